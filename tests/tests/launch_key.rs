//! The launch key (H1): another VM started on a stopped VM's CID, running a
//! stock guest agent with the VM's public bootstrap, must get none of its
//! credentials. Real `vmcred-host serve` and `launch --dry-run`, real
//! guest agents and the hostile double, real TLS, through the hybrid-vsock
//! muxer stand-in (the CID itself is the VM stage's: `tests/vm/nested.sh`).
//! Build the binaries first (`cargo build --bins`).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use vmcred_tests::hostile_guest::{HostileGuest, Mode};
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

/// VM `a` requires the key and holds SECRET; the hostile double (honest
/// until told otherwise) answers in its place. The host is not started.
fn keyed_vm_with_double() -> (World, HostileGuest) {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.set_secret(VM, "token", SECRET, false).expect("secret");
    let double = w.start_hostile(VM, Mode::Honest).expect("double");
    (w, double)
}

/// VMs `a` and `b` require the key (b's is another VM's real key).
fn world_requiring_the_key() -> World {
    let mut w = World::new().expect("world");
    for vm in [VM, "b"] {
        w.add_vm(vm, false).expect("vm");
        w.guests.get_mut(vm).expect("guest").launch_key = true;
    }
    w.set_secret(VM, "token", SECRET, false).expect("secret");
    w.start_host().expect("host");
    w
}

/// A rotate must fail (nothing can be pushed) and leave the guest without
/// the value. It waits 3 s, past at least one redial (the back-off is at
/// most 1 s here), so a push that came after the refusal was recorded
/// would be seen.
fn nothing_reaches(w: &World) {
    let out = w.rotate(VM, &["token"], "3s").expect("rotate");
    assert!(
        !out.status.success(),
        "rotate to an unproven guest succeeded"
    );
    assert_eq!(w.read_guest(VM, "token"), None, "the guest got the value");
}

fn no_secret_anywhere(w: &World) {
    let logs = w.logs();
    assert!(
        !logs.contains(std::str::from_utf8(SECRET).expect("utf8")),
        "a value reached a log"
    );
    for vm in [VM, "b"] {
        let key = std::fs::read_to_string(w.launch_key_path(vm)).expect("key");
        assert!(!logs.contains(&key), "a launch key reached a log");
    }
}

/// Counts the host's refusals that name a wrong key for `a`.
fn mismatches(w: &World) -> usize {
    w.logs().matches("not VM a's").count()
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
    assert!(
        imported.iter().any(|n| n == "vmcred.bootstrap"),
        "{imported:?}"
    );
    let st = wait_for_launch_key(&w, "missing");
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("did not return VM a's launch key"), "{st}");
    // What it claims is not shown as the VM's.
    assert!(st["guest_version"].is_null(), "{st}");
    nothing_reaches(&w);

    // Another VM's real key: a mismatch.
    w.kill_guest_agent(VM).expect("kill");
    let b_key = std::fs::read(w.launch_key_path("b")).expect("b's key");
    let before = mismatches(&w);
    w.boot_impostor(VM, Some(&b_key)).expect("b's key on a");
    wait_until(T, || mismatches(&w) > before).expect("b's key refused on a");
    assert_eq!(status_of(&w, VM)["launch_key"], "mismatch");
    nothing_reaches(&w);

    // The VM's own key with its last digit changed.
    w.kill_guest_agent(VM).expect("kill");
    let mut forged = std::fs::read(w.launch_key_path(VM)).expect("a's key");
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let before = mismatches(&w);
    w.boot_impostor(VM, Some(&forged)).expect("forged");
    wait_until(T, || mismatches(&w) > before).expect("the forged key refused");
    nothing_reaches(&w);

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
    assert!(st["guest_version"].is_string(), "{st}");
    no_secret_anywhere(&w);
}

