//! Measurement harness for what an idle, connected VM costs per keepalive
//! probe (issue 10): not part of the test run (`#[ignore]`).
//!
//! Starts the host agent and `PROBE_COST_VMS` guests (default 1) behind
//! their muxer stand-ins with `keepalive_interval = PROBE_COST_KEEPALIVE`
//! seconds (default 2), lets them sync and settle, then counts over
//! `PROBE_COST_SECS` idle seconds (default 20): the host's CPU (scheduler
//! nanoseconds) and context switches, every guest's context switches and
//! CPU, and the muxer threads' context switches (they run in this
//! process). `PROBE_COST_STRACE=DIR` also traces the host and the first
//! guest over the window (`strace -f -ttt -T`, `DIR/host`, `DIR/guest`);
//! strace slows both, so take counts from a run without it.
//! `PROBE_COST_HOST_WRAP="perf record -e cpu-clock -g -o FILE"` runs the
//! host agent under a profiler (stopped with SIGTERM at the end);
//! `PROBE_COST_CALLGRIND=FILE` runs it under callgrind with collection
//! switched on only for the window (`callgrind_control`), and prints the
//! instructions it executed in the window (the dump goes to FILE). The
//! binaries come from `VMCRED_BIN_DIR`. The number of probes is what
//! the guests answered: each `Hello` reply is one `sendto` in a traced
//! guest, and otherwise estimated from the interval (uniform in 3/4..1 of
//! it, rounded up to the host's one-second grid). Figures: README
//! "Measured here", ARCHITECTURE.md "Keepalive".

use std::time::Duration;

use vmcred_tests::measure::context_switches;
use vmcred_tests::{env_num, World};

