//! `vmcred-bench`: how fast and how small vmcred is on this machine, with
//! the floors it is judged against measured in the same run. Real release
//! agents behind the hybrid-vsock muxer stand-in (see `vmcred_tests`),
//! Unix sockets only: no AF_VSOCK socket is opened. Not part of the test
//! run; see README.md, "Measured here".

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vmcred_tests::inotify::{self, Inotify};
use vmcred_tests::measure::ProcFootprint;
use vmcred_tests::{muxer, muxer::Muxer, write_atomic, World};

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
    /// The one-VM idle window at the default 60 s keepalive; zero skips it.
    idle_guest: Duration,
    /// `--guest-bin`: the guest agent to run instead of the one found.
    guest_bin: Option<PathBuf>,
    cli_bin: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        json: None,
        samples: 300,
        sizes: Vec::new(),
        idle: Duration::from_secs(25),
        keepalive: Duration::from_secs(10),
        idle_guest: Duration::from_secs(70),
        guest_bin: None,
        cli_bin: None,
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
            "--idle-guest-secs" => {
                a.idle_guest = Duration::from_secs(
                    it.next()
                        .context("--idle-guest-secs needs seconds")?
                        .parse()?,
                );
            }
            "--guest-bin" => {
                a.guest_bin = Some(it.next().context("--guest-bin needs a path")?.into());
            }
            "--cli-bin" => {
                a.cli_bin = Some(it.next().context("--cli-bin needs a path")?.into());
            }
            "-h" | "--help" => {
                println!(
                    "usage: vmcred-bench [--quick] [--json FILE] [--samples K] [--sizes 10,100,1000] [--idle-secs S] [--keepalive-secs K]\n\
                     \x20                   [--idle-guest-secs S] [--guest-bin PATH] [--cli-bin PATH]\n\
                     --keepalive-secs: the host's keepalive_interval in the fan-out runs (default 10; \n\
                     the idle window defaults to 2.5 of it, so it holds every VM's probes twice)\n\
                     --idle-guest-secs: the window of the one-VM idle run at the default 60 s keepalive,\n\
                     run alongside the other parts (default 70, so it holds one probe; 0 skips it)\n\
                     --guest-bin: the guest agent to run (default: the `guest` profile's static build,\n\
                     then its dynamic build, then the release build next to this binary)\n\
                     --cli-bin: the vmcred-host whose rotate and --version are timed (default: the\n\
                     static-pie build in target/x86_64-unknown-linux-gnu/release, else the release one)\n\
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
    if !a.idle_guest.is_zero() && a.idle_guest < Duration::from_secs(61) {
        bail!("--idle-guest-secs must be 0 or above 60, so that the window holds a probe");
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
    let guest = choose_guest(args.guest_bin.as_deref())?;
    guest.print();
    let cli = choose_cli(args.cli_bin.as_deref())?;
    cli.print();
    let mut out = json!({
        "machine": machine(),
        "samples": args.samples,
        "guest_binary": guest.json(),
        "cli_binary": cli.json(),
    });
    out["load_average_at_start"] = load_average();
    let latency = part("rotate latency", || latency(&args, &guest.path, &cli.path))?;
    print_latency(&latency);
    out["latency"] = latency;
    // The one-VM idle run waits more than a minute for one probe; it runs
    // next to the fan-outs (after the latency part, whose floors it would
    // disturb while it starts).
    let idle = (!args.idle_guest.is_zero()).then(|| {
        let (path, window) = (guest.path.clone(), args.idle_guest);
        std::thread::spawn(move || part("idle guest", || idle_guest(&path, window)))
    });
    let mut fleet = Vec::new();
    for &n in &args.sizes {
        let r = part(&format!("fan-out to {n} VMs"), || {
            fan_out(n, &args, &guest.path)
        })
        .with_context(|| format!("fan-out to {n} VMs"))?;
        print_fleet(&r);
        fleet.push(r);
    }
    let idle = match idle {
        Some(t) => {
            eprintln!("-- waiting for the idle-guest window to end");
            let v = t
                .join()
                .map_err(|_| anyhow::anyhow!("the idle-guest run panicked"))?
                .context("idle guest")?;
            print_idle_guest(&v);
            v
        }
        None => Value::Null,
    };
    let goals = goals(&out["latency"], &fleet, &idle, &guest);
    print_goals(&goals);
    out["fleet"] = Value::Array(fleet);
    out["idle_guest"] = idle;
    out["goals"] = goals;
    out["load_average_at_end"] = load_average();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}

/// Runs one part of the bench between two readings of the load average,
/// printed and added to the part's JSON object as `load_average`
/// (`start`, `end`): the machine is shared, so each figure goes with the
/// load it was taken under.
fn part(name: &str, f: impl FnOnce() -> Result<Value>) -> Result<Value> {
    let start = load_average();
    eprintln!("-- {name}: load average at start {start}");
    let mut v = f()?;
    let end = load_average();
    eprintln!("-- {name}: load average at end {end}");
    v["load_average"] = json!({"start": start, "end": end});
    Ok(v)
}

fn fmt_load(v: &Value) -> String {
    let f = |p: &str| {
        v["load_average"][p]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.2}", x.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    format!("load average {} -> {}", f("start"), f("end"))
}

/// How the guest agent under test was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linkage {
    /// No ELF interpreter: glibc linked in (`+crt-static`), as the VM
    /// stage builds it.
    Static,
    Dynamic,
}

/// A binary under test, as found: where, how linked, how big.
struct Binary {
    /// What it is, for the printed line (`guest agent`, `host CLI`).
    role: &'static str,
    path: PathBuf,
    /// Where it was found (see [`choose_guest`] and [`choose_cli`]).
    source: &'static str,
    linkage: Linkage,
    size: u64,
    /// Found (not given) and built before the release build next to this
    /// binary: likely stale.
    older_than_release: bool,
    /// For the static guest-profile guest: the size of the dynamic one
    /// (`target/guest/vmcred-guest`), when built. glibc linked in is about
    /// 0.9 MB of the static binary.
    dynamic_sibling_size: Option<u64>,
}

/// `target/` above this binary (`target/release/vmcred-bench`).
fn target_dir() -> Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("cannot find the target directory above this binary")
}

