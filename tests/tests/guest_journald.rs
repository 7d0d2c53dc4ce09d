//! The guest agent's log events as native journal entries: the real agent
//! runs with its stderr named by `JOURNAL_STREAM` (as systemd does), in a
//! private mount namespace whose `/run/systemd/journal/socket` is a Unix
//! datagram socket this test binds; each datagram is parsed as journald's
//! native protocol. Needs root (the mount namespace).

use std::time::{Duration, Instant};

use vmcred_tests::journal::{
    fake_journal, journal_stream, journal_world, private_run, receive_until, text, Entry,
};

const T: Duration = Duration::from_secs(30);
const VM: &str = "vm1";
const UNIT: &str = "app.service";

#[test]
fn guest_events_are_native_journal_entries_with_generation_and_unit() {
    let Some(mut w) = journal_world(VM, b"first-value").unwrap() else {
        return;
    };
    let jdir = w.path().join("guest-journal");
    let sock = fake_journal(&jdir).unwrap();
    {
        let g = w.guests.get_mut(VM).unwrap();
        g.units.insert("API_KEY".into(), vec![UNIT.into()]);
        g.env.push(journal_stream(&g.log).unwrap());
        g.prefix = private_run(Some(&jdir));
    }
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"first-value", T)
        .unwrap();

    let mut entries: Vec<Entry> = Vec::new();
    let find = |entries: &[Entry], pred: &dyn Fn(&Entry) -> bool| {
        entries.iter().find(|e| pred(e)).cloned()
    };
    let is_apply = |e: &Entry| text(e, "MESSAGE").starts_with("apply: ");
    let is_unit = |e: &Entry| text(e, "MESSAGE") == "unit action done";
    receive_until(&sock, &mut entries, T, |e| {
        find(e, &is_apply).is_some() && find(e, &is_unit).is_some()
    });
    let apply =
        find(&entries, &is_apply).unwrap_or_else(|| panic!("no apply entry in {entries:?}"));
    let generation: u64 = text(&apply, "GENERATION")
        .parse()
        .expect("GENERATION is a number");
    assert!(generation > 1_000_000_000_000_000, "{generation}");
    assert_eq!(text(&apply, "APPLIED_GENERATION"), generation.to_string());
    assert!(text(&apply, "MESSAGE").contains("API_KEY"), "{apply:?}");
    assert_eq!(text(&apply, "PRIORITY"), "6", "INFO is informational");
    assert_eq!(text(&apply, "SYSLOG_IDENTIFIER"), "vmcred-guest");

    let unit = find(&entries, &is_unit).unwrap();
    assert_eq!(text(&unit, "UNIT"), UNIT);
    assert_eq!(text(&unit, "ACTION"), "restart");
    assert_eq!(text(&unit, "PRIORITY"), "6");

    // Every entry has a message, a priority and the identifier, and none
    // holds the value.
    for e in &entries {
        assert!(
            e.contains_key("MESSAGE") && e.contains_key("PRIORITY"),
            "{e:?}"
        );
        assert_eq!(text(e, "SYSLOG_IDENTIFIER"), "vmcred-guest");
        assert!(
            !e.values()
                .any(|v| v.windows(11).any(|w| w == b"first-value")),
            "a secret value in the journal: {e:?}"
        );
    }
    // Nothing went to stderr as text: the entries went to the journal.
    let log = std::fs::read_to_string(&w.guests[VM].log).unwrap();
    assert!(!log.contains("apply: "), "{log}");
    assert!(!log.contains("unit action done"), "{log}");
}

/// Without a journal socket to reach, the agent falls back to `<N>`
/// prefixed lines on stderr and says why, once.
#[test]
fn guest_falls_back_to_prefixed_lines_without_a_journal_socket() {
    let Some(mut w) = journal_world(VM, b"first-value").unwrap() else {
        return;
    };
    {
        let g = w.guests.get_mut(VM).unwrap();
        g.env.push(journal_stream(&g.log).unwrap());
        // An empty /run: no journal socket.
        g.prefix = private_run(None);
    }
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"first-value", T)
        .unwrap();
    let log_path = w.guests[VM].log.clone();
    let deadline = Instant::now() + T;
    let mut log = String::new();
    while !log.contains("apply: ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        log = std::fs::read_to_string(&log_path).unwrap();
    }
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} line in {log}"))
            .to_string()
    };
    assert!(
        line("cannot send to journald's socket").starts_with("<4>"),
        "{log}"
    );
    let apply = line("apply: ");
    assert!(apply.starts_with("<6>"), "{apply}");
    assert!(apply.contains("generation="), "{apply}");
    assert!(!log.contains("first-value"), "{log}");
}