#[test]
#[ignore]
fn probe_cost() {
    let vms = env_num("PROBE_COST_VMS", 1);
    let keepalive = env_num("PROBE_COST_KEEPALIVE", 2);
    let secs = env_num("PROBE_COST_SECS", 20);
    let mut w = World::new().unwrap();
    w.log_level = "warn".into();
    w.extra_config = format!("keepalive_interval = \"{keepalive}s\"");
    if let Ok(wrap) = std::env::var("PROBE_COST_HOST_WRAP") {
        w.host_prefix = wrap.split_whitespace().map(str::to_string).collect();
    }
    let callgrind = std::env::var("PROBE_COST_CALLGRIND").ok();
    if let Some(out) = &callgrind {
        w.host_prefix = vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            format!("--callgrind-out-file={out}"),
        ];
    }
    let names: Vec<String> = (0..vms).map(|i| format!("vm{i}")).collect();
    for n in &names {
        w.add_vm(n, false).unwrap();
        w.set_secret(n, "K1", b"v0", false).unwrap();
        w.set_secret(n, "K2", b"static", false).unwrap();
    }
    w.start_host().unwrap();
    for n in &names {
        w.boot_guest(n).unwrap();
    }
    for n in &names {
        w.wait_for_guest_value(n, "K1", b"v0", Duration::from_secs(60))
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(env_num("PROBE_COST_SETTLE", 3)));
    // Valgrind runs the agent in its own process; other wrappers fork it.
    let host = if callgrind.is_some() {
        w.host.as_ref().unwrap().id() as i32
    } else {
        host_pid(&w)
    };
    let guests: Vec<i32> = names
        .iter()
        .map(|n| w.guests[n].child.as_ref().unwrap().id() as i32)
        .collect();
    let traces = std::env::var("PROBE_COST_STRACE").ok().map(|dir| {
        std::fs::create_dir_all(&dir).unwrap();
        [("host", host), ("guest", guests[0])].map(|(what, pid)| {
            let out = format!("{dir}/{what}");
            std::process::Command::new("strace")
                .args(["-f", "-ttt", "-T", "-o", &out, "-p", &pid.to_string()])
                .spawn()
                .unwrap()
        })
    });
    if traces.is_some() {
        std::thread::sleep(Duration::from_secs(1));
    }
    if callgrind.is_some() {
        callgrind_control(&["-i", "on"], host);
    }
    let h0 = (cpu_ns(host), switches(host));
    let g0: Vec<(u64, u64)> = guests.iter().map(|&p| (cpu_ns(p), switches(p))).collect();
    let m0 = muxer_switches();
    std::thread::sleep(Duration::from_secs(secs));
    let h1 = (cpu_ns(host), switches(host));
    let g1: Vec<(u64, u64)> = guests.iter().map(|&p| (cpu_ns(p), switches(p))).collect();
    let m1 = muxer_switches();
    if callgrind.is_some() {
        callgrind_control(&["-i", "off"], host);
    }
    if let Some(ts) = traces {
        for t in ts {
            signal(t.id() as i32, nix::sys::signal::Signal::SIGINT);
        }
    }
    let guest_cpu: u64 = g0.iter().zip(&g1).map(|(a, b)| b.0 - a.0).sum();
    let guest_sw: u64 = g0.iter().zip(&g1).map(|(a, b)| b.1 - a.1).sum();
    // Mean of ceil(uniform(3/4 K, K)) on the one-second grid, by sampling.
    let mean_interval = {
        let k = keepalive as f64;
        let steps = 10_000;
        (0..steps)
            .map(|i| (0.75 * k + 0.25 * k * (i as f64 + 0.5) / steps as f64).ceil())
            .sum::<f64>()
            / steps as f64
    };
    let probes = vms as f64 * secs as f64 / mean_interval;
    eprintln!(
        "probe_cost: {vms} VMs, keepalive {keepalive} s, {secs} s window, ~{probes:.0} probes \
         (mean interval {mean_interval:.2} s)\n\
         host:   {:.3} ms CPU, {} switches; per probe {:.1} us, {:.2} switches\n\
         guests: {:.3} ms CPU, {} switches; per probe {:.1} us, {:.2} switches\n\
         muxers: {} switches; per probe {:.2}\n\
         load: {}",
        (h1.0 - h0.0) as f64 / 1e6,
        h1.1 - h0.1,
        (h1.0 - h0.0) as f64 / 1e3 / probes,
        (h1.1 - h0.1) as f64 / probes,
        guest_cpu as f64 / 1e6,
        guest_sw,
        guest_cpu as f64 / 1e3 / probes,
        guest_sw as f64 / probes,
        m1 - m0,
        (m1 - m0) as f64 / probes,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
    );
    if let Some(mut h) = w.host.take() {
        signal(h.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let _ = h.wait();
    }
    if let Some(out) = callgrind {
        // The dump written at exit holds what was collected: the window.
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let ir: u64 = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0);
        eprintln!(
            "callgrind: {ir} instructions in the window, {:.0} per probe",
            ir as f64 / probes
        );
    }
}

fn callgrind_control(args: &[&str], pid: i32) {
    let ok = std::process::Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "callgrind_control {args:?} {pid} failed");
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// The agent itself when it runs under a wrapper (its only child).
fn host_pid(w: &World) -> i32 {
    let child = w.host.as_ref().unwrap().id() as i32;
    if w.host_prefix.is_empty() {
        return child;
    }
    let want = "vmcred-host";
    let mut found = child;
    vmcred_tests::wait_until(Duration::from_secs(10), || {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if head.ends_with(want) && rest.split_whitespace().nth(1) == Some(&child.to_string()) {
                found = e.file_name().to_string_lossy().parse().unwrap();
                return true;
            }
        }
        false
    })
    .unwrap();
    found
}

/// Scheduler CPU of every thread, in nanoseconds (`/proc/PID/schedstat`).
fn cpu_ns(pid: i32) -> u64 {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        n += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    n
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn switches(pid: i32) -> u64 {
    context_switches(pid, |_| true)
}

/// The muxer stand-ins' threads in this process.
fn muxer_switches() -> u64 {
    context_switches(std::process::id() as i32, |c| {
        c == vmcred_tests::muxer::THREAD_NAME
    })
}