/// The guest agent binary every part runs: the VMs get the `guest`
/// profile (`opt-level = "z"`, fat LTO, `panic = "abort"`), so that is
/// what is measured when it is built: `--guest-bin`, else the static
/// guest-profile build, else the dynamic one, else the release build.
fn choose_guest(given: Option<&Path>) -> Result<Binary> {
    let release = vmcred_tests::Bins::find()?.guest;
    let target = target_dir()?;
    let dynamic_guest = target.join("guest/vmcred-guest");
    let (path, source) = match given {
        Some(p) => (p.to_path_buf(), "--guest-bin"),
        None => {
            let candidates = [
                (
                    target.join("x86_64-unknown-linux-gnu/guest/vmcred-guest"),
                    "guest profile, static",
                ),
                (dynamic_guest.clone(), "guest profile"),
            ];
            candidates
                .into_iter()
                .find(|(p, _)| p.is_file())
                .unwrap_or((release.clone(), "release (no guest-profile build found)"))
        }
    };
    let mut bin = Binary::inspect("guest agent", path, source, &release)?;
    bin.dynamic_sibling_size = (bin.linkage == Linkage::Static && bin.path != dynamic_guest)
        .then(|| std::fs::metadata(&dynamic_guest).ok().map(|m| m.len()))
        .flatten();
    Ok(bin)
}

/// The `vmcred-host` whose `rotate` and `--version` are timed:
/// `--cli-bin`, else the front's static-pie build (`+crt-static`, README
/// "Measured here") when there is one, as a host would install it for a
/// fast `rotate`, else the release build next to this binary. `serve`
/// always runs from the release build (the static front's directory has
/// no `vmcred-host-agent` to exec).
fn choose_cli(given: Option<&Path>) -> Result<Binary> {
    let release = vmcred_tests::Bins::find()?.host;
    let static_front = target_dir()?.join("x86_64-unknown-linux-gnu/release/vmcred-host");
    let (path, source) = if let Some(p) = given {
        (p.to_path_buf(), "--cli-bin")
    } else if static_front.is_file() {
        (static_front, "release, static")
    } else {
        (release.clone(), "release (no static build found)")
    };
    let mut bin = Binary::inspect("host CLI", path, source, &release)?;
    // A binary given on purpose may well be older (a comparison).
    bin.older_than_release &= given.is_none();
    Ok(bin)
}

