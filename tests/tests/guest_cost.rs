//! Measurement harness for the guest agent's CPU per Apply and per
//! connect (issue 10): not part of the test run (`#[ignore]`).
//!
//! `GUEST_COST_WRAP="perf stat -o FILE -e task-clock,..."` runs the agent
//! under a profiler; `GUEST_COST_APPLIES=N` rotates N times (each with a
//! new value, so each pushes an Apply); `GUEST_COST_CONNECTS=M` restarts
//! the host M times with a value changed while it was down (dial, TLS,
//! Trust, Hello, Apply); `GUEST_COST_IDLE_SECS=S` then counts the agent's
//! context switches over S idle seconds (after `GUEST_COST_IDLE_SETTLE`,
//! default 3 s), under strace with `GUEST_COST_IDLE_STRACE=FILE`. The
//! agent is then stopped with SIGTERM so the wrapper writes its report.
//! `TMPDIR=/dev/shm` puts the agent's state on tmpfs, as in a VM; the
//! binaries come from `VMCRED_BIN_DIR`. Per push: (run with N applies −
//! run with none) / N; per connect likewise. Figures: ARCHITECTURE.md,
//! "Guest footprint".

use std::time::Duration;

use vmcred_tests::measure::context_switches;
use vmcred_tests::{env_num, World};

#[test]
#[ignore]
fn guest_cost() {
    let applies = env_num("GUEST_COST_APPLIES", 200);
    let connects = env_num("GUEST_COST_CONNECTS", 0);
    let mut w = World::new().unwrap();
    w.log_level = "info".into();
    w.add_vm("a", true).unwrap();
    w.set_secret("a", "K1", b"v0", false).unwrap();
    w.set_secret("a", "K2", b"static", false).unwrap();
    if let Ok(wrap) = std::env::var("GUEST_COST_WRAP") {
        let g = w.guests.get_mut("a").unwrap();
        g.prefix = wrap.split_whitespace().map(str::to_string).collect();
    }
    w.start_host().unwrap();
    w.boot_guest("a").unwrap();
    wait_for(&w, b"v0");
    for i in 0..applies {
        let v = format!("value-{i}");
        w.set_secret("a", "K1", v.as_bytes(), false).unwrap();
        let out = w.rotate("a", &["K1"], "10s").unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..connects {
        w.stop_host().unwrap();
        let v = format!("conn-{i}");
        w.set_secret("a", "K1", v.as_bytes(), false).unwrap();
        w.start_host().unwrap();
        wait_for(&w, v.as_bytes());
    }
    let idle = env_num("GUEST_COST_IDLE_SECS", 0);
    if idle > 0 {
        let pid = agent_pid(&w);
        let strace = std::env::var("GUEST_COST_IDLE_STRACE").ok().map(|out| {
            std::process::Command::new("strace")
                .args(["-f", "-tt", "-o", &out, "-p", &pid.to_string()])
                .spawn()
                .unwrap()
        });
        // After the rotations' blocking thread (if any) is gone, and (with
        // GUEST_COST_IDLE_SETTLE=25) the agent's 20 s initial-sync timer.
        let settle = env_num("GUEST_COST_IDLE_SETTLE", 3);
        std::thread::sleep(Duration::from_secs(settle as u64));
        let before = switches(pid);
        std::thread::sleep(Duration::from_secs(idle as u64));
        let after = switches(pid);
        if let Some(mut s) = strace {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .unwrap();
            let _ = s.wait();
        }
        let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Threads:"))
            .unwrap()
            .to_string();
        eprintln!(
            "idle {idle} s: {} context switches ({:.1}/min), {threads}",
            after - before,
            (after - before) as f64 * 60.0 / idle as f64
        );
    }
    w.stop_host().unwrap();
    let pid = agent_pid(&w);
    let g = w.guests.get_mut("a").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut c = g.child.take().unwrap();
    let _ = c.wait();
    eprintln!(
        "guest log:\n{}",
        std::fs::read_to_string(&g.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The agent: the wrapper's child (unshare and sh exec it), or the child
/// itself.
fn agent_pid(w: &World) -> i32 {
    let g = &w.guests["a"];
    let child = g.child.as_ref().unwrap().id() as i32;
    if g.prefix.is_empty() {
        return child;
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&child.to_string()) {
            return e.file_name().to_string_lossy().parse().unwrap();
        }
    }
    child
}

/// Voluntary and involuntary context switches of every thread.
fn switches(pid: i32) -> u64 {
    context_switches(pid, |_| true)
}

/// Waits until the agent's own view of K1 holds `want` (a wrapper is not
/// in the agent's mount namespace, so `World::read_guest` cannot be used).
fn wait_for(w: &World, want: &[u8]) {
    let g = &w.guests["a"];
    let rel = g.creds_dir.strip_prefix("/").unwrap().join("K1");
    vmcred_tests::wait_until(Duration::from_secs(30), || {
        let path = std::path::Path::new(&format!("/proc/{}/root", agent_pid(w))).join(&rel);
        std::fs::read(path).ok().as_deref() == Some(want)
    })
    .unwrap();
}
