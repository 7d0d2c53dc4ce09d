//! A SIGHUP reload that would put two VMs on one socket is refused whole:
//! the real agent logs why, naming both VMs and the socket, and keeps
//! serving the config it had. (The rule itself is unit-tested in
//! host-agent/src/config.rs.) Build the binaries first (`cargo build
//! --bins`; tests/run.sh does).

use std::time::Duration;

use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);

fn vm_names(w: &World) -> Vec<String> {
    let st = w.status_json().expect("status");
    st.as_array()
        .expect("a vms array")
        .iter()
        .map(|v| v["vm"].as_str().expect("a vm name").to_string())
        .collect()
}

#[test]
fn a_reload_with_two_vms_on_one_socket_keeps_the_previous_config() {
    let mut w = World::new().unwrap();
    w.add_vm("a", false).unwrap();
    w.set_secret("a", "A", b"a-1", false).unwrap();
    w.start_host().unwrap();
    assert_eq!(vm_names(&w), ["a"]);

    // VM "c" on a's hybrid-vsock socket.
    let shared = w.path().join("vms/a/notify.vsock");
    let mut text = std::fs::read_to_string(w.config_path()).unwrap();
    text.push_str(&format!(
        "\n[vms.c]\nhybrid_socket = \"{}\"\n[vms.c.credentials.C]\npath = \"/nonexistent/c\"\n",
        shared.display()
    ));
    std::fs::write(w.config_path(), text).unwrap();
    let host = w.host.as_ref().expect("host running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(T, || w.logs().contains("config reload failed")).unwrap_or_else(|e| {
        panic!("{e:#}\n{}", w.logs());
    });
    let log = w.logs();
    let line = log
        .lines()
        .find(|l| l.contains("config reload failed"))
        .expect("the failure line");
    assert!(
        line.contains("both have hybrid_socket")
            && line.contains(&shared.display().to_string())
            && line.contains("give each VM its own"),
        "{line}"
    );
    assert!(!log.contains("config reloaded"), "{log}");
    // Still the previous config: no VM "c".
    assert_eq!(vm_names(&w), ["a"]);

    // A good config is taken again afterwards.
    w.reload_host_applied().unwrap();
    assert_eq!(vm_names(&w), ["a"]);
}
