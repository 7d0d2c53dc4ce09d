//! What `vmcred-host serve` writes to stderr under systemd
//! (`$JOURNAL_STREAM` set): a VM that stays unreachable is logged once at
//! WARN (later failures only at DEBUG), every event is one line with a
//! `<N>` journald priority, and a multi-line error stays one entry.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until it holds; panics after `limit` (a bound on waiting for
/// an event, not a timing assertion).
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unreachable_vm_is_logged_once_and_every_event_is_one_prefixed_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let config = common::config_with_unreachable_vm(p, "dial_backoff_max = \"100ms\"\n");
    let log = p.join("serve.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // `JOURNAL_STREAM` counts only when it names fd 2 itself (as systemd
    // sets it); with no journald socket to reach, the agent falls back to
    // one `<N>`-prefixed line per event, which is what is checked here.
    // Native journal entries are `tests/tests/journald.rs`'s.
    let stream = {
        use std::os::unix::fs::MetadataExt;
        let m = log_file.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        let why = "journald runs here: the agent would write native entries; the fallback is checked only where no journal socket exists";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("{why}");
        return;
    }
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_vmcred-host"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", &stream)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let count = |needle: &str| read().lines().filter(|l| l.contains(needle)).count();

    wait_for(Duration::from_secs(60), "five failed dials", || {
        count("still not reachable") >= 4
    });
    let warned: Vec<String> = read()
        .lines()
        .filter(|l| l.contains("guest agent not reachable"))
        .map(String::from)
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].starts_with("<4>"), "{}", warned[0]);
    assert!(warned[0].contains("vm0"), "{}", warned[0]);

    // A reload with a broken config: a multi-line TOML error, one entry.
    std::fs::write(&config, "[vms.x]\nunix_socket = \n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the reload failure", || {
        count("config reload failed") == 1
    });
    let text = read();
    let failed = text
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap();
    assert!(failed.starts_with("<3>"), "{failed}");
    assert!(failed.contains("\\n"), "the error's own lines: {failed}");
    for line in text.lines() {
        let prefixed = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .any(|p| line.starts_with(p));
        assert!(prefixed, "a line that is not an entry of its own: {line:?}");
    }
}
