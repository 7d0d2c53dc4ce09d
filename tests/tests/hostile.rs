//! The real `vmcred-host` against a guest that lies (`hostile_guest`), next
//! to a real guest agent that must not notice: absurd generations, floods,
//! busy and refusal statuses, stalls, connections closed after TLS, owed
//! unit actions. Real processes, real TLS, real files, through the
//! hybrid-vsock muxer stand-in. Build the binaries first (`cargo build
//! --bins`).

use std::process::Output;
use std::time::Duration;

use tonic::Code;
use vmcred_tests::hostile_guest::{HostileGuest, Mode};
use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const GOOD: &str = "good";
const BAD: &str = "bad";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A world with a real guest (`good`, credential A) and the double
/// (`bad`, credential S) in `mode`, both synced or refused once.
fn world(mode: Mode) -> (World, HostileGuest) {
    let mut w = World::new().expect("world");
    w.add_vm(GOOD, false).unwrap();
    w.add_vm(BAD, false).unwrap();
    w.set_secret(GOOD, "A", b"good-1", false).unwrap();
    w.set_secret(BAD, "S", b"bad-1", false).unwrap();
    let bad = w.start_hostile(BAD, mode).unwrap();
    w.start_host().unwrap();
    w.boot_guest(GOOD).unwrap();
    w.wait_for_guest_value(GOOD, "A", b"good-1", T).unwrap();
    (w, bad)
}

fn status_of(w: &World, vm: &str) -> serde_json::Value {
    let st = w.status_json().unwrap();
    st.as_array()
        .unwrap()
        .iter()
        .find(|s| s["vm"] == vm)
        .cloned()
        .unwrap_or_else(|| panic!("{vm} not in status: {st}"))
}