#[test]
fn a_hostile_guest_s_oversized_key_is_refused_and_nothing_is_pushed() {
    let (mut w, double) = keyed_vm_with_double();
    double.state.lock().expect("state").launch_key = vec![b'k'; 100_000];
    w.start_host().expect("host");
    wait_for_launch_key(&w, "mismatch");
    // Past a redial: a push after the refusal was recorded would be here.
    wait_until(T, || double.state.lock().is_ok_and(|s| s.hellos >= 2)).expect("redialled");
    let st = double.state.lock().expect("state");
    assert!(
        st.applies.is_empty(),
        "pushed to a refused guest: {:?}",
        st.applies
    );
}

#[test]
fn an_unproven_guest_is_not_handed_the_next_host_key_pin_nor_believed() {
    let (mut w, double) = keyed_vm_with_double();
    w.start_host().expect("host");
    wait_for_launch_key(&w, "missing");
    let out = w
        .host_cmd(&["rotate-key", "prepare", "--timeout", "5s"])
        .expect("prepare");
    let hellos = double.state.lock().expect("state").hellos;
    wait_until(T, || {
        double.state.lock().is_ok_and(|s| s.hellos > hellos + 1)
    })
    .expect("redialled after prepare");
    let st = double.state.lock().expect("state");
    assert_eq!(
        st.trusts,
        0,
        "Trust reached a guest that did not prove its launch ({})",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(st.applies.is_empty(), "{:?}", st.applies);
    drop(st);
    let st = status_of(&w, VM);
    assert_eq!(st["guest_pins"], serde_json::json!([]), "{st}");
    assert!(
        st["guest_version"].is_null(),
        "its claims were believed: {st}"
    );
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
    let out = w.rotate(VM, &["token"], "3s").expect("rotate");
    assert!(
        !out.status.success(),
        "rotate to an unproven guest succeeded"
    );
    assert_eq!(
        w.read_guest(VM, "token").as_deref(),
        Some(SECRET),
        "the reload pushed the new value to a guest that cannot prove its launch"
    );
    assert!(w.launch_key_path(VM).exists(), "the reload made the key");
}

/// A reload turns the key on while the VM task is busy in a push and a
/// rotate waits in its queue ahead of the reload's new config: the rotate
/// must not reach the guest, which never proved its launch. (What stops it
/// is the check before every push against the agent's set of VMs that
/// require a key, not the task's own copy of the config, which it takes
/// only after the rotate.)
#[test]
fn a_rotate_queued_before_the_reload_that_requires_the_key_is_not_pushed() {
    let mut w = World::new().expect("world");
    w.add_vm(VM, false).expect("vm");
    w.set_secret(VM, "token", b"v1", false).expect("secret");
    let double = w.start_hostile(VM, Mode::Honest).expect("double");
    w.start_host().expect("host");
    wait_until(T, || {
        double.held("token").as_deref() == Some(b"v1".as_slice())
    })
    .expect("synced while off");

    // The next push is answered "busy" four times: the task stays in it
    // for about a second (0.1 + 0.2 + 0.3 + 0.4 s of back-off).
    double.set_mode(Mode::Busy(4));
    w.set_secret(VM, "token", b"v2", false).expect("v2");
    let first = w.rotate_in_background(VM, &["token"], "20s");
    wait_until(T, || {
        double
            .state
            .lock()
            .is_ok_and(|s| s.applies.iter().any(|a| a.3 == tonic::Code::Aborted))
    })
    .expect("the push is being refused as busy");
    w.set_secret(VM, "token", b"v3", false).expect("v3");
    let second = w.rotate_in_background(VM, &["token"], "4s");
    std::thread::sleep(Duration::from_millis(150));
    w.guests.get_mut(VM).expect("guest").launch_key = true;
    w.reload_host_applied().expect("reload");

    let first = first.join().expect("join").expect("rotate 1");
    let second = second.join().expect("join").expect("rotate 2");
    assert!(
        !second.status.success(),
        "the queued rotate reached an unproven guest: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    assert_ne!(
        double.held("token").as_deref(),
        Some(b"v3".as_slice()),
        "the queued rotate's value was pushed after the key was required"
    );
    wait_for_launch_key(&w, "missing");
    // The push that was in flight when the reload came is the only one
    // that may have landed.
    drop(first);
}