impl Binary {
    fn inspect(
        role: &'static str,
        path: PathBuf,
        source: &'static str,
        release: &Path,
    ) -> Result<Binary> {
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read the {role} {}", path.display()))?;
        let linkage = if has_interpreter(&bytes)
            .with_context(|| format!("{} is not an ELF64 executable", path.display()))?
        {
            Linkage::Dynamic
        } else {
            Linkage::Static
        };
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let older_than_release = path != release
            && matches!((mtime(&path), mtime(release)), (Some(a), Some(b)) if a < b);
        Ok(Binary {
            role,
            size: bytes.len() as u64,
            path,
            source,
            linkage,
            older_than_release,
            dynamic_sibling_size: None,
        })
    }

    fn linkage_name(&self) -> &'static str {
        match self.linkage {
            Linkage::Static => "static",
            Linkage::Dynamic => "dynamic",
        }
    }

    fn print(&self) {
        println!(
            "{}: {} ({}, {} glibc, {} B)",
            self.role,
            self.path.display(),
            self.source,
            self.linkage_name(),
            self.size
        );
        if self.older_than_release {
            println!(
                "  WARNING: built before the release {}; rebuild it (README, \"Measured here\")",
                self.role
            );
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "path": self.path.display().to_string(),
            "source": self.source,
            "linkage": self.linkage_name(),
            "size_bytes": self.size,
            "older_than_release_build": self.older_than_release,
        });
        if let Some(size) = self.dynamic_sibling_size {
            v["dynamic_guest_profile_size_bytes"] = json!(size);
        }
        v
    }
}

/// Whether an ELF64 little-endian file has a `PT_INTERP` program header
/// (a dynamic loader); `None` when it is not such a file.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?) == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
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
    // One write, as the CLI sends it (`client::call`): `writeln!` on the
    // unbuffered stream sent each JSON token in a sendto(2) of its own
    // (about 40), each waking the daemon's reader, and that was timed too.
    let mut line = serde_json::to_vec(
        &json!({"cmd": "rotate", "vms": [vm], "credentials": [], "timeout_ms": 30000}),
    )?;
    line.push(b'\n');
    s.write_all(&line)?;
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
/// credentials do, while the host state stays on the disk-backed tempdir;
/// its guests run the agent at `guest`.
fn world(guest: &Path) -> Result<(World, tempfile::TempDir)> {
    let mut w = World::new()?;
    w.bins.guest = guest.to_path_buf();
    let shm = tempfile::Builder::new()
        .prefix("vmcred-bench")
        .tempdir_in("/dev/shm")
        .context("cannot make a directory in /dev/shm (tmpfs)")?;
    // The host's sources on tmpfs too, where secrets live on a host
    // (sops-nix's and agenix's ramfs, systemd's credentials): the host
    // reads those without a thread hop (ARCHITECTURE.md, "Sources that hang").
    for sub in ["vms", "secrets"] {
        std::fs::create_dir(shm.path().join(sub))?;
        std::os::unix::fs::symlink(shm.path().join(sub), w.path().join(sub))?;
    }
    Ok((w, shm))
}

