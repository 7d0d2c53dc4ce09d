//! `vmcred-host serve` and systemd's notify protocol, against a fake
//! `$NOTIFY_SOCKET` (a Unix datagram socket this test reads): READY=1 at
//! start, RELOADING=1 with MONOTONIC_USEC= on SIGHUP and READY=1 after it
//! (what `Type=notify-reload` requires), WATCHDOG=1 while `WATCHDOG_USEC`
//! is set, STOPPING=1 on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads datagrams until one satisfies `want`; panics after `limit` (a
/// bound on waiting for an event) with everything read so far.
fn wait_for(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    limit: Duration,
    want: impl Fn(&str) -> bool,
) -> String {
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching notification; got {seen:#?}");
        sock.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if want(&msg) {
                return msg;
            }
        }
    }
}

#[test]
fn ready_reload_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    common::config_with_unreachable_vm(p, "");
    let notify = UnixDatagram::bind(p.join("notify.sock")).unwrap();
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_vmcred-host"))
            .args(["serve", "--config"])
            .arg(p.join("host.toml"))
            .env("NOTIFY_SOCKET", p.join("notify.sock"))
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = nix::unistd::Pid::from_raw(serve.0.id() as i32);
    let limit = Duration::from_secs(30);
    let mut seen = Vec::new();
    wait_for(&notify, &mut seen, limit, |m| {
        m.lines().any(|l| l == "READY=1")
    });
    wait_for(&notify, &mut seen, limit, |m| {
        m.lines().any(|l| l == "WATCHDOG=1")
    });

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = wait_for(&notify, &mut seen, limit, |m| m.contains("RELOADING=1"));
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0, "{reloading:?}");
    wait_for(&notify, &mut seen, limit, |m| {
        m.lines().any(|l| l == "READY=1")
    });
    // The watchdog keeps going after a reload.
    wait_for(&notify, &mut seen, limit, |m| {
        m.lines().any(|l| l == "WATCHDOG=1")
    });

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for(&notify, &mut seen, limit, |m| m.contains("STOPPING=1"));
}
