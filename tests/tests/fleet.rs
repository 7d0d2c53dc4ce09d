//! What the fleet-scale changes must not break: the CLI reads only the
//! head of the config and lets the agent judge names (still exit 2 at
//! once), and the rarer keepalive still notices a guest that went away.
//! Real agents behind the muxer stand-in; no timed assertions.

use std::io::Write;
use std::time::Duration;

use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const VM: &str = "vm1";

fn booted(extra_config: &str) -> World {
    vmcred_tests::booted_one(VM, "token", b"one", extra_config, T).expect("booted")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config with thousands of VMs after the head, and a tail the CLI must
/// never need (here: not even valid TOML). Rotate still works, and names
/// the running agent does not know are still usage errors, exit 2.
#[test]
fn cli_reads_only_the_config_head_and_the_agent_refuses_unknown_names() {
    let mut w = booted("");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(w.config_path())
        .expect("config");
    for i in 0..5000 {
        writeln!(
            f,
            "[vms.bulk{i}]\ncid = {}\n[vms.bulk{i}.credentials.a]\npath = \"/nonexistent\"",
            i + 3
        )
        .expect("append");
    }
    writeln!(f, "this line is not TOML").expect("append");
    drop(f);

    w.set_secret(VM, "token", b"two", false).expect("secret");
    let out = w.host_cmd(&["rotate", VM]).expect("rotate");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(w.read_guest(VM, "token").as_deref(), Some(&b"two"[..]));

    for args in [
        &["rotate", "nosuchvm"][..],
        &["rotate", VM, "nosuchcred"][..],
        &["rotate", "--vm", VM, "--vm", "nosuchvm"][..],
        &["status", "--vm", "nosuchvm"][..],
    ] {
        let out = w.host_cmd(args).expect("cli");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("nosuch"), "{args:?}: {}", text(&out));
    }
    // Nothing was pushed by the refused rotations.
    assert_eq!(w.read_guest(VM, "token").as_deref(), Some(&b"two"[..]));
}

/// The keepalive probe still finds out that the guest agent is gone, with
/// no rotate or launch to trigger it.
#[test]
fn keepalive_notices_a_dead_guest() {
    let mut w = booted("keepalive_interval = \"1s\"");
    let connected = |w: &World| {
        w.status_json()
            .ok()
            .and_then(|v| v[0]["connected"].as_bool())
            == Some(true)
    };
    wait_until(T, || connected(&w)).expect("connected");
    w.kill_guest_agent(VM).expect("kill");
    wait_until(T, || !connected(&w)).expect("the host noticed the guest is gone");
}

/// `keepalive_interval` is checked like every other key: a value that is
/// not a duration is a config error (exit 4), not a silent default.
#[test]
fn keepalive_interval_must_be_a_duration() {
    let w = World::new().expect("world");
    w.write_config("keepalive_interval = \"often\"")
        .expect("config");
    let out = w.host_cmd(&["check-config"]).expect("check-config");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
}