/// The good VM still rotates: the hostile one costs it nothing.
fn good_still_rotates(w: &mut World, value: &[u8]) {
    w.set_secret(GOOD, "A", value, false).unwrap();
    let out = w.rotate(GOOD, &["A"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(w.read_guest(GOOD, "A").unwrap(), value);
}

/// No raw control, bidi or separator character from the guest reaches an
/// operator's terminal.
fn assert_escaped(s: &str) {
    for bad in ['\u{1b}', '\u{202e}', '\u{2028}', '\u{200b}', '\u{7}'] {
        assert!(!s.contains(bad), "raw {bad:?} in output: {s:.2000}");
    }
}

fn ok_generations(bad: &HostileGuest) -> Vec<u64> {
    bad.applies()
        .into_iter()
        .filter(|a| a.3 == Code::Ok)
        .map(|a| a.0)
        .collect()
}

#[test]
fn a_guest_claiming_u64_max_cannot_wedge_rotations_across_restarts_and_state_loss() {
    let (mut w, bad) = world(Mode::ClaimMax);
    wait_until(T, || !bad.applies().is_empty()).expect("the host pushes to the liar");

    // The host keeps issuing its own numbers; the liar refuses them and
    // that is reported for that VM only.
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not newer"), "{}", text(&out));
    assert_escaped(&text(&out));
    let st = status_of(&w, BAD);
    assert_eq!(st["generation_applied"].as_u64(), Some(u64::MAX), "{st}");
    let sent = st["generation_sent"].as_u64().unwrap();
    assert!(
        sent < u64::MAX / 2,
        "the claim became the host's counter: {st}"
    );
    good_still_rotates(&mut w, b"good-2");

    // Not after a restart either, nor after a config rebuild.
    w.stop_host().unwrap();
    w.start_host().unwrap();
    w.reload_host_applied().unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(text(&out).contains("not newer"), "{}", text(&out));
    good_still_rotates(&mut w, b"good-3");
    let gens: Vec<u64> = bad.applies().iter().map(|a| a.0).collect();
    assert!(gens.iter().all(|g| *g < u64::MAX / 2), "{gens:?}");
    assert!(gens.windows(2).all(|p| p[0] < p[1]), "{gens:?}");

    // The guest agent restarts with fresh state: it syncs again.
    bad.reset(Mode::Honest);
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bad.held("S").unwrap(), b"bad-2");

    // The host loses its state directory (key kept, generations gone):
    // time-based generations still pass what the guest applied, at the
    // latest once the clock passes the last reserved mark (a few seconds).
    w.kill_host().unwrap();
    std::fs::remove_dir_all(w.path().join("host-state/generations")).unwrap();
    w.set_secret(BAD, "S", b"bad-3", false).unwrap();
    w.start_host().unwrap();
    wait_until(T, || bad.held("S").as_deref() == Some(b"bad-3".as_slice()))
        .expect("synced after state loss");
    let ok = ok_generations(&bad);
    assert!(
        ok.windows(2).all(|p| p[0] < p[1]),
        "applied went back: {ok:?}"
    );
    good_still_rotates(&mut w, b"good-4");
}

#[test]
fn a_flooding_guest_is_bounded_escaped_and_believed_in_nothing() {
    let (mut w, bad) = world(Mode::Flood);
    wait_until(T, || status_of(&w, BAD)["guest_version"].is_string()).expect("hello seen");

    let out = w.rotate(BAD, &[], "30s").unwrap();
    let report = text(&out);
    assert!(
        report.len() < 64 * 1024,
        "rotate output is {} bytes",
        report.len()
    );
    assert!(
        !out.status.success(),
        "owed actions were claimed: {report:.3000}"
    );
    assert!(report.contains("more"), "{report:.3000}");
    assert_escaped(&report);

    let st = w.host_cmd(&["status", "--json"]).unwrap();
    // Exit 1: this VM owes unit actions, so it is out of sync; anything
    // else (2 usage, 3 unreachable, 4 config) would be a failure here.
    assert_eq!(st.status.code(), Some(1), "{}", text(&st));
    assert!(
        st.stdout.len() < 128 * 1024,
        "status is {} bytes",
        st.stdout.len()
    );
    assert_escaped(&String::from_utf8_lossy(&st.stdout));
    let human = w.host_cmd(&["status"]).unwrap();
    assert_escaped(&text(&human));
    let s = status_of(&w, BAD);
    let owed = s["owed_units"].as_array().unwrap();
    assert!(owed.len() <= 65, "{}", owed.len());
    assert!(owed.last().unwrap()["unit"]
        .as_str()
        .unwrap()
        .contains("more"));
    assert!(
        s["guest_version"].as_str().unwrap().chars().count() < 100,
        "{s}"
    );

    // What it claimed to hold decides nothing beyond its own VM: the host
    // removes only valid names, a bounded number at a time, and never a
    // name it was not told about by a valid entry.
    for (_, _, removals, _) in bad.applies() {
        assert!(removals.len() <= 1000);
        for r in &removals {
            assert!(r.starts_with("NOT_CONFIGURED_"), "{r:?}");
        }
    }
    // And nothing it said became host state.
    let mark = std::fs::read_to_string(w.path().join("host-state/generations/reserved")).unwrap();
    assert!(mark.trim().parse::<u64>().unwrap() < u64::MAX / 2);
    assert_eq!(bad.held("S").unwrap(), b"bad-1");
    good_still_rotates(&mut w, b"good-2");
}

#[test]
fn a_busy_guest_gets_the_same_content_again_on_the_same_connection() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    let connections = bad.accepts.load(std::sync::atomic::Ordering::SeqCst);
    bad.set_mode(Mode::Busy(2));
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let applies = bad.applies();
    let last3 = &applies[applies.len() - 3..];
    assert_eq!(
        last3.iter().map(|a| a.3).collect::<Vec<_>>(),
        [Code::Aborted, Code::Aborted, Code::Ok]
    );
    assert!(
        last3.iter().all(|a| a.0 == last3[0].0 && a.1 == ["S"]),
        "{last3:?}"
    );
    assert_eq!(
        bad.accepts.load(std::sync::atomic::Ordering::SeqCst),
        connections,
        "busy is not a lost connection"
    );

    // Busy for longer than the host retries: reported, then the next
    // rotate gets through with a higher generation.
    bad.set_mode(Mode::Busy(100));
    w.set_secret(BAD, "S", b"bad-3", false).unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("busy"), "{}", text(&out));
    bad.set_mode(Mode::Honest);
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bad.held("S").unwrap(), b"bad-3");
    let ok = ok_generations(&bad);
    assert!(ok.windows(2).all(|p| p[0] < p[1]), "{ok:?}");
}

#[test]
fn an_ack_for_another_generation_is_not_applied() {
    let (w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    bad.set_mode(Mode::WrongAck);
    let mut w = w;
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("did not apply"), "{}", text(&out));
    good_still_rotates(&mut w, b"good-2");
}

#[test]
fn owed_unit_actions_keep_rotate_failing_until_the_guest_has_done_them() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    bad.set_mode(Mode::Owes(vec!["broken.service".into()]));
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("owes"), "{}", text(&out));
    let st = status_of(&w, BAD);
    assert_eq!(st["owed_units"][0]["unit"], "broken.service", "{st}");

    // Nothing changed, but the action is still owed: the rotate asks the
    // guest again (same bytes, new generation) and still fails.
    let before = bad.applies().len();
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let applies = bad.applies();
    assert_eq!(applies.len(), before + 1);
    assert_eq!(applies.last().unwrap().1, ["S"]);

    // Once the guest manages it, rotate succeeds and status clears.
    bad.set_mode(Mode::Honest);
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        status_of(&w, BAD)["owed_units"].as_array().unwrap().len(),
        0
    );
}

