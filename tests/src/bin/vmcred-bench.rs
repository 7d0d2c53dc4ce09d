//! `vmcred-bench`: how fast and how small vmcred is on this machine, with
//! the floors it is judged against measured in the same run. Real release
//! agents behind the hybrid-vsock muxer stand-in (see `vmcred_tests`),
//! Unix sockets only: no AF_VSOCK socket is opened. Not part of the test
//! run; see README.md, "Measured here".

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vmcred_tests::{muxer::Muxer, wait_until, write_atomic, World};

/// The guest agent's port behind each muxer is `vmcred_tests::PORT`; the
/// echo floor uses this one.
const ECHO_PORT: u32 = 1234;
const CRED: &str = "token";

struct Args {
    quick: bool,
    json: Option<PathBuf>,
    samples: usize,
    sizes: Vec<usize>,
    idle: Duration,
    /// The host's `keepalive_interval` in the fan-out worlds: short enough
    /// that the idle window holds probes (the default is 60 s).
    keepalive: Duration,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        json: None,
        samples: 300,
        sizes: Vec::new(),
        idle: Duration::from_secs(25),
        keepalive: Duration::from_secs(10),
    };
    let mut idle_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--json" => a.json = Some(it.next().context("--json needs a file")?.into()),
            "--samples" => {
                a.samples = it.next().context("--samples needs a count")?.parse()?;
            }
            "--sizes" => {
                a.sizes = it
                    .next()
                    .context("--sizes needs a list, e.g. 10,100,1000")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--idle-secs" => {
                a.idle =
                    Duration::from_secs(it.next().context("--idle-secs needs seconds")?.parse()?);
                idle_given = true;
            }
            "--keepalive-secs" => {
                a.keepalive = Duration::from_secs(
                    it.next()
                        .context("--keepalive-secs needs seconds")?
                        .parse()?,
                );
            }
            "-h" | "--help" => {
                println!(
                    "usage: vmcred-bench [--quick] [--json FILE] [--samples K] [--sizes 10,100,1000] [--idle-secs S] [--keepalive-secs K]\n\
                     --keepalive-secs: the host's keepalive_interval in the fan-out runs (default 10; \n\
                     the idle window defaults to 2.5 of it, so it holds every VM's probes twice)\n\
                     --quick: N up to 100, fewer samples, a 10 s idle window with a 4 s keepalive"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if a.sizes.is_empty() {
        a.sizes = if a.quick {
            vec![10, 100]
        } else {
            vec![10, 100, 1000]
        };
    }
    if a.quick {
        a.samples = a.samples.min(100);
        if !idle_given {
            a.keepalive = a.keepalive.min(Duration::from_secs(4));
        }
    }
    if !idle_given {
        a.idle = a.keepalive * 5 / 2;
    }
    if a.keepalive.is_zero() {
        bail!("--keepalive-secs must be at least 1");
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vmcred-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    raise_nofile();
    let mut out = json!({
        "machine": machine(),
        "samples": args.samples,
    });
    let latency = latency(&args)?;
    print_latency(&latency);
    out["latency"] = latency;
    out["load_average_at_start"] = load_average();
    let mut fleet = Vec::new();
    for &n in &args.sizes {
        let r = fan_out(n, &args).with_context(|| format!("fan-out to {n} VMs"))?;
        print_fleet(&r);
        fleet.push(r);
    }
    let goals = goals(&out["latency"], &fleet);
    print_goals(&goals);
    out["fleet"] = Value::Array(fleet);
    out["goals"] = goals;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"nproc": nproc, "cpu": cpu})
}

/// 1000 VMs cost this process about five descriptors each (muxer
/// listener, both ends of each spliced connection).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Milliseconds at the given fraction of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({"p50_ms": pct(&ms, 0.5), "p99_ms": pct(&ms, 0.99), "n": ms.len()})
}

/// A Unix socket that echoes one byte per connection, as a guest port.
fn echo_server(path: &Path) -> Result<()> {
    let l = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(&b);
                }
            });
        }
    });
    Ok(())
}

fn echo_once(mut s: UnixStream) -> Result<()> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

fn hybrid_echo(muxer: &Path) -> Result<()> {
    let mut s = UnixStream::connect(muxer)?;
    s.write_all(format!("CONNECT {ECHO_PORT}\n").as_bytes())?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        bail!("muxer answered {line:?}");
    }
    echo_once(s)
}

