//! Host key rollover across real agents (Unix-socket/hybrid harness):
//! prepare → guests store the next pin → switch → guests drop the old pin
//! on first sight of the new key → retire; a guest that was down, one
//! that stays down past retire, kill -9 of either agent between steps,
//! and revoking a leaked old key. Build the binaries first (`cargo build
//! --bins`).

use std::path::Path;
use std::time::Duration;

use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);

fn host_pin(w: &World, stem: &str) -> Option<String> {
    std::fs::read_to_string(w.path().join("host-state").join(format!("{stem}.pin")))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The pins the guest agent stored (its state dir's `pins.json`).
fn guest_pins(w: &World, vm: &str) -> Vec<String> {
    let p = w.guests[vm].state_dir.join("pins.json");
    let Ok(bytes) = std::fs::read(&p) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    v["pins"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn rotate_key(w: &World, args: &[&str]) -> (i32, String) {
    let mut all = vec!["rotate-key"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--timeout", "20s"]);
    let out = w.host_cmd(&all).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn vm_status(w: &World, vm: &str) -> serde_json::Value {
    w.status_json()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vm"] == vm)
        .cloned()
        .unwrap()
}

fn world(vms: &[&str]) -> World {
    let mut w = World::new().unwrap();
    w.log_level = "info".into();
    // The harness relaunches a guest without the hypervisor wrapper's
    // launch notification, so the host notices the old connection is gone
    // only at its next keepalive probe (60 s by default).
    w.extra_config = "keepalive_interval = \"1s\"\n".into();
    for vm in vms {
        w.add_vm(vm, false).unwrap();
        w.set_secret(vm, "A", b"alpha", false).unwrap();
    }
    w.start_host().unwrap();
    w
}

fn assert_key_file_modes(dir: &Path, stem: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| {
        std::fs::metadata(dir.join(format!("{stem}.{f}")))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("key"), 0o600);
    assert_eq!(mode("crt"), 0o644);
    assert_eq!(mode("pin"), 0o644);
}

#[test]
fn rollover_with_a_guest_down_during_it_and_a_relaunch_after() {
    let mut w = world(&["up", "late"]);
    w.boot_guest("up").unwrap();
    w.boot_guest("late").unwrap();
    w.wait_for_guest_value("up", "A", b"alpha", T).unwrap();
    w.wait_for_guest_value("late", "A", b"alpha", T).unwrap();
    let old = host_pin(&w, "host").unwrap();
    assert_eq!(guest_pins(&w, "up"), vec![old.clone()]);

    // Out of order: nothing to switch to or retire.
    let (code, text) = rotate_key(&w, &["switch"]);
    assert_ne!(code, 0);
    assert!(text.contains("prepare` first"), "{text}");

    // "late" goes down before prepare.
    w.kill_guest_agent("late").unwrap();
    let (code, text) = rotate_key(&w, &["prepare"]);
    assert_eq!(code, 1, "late lacks the next pin: {text}");
    let next = host_pin(&w, "host.next").unwrap();
    assert_key_file_modes(&w.path().join("host-state"), "host.next");
    assert!(text.contains(&next), "{text}");
    assert_eq!(guest_pins(&w, "up"), vec![old.clone(), next.clone()]);
    let st = vm_status(&w, "up");
    assert_eq!(st["key_trust"], "has_next", "{st}");
    // Last seen holding only the old pin.
    assert_eq!(vm_status(&w, "late")["key_trust"], "lacks_next");
    // Idempotent.
    let (_, text) = rotate_key(&w, &["prepare"]);
    assert!(text.contains("already done"), "{text}");
    assert_eq!(host_pin(&w, "host.next").unwrap(), next);

    // Switch refuses while a guest lacks the pin, unless forced.
    let (code, text) = rotate_key(&w, &["switch"]);
    assert_ne!(code, 0);
    assert!(text.contains("late") && text.contains("--force"), "{text}");
    let (_, text) = rotate_key(&w, &["switch", "--force"]);
    assert!(text.contains("switch: done"), "{text}");
    assert_eq!(host_pin(&w, "host").unwrap(), next);
    assert_eq!(host_pin(&w, "host.prev").unwrap(), old);
    // "up" saw the new key and dropped the old pin.
    wait_until(T, || guest_pins(&w, "up") == vec![next.clone()]).unwrap();

    // "late" comes back holding only the old pin: the host falls back to
    // the previous key, hands over the current pin, and redials.
    w.start_guest_agent("late").unwrap();
    wait_until(T, || guest_pins(&w, "late") == vec![next.clone()]).unwrap();
    wait_until(T, || vm_status(&w, "late")["key_trust"] == "current").unwrap();

    // Pushes keep working under the new key.
    w.set_secret("late", "A", b"beta", false).unwrap();
    let out = w.rotate("late", &["A"], "20s").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, text) = rotate_key(&w, &["retire"]);
    assert_eq!(code, 0, "{text}");
    assert!(!w.path().join("host-state/host.prev.key").exists());
    let (code, text) = rotate_key(&w, &["retire"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already done"), "{text}");

    // A VM launched now gets the new pin at launch.
    w.kill_guest_agent("up").unwrap();
    w.boot_guest("up").unwrap();
    assert_eq!(guest_pins(&w, "up"), vec![next.clone()]);
    w.wait_for_guest_value("up", "A", b"alpha", T).unwrap();
}

#[test]
fn a_guest_down_past_retire_is_told_to_relaunch() {
    let mut w = world(&["gone"]);
    w.boot_guest("gone").unwrap();
    w.wait_for_guest_value("gone", "A", b"alpha", T).unwrap();
    w.kill_guest_agent("gone").unwrap();
    rotate_key(&w, &["prepare"]);
    rotate_key(&w, &["switch", "--force"]);
    let (code, _) = rotate_key(&w, &["retire"]);
    assert_eq!(code, 1);
    w.start_guest_agent("gone").unwrap();
    wait_until(T, || vm_status(&w, "gone")["key_trust"] == "untrusted").unwrap();
    let out = w.host_cmd(&["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("guest does not trust the current key: relaunch the VM"),
        "{text}"
    );
    // Relaunching fixes it.
    w.kill_guest_agent("gone").unwrap();
    w.boot_guest("gone").unwrap();
    wait_until(T, || vm_status(&w, "gone")["key_trust"] == "current").unwrap();
}

#[test]
fn kill_9_of_either_agent_between_steps() {
    let mut w = world(&["vm1"]);
    w.boot_guest("vm1").unwrap();
    w.wait_for_guest_value("vm1", "A", b"alpha", T).unwrap();
    let old = host_pin(&w, "host").unwrap();

    let (code, text) = rotate_key(&w, &["prepare"]);
    assert_eq!(code, 0, "{text}\n{}", w.logs());
    let next = host_pin(&w, "host.next").unwrap();
    // Guest agent killed after storing the next pin: it keeps both.
    w.kill_guest_agent("vm1").unwrap();
    w.start_guest_agent("vm1").unwrap();
    assert_eq!(guest_pins(&w, "vm1"), vec![old.clone(), next.clone()]);
    // Host killed after prepare: the next key survives, prepare is a no-op.
    w.kill_host().unwrap();
    w.start_host().unwrap();
    let (code, text) = rotate_key(&w, &["prepare"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already done"), "{text}");
    assert_eq!(host_pin(&w, "host.next").unwrap(), next);

    let (code, text) = rotate_key(&w, &["switch"]);
    assert_eq!(code, 0, "{text}");
    wait_until(T, || guest_pins(&w, "vm1") == vec![next.clone()]).unwrap();
    // Host killed after switch: it dials with the new key, keeps the old.
    // A step that is already done does not wait for VMs to redial, so wait
    // for the restarted host to reach the guest first.
    w.kill_host().unwrap();
    w.start_host().unwrap();
    wait_until(T, || vm_status(&w, "vm1")["key_trust"] == "current").unwrap();
    let (code, text) = rotate_key(&w, &["switch"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already done"), "{text}");
    assert_eq!(host_pin(&w, "host.prev").unwrap(), old);
    // Guest agent killed after dropping the old pin: it stays dropped.
    w.kill_guest_agent("vm1").unwrap();
    w.start_guest_agent("vm1").unwrap();
    assert_eq!(guest_pins(&w, "vm1"), vec![next.clone()]);

    let (code, text) = rotate_key(&w, &["retire"]);
    assert_eq!(code, 0, "{text}");
    w.kill_host().unwrap();
    w.start_host().unwrap();
    wait_until(T, || vm_status(&w, "vm1")["key_trust"] == "current").unwrap();
    let (code, text) = rotate_key(&w, &["show"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("Steady") && !text.contains("previous:"),
        "{text}"
    );
    w.set_secret("vm1", "A", b"gamma", false).unwrap();
    let out = w.rotate("vm1", &["A"], "20s").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn revoke_old_drops_the_leaked_key_at_once_and_lists_the_rest() {
    let mut w = world(&["holder", "stale"]);
    w.boot_guest("holder").unwrap();
    w.boot_guest("stale").unwrap();
    w.wait_for_guest_value("holder", "A", b"alpha", T).unwrap();
    w.wait_for_guest_value("stale", "A", b"alpha", T).unwrap();
    // Revoking with no next key distributed is refused.
    let (code, text) = rotate_key(&w, &["revoke-old"]);
    assert_ne!(code, 0);
    assert!(text.contains("prepare"), "{text}");

    w.kill_guest_agent("stale").unwrap();
    rotate_key(&w, &["prepare"]);
    let next = host_pin(&w, "host.next").unwrap();
    let (code, text) = rotate_key(&w, &["switch", "--revoke"]);
    assert_eq!(code, 1, "{text}");
    // The holder already dropped the old pin; the old key is gone.
    assert_eq!(guest_pins(&w, "holder"), vec![next]);
    assert!(!w.path().join("host-state/host.prev.key").exists());
    assert!(text.contains("holder") && text.contains("stale"), "{text}");
    w.start_guest_agent("stale").unwrap();
    wait_until(T, || vm_status(&w, "stale")["key_trust"] == "untrusted").unwrap();
}

/// A guest rebooting inside the same hypervisor process: its agent stops,
/// `/run` (state directory, credentials directory) starts empty, and
/// systemd imports the same launch-time bootstrap again.
fn reboot_inside_vmm(w: &mut World, vm: &str, bootstrap: &[u8]) {
    w.kill_guest_agent(vm).unwrap();
    let g = &w.guests[vm];
    let _ = std::fs::remove_dir_all(&g.state_dir);
    let _ = std::fs::remove_dir_all(&g.creds_dir);
    std::fs::create_dir_all(&g.creds_dir).unwrap();
    vmcred_tests::write_atomic(&g.creds_dir.join("vmcred.bootstrap"), bootstrap, 0o400).unwrap();
    w.start_guest_agent(vm).unwrap();
}

/// With `pin_state_dir` on storage that survives the reboot, a key that a
/// rollover dropped stays dropped though the bootstrap names it again;
/// without it (pins on `/run`), the guest trusts the bootstrap's old key
/// again, which is the documented remaining case (relaunch, not reboot).
#[test]
fn a_dropped_key_stays_dropped_across_a_reboot_with_a_persistent_pin_dir() {
    let mut w = world(&["persist", "volatile"]);
    let persist = w.guests["persist"].dir.join("var-lib-vmcred");
    w.guests.get_mut("persist").unwrap().extra_config =
        format!("pin_state_dir = \"{}\"\n", persist.display());
    w.boot_guest("persist").unwrap();
    w.boot_guest("volatile").unwrap();
    w.wait_for_guest_value("persist", "A", b"alpha", T).unwrap();
    w.wait_for_guest_value("volatile", "A", b"alpha", T)
        .unwrap();
    let old = host_pin(&w, "host").unwrap();
    let bootstrap = |w: &World, vm: &str| {
        std::fs::read(w.guests[vm].creds_dir.join("vmcred.bootstrap")).unwrap()
    };
    let (b_persist, b_volatile) = (bootstrap(&w, "persist"), bootstrap(&w, "volatile"));

    let (code, text) = rotate_key(&w, &["prepare"]);
    assert_eq!(code, 0, "{text}");
    let next = host_pin(&w, "host.next").unwrap();
    let (code, text) = rotate_key(&w, &["revoke-old"]);
    assert_eq!(code, 0, "{text}");
    let pins_in = |p: &Path| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.join("pins.json")).unwrap()).unwrap();
        v["pins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    wait_until(T, || pins_in(&persist) == vec![next.clone()]).unwrap();

    reboot_inside_vmm(&mut w, "persist", &b_persist);
    reboot_inside_vmm(&mut w, "volatile", &b_volatile);
    // The persistent set wins over the bootstrap's (retired) pin ...
    assert_eq!(pins_in(&persist), vec![next.clone()]);
    wait_until(T, || vm_status(&w, "persist")["key_trust"] == "current").unwrap();
    w.set_secret("persist", "A", b"beta", false).unwrap();
    let out = w.rotate("persist", &["A"], "20s").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.read_guest("persist", "A").unwrap(), b"beta");
    // ... while pins on /run start again from the bootstrap's old key.
    assert_eq!(guest_pins(&w, "volatile"), vec![old]);
    wait_until(T, || vm_status(&w, "volatile")["key_trust"] == "untrusted").unwrap();
}
