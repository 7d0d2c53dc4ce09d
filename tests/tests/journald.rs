//! The host agent's log events as native journal entries: the real agent
//! runs with its stderr named by `JOURNAL_STREAM` (as systemd does), in a
//! private mount namespace whose `/run/systemd/journal/socket` is a Unix
//! datagram socket this test binds, and each datagram is parsed as
//! journald's native protocol. Needs root (the mount namespace).

use std::time::Duration;

use vmcred_tests::journal::{
    fake_journal, journal_stream, journal_world, private_run, receive_until, text, Entry,
};

const T: Duration = Duration::from_secs(30);
const VM: &str = "vm1";

#[test]
fn events_are_native_journal_entries_with_vm_and_generation() {
    let Some(mut w) = journal_world(VM, b"first-value").unwrap() else {
        return;
    };
    let jdir = w.path().join("journal");
    let sock = fake_journal(&jdir).unwrap();
    w.host_env.push(journal_stream(&w.host_log).unwrap());
    w.host_prefix = private_run(Some(&jdir));
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"first-value", T)
        .unwrap();

    let mut entries: Vec<Entry> = Vec::new();
    let pushed = |entries: &[Entry]| {
        entries
            .iter()
            .find(|e| text(e, "MESSAGE") == "pushing to guest")
            .cloned()
    };
    receive_until(&sock, &mut entries, T, |e| pushed(e).is_some());
    let push = pushed(&entries).unwrap_or_else(|| panic!("no push entry in {entries:?}"));
    assert_eq!(text(&push, "VM"), VM);
    let generation: u64 = text(&push, "GENERATION")
        .parse()
        .expect("GENERATION is a number");
    assert!(generation > 1_000_000_000_000_000, "{generation}");
    assert_eq!(text(&push, "PRIORITY"), "6", "INFO is informational");
    assert_eq!(text(&push, "SYSLOG_IDENTIFIER"), "vmcred-host");
    // Every entry has a message and a priority, and none holds the value.
    for e in &entries {
        assert!(
            e.contains_key("MESSAGE") && e.contains_key("PRIORITY"),
            "{e:?}"
        );
        assert!(
            !e.values()
                .any(|v| v.windows(11).any(|w| w == b"first-value")),
            "a secret value in the journal: {e:?}"
        );
    }
    // Nothing went to stderr as text: the entries went to the journal.
    let stderr = std::fs::read_to_string(&w.host_log).unwrap();
    assert!(!stderr.contains("pushing to guest"), "{stderr}");

    // A multi-line error is one entry, with its line breaks intact.
    w.kill_guest_agent(VM).unwrap();
    std::fs::write(w.config_path(), "[vms.a]\ncid = 3\nprot = 1\n").unwrap();
    let host = w.host.as_ref().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let is_failure = |e: &Entry| text(e, "MESSAGE").contains("config reload failed");
    let mut later = Vec::new();
    receive_until(&sock, &mut later, T, |es| es.iter().any(is_failure));
    let failed = later
        .into_iter()
        .find(is_failure)
        .expect("a reload failure entry");
    assert_eq!(text(&failed, "PRIORITY"), "3");
    let err = text(&failed, "ERROR");
    assert!(
        err.contains("unknown field") && err.contains('\n'),
        "{err:?}"
    );
}