#[test]
fn a_stalled_guest_does_not_hold_up_other_vms_or_status() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    bad.set_mode(Mode::HangApply);
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    let hung = w.rotate_in_background(BAD, &["S"], "3s");
    // While BAD's Apply hangs, GOOD rotates and status answers.
    good_still_rotates(&mut w, b"good-2");
    assert!(w.status_json().is_ok());
    let out = hung.join().unwrap().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("timed out"), "{}", text(&out));
}

/// A connect with no next key pin to hand over is Hello (which also proves
/// the guest accepted the host key) and the Apply it calls for: no `Trust`
/// probe, one round trip fewer for each of many VMs at a host start.
#[test]
fn a_connect_is_one_hello_and_one_apply() {
    let (w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").as_deref() == Some(b"bad-1".as_slice())).unwrap();
    let (hellos, trusts, applies) = {
        let st = bad.state.lock().unwrap();
        (st.hellos, st.trusts, st.applies.len())
    };
    assert_eq!(
        (hellos, trusts, applies),
        (1, 0, 1),
        "calls of one connect (hello, trust, apply); host log:\n{}",
        w.logs()
    );
}

#[test]
fn a_guest_that_hangs_up_after_tls_is_redialled_with_a_growing_back_off() {
    let (w, bad) = world(Mode::CloseAfterTls);
    // Each session ends before the guest is in sync, so the back-off is
    // not reset by the (successful) connect: attempts keep counting up.
    let bad_attempt = |n: u32| {
        w.logs().lines().any(|l| {
            l.contains("redialling") && l.contains("vm=bad") && l.contains(&format!("attempt={n} "))
        })
    };
    wait_until(T, || bad_attempt(5)).unwrap_or_else(|_| {
        panic!(
            "back-off reset on every connect: {}",
            w.logs()
                .lines()
                .filter(|l| l.contains("redialling"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(bad.accepts.load(std::sync::atomic::Ordering::SeqCst) >= 5);
}

#[test]
fn check_config_refuses_temp_file_and_uncarriable_boot_names() {
    for (name, boot, want) in [
        (".API_KEY.vmcred-tmp", false, "temporary files"),
        ("x.vmcred-tmp", false, "temporary files"),
        ("x=y", true, "boot = true"),
        ("a,b", true, "boot = true"),
    ] {
        let mut w = World::new().unwrap();
        w.add_vm(GOOD, false).unwrap();
        w.set_secret(GOOD, name, b"v", boot).unwrap();
        w.write_config("").unwrap();
        let out = w.host_cmd(&["check-config"]).unwrap();
        assert!(!out.status.success(), "{name}: {}", text(&out));
        assert!(text(&out).contains(want), "{name}: {}", text(&out));
        // serve refuses it too, at once.
        let mut serve = std::process::Command::new(&w.bins.host)
            .args(["serve", "--config"])
            .arg(w.config_path())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut exited = None;
        wait_until(T, || {
            exited = serve.try_wait().unwrap();
            exited.is_some()
        })
        .unwrap_or_else(|_| {
            let _ = serve.kill();
            panic!("{name}: serve accepted the config");
        });
        assert!(!exited.unwrap().success(), "{name}");
    }
    // The same name without boot = true is fine.
    let mut w = World::new().unwrap();
    w.add_vm(GOOD, false).unwrap();
    w.set_secret(GOOD, "x=y", b"v", false).unwrap();
    w.write_config("").unwrap();
    let out = w.host_cmd(&["check-config"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_fifo_source_is_reported_and_the_vm_goes_on() {
    let mut w = World::new().unwrap();
    w.add_vm(GOOD, false).unwrap();
    w.set_secret(GOOD, "A", b"good-1", false).unwrap();
    w.set_secret(GOOD, "F", b"placeholder", false).unwrap();
    let fifo = w.creds[GOOD]["F"].0.clone();
    std::fs::remove_file(&fifo).unwrap();
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    w.start_host().unwrap();
    w.boot_guest(GOOD).unwrap();
    w.wait_for_guest_value(GOOD, "A", b"good-1", T).unwrap();
    let out = w.rotate(GOOD, &[], "30s").unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));
    let st = status_of(&w, GOOD);
    assert_eq!(st["connected"], true, "{st}");
    let f = st["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "F")
        .cloned()
        .unwrap();
    assert_eq!(f["state"], "source-error", "{st}");
    good_still_rotates(&mut w, b"good-2");
    w.stop_host().expect("SIGTERM still stops the agent");
}

#[test]
fn a_reset_mid_apply_is_a_lost_connection_resolved_by_what_the_guest_holds() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    let accepts = bad.accepts.load(std::sync::atomic::Ordering::SeqCst);
    bad.set_mode(Mode::ResetMidApply);
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    // The guest applies, then the connection dies before the answer: the
    // host redials, sees the guest holds the new value, and only then
    // reports the rotation applied.
    let out = w.rotate(BAD, &["S"], "30s").unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(bad.resets.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(bad.accepts.load(std::sync::atomic::Ordering::SeqCst) > accepts);
    assert_eq!(bad.held("S").unwrap(), b"bad-2");
    good_still_rotates(&mut w, b"good-2");
}

/// A rotation that waits for a redial (the session it was sent on was
/// lost) is answered only by a session that carries it through: when the
/// next session's push of it is lost too, it waits again instead of being
/// dropped with every other waiting rotation (found by the `host_session`
/// fuzz target: `rotate` exited at once with an internal error).
#[test]
fn a_waiting_rotation_survives_a_session_lost_while_it_is_pushed() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    // Every new session's connect sync is refused (a report, the session
    // goes on); the push after it resets the connection.
    bad.set_mode(Mode::RefuseThenReset);
    bad.cut();
    let rotate = w.rotate_in_background(BAD, &["S"], "30s");
    // A session whose connect sync was refused, whose push of the waiting
    // rotation was reset, and a redial after it.
    let lost_in_a_later_session = || {
        let codes: Vec<Code> = bad.applies().into_iter().map(|a| a.3).collect();
        codes.windows(3).any(|w| {
            w == [
                Code::InvalidArgument,
                Code::Unavailable,
                Code::InvalidArgument,
            ]
        })
    };
    wait_until(T, lost_in_a_later_session)
        .unwrap_or_else(|_| panic!("applies {:?}\nhost log:\n{}", bad.applies(), w.logs()));
    bad.set_mode(Mode::Honest);
    let out = rotate.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}\nhost log:\n{}",
        text(&out),
        w.logs()
    );
    assert_eq!(bad.held("S").unwrap(), b"bad-2");
    good_still_rotates(&mut w, b"good-2");
}

/// A guest that takes every connect sync and then drops the push of the
/// rotation waiting for it does not get redialled at the back-off's floor
/// for as long as the rotation waits: such a session does not count as
/// synced, so the back-off keeps growing (before, every session reset it,
/// and the host made a full handshake and connect sync every 20-250 ms).
#[test]
fn a_guest_that_drops_every_waiting_push_is_redialled_with_growing_back_off() {
    let (mut w, bad) = world(Mode::Honest);
    wait_until(T, || bad.held("S").is_some()).unwrap();
    w.set_secret(BAD, "S", b"bad-2", false).unwrap();
    bad.set_mode(Mode::RefuseThenReset);
    bad.cut();
    let rotate = w.rotate_in_background(BAD, &["S"], "60s");
    let resets = || bad.resets.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(T, || resets() >= 4)
        .unwrap_or_else(|_| panic!("resets {}\nhost log:\n{}", resets(), w.logs()));
    // The back-off attempts the host logged for this VM's redials.
    let logs = w.logs();
    let attempts: Vec<u32> = logs
        .lines()
        .filter(|l| l.contains("redialling after back-off") && l.contains(&format!("vm={BAD}")))
        .filter_map(|l| {
            let at = l
                .split_whitespace()
                .find_map(|f| f.strip_prefix("attempt="))?;
            at.parse().ok()
        })
        .collect();
    assert!(
        attempts.iter().any(|a| *a >= 3),
        "the back-off was reset by sessions that dropped the waiting push: attempts {attempts:?}\nhost log:\n{logs}"
    );
    bad.set_mode(Mode::Honest);
    let out = rotate.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}\nhost log:\n{}",
        text(&out),
        w.logs()
    );
    assert_eq!(bad.held("S").unwrap(), b"bad-2");
    good_still_rotates(&mut w, b"good-2");
}

#[test]
fn an_oversized_reply_costs_only_its_own_vm() {
    let (mut w, bad) = world(Mode::Oversized);
    let mut st = serde_json::Value::Null;
    wait_until(T, || {
        st = status_of(&w, BAD);
        st["last_error"].is_string() && st["connected"] == false
    })
    .unwrap();
    let e = st["last_error"].as_str().unwrap();
    assert!(e.chars().count() < 2100, "{e}");
    assert_escaped(e);
    assert!(bad.held("S").is_none());
    good_still_rotates(&mut w, b"good-2");
    let out = w.rotate(BAD, &["S"], "2s").unwrap();
    assert!(!out.status.success());
}