/// `cli`: the `vmcred-host` whose `rotate` and `--version` are timed.
fn latency(args: &Args, guest: &Path, cli: &Path) -> Result<Value> {
    let (mut w, _shm) = world(guest)?;
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
    let control = w.path().join("run/control.sock");
    let source = w.creds["vm0"][CRED].0.clone();
    let mut hybrid = Vec::new();
    let mut unix = Vec::new();
    let mut via_socket = Vec::new();
    let mut via_cli = Vec::new();
    // The rotate and its floors interleaved, one sample of each in turn,
    // so that the ratio compares figures taken under the same load: on
    // this shared machine the floor alone moved 0.094 -> 0.142 ms between
    // runs minutes apart (session 7), and a floor measured in one stretch
    // and the rotate in the next could meet different weather.
    for i in 0..args.samples {
        hybrid.push(time_ms(|| hybrid_echo(&mux_sock))?);
        unix.push(time_ms(|| echo_once(UnixStream::connect(&echo_sock)?))?);
        // A new value each time, so every rotate pushes and is applied.
        write_atomic(&source, format!("s-{i}").as_bytes(), 0o400)?;
        via_socket.push(time_ms(|| control_rotate(&control, "vm0"))?);
    }
    // The CLI and its floors, interleaved so that each sample of the three
    // meets the same load: starting any process at all (fork + exec of
    // /bin/true), starting this binary (`--version`), and the rotate.
    let spawn = |cmd: &Path, args: &[&OsStr]| -> Result<f64> {
        time_ms(|| {
            let st = Command::new(cmd)
                .args(args)
                .stdout(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("{} {args:?} exited {st}", cmd.display());
            }
            Ok(())
        })
    };
    let config = w.config_path();
    let rotate_args = [
        OsStr::new("rotate"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("vm0"),
    ];
    let mut version = Vec::new();
    let mut true_ = Vec::new();
    for i in 0..args.samples.min(100) {
        write_atomic(&source, format!("c-{i}").as_bytes(), 0o400)?;
        via_cli.push(spawn(cli, &rotate_args)?);
        version.push(spawn(cli, &[OsStr::new("--version")])?);
        true_.push(spawn(Path::new("/bin/true"), &[])?);
    }
    let (s, c, h, u) = (
        summary(via_socket),
        summary(via_cli),
        summary(hybrid),
        summary(unix),
    );
    let (v, t) = (summary(version), summary(true_));
    let p50 = |x: &Value| x["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let ratio = p50(&s) / p50(&h);
    let cli_over_version = p50(&c) - p50(&v);
    w.stop_host()?;
    Ok(json!({
        "rotate_control_socket": s,
        "rotate_cli": c,
        "floor_hybrid_connect_echo": h,
        "floor_unix_connect_echo": u,
        "floor_cli_version": v,
        "floor_fork_exec_true": t,
        "ratio_socket_p50_to_hybrid_floor": ratio,
        "cli_p50_minus_version_p50_ms": cli_over_version,
        "state": "guest directories and host sources on tmpfs (/dev/shm), host state on the disk-backed tempdir",
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
        ("floor_fork_exec_true", "floor: /bin/true (fork + exec)"),
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
    println!(
        "CLI rotate p50 - --version p50 (the CLI's own work): {:.3} ms",
        v["cli_p50_minus_version_p50_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    println!("({})", fmt_load(v));
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

/// This thread's CPU time in seconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Sees every guest of a fan-out take a new value: inotify on each
/// guest's credentials directory (the agent renames the new file in), and
/// one read of a guest's file only when its directory changed. A second
/// without events re-reads the guests still waited for, in case an event
/// was lost (queue overflow).
struct SyncWatch {
    ino: Inotify,
    vm_of_wd: HashMap<i32, usize>,
    files: Vec<PathBuf>,
}

/// What watching a fan-out cost this process.
struct WatchCost {
    events: usize,
    file_reads: usize,
    cpu_s: f64,
}

impl WatchCost {
    fn json(&self) -> Value {
        json!({"inotify_events": self.events, "file_reads": self.file_reads, "cpu_s": self.cpu_s})
    }
}

impl SyncWatch {
    /// Call after the guests booted: a boot re-creates their directories.
    fn new(w: &World, n: usize) -> Result<SyncWatch> {
        let ino = Inotify::new()?;
        let mut vm_of_wd = HashMap::new();
        let mut files = Vec::new();
        for i in 0..n {
            let dir = w.guest_view(&vm_name(i))?;
            vm_of_wd.insert(
                ino.watch(&dir, inotify::IN_MOVED_TO | inotify::IN_CLOSE_WRITE)?,
                i,
            );
            files.push(dir.join(CRED));
        }
        Ok(SyncWatch {
            ino,
            vm_of_wd,
            files,
        })
    }

    /// Waits until every guest holds `value`, which none held when the
    /// change that `start` timed began; the time from `start`.
    fn wait_all(&self, value: &[u8], start: Instant) -> Result<(f64, WatchCost)> {
        let cpu0 = thread_cpu_secs();
        let mut cost = WatchCost {
            events: 0,
            file_reads: 0,
            cpu_s: 0.0,
        };
        let mut holds = |i: usize| {
            cost.file_reads += 1;
            std::fs::read(&self.files[i]).ok().as_deref() == Some(value)
        };
        let mut pending: BTreeSet<usize> = (0..self.files.len()).collect();
        while !pending.is_empty() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{} of {} guests did not get the new value within 120 s",
                    pending.len(),
                    self.files.len()
                );
            }
            let evs = self.ino.wait(Duration::from_secs(1))?;
            cost.events += evs.len();
            let recheck_all =
                evs.is_empty() || evs.iter().any(|e| e.mask & inotify::IN_Q_OVERFLOW != 0);
            if recheck_all {
                pending.retain(|&i| !holds(i));
                continue;
            }
            for e in evs {
                if let Some(&i) = self.vm_of_wd.get(&e.wd) {
                    if pending.contains(&i) && holds(i) {
                        pending.remove(&i);
                    }
                }
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        cost.cpu_s = thread_cpu_secs() - cpu0;
        Ok((ms, cost))
    }
}

fn fan_out(n: usize, args: &Args, guest: &Path) -> Result<Value> {
    eprintln!("-- {n} VMs: starting guests");
    let (mut w, _shm) = world(guest)?;
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
    let watch = SyncWatch::new(&w, n)?;
    watch.wait_all(b"boot", Instant::now())?;
    w.stop_host()?;
    // Events of the boot sync left queued would only cost the timed
    // start extra reads.
    let _ = watch.ino.drain()?;

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
    let (start_ms, start_watch) = watch.wait_all(b"start", t)?;
    // The host's own CPU from its start; the others' over the same time.
    let start_cpu = Cpu::now(Some(host_pid), &guest_pids).since(&cpu0);

    // SIGHUP with a new value -> every guest holds it.
    set_all(&mut w, n, b"sighup")?;
    let _ = watch.ino.drain()?;
    let cpu0 = Cpu::now(Some(host_pid), &guest_pids);
    let t = Instant::now();
    w.reload_host()?;
    let (sighup_ms, sighup_watch) = watch.wait_all(b"sighup", t)?;
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

    // One VM's rotate through the control socket with N VMs configured:
    // it must not grow with N (compare with the one-VM latency part).
    let control = w.path().join("run/control.sock");
    let source = w.creds[&vm_name(0)][CRED].0.clone();
    let mut one = Vec::new();
    for i in 0..ONE_VM_SAMPLES {
        write_atomic(&source, format!("one-{i}").as_bytes(), 0o400)?;
        one.push(time_ms(|| control_rotate(&control, &vm_name(0)))?);
    }
    // Drop the events of these rotates and of rotate --all.
    let _ = watch.ino.drain()?;

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
        "rotate_one_vm_control_socket": summary(one),
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
        "watch_start_to_synced": start_watch.json(),
        "watch_sighup_to_all": sighup_watch.json(),
        "host_idle_wakeups_per_min": hw1.saturating_sub(hw0) as f64 * per_min,
        "guest_rss_mib": guest_rss_kib as f64 / 1024.0,
        "guest_threads": guest_threads,
        "guest_idle_wakeups_per_min_at_bench_keepalive": gw1.saturating_sub(gw0) as f64 * per_min,
        "idle_window_s": args.idle.as_secs_f64(),
    }))
}

/// Control-socket rotates of one VM in each fan-out world.
const ONE_VM_SAMPLES: usize = 20;

/// `rchar` and `syscr` from `/proc/PID/io`: bytes and calls of read(2),
/// readv(2) and pread(2) (files, pipes, eventfds; recv(2) on a socket is
/// not counted).
fn proc_io(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    let field = |k: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .with_context(|| format!("no {k} in /proc/{pid}/io"))?
            .trim()
            .parse()
            .with_context(|| format!("{k} in /proc/{pid}/io is not a number"))
    };
    Ok((field("rchar")?, field("syscr")?))
}

/// One VM at the host's default 60 s keepalive, connected and idle for
/// `window` (more than 60 s, so it holds one jittered probe): the guest's
/// wake-ups, read syscalls, files opened or read in its directories, CPU
/// and footprint.
fn idle_guest(guest: &Path, window: Duration) -> Result<Value> {
    let (mut w, _shm) = world(guest)?;
    w.log_level = "warn".into();
    w.extra_config = "keepalive_interval = \"60s\"".into();
    let vm = "idle";
    w.add_vm(vm, false)?;
    w.set_secret(vm, CRED, b"idle-v1", false)?;
    w.start_host()?;
    w.boot_guest(vm)?;
    let wait = Duration::from_secs(60);
    w.wait_for_guest_value(vm, CRED, b"idle-v1", wait)?;
    w.set_secret(vm, CRED, b"idle-v2", false)?;
    control_rotate(&w.path().join("run/control.sock"), vm)?;
    w.wait_for_guest_value(vm, CRED, b"idle-v2", wait)?;
    // The guest's blocking-pool thread exits 2 s after the push.
    std::thread::sleep(Duration::from_secs(3));
    let g = &w.guests[vm];
    let pid = g.child.as_ref().context("guest agent not running")?.id();
    // Any open or read of a file in the guest's directories (its
    // credentials, its state, its config) while idle.
    let ino = Inotify::new()?;
    for d in [&g.dir, &g.creds_dir, &g.state_dir] {
        ino.watch(d, inotify::IN_OPEN | inotify::IN_ACCESS)?;
    }
    let (wk0, io0, cpu0) = (wakeups(pid)?, proc_io(pid)?, cpu_secs(pid)?);
    std::thread::sleep(window);
    let (wk1, io1, cpu1) = (wakeups(pid)?, proc_io(pid)?, cpu_secs(pid)?);
    let evs = ino.drain()?;
    let overflow = evs.iter().any(|e| e.mask & inotify::IN_Q_OVERFLOW != 0);
    let count = |m: u32| evs.iter().filter(|e| e.mask & m != 0).count();
    let fp = ProcFootprint::of_pid(pid)?;
    w.stop_host()?;
    let per_min = 60.0 / window.as_secs_f64();
    Ok(json!({
        "keepalive_s": 60,
        "window_s": window.as_secs_f64(),
        "wakeups_per_min": wk1.saturating_sub(wk0) as f64 * per_min,
        // read(2), readv, pread: files, pipes, eventfds. The agent's
        // socket reads are recv(2), which /proc/PID/io does not count.
        "read_syscalls": io1.1.saturating_sub(io0.1),
        "read_bytes": io1.0.saturating_sub(io0.0),
        "file_opens_in_guest_dirs": count(inotify::IN_OPEN),
        "file_reads_in_guest_dirs": count(inotify::IN_ACCESS),
        "inotify_overflow": overflow,
        "cpu_s": cpu1 - cpu0,
        "rss_kib": fp.rss_kib,
        "rss_file_kib": fp.rss_file_kib,
        "rss_anon_kib": fp.rss_anon_kib,
        "threads": fp.threads,
    }))
}

fn print_idle_guest(v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n== one guest connected and idle, keepalive 60 s (default), {} s window ({})",
        v["window_s"],
        fmt_load(v)
    );
    println!(
        "wake-ups                      {:>10.1} per min",
        f("wakeups_per_min")
    );
    println!(
        "read(2)-family syscalls       {:>10} ({} bytes; files, pipes, eventfds; not socket recv)",
        v["read_syscalls"], v["read_bytes"]
    );
    println!(
        "files opened / read in its credential, state and config directories: {} / {}{}",
        v["file_opens_in_guest_dirs"],
        v["file_reads_in_guest_dirs"],
        if v["inotify_overflow"].as_bool() == Some(true) {
            " (inotify queue overflowed: more)"
        } else {
            ""
        }
    );
    println!("CPU                           {:>10.4} s", f("cpu_s"));
    println!(
        "RSS                           {:>10.0} KiB (file {}, anonymous {}; {} threads)",
        f("rss_kib"),
        v["rss_file_kib"],
        v["rss_anon_kib"],
        v["threads"]
    );
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
    println!(
        "one VM's rotate, control socket {:>8.3} ms p50, {:.3} ms p99 (with {} VMs configured)",
        v["rotate_one_vm_control_socket"]["p50_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        v["rotate_one_vm_control_socket"]["p99_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        v["vms"]
    );
    for (k, w, label) in [
        (
            "cpu_s_start_to_synced",
            "watch_start_to_synced",
            "CPU s, start -> synced",
        ),
        (
            "cpu_s_sighup_to_all",
            "watch_sighup_to_all",
            "CPU s, SIGHUP -> all",
        ),
    ] {
        let c = |x: &str| v[k][x].as_f64().unwrap_or(f64::NAN);
        println!(
            "{label:<30} host {:.3}  guests {:.3}  muxers {:.3}  bench {:.3}",
            c("host"),
            c("guests"),
            c("muxers"),
            c("bench"),
        );
        let k = |who: &str, x: &str| v[k][who][x].as_u64().unwrap_or(0);
        println!(
            "  minor faults / switches      host {} / {}  guests {} / {}",
            k("host_kernel", "minor_faults"),
            k("host_kernel", "context_switches"),
            k("guests_kernel", "minor_faults"),
            k("guests_kernel", "context_switches"),
        );
        println!(
            "  of the bench: seeing all synced {:.4} s ({} inotify events, {} file reads)",
            v[w]["cpu_s"].as_f64().unwrap_or(f64::NAN),
            v[w]["inotify_events"],
            v[w]["file_reads"]
        );
    }
    println!(
        "guest RSS                     {:>10.1} MiB ({} threads)",
        f("guest_rss_mib"),
        v["guest_threads"]
    );
    println!(
        "guest idle wake-ups           {:>10.1} per min at the {} s keepalive (the goal's figure is the one-VM run at 60 s)",
        f("guest_idle_wakeups_per_min_at_bench_keepalive"),
        v["keepalive_s"]
    );
    println!("({})", fmt_load(v));
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
/// agent, all guest agents together, the muxer stand-ins' threads of this
/// process, and the rest of this process (the main thread watching for
/// the guests' files, and the idle-guest run's thread, which sleeps).
struct Cpu {
    host: f64,
    guests: f64,
    muxers: f64,
    bench: f64,
    /// Minor page faults and context switches of the host and of all
    /// guests: what the kernel's share of a fan-out is made of, which an
    /// instruction profile of the agents (user space only) does not see.
    host_kernel: Kernel,
    guests_kernel: Kernel,
}

/// A process's minor faults (`/proc/PID/stat` field 10, whole process)
/// and context switches (its live threads').
#[derive(Clone, Copy, Default)]
struct Kernel {
    minor_faults: u64,
    switches: u64,
}

impl Kernel {
    fn of(pid: u32) -> Kernel {
        // comm (field 2) may hold spaces; the fields after its ')' are
        // fixed, minflt being the 8th of them.
        let minor_faults = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().nth(7)?.parse().ok()
            })
            .unwrap_or(0);
        Kernel {
            minor_faults,
            switches: wakeups(pid).unwrap_or(0),
        }
    }

    fn sum(pids: &[u32]) -> Kernel {
        pids.iter().fold(Kernel::default(), |a, p| {
            let k = Kernel::of(*p);
            Kernel {
                minor_faults: a.minor_faults + k.minor_faults,
                switches: a.switches + k.switches,
            }
        })
    }

    fn since(&self, before: &Kernel) -> Kernel {
        Kernel {
            minor_faults: self.minor_faults.saturating_sub(before.minor_faults),
            switches: self.switches.saturating_sub(before.switches),
        }
    }

    fn json(&self) -> Value {
        json!({"minor_faults": self.minor_faults, "context_switches": self.switches})
    }
}

/// This process's CPU seconds: (muxer threads, all other threads).
fn own_cpu_secs() -> (f64, f64) {
    let (mut mux, mut rest) = (0u64, 0u64);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (f64::NAN, f64::NAN);
    };
    for t in tasks.flatten() {
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == muxer::THREAD_NAME {
            mux += ns;
        } else {
            rest += ns;
        }
    }
    (mux as f64 / 1e9, rest as f64 / 1e9)
}

impl Cpu {
    fn now(host: Option<u32>, guests: &[u32]) -> Cpu {
        let (muxers, bench) = own_cpu_secs();
        Cpu {
            host: host.and_then(|p| cpu_secs(p).ok()).unwrap_or(0.0),
            guests: guests.iter().filter_map(|p| cpu_secs(*p).ok()).sum(),
            muxers,
            bench,
            host_kernel: host.map(Kernel::of).unwrap_or_default(),
            guests_kernel: Kernel::sum(guests),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            host: self.host - before.host,
            guests: self.guests - before.guests,
            muxers: self.muxers - before.muxers,
            bench: self.bench - before.bench,
            host_kernel: self.host_kernel.since(&before.host_kernel),
            guests_kernel: self.guests_kernel.since(&before.guests_kernel),
        }
    }

    fn json(&self) -> Value {
        json!({
            "host": self.host,
            "guests": self.guests,
            "muxers": self.muxers,
            "bench": self.bench,
            "bench_and_muxers": self.muxers + self.bench,
            "host_kernel": self.host_kernel.json(),
            "guests_kernel": self.guests_kernel.json(),
        })
    }
}

/// One row of the goals table: `met` is `None` when this run did not
/// measure the figure.
fn row(figure: &str, measured: String, goal: &str, met: Option<bool>, note: &str) -> Value {
    json!({"figure": figure, "measured": measured, "goal": goal, "met": met, "note": note})
}

/// Every goal of issue 10 next to what this run measured. The fleet goals
/// are for N = 1000; the guest's from the one-VM idle run at the default
/// keepalive and the guest binary this run used.
fn goals(latency: &Value, fleet: &[Value], idle: &Value, guest: &Binary) -> Value {
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
        row(
            "rotate via control socket p50 / p99",
            format!("{sp50:.2} / {sp99:.2} ms"),
            "<= 0.4 / 2 ms",
            Some(sp50 <= 0.4 && sp99 <= 2.0),
            "",
        ),
        row(
            "control-socket p50 / hybrid floor p50",
            format!("{ratio:.1} x"),
            "<= 4 x",
            Some(ratio <= 4.0),
            &format!(
                "floor: hybrid-vsock connect + 1-byte echo, p50 {:.3} ms",
                l("floor_hybrid_connect_echo", "p50_ms")
            ),
        ),
        row(
            "vmcred-host rotate CLI p50",
            format!("{cli:.2} ms"),
            "<= 1.5 ms",
            Some(cli <= 1.5),
            &format!(
                "floors p50: /bin/true {:.2} ms, vmcred-host --version {:.2} ms; CLI p50 - --version p50 = {:.2} ms",
                l("floor_fork_exec_true", "p50_ms"),
                l("floor_cli_version", "p50_ms"),
                latency["cli_p50_minus_version_p50_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            ),
        ),
        row(
            "host's durable generation write per push",
            "not measured here".into(),
            "off the latency path",
            None,
            "a design property: see ARCHITECTURE.md and the host's tests",
        ),
    ];
    let big = fleet.iter().find(|f| f["vms"].as_u64() == Some(1000));
    let f = |k: &str| big.and_then(|b| b[k].as_f64()).unwrap_or(f64::NAN);
    let one_n = big
        .and_then(|b| b["rotate_one_vm_control_socket"]["p50_ms"].as_f64())
        .unwrap_or(f64::NAN);
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
            "N = 1000: one VM's rotate p50 / one-VM world's",
            one_n / sp50,
            "x",
            1.5,
            "<= 1.5 x",
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
            row(figure, format!("{v:.3} {unit}"), goal, Some(v <= max), "")
        } else {
            row(
                figure,
                "not run (--sizes without 1000)".into(),
                goal,
                None,
                "",
            )
        });
    }
    let from = format!(
        "{} ({}; {} glibc)",
        guest.path.display(),
        guest.source,
        guest.linkage_name()
    );
    let size_note = match guest.dynamic_sibling_size {
        Some(d) => format!("{from}; the dynamic guest-profile build is {d} B"),
        None => from.clone(),
    };
    rows.push(row(
        "guest agent binary size",
        format!("{} B", guest.size),
        "<= 3 MB",
        Some(guest.size <= 3_000_000),
        &size_note,
    ));
    let i = |k: &str| idle[k].as_f64();
    match (
        i("rss_kib"),
        i("wakeups_per_min"),
        i("file_opens_in_guest_dirs"),
        i("file_reads_in_guest_dirs"),
    ) {
        (Some(rss), Some(wk), Some(opens), Some(reads)) => {
            rows.push(row(
                "guest agent RSS, connected and idle",
                format!("{:.2} MiB", rss / 1024.0),
                "<= 4 MiB",
                Some(rss <= 4096.0),
                &from,
            ));
            rows.push(row(
                "guest idle wake-ups, keepalive 60 s",
                format!("{wk:.1} /min"),
                "<= 6 /min",
                Some(wk <= 6.0),
                &format!("{} s window", idle["window_s"]),
            ));
            rows.push(row(
                "guest files opened / read while idle",
                format!("{opens} / {reads}"),
                "0 / 0",
                Some(opens == 0.0 && reads == 0.0),
                &format!(
                    "its credential, state and config directories (inotify); {} read(2)-family syscalls in all ({} bytes)",
                    idle["read_syscalls"], idle["read_bytes"]
                ),
            ));
        }
        _ => {
            for (figure, goal) in [
                ("guest agent RSS, connected and idle", "<= 4 MiB"),
                ("guest idle wake-ups, keepalive 60 s", "<= 6 /min"),
                ("guest files opened / read while idle", "0 / 0"),
            ] {
                rows.push(row(
                    figure,
                    "not run (--idle-guest-secs 0)".into(),
                    goal,
                    None,
                    "",
                ));
            }
        }
    }
    rows.push(row(
        "host polling of sources",
        "not measured here".into(),
        "read once per change",
        None,
        "a design property: see ARCHITECTURE.md and the host's tests",
    ));
    Value::Array(rows)
}

fn print_goals(goals: &Value) {
    println!("\n== goals (issue 10)");
    println!(
        "{:<52} {:>22} {:>20} {:>4}",
        "figure", "measured", "goal", "met"
    );
    for g in goals.as_array().into_iter().flatten() {
        let met = match g["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<52} {:>22} {:>20} {:>4}",
            g["figure"].as_str().unwrap_or(""),
            g["measured"].as_str().unwrap_or(""),
            g["goal"].as_str().unwrap_or(""),
            met
        );
        if let Some(note) = g["note"].as_str().filter(|n| !n.is_empty()) {
            println!("    {note}");
        }
    }
}
