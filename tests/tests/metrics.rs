//! The host agent's metrics, end to end: a real agent and a real guest;
//! `GET /metrics` on the metrics socket and the node-exporter textfile are
//! parsed as the Prometheus text format, and their values follow a
//! rotation and the guest going away. Build the binaries first (`cargo
//! build --bins`; tests/run.sh does).

use std::time::Duration;

use vmcred_tests::prom::{self, Exposition};
use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const VM: &str = "vm1";

fn scrape(w: &World) -> Exposition {
    let (code, ctype, body) = prom::scrape(&w.path().join("run/metrics.sock")).expect("scrape");
    assert_eq!(code, 200, "{body}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    prom::parse(&body).unwrap_or_else(|e| panic!("{e:#}\n{body}"))
}

fn v(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.get(name, labels)
        .unwrap_or_else(|| panic!("no single sample {name}{labels:?}"))
}

#[test]
fn metrics_follow_rotation_and_a_lost_guest() {
    let mut w = World::new().unwrap();
    w.add_vm(VM, false).unwrap();
    w.add_vm("never-up", false).unwrap();
    w.set_secret(VM, "API_KEY", b"v1-0123", false).unwrap();
    w.set_secret("never-up", "X", b"x", false).unwrap();
    let textfile = w.path().join("textfile/vmcred.prom");
    std::fs::create_dir_all(textfile.parent().unwrap()).unwrap();
    w.extra_config = format!(
        "metrics_socket = \"{}\"\nmetrics_textfile = \"{}\"\nmetrics_interval = \"1s\"\nkeepalive_interval = \"1s\"\n",
        w.path().join("run/metrics.sock").display(),
        textfile.display()
    );
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"v1-0123", T)
        .unwrap();

    let vm = [("vm", VM)];
    let mut before = scrape(&w);
    wait_until(T, || {
        before = scrape(&w);
        before
            .get("vmcred_vm_last_success_timestamp_seconds", &vm)
            .is_some()
    })
    .expect("a last success after the first sync");
    assert_eq!(v(&before, "vmcred_vms", &[]), 2.0);
    assert_eq!(v(&before, "vmcred_vms_connected", &[]), 1.0);
    assert_eq!(v(&before, "vmcred_vm_connected", &vm), 1.0);
    assert_eq!(
        v(&before, "vmcred_vm_connected", &[("vm", "never-up")]),
        0.0
    );
    assert!(before
        .get(
            "vmcred_vm_last_success_timestamp_seconds",
            &[("vm", "never-up")]
        )
        .is_none());
    assert_eq!(
        v(
            &before,
            "vmcred_vm_credentials",
            &[("vm", "never-up"), ("state", "pending")]
        ),
        1.0,
        "a VM that never came up shows its credential as pending"
    );
    assert!(
        v(
            &before,
            "vmcred_vm_failures_total",
            &[("vm", "never-up"), ("kind", "unreachable")]
        ) >= 1.0
    );
    let sent = v(&before, "vmcred_vm_generation_sent", &vm);
    assert!(
        sent > 1.0e15,
        "a generation is wall-clock microseconds: {sent}"
    );
    assert_eq!(
        v(&before, "vmcred_vm_generation_applied_claimed", &vm),
        sent
    );
    assert_eq!(
        v(
            &before,
            "vmcred_vm_credentials",
            &[("vm", VM), ("state", "applied")]
        ),
        1.0
    );
    let count = v(&before, "vmcred_vm_rotation_seconds_count", &vm);
    assert!(count >= 1.0);
    assert_eq!(
        v(
            &before,
            "vmcred_vm_rotation_seconds_bucket",
            &[("vm", VM), ("le", "+Inf")]
        ),
        count
    );

    // A rotation moves the generations and adds one latency observation.
    w.set_secret(VM, "API_KEY", b"v2-4567", false).unwrap();
    let out = w.rotate(VM, &["API_KEY"], "20s").unwrap();
    assert!(out.status.success(), "{out:?}");
    let after = scrape(&w);
    let sent2 = v(&after, "vmcred_vm_generation_sent", &vm);
    assert!(sent2 > sent, "{sent2} > {sent}");
    assert_eq!(
        v(&after, "vmcred_vm_generation_applied_claimed", &vm),
        sent2
    );
    assert_eq!(
        v(&after, "vmcred_vm_rotation_seconds_count", &vm),
        count + 1.0
    );
    assert!(
        v(&after, "vmcred_vm_last_success_timestamp_seconds", &vm)
            >= v(&before, "vmcred_vm_last_success_timestamp_seconds", &vm)
    );
    assert_eq!(
        v(&after, "vmcred_rotation_seconds_count", &[]),
        v(&after, "vmcred_vm_rotation_seconds_count", &vm)
            + v(
                &after,
                "vmcred_vm_rotation_seconds_count",
                &[("vm", "never-up")]
            )
    );

    // The textfile says the same, in the same format, without a stray
    // temporary file for node-exporter to read.
    let mut file = Exposition::default();
    wait_until(T, || {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        match prom::parse(&text) {
            Ok(e) => {
                file = e;
                file.get("vmcred_vm_generation_sent", &vm) == Some(sent2)
            }
            Err(e) => panic!("{e:#}\n{text}"),
        }
    })
    .expect("the textfile follows the rotation");
    let entries: Vec<String> = std::fs::read_dir(textfile.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["vmcred.prom"]);

    // The guest goes away: disconnected, and the failure is counted.
    w.kill_guest_agent(VM).unwrap();
    let mut gone = scrape(&w);
    wait_until(T, || {
        gone = scrape(&w);
        gone.get("vmcred_vm_connected", &vm) == Some(0.0)
    })
    .expect("the lost guest shows as disconnected");
    let failures = |e: &Exposition| {
        ["session_lost", "unreachable"]
            .iter()
            .map(|k| v(e, "vmcred_vm_failures_total", &[("vm", VM), ("kind", k)]))
            .sum::<f64>()
    };
    wait_until(T, || failures(&scrape(&w)) >= 1.0).expect("the loss is counted");
    let fleet = scrape(&w);
    assert!(v(&fleet, "vmcred_failures_total", &[("kind", "unreachable")]) >= 1.0);
    assert_eq!(v(&fleet, "vmcred_vms_connected", &[]), 0.0);

    // A VM removed from the config leaves the metrics at reload.
    w.guests.remove("never-up");
    w.creds.remove("never-up");
    w.reload_host().unwrap();
    wait_until(T, || v(&scrape(&w), "vmcred_vms", &[]) == 1.0).expect("reload");
    let e = scrape(&w);
    assert!(e
        .samples
        .iter()
        .all(|s| s.labels.get("vm").map(String::as_str) != Some("never-up")));
}

#[test]
fn metrics_socket_answers_only_get_metrics() {
    use std::io::{Read, Write};
    let mut w = World::new().unwrap();
    w.add_vm(VM, false).unwrap();
    w.extra_config = format!(
        "metrics_socket = \"{}\"\n",
        w.path().join("run/metrics.sock").display()
    );
    w.start_host().unwrap();
    let sock = w.path().join("run/metrics.sock");
    wait_until(T, || sock.exists()).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let ask = |req: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        ask("GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .starts_with("HTTP/1.1 404")
    );
    assert!(ask(
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .starts_with("HTTP/1.1 405"));
    // Garbage is refused without harming the next scrape.
    let _ = ask("\u{1b}[2J not http\r\n\r\n");
    let (code, _, body) = prom::scrape(&sock).unwrap();
    assert_eq!(code, 200);
    prom::parse(&body).unwrap();
}