fn time_ms(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// One rotate through the control socket, as the CLI sends it; returns
/// once the `done` line is read. Fails unless the VM applied.
fn control_rotate(socket: &Path, vm: &str) -> Result<()> {
    let mut s = UnixStream::connect(socket)?;
    writeln!(
        s,
        "{}",
        json!({"cmd": "rotate", "vms": [vm], "credentials": [], "timeout_ms": 30000})
    )?;
    let mut r = BufReader::new(s);
    let mut applied = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("control socket closed before done");
        }
        let v: Value = serde_json::from_str(&line)?;
        if let Some(rep) = v.get("rotate") {
            applied = rep["applied"].as_bool() == Some(true);
        } else if v.get("done").is_some() {
            break;
        } else {
            bail!("control socket answered {line}");
        }
    }
    if !applied {
        bail!("the guest did not apply");
    }
    Ok(())
}

/// A world whose guests live on tmpfs (/dev/shm), as a guest's
/// credentials do, while the host state stays on the disk-backed tempdir.
fn world() -> Result<(World, tempfile::TempDir)> {
    let w = World::new()?;
    let shm = tempfile::Builder::new()
        .prefix("vmcred-bench")
        .tempdir_in("/dev/shm")
        .context("cannot make a directory in /dev/shm (tmpfs)")?;
    std::os::unix::fs::symlink(shm.path(), w.path().join("vms"))?;
    Ok((w, shm))
}

fn latency(args: &Args) -> Result<Value> {
    let (mut w, _shm) = world()?;
    w.log_level = "warn".into();
    w.add_vm("vm0", false)?;
    w.set_secret("vm0", CRED, b"v-0", false)?;
    w.start_host()?;
    w.boot_guest("vm0")?;
    w.wait_for_guest_value("vm0", CRED, b"v-0", Duration::from_secs(30))?;

    // Floors: the same muxer stand-in, a port that echoes one byte.
    let echo_sock = w.path().join("echo.sock");
    echo_server(&echo_sock)?;
    let mux_sock = w.path().join("echo-muxer.sock");
    let _mux = Muxer::start(
        &mux_sock,
        [(ECHO_PORT, echo_sock.clone())].into_iter().collect(),
    )?;
    let mut hybrid = Vec::new();
    let mut unix = Vec::new();
    for _ in 0..args.samples {
        hybrid.push(time_ms(|| hybrid_echo(&mux_sock))?);
        unix.push(time_ms(|| echo_once(UnixStream::connect(&echo_sock)?))?);
    }

    let control = w.path().join("run/control.sock");
    let source = w.creds["vm0"][CRED].0.clone();
    let mut via_socket = Vec::new();
    let mut via_cli = Vec::new();
    for i in 0..args.samples {
        // A new value each time, so every rotate pushes and is applied.
        write_atomic(&source, format!("s-{i}").as_bytes(), 0o400)?;
        via_socket.push(time_ms(|| control_rotate(&control, "vm0"))?);
    }
    for i in 0..args.samples.min(100) {
        write_atomic(&source, format!("c-{i}").as_bytes(), 0o400)?;
        via_cli.push(time_ms(|| {
            let st = Command::new(&w.bins.host)
                .args(["rotate", "--config"])
                .arg(w.config_path())
                .arg("vm0")
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("vmcred-host rotate exited {st}");
            }
            Ok(())
        })?);
    }
    // The CLI's own floor: starting the binary at all.
    let mut version = Vec::new();
    for _ in 0..args.samples.min(100) {
        version.push(time_ms(|| {
            let st = Command::new(&w.bins.host)
                .arg("--version")
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("vmcred-host --version exited {st}");
            }
            Ok(())
        })?);
    }
    let (s, c, h, u) = (
        summary(via_socket),
        summary(via_cli),
        summary(hybrid),
        summary(unix),
    );
    let v = summary(version);
    let ratio = s["p50_ms"].as_f64().unwrap_or(f64::NAN) / h["p50_ms"].as_f64().unwrap_or(f64::NAN);
    w.stop_host()?;
    Ok(json!({
        "rotate_control_socket": s,
        "rotate_cli": c,
        "floor_hybrid_connect_echo": h,
        "floor_unix_connect_echo": u,
        "floor_cli_version": v,
        "ratio_socket_p50_to_hybrid_floor": ratio,
        "state": "guest directories on tmpfs (/dev/shm), host state on the disk-backed tempdir",
    }))
}

