//! The launch key (H1): another VM started on a stopped VM's CID, running a
//! stock guest agent with the VM's public bootstrap, must get none of its
//! credentials. Real `vmcred-host serve` and `launch --dry-run`, real
//! guest agents and the hostile double, real TLS, through the hybrid-vsock
//! muxer stand-in (the CID itself is the VM stage's: `tests/vm/nested.sh`).
//! Build the binaries first (`cargo build --bins`).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use vmcred_tests::hostile_guest::Mode;
use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const VM: &str = "a";
const SECRET: &[u8] = b"launch-key-secret-1";

fn status_of(w: &World, vm: &str) -> serde_json::Value {
    let st = w.status_json().expect("status");
    st.as_array()
        .expect("status list")
        .iter()
        .find(|s| s["vm"] == vm)
        .cloned()
        .unwrap_or_else(|| panic!("{vm} not in status: {st}"))
}

/// Waits until `status` shows `state` as the VM's launch key state.
fn wait_for_launch_key(w: &World, state: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let seen = wait_until(T, || {
        last = status_of(w, VM);
        last["launch_key"] == state
    });
    assert!(seen.is_ok(), "launch_key never became {state:?}: {last}");
    last
}

fn world_requiring_the_key() -> World {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.set_secret(VM, "token", SECRET, false).expect("secret");
    w.start_host().expect("host");
    w
}

fn no_secret_anywhere(w: &World) {
    let logs = w.logs();
    assert!(
        !logs.contains(std::str::from_utf8(SECRET).expect("utf8")),
        "a value reached a log"
    );
    let key = std::fs::read_to_string(w.launch_key_path(VM)).expect("key");
    assert!(!logs.contains(&key), "the launch key reached a log");
}

#[test]
fn the_agent_makes_a_private_key_per_required_vm_before_it_is_ready() {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.add_vm("b", false).expect("vm b");
    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.start_host().expect("host");
    // The control socket exists: the agent is past its start.
    let key = w.launch_key_path(VM);
    let meta = std::fs::metadata(&key).expect("the key exists once the agent is up");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(key.parent().expect("dir")).expect("dir");
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    assert!(
        !w.launch_key_path("b").exists(),
        "a VM with launch_key off has no key"
    );
    let first = std::fs::read(&key).expect("read");
    w.stop_host().expect("stop");
    w.start_host().expect("restart");
    assert_eq!(
        std::fs::read(&key).expect("read"),
        first,
        "a restart keeps the key"
    );
    assert_eq!(status_of(&w, VM)["launch_key"], "unchecked");
    assert_eq!(status_of(&w, "b")["launch_key"], "off");
}

#[test]
fn a_vm_on_the_same_address_without_the_key_gets_nothing_and_the_launched_vm_gets_it() {
    let mut w = world_requiring_the_key();
    // The impostor has the public bootstrap and no key.
    let imported = w.boot_impostor(VM, None).expect("impostor");
    assert!(imported.iter().any(|n| n == "vmcred.bootstrap"), "{imported:?}");
    let st = wait_for_launch_key(&w, "missing");
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("did not return VM a's launch key"), "{st}");
    assert_eq!(w.read_guest(VM, "token"), None, "the impostor got the value");
    // A rotate does not push to it either.
    let out = w.rotate(VM, &["token"], "3s").expect("rotate");
    assert!(!out.status.success(), "rotate to an impostor succeeded");
    assert_eq!(w.read_guest(VM, "token"), None);

    // Another key than the VM's: refused as a mismatch.
    w.kill_guest_agent(VM).expect("kill");
    let forged = [b'0'; 64];
    w.boot_impostor(VM, Some(&forged)).expect("forged");
    let st = wait_for_launch_key(&w, "mismatch");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("not VM a's"),
        "{st}"
    );
    assert_eq!(w.read_guest(VM, "token"), None);

    // The VM started through `vmcred-host launch` carries the key.
    w.kill_guest_agent(VM).expect("kill");
    let imported = w.boot_guest(VM).expect("boot");
    assert!(
        imported.iter().any(|n| n == "vmcred.launch-key"),
        "launch passed no key: {imported:?}"
    );
    w.wait_for_guest_value(VM, "token", SECRET, T)
        .expect("the launched VM is served");
    let st = wait_for_launch_key(&w, "verified");
    assert!(st["last_error"].is_null(), "{st}");
    no_secret_anywhere(&w);
}

#[test]
fn a_hostile_guest_s_oversized_key_is_refused_and_nothing_is_pushed() {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.set_secret(VM, "token", SECRET, false).expect("secret");
    let double = w.start_hostile(VM, Mode::Honest).expect("double");
    double.state.lock().expect("state").launch_key = vec![b'k'; 100_000];
    w.start_host().expect("host");
    wait_for_launch_key(&w, "mismatch");
    let st = double.state.lock().expect("state");
    assert!(st.hellos >= 1, "the host never said hello");
    assert!(st.applies.is_empty(), "pushed to a refused guest: {:?}", st.applies);
}

#[test]
fn turning_the_key_on_by_reload_refuses_a_connected_guest_without_it() {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.set_secret(VM, "token", SECRET, false).expect("secret");
    w.start_host().expect("host");
    // Booted while the key was off: launch passed none.
    w.boot_guest(VM).expect("boot");
    w.wait_for_guest_value(VM, "token", SECRET, T)
        .expect("served while off");
    assert_eq!(status_of(&w, VM)["launch_key"], "off");

    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.set_secret(VM, "token", b"launch-key-secret-2", false)
        .expect("secret 2");
    w.reload_host_applied().expect("reload");
    wait_for_launch_key(&w, "missing");
    assert_eq!(
        w.read_guest(VM, "token").as_deref(),
        Some(SECRET),
        "the reload pushed the new value to a guest that cannot prove its launch"
    );
    assert!(w.launch_key_path(VM).exists(), "the reload made the key");
}
