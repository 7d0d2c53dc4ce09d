//! SIGTERM stops the host agent even when a VM task is stuck in a blocking
//! call (here: a credential source that is a FIFO nobody writes, which
//! blocks `open()`). Real host and guest agents, real TLS, through the
//! hybrid-vsock muxer stand-in.

use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use vmcred_tests::World;

const VM: &str = "vm1";

/// Whether a thread of `pid` sits in `openat` (syscall 257 on x86_64).
fn blocked_in_open(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall"))
            .map(|s| s.split_whitespace().next() == Some("257"))
            .unwrap_or(false)
    })
}

#[test]
fn sigterm_stops_the_agent_even_with_a_stuck_vm_task() {
    let mut w = World::new().unwrap();
    w.add_vm(VM, false).unwrap();
    w.set_secret(VM, "A", b"value-a", false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "A", b"value-a", Duration::from_secs(30))
        .unwrap();

    // Replace the source by a FIFO and ask for a rotation: the VM task
    // opens it and, unless sources are read off the async workers with a
    // deadline, blocks there.
    let src = w.creds[VM]["A"].0.clone();
    std::fs::remove_file(&src).unwrap();
    nix::unistd::mkfifo(&src, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut rotate = Command::new(&w.bins.host)
        .args(["rotate", "--timeout", "60s", "--config"])
        .arg(w.config_path())
        .args([VM, "A"])
        .spawn()
        .unwrap();
    let host = w.host.take().unwrap();
    let pid = host.id();
    // Give the task a bounded chance to get stuck (it may not, if sources
    // are read without blocking; then this only tests a plain SIGTERM).
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && !blocked_in_open(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut host = host;
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = host.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = host.kill();
    let _ = host.wait();
    let _ = rotate.kill();
    let _ = rotate.wait();
    // Unblock any thread still in open() so nothing lingers (non-blocking:
    // with no reader left this fails at once instead of waiting).
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&src);
    let Some(status) = status else {
        panic!(
            "vmcred-host serve did not stop within 30 s of SIGTERM; its log:\n{}",
            w.logs()
        );
    };
    assert!(status.code().is_some(), "{status:?}");
}