fn print_latency(v: &Value) {
    println!("== rotate latency (one VM), ms");
    println!("{:<40} {:>8} {:>8}", "", "p50", "p99");
    for (k, label) in [
        ("rotate_control_socket", "rotate via control socket"),
        ("rotate_cli", "rotate via vmcred-host CLI"),
        (
            "floor_hybrid_connect_echo",
            "floor: hybrid-vsock connect + echo",
        ),
        ("floor_unix_connect_echo", "floor: Unix connect + echo"),
        ("floor_cli_version", "floor: vmcred-host --version"),
    ] {
        println!(
            "{label:<40} {:>8.3} {:>8.3}",
            v[k]["p50_ms"].as_f64().unwrap_or(f64::NAN),
            v[k]["p99_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "ratio control-socket p50 / hybrid floor p50: {:.2}",
        v["ratio_socket_p50_to_hybrid_floor"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
}

/// CPU time of a process in seconds: the sum over its live threads of the
/// scheduler's nanosecond runtime (`/proc/PID/task/*/schedstat`). Not
/// `/proc/PID/stat`'s utime + stime: those are in clock ticks (10 ms
/// here), and a guest's whole sync takes less than one, so every guest
/// read 0. A thread that exits takes its time along (idle blocking-pool
/// threads), so a difference is a floor.
fn cpu_secs(pid: u32) -> Result<f64> {
    let mut ns: u64 = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = t?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

fn status_field(pid: u32, task: Option<&str>, key: &str) -> Result<u64> {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(path)?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

/// Voluntary + involuntary context switches over the live threads: each
/// is a wake-up. A thread that exits in the window (an idle blocking-pool
/// thread) takes its count along, so a window's difference is a floor and
/// is clamped at zero.
fn wakeups(pid: u32) -> Result<u64> {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?.file_name();
        let t = t.to_string_lossy();
        n += status_field(pid, Some(&t), "voluntary_ctxt_switches:").unwrap_or(0);
        n += status_field(pid, Some(&t), "nonvoluntary_ctxt_switches:").unwrap_or(0);
    }
    Ok(n)
}

fn all_hold(w: &World, n: usize, value: &[u8]) -> bool {
    (0..n).all(|i| w.read_guest(&vm_name(i), CRED).as_deref() == Some(value))
}

fn vm_name(i: usize) -> String {
    format!("vm{i:05}")
}

fn set_all(w: &mut World, n: usize, value: &[u8]) -> Result<()> {
    for i in 0..n {
        w.set_secret(&vm_name(i), CRED, value, false)?;
    }
    Ok(())
}

/// Waits until every guest holds `value`; the time from `start`.
fn until_all(w: &World, n: usize, value: &[u8], start: Instant) -> Result<f64> {
    wait_until(Duration::from_secs(120), || all_hold(w, n, value))
        .context("not every guest got the new value")?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn fan_out(n: usize, args: &Args) -> Result<Value> {
    eprintln!("-- {n} VMs: starting guests");
    let (mut w, _shm) = world()?;
    w.log_level = "warn".into();
    w.extra_config = format!("keepalive_interval = \"{}s\"", args.keepalive.as_secs());
    for i in 0..n {
        w.add_vm(&vm_name(i), false)?;
    }
    set_all(&mut w, n, b"boot")?;
    // The first start creates the host key that the guests' bootstrap pins.
    w.start_host()?;
    for i in 0..n {
        w.boot_guest(&vm_name(i))?;
    }
    until_all(&w, n, b"boot", Instant::now())?;
    w.stop_host()?;

    // Host start -> every guest holds a value changed while it was down.
    set_all(&mut w, n, b"start")?;
    let guest_pids: Vec<u32> = w
        .guests
        .values()
        .filter_map(|g| g.child.as_ref().map(|c| c.id()))
        .collect();
    let cpu0 = Cpu::now(None, &guest_pids);
    let t = Instant::now();
    w.start_host()?;
    let host_pid = w.host.as_ref().context("host not running")?.id();
    let start_ms = until_all(&w, n, b"start", t)?;
    // The host's own CPU from its start; the others' over the same time.
    let start_cpu = Cpu::now(Some(host_pid), &guest_pids).since(&cpu0);

    // SIGHUP with a new value -> every guest holds it.
    set_all(&mut w, n, b"sighup")?;
    let cpu0 = Cpu::now(Some(host_pid), &guest_pids);
    let t = Instant::now();
    w.reload_host()?;
    let sighup_ms = until_all(&w, n, b"sighup", t)?;
    let sighup_cpu = Cpu::now(Some(host_pid), &guest_pids).since(&cpu0);

    // rotate --all, through the CLI, until it exits.
    set_all(&mut w, n, b"rotate")?;
    let t = Instant::now();
    let out = w.host_cmd(&["rotate", "--all"])?;
    let rotate_all_ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "rotate --all failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !all_hold(&w, n, b"rotate") {
        bail!("rotate --all returned before every guest held the value");
    }

    let guest_pid = w.guests[&vm_name(0)]
        .child
        .as_ref()
        .context("guest not running")?
        .id();
    let host_rss_kib = status_field(host_pid, None, "VmRSS:")?;
    let guest_rss_kib = status_field(guest_pid, None, "VmRSS:")?;
    let guest_threads = status_field(guest_pid, None, "Threads:")?;

    // Idle: nothing changes for a while. The window holds every VM's
    // keepalive probes (`--keepalive-secs`), so its CPU is mostly theirs.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, hw0, gw0) = (cpu_secs(host_pid)?, wakeups(host_pid)?, wakeups(guest_pid)?);
    std::thread::sleep(args.idle);
    let (c1, hw1, gw1) = (cpu_secs(host_pid)?, wakeups(host_pid)?, wakeups(guest_pid)?);
    let per_min = 60.0 / args.idle.as_secs_f64();
    let idle_cpu = (c1 - c0) * per_min;
    w.stop_host()?;
    let keepalive_s = args.keepalive.as_secs_f64();
    Ok(json!({
        "vms": n,
        "start_to_all_synced_ms": start_ms,
        "sighup_to_all_hold_ms": sighup_ms,
        "rotate_all_ms": rotate_all_ms,
        "host_rss_mib": host_rss_kib as f64 / 1024.0,
        "host_rss_kib_per_vm": host_rss_kib as f64 / n as f64,
        "host_idle_cpu_s_per_min": idle_cpu,
        // Idle CPU is the probes' (nothing else runs): at the default
        // 60 s interval there are keepalive/60 as many.
        "host_idle_cpu_s_per_min_at_60s_keepalive": idle_cpu * keepalive_s / 60.0,
        "keepalive_s": keepalive_s,
        // Probes come every 3/4..1 of the interval (7/8 on average).
        "probes_in_idle_window_approx": (n as f64 * args.idle.as_secs_f64() / (keepalive_s * 0.875)).round(),
        "cpu_s_start_to_synced": start_cpu.json(),
        "cpu_s_sighup_to_all": sighup_cpu.json(),
        "host_idle_wakeups_per_min": hw1.saturating_sub(hw0) as f64 * per_min,
        "guest_rss_mib": guest_rss_kib as f64 / 1024.0,
        "guest_threads": guest_threads,
        "guest_idle_wakeups_per_min": gw1.saturating_sub(gw0) as f64 * per_min,
        "idle_window_s": args.idle.as_secs_f64(),
    }))
}

fn print_fleet(v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("\n== fan-out to {} VMs", v["vms"]);
    println!(
        "host start -> all synced      {:>10.1} ms",
        f("start_to_all_synced_ms")
    );
    println!(
        "SIGHUP -> all hold new value  {:>10.1} ms",
        f("sighup_to_all_hold_ms")
    );
    println!(
        "rotate --all (CLI, to exit)   {:>10.1} ms",
        f("rotate_all_ms")
    );
    println!(
        "host RSS                      {:>10.1} MiB ({:.1} KiB per VM)",
        f("host_rss_mib"),
        f("host_rss_kib_per_vm")
    );
    println!(
        "host idle CPU                 {:>10.3} s/min ({:.0} wake-ups/min; keepalive {} s, ~{} probes in the {} s window)",
        f("host_idle_cpu_s_per_min"),
        f("host_idle_wakeups_per_min"),
        v["keepalive_s"],
        v["probes_in_idle_window_approx"],
        v["idle_window_s"]
    );
    println!(
        "  scaled to the 60 s default   {:>10.3} s/min",
        f("host_idle_cpu_s_per_min_at_60s_keepalive")
    );
    for (k, label) in [
        ("cpu_s_start_to_synced", "CPU s, start -> synced"),
        ("cpu_s_sighup_to_all", "CPU s, SIGHUP -> all"),
    ] {
        println!(
            "{label:<30} host {:.3}  guests {:.3}  bench+muxers {:.3}",
            v[k]["host"].as_f64().unwrap_or(f64::NAN),
            v[k]["guests"].as_f64().unwrap_or(f64::NAN),
            v[k]["bench_and_muxers"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "guest RSS                     {:>10.1} MiB ({} threads)",
        f("guest_rss_mib"),
        v["guest_threads"]
    );
    println!(
        "guest idle wake-ups           {:>10.1} per min",
        f("guest_idle_wakeups_per_min")
    );
}

/// `/proc/loadavg`'s first three fields: the machine is shared, so every
/// figure goes with the load it was taken under.
fn load_average() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let f: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    json!(f)
}

/// CPU seconds of each party, to see whom a fan-out waits on: the host
/// agent, all guest agents together, and this process (the muxer
/// stand-ins' threads and the polling of the guests' files).
struct Cpu {
    host: f64,
    guests: f64,
    bench: f64,
}

impl Cpu {
    fn now(host: Option<u32>, guests: &[u32]) -> Cpu {
        Cpu {
            host: host.and_then(|p| cpu_secs(p).ok()).unwrap_or(0.0),
            guests: guests.iter().filter_map(|p| cpu_secs(*p).ok()).sum(),
            bench: cpu_secs(std::process::id()).unwrap_or(0.0),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            host: self.host - before.host,
            guests: self.guests - before.guests,
            bench: self.bench - before.bench,
        }
    }

    fn json(&self) -> Value {
        json!({"host": self.host, "guests": self.guests, "bench_and_muxers": self.bench})
    }
}

/// The goals of issue 10 next to what this run measured. The fleet goals
/// are for N = 1000.
fn goals(latency: &Value, fleet: &[Value]) -> Value {
    let l = |k: &str, p: &str| latency[k][p].as_f64().unwrap_or(f64::NAN);
    let (sp50, sp99) = (
        l("rotate_control_socket", "p50_ms"),
        l("rotate_control_socket", "p99_ms"),
    );
    let ratio = latency["ratio_socket_p50_to_hybrid_floor"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let cli = l("rotate_cli", "p50_ms");
    let mut rows = vec![
        json!({"figure": "rotate via control socket p50 / p99", "measured": format!("{sp50:.2} / {sp99:.2} ms"), "goal": "<= 0.4 / 2 ms", "met": sp50 <= 0.4 && sp99 <= 2.0}),
        json!({"figure": "control-socket p50 / hybrid floor p50", "measured": format!("{ratio:.1} x"), "goal": "<= 4 x", "met": ratio <= 4.0}),
        json!({"figure": "vmcred-host rotate CLI p50", "measured": format!("{cli:.2} ms"), "goal": "<= 1.5 ms", "met": cli <= 1.5}),
    ];
    let big = fleet.iter().find(|f| f["vms"].as_u64() == Some(1000));
    let f = |k: &str| big.and_then(|b| b[k].as_f64()).unwrap_or(f64::NAN);
    let fleet_rows = [
        (
            "N = 1000: host start -> all synced",
            f("start_to_all_synced_ms"),
            "ms",
            500.0,
            "<= 500 ms",
        ),
        (
            "N = 1000: SIGHUP -> all hold the new value",
            f("sighup_to_all_hold_ms"),
            "ms",
            200.0,
            "<= 200 ms",
        ),
        (
            "N = 1000: rotate --all",
            f("rotate_all_ms"),
            "ms",
            500.0,
            "<= 500 ms",
        ),
        (
            "N = 1000: host RSS",
            f("host_rss_mib"),
            "MiB",
            32.0,
            "<= 32 MiB",
        ),
        (
            "N = 1000: host idle CPU, probes at the 60 s default",
            f("host_idle_cpu_s_per_min_at_60s_keepalive"),
            "s/min",
            0.1,
            "<= 0.1 s/min",
        ),
    ];
    for (figure, v, unit, max, goal) in fleet_rows {
        rows.push(if big.is_some() {
            json!({"figure": figure, "measured": format!("{v:.3} {unit}"), "goal": goal, "met": v <= max})
        } else {
            json!({"figure": figure, "measured": "not run (--sizes without 1000)", "goal": goal, "met": null})
        });
    }
    Value::Array(rows)
}

fn print_goals(goals: &Value) {
    println!("\n== goals (issue 10)");
    println!(
        "{:<52} {:>22} {:>14} {:>5}",
        "figure", "measured", "goal", "met"
    );
    for g in goals.as_array().into_iter().flatten() {
        let met = match g["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<52} {:>22} {:>14} {:>5}",
            g["figure"].as_str().unwrap_or(""),
            g["measured"].as_str().unwrap_or(""),
            g["goal"].as_str().unwrap_or(""),
            met
        );
    }
}
