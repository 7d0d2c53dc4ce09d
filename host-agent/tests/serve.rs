//! `vmcred-host serve` as a real process: its local sockets, who may use
//! them, how it behaves under floods, slow clients, many VMs, few
//! descriptors and a second instance, and the CLI's exit codes. VMs point
//! at Unix sockets that do not exist (or at a listener that only counts
//! dials): none of this needs a guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const BUILT: &str = env!("CARGO_BIN_EXE_vmcred-host");

/// The binary under test; `VMCRED_HOST_BIN` points these tests at another
/// build (to show that a fix's test fails on the code before it).
fn bin() -> String {
    std::env::var("VMCRED_HOST_BIN").unwrap_or_else(|_| BUILT.to_string())
}

struct Agent {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    /// A config with `extra` appended (top-level keys first, then VMs).
    fn config(top: &str, vms: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        // Other users (the launch-socket test's `nobody`) must reach the
        // sockets.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path();
        std::fs::write(
            p.join("host.toml"),
            format!(
                "state_dir = \"{}\"\ncontrol_socket = \"{}\"\nlaunch_socket = \"{}\"\npoll_interval = \"0s\"\ndial_backoff_max = \"30s\"\n{top}\n{vms}",
                p.join("state").display(),
                p.join("run/control.sock").display(),
                p.join("run/launch.sock").display(),
            ),
        )
        .unwrap();
        dir
    }

    fn start(top: &str, vms: &str) -> Agent {
        Agent::start_in(Agent::config(top, vms), None)
    }

    fn start_in(dir: tempfile::TempDir, nofile: Option<u64>) -> Agent {
        Agent::start_under(&[], dir, nofile)
    }

    /// The agent run as the last argument of `wrapper` (such as
    /// `unshare -m`), which must exec it.
    fn start_under(wrapper: &[&str], dir: tempfile::TempDir, nofile: Option<u64>) -> Agent {
        let child = spawn_serve(wrapper, dir.path(), nofile);
        let agent = Agent {
            dir,
            child: Some(child),
        };
        wait_for(Duration::from_secs(30), || {
            UnixStream::connect(agent.control()).is_ok()
        });
        agent
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn config_path(&self) -> PathBuf {
        self.path().join("host.toml")
    }
    fn control(&self) -> PathBuf {
        self.path().join("run/control.sock")
    }
    fn launch(&self) -> PathBuf {
        self.path().join("run/launch.sock")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("serve.log")).unwrap_or_default()
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_serve(wrapper: &[&str], dir: &Path, nofile: Option<u64>) -> Child {
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    cmd.args(["serve", "--config"])
        .arg(dir.join("host.toml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(n) = nofile {
        // SAFETY: only async-signal-safe setrlimit between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().unwrap()
}

/// Polls `f` until it holds; panics after `limit` (a bound on waiting for
/// an event, not a timing assertion).
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < end,
            "condition not reached within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `serve --config cfg`, which must exit on its own (a second agent);
/// waits at most 20 s, then kills it and fails.
fn serve_must_exit(cfg: &Path) -> Output {
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the second serve kept running: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Whether a reply line ends the reply.
fn terminal(line: &str) -> bool {
    !(line.starts_with("{\"status\"") || line.starts_with("{\"rotate\""))
}

/// Sends one request line on a connected stream and reads reply lines up
/// to the terminal one.
fn exchange(mut s: UnixStream, request: &str) -> Vec<String> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        let end = terminal(&line);
        lines.push(line);
        if end {
            break;
        }
    }
    lines
}

/// `n` control clients that all connect before any of them sends
/// `status`; each one's reply lines, in client order.
fn concurrent_status(agent: &Agent, n: usize) -> Vec<Vec<String>> {
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let path = agent.control();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(path).unwrap();
                barrier.wait();
                exchange(s, r#"{"cmd":"status"}"#)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// `request` sent to the Unix socket `socket` by `nobody` (through
/// `setpriv` and `socat`); what came back, and socat's own errors.
fn nobody_sends(socket: &Path, request: &[u8]) -> Output {
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "socat",
            "-t",
            "5",
            "-",
        ])
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(request).unwrap();
    child.wait_with_output().unwrap()
}

fn vms_at_missing_sockets(dir: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("[vms.vm{i}]\nunix_socket = \"{dir}/nothing-{i}.sock\"\n"))
        .collect()
}

#[test]
fn launch_socket_admits_only_root_and_launch_users() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    let mode = std::fs::metadata(agent.launch())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    let as_nobody = || {
        let o = nobody_sends(&agent.launch(), b"{\"cmd\":\"launched\",\"vm\":\"a\"}\n");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let refused = as_nobody();
    assert!(refused.contains("may not notify"), "{refused:?}");
    // Root is always admitted.
    let ok = exchange(
        UnixStream::connect(agent.launch()).unwrap(),
        r#"{"cmd":"launched","vm":"a"}"#,
    );
    assert_eq!(ok, vec!["\"ok\"".to_string()]);

    // Allow `nobody` and reload: now it may.
    let cfg = std::fs::read_to_string(agent.config_path()).unwrap();
    std::fs::write(
        agent.config_path(),
        format!("launch_users = [\"nobody\"]\n{cfg}"),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(30), || as_nobody().contains("\"ok\""));
}

#[test]
fn slow_launch_clients_do_not_block_a_real_one() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    // More idle connections than the old 32 slots, sending nothing.
    let idle: Vec<UnixStream> = (0..60)
        .map(|_| UnixStream::connect(agent.launch()).unwrap())
        .collect();
    let real = exchange(
        UnixStream::connect(agent.launch()).unwrap(),
        r#"{"cmd":"launched","vm":"a"}"#,
    );
    assert_eq!(real, vec!["\"ok\"".to_string()]);
    // Each idle one is then cut off by its deadline, with an answer.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.contains("timed out"), "{text:?}");
    }
}

#[test]
fn launched_flood_is_coalesced_per_vm() {
    let dir = Agent::config("", "");
    let guest = dir.path().join("guest.sock");
    let listener = UnixListener::bind(&guest).unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    {
        let dials = dials.clone();
        std::thread::spawn(move || {
            // Accept and hang up at once: every dial fails and backs off.
            for s in listener.incoming() {
                dials.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
    }
    let cfg = dir.path().join("host.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}[vms.a]\nunix_socket = \"{}\"\n", guest.display()),
    )
    .unwrap();
    let agent = Agent::start_in(dir, None);
    wait_for(Duration::from_secs(30), || {
        dials.load(Ordering::SeqCst) >= 1
    });
    let started = Instant::now();
    let before = dials.load(Ordering::SeqCst);
    for _ in 0..100 {
        let r = exchange(
            UnixStream::connect(agent.launch()).unwrap(),
            r#"{"cmd":"launched","vm":"a"}"#,
        );
        assert_eq!(r, vec!["\"ok\"".to_string()]);
    }
    let elapsed = started.elapsed().as_secs();
    let during = dials.load(Ordering::SeqCst) - before;
    // One wake-up per second at most, plus the task's own back-off
    // (250 ms doubling) — far below one dial per notification.
    let allowed = 2 * (elapsed as usize + 1) + 6;
    assert!(
        during <= allowed,
        "{during} dials for 100 notifications in {elapsed} s"
    );
}

#[test]
fn hundred_concurrent_control_clients_all_get_an_answer() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    for lines in concurrent_status(&agent, 100) {
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[1], r#"{"done":{"count":1}}"#);
    }
}

#[test]
fn status_answers_for_2000_vms() {
    let dir = Agent::config("", "");
    let cfg = dir.path().join("host.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let vms = vms_at_missing_sockets(&dir.path().display().to_string(), 2000);
    std::fs::write(&cfg, format!("{text}{vms}")).unwrap();
    let agent = Agent::start_in(dir, None);
    let out = agent.cli(&["status", "--json"]);
    // Out of sync: none of them is reachable.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["vms"].as_array().unwrap().len(), 2000);
    assert_eq!(v["summary"]["out_of_sync"], 2000);
    assert_eq!(v["complete"], true);
    // The table form, filtered.
    let out = agent.cli(&["status", "--vm", "vm7", "--vm", "vm1999"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.contains("vm1999") && text.contains("down"), "{text}");
    assert!(text.contains("2 VM(s): 0 in sync, 2 out of sync"), "{text}");
}

#[test]
fn few_descriptors_many_clients_stays_responsive_and_quiet() {
    let dir = Agent::config("", "");
    let agent = Agent::start_in(dir, Some(40));
    for lines in concurrent_status(&agent, 150) {
        assert_eq!(
            lines.last().map(String::as_str),
            Some(r#"{"done":{"count":0}}"#),
            "{lines:?}"
        );
    }
    let log = agent.log();
    assert!(
        log.lines().count() < 50,
        "{} log lines:\n{}",
        log.lines().count(),
        log.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    let out = agent.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn a_second_serve_refuses_and_leaves_the_first_alone() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    let before = std::fs::metadata(agent.control()).unwrap();
    let out = serve_must_exit(&agent.config_path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("PID {}", agent.pid())), "{err}");
    let after = std::fs::metadata(agent.control()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(before.ino(), after.ino(), "the live socket was replaced");
    assert_eq!(agent.cli(&["status", "--vm", "a"]).status.code(), Some(1));
}

#[test]
fn a_live_socket_of_another_agent_is_not_taken_over() {
    let first = Agent::start("", "");
    // Same sockets, another state_dir: the lock does not see it, the
    // probe does.
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(first.config_path())
        .unwrap()
        .replace(
            &first.path().join("state").display().to_string(),
            &dir.path().join("state").display().to_string(),
        );
    std::fs::write(dir.path().join("host.toml"), cfg).unwrap();
    let out = serve_must_exit(&dir.path().join("host.toml"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refusing to take it over"), "{err}");
    assert_eq!(first.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn sigterm_stops_and_removes_the_sockets() {
    let mut agent = Agent::start("", &vms_at_missing_sockets("/nonexistent", 3));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.child.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!agent.control().exists() && !agent.launch().exists());
}

#[test]
fn exit_codes_are_distinct_and_errors_say_their_cause_once() {
    let dir = Agent::config("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n[vms.a.credentials.K]\npath = \"/nonexistent/k\"\n");
    let cfg = dir.path().join("host.toml");
    let run = |args: &[&str], cfg: &Path| {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap()
    };
    // No agent running.
    let o = run(&["status"], &cfg);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    // Unreadable config: 4, and the cause once.
    let o = run(&["status"], &dir.path().join("missing.toml"));
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // A VM or credential not in the config: the running agent refuses it
    // at once (the CLI reads only control_socket), 2.
    let agent = Agent::start(
        "",
        "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n[vms.a.credentials.K]\npath = \"/nonexistent/k\"\n",
    );
    assert_eq!(agent.cli(&["rotate", "nope"]).status.code(), Some(2));
    let o = agent.cli(&["rotate", "a", "NOT_CONFIGURED"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no credential named"));
    assert_eq!(
        agent.cli(&["status", "--vm", "nope"]).status.code(),
        Some(2)
    );
    // clap's own usage errors.
    assert_eq!(run(&["rotate", "--bogus"], &cfg).status.code(), Some(2));
}

#[test]
fn rotate_all_reports_every_vm_in_one_table() {
    let agent = Agent::start("", &vms_at_missing_sockets("/nonexistent", 3));
    let out = agent.cli(&["rotate", "--all", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for vm in ["vm0", "vm1", "vm2"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(vm) && l.contains("NOT-APPLIED")),
            "{text}"
        );
    }
    assert!(text.contains("3 VM(s): 0 applied, 3 not"), "{text}");
    let out = agent.cli(&["rotate", "--vm", "vm1", "--json", "--timeout", "1s"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["rotations"].as_array().unwrap().len(), 1);
    assert_eq!(v["rotations"][0]["vm"], "vm1");
}

#[test]
fn sighup_adds_and_removes_vms_and_keeps_answering() {
    let agent = Agent::start("", &vms_at_missing_sockets("/nonexistent", 3));
    // Through the socket: the CLI itself would refuse the broken config.
    let names = |agent: &Agent| -> Vec<String> {
        exchange(
            UnixStream::connect(agent.control()).unwrap(),
            r#"{"cmd":"status"}"#,
        )
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["status"]["vm"].as_str().map(String::from))
        .collect()
    };
    assert_eq!(names(&agent), ["vm0", "vm1", "vm2"]);
    let text = std::fs::read_to_string(agent.config_path()).unwrap();
    let text = text.replace("[vms.vm0]", "[vms.vm3]");
    std::fs::write(agent.config_path(), text).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(30), || {
        names(&agent) == ["vm1", "vm2", "vm3"]
    });
    // A broken config is refused and the running one kept.
    std::fs::write(agent.config_path(), "[vms.x]\n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(30), || {
        agent.log().contains("config reload failed")
    });
    assert_eq!(names(&agent), ["vm1", "vm2", "vm3"]);
}

#[test]
fn control_socket_refuses_other_users_and_long_name_lists_stay_short() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    let mode = std::fs::metadata(agent.control())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Even with the mode opened up, the peer check refuses `nobody`.
    std::fs::set_permissions(agent.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nobody_sends(&agent.control(), b"{\"cmd\":\"status\"}\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("may not use the control socket"), "{text:?}");
    assert!(!text.contains("\"status\""), "{text:?}");
    // Thousands of unknown names: one short error line, nothing rotated.
    let names: Vec<String> = (0..5000).map(|i| format!("x{i}")).collect();
    let req = serde_json::json!({"cmd": "rotate", "vms": names, "timeout_ms": 1000});
    let lines = exchange(
        UnixStream::connect(agent.control()).unwrap(),
        &req.to_string(),
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].len() < 1000, "{}", lines[0].len());
    assert!(lines[0].contains("and 4995 more"), "{}", lines[0]);
}

#[test]
fn control_group_members_may_read_status_but_not_rotate() {
    let agent = Agent::start(
        "control_group = \"nogroup\"",
        "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n",
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(agent.control()).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), 65534);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", &bin()])
            .args(args)
            .arg("--config")
            .arg(agent.config_path())
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // Readable; out of sync (the VM is not reachable), so exit 1.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text.lines().any(|l| l.starts_with("a ")), "{text}");
    let out = as_nobody(&["rotate", "a", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("may only read status"), "{all}");
}

/// An agent with `n` VMs at missing sockets and `top` in its config.
fn agent_with_vms(top: &str, n: usize) -> Agent {
    let dir = Agent::config(top, "");
    let cfg = dir.path().join("host.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let vms = vms_at_missing_sockets(&dir.path().display().to_string(), n);
    std::fs::write(&cfg, format!("{text}{vms}")).unwrap();
    Agent::start_in(dir, None)
}

/// Reads whatever has arrived on the non-blocking `s` without waiting;
/// whether the daemon closed the connection.
fn drain(s: &mut UnixStream, got: &mut Vec<u8>) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// How often the slow readers below take what has arrived: well within
/// the old per-line write deadline (10 s), so each of them could hold its
/// slot for as long as its reply lasted.
const SLOW_READ_EVERY: Duration = Duration::from_secs(4);

#[test]
fn status_names_each_vm_once_however_often_it_is_named() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    let req = serde_json::json!({"cmd": "status", "vms": vec!["a"; 50_000]});
    let lines = exchange(
        UnixStream::connect(agent.control()).unwrap(),
        &req.to_string(),
    );
    assert_eq!(lines.len(), 2, "{} lines", lines.len());
    assert!(
        lines[0].starts_with("{\"status\":{\"vm\":\"a\""),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1], r#"{"done":{"count":1}}"#);
}

#[test]
fn a_huge_bogus_command_gives_a_short_log_line_and_a_short_reply() {
    let agent = Agent::start("", "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n");
    let bogus = format!("{{\"cmd\":\"{}\"}}", "x".repeat(200_000));
    let mut replies = Vec::new();
    for socket in [agent.control(), agent.launch()] {
        replies.push((
            socket.clone(),
            exchange(UnixStream::connect(&socket).unwrap(), &bogus),
        ));
    }
    // Bad requests are logged once per 10 s (the start-up probe's empty
    // connection was one): send it again until its whole line is logged.
    let logged = |log: &str| {
        log.find("unknown variant")
            .is_some_and(|at| log[at..].contains('\n'))
    };
    wait_for(Duration::from_secs(40), || {
        if logged(&agent.log()) {
            return true;
        }
        exchange(UnixStream::connect(agent.control()).unwrap(), &bogus);
        std::thread::sleep(Duration::from_millis(500));
        logged(&agent.log())
    });
    let log = agent.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");
    for (socket, lines) in replies {
        assert_eq!(lines.len(), 1, "{socket:?}");
        assert!(lines[0].contains("bad request"), "{}", lines[0]);
        assert!(
            lines[0].len() < 1000,
            "{socket:?}: {} bytes",
            lines[0].len()
        );
    }
}

#[test]
fn a_slow_reader_is_cut_off_once_it_has_kept_the_daemon_waiting_long_enough() {
    let agent = agent_with_vms("", 2000);
    let mut s = UnixStream::connect(agent.control()).unwrap();
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        std::thread::sleep(SLOW_READ_EVERY);
        if drain(&mut s, &mut got) {
            break;
        }
        assert!(
            Instant::now() < end,
            "never cut off ({} bytes read)",
            got.len()
        );
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("{\"done\""),
        "the slow reader was served its whole reply ({} lines)",
        text.lines().count()
    );
    wait_for(Duration::from_secs(20), || {
        agent.log().contains("kept the daemon waiting")
    });
}

/// Not a test on its own: `read_only_slow_readers_cannot_make_root_busy`
/// runs it as `nobody`. It opens `VMCRED_SLOW_READERS` control connections,
/// asks each for the status of every VM (each named ten times), then reads
/// what has arrived every `SLOW_READ_EVERY`, saying after each round how
/// many connections are still open.
#[test]
#[ignore]
fn slow_read_only_readers() {
    let Ok(socket) = std::env::var("VMCRED_SLOW_READER_SOCKET") else {
        return;
    };
    let n: usize = std::env::var("VMCRED_SLOW_READERS")
        .unwrap()
        .parse()
        .unwrap();
    let vms: usize = std::env::var("VMCRED_SLOW_READER_VMS")
        .unwrap()
        .parse()
        .unwrap();
    let names: Vec<String> = (0..10)
        .flat_map(|_| (0..vms).map(|i| format!("vm{i}")))
        .collect();
    let mut req = serde_json::json!({"cmd": "status", "vms": names}).to_string();
    req.push('\n');
    let mut conns: Vec<Option<UnixStream>> = (0..n)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            // A connection refused at once may be closed before all of it
            // is written.
            let _ = s.write_all(req.as_bytes());
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    for round in 1..=100 {
        std::thread::sleep(SLOW_READ_EVERY);
        for c in conns.iter_mut() {
            if let Some(s) = c {
                let mut got = Vec::new();
                if drain(s, &mut got) {
                    *c = None;
                }
            }
        }
        let open = conns.iter().filter(|c| c.is_some()).count();
        println!("round {round} open {open}");
        if open == 0 {
            return;
        }
    }
}

/// Runs [`slow_read_only_readers`] as `nobody` with `n` connections to
/// `agent`'s control socket (status of 2000 VMs, each named ten times),
/// and returns once two of its rounds have passed, when every reader that
/// got a slot holds it. The readers' stdout comes back with them: closing
/// it would end them at their next round's line.
fn start_slow_readers(agent: &Agent, n: usize) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut readers = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "slow_read_only_readers",
            "--ignored",
            "--nocapture",
        ])
        .env("VMCRED_SLOW_READER_SOCKET", agent.control())
        .env("VMCRED_SLOW_READERS", n.to_string())
        .env("VMCRED_SLOW_READER_VMS", "2000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(readers.stdout.take().unwrap());
    let second = out
        .by_ref()
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("round 2 "));
    assert!(second.is_some(), "the slow readers did not start");
    (readers, out)
}

#[test]
fn read_only_slow_readers_cannot_make_root_busy() {
    let agent = agent_with_vms("control_group = \"nogroup\"", 2000);
    // More slow readers than the daemon had work slots in all.
    let (mut readers, _their_stdout) = start_slow_readers(&agent, 40);
    let reply = exchange(
        UnixStream::connect(agent.control()).unwrap(),
        r#"{"cmd":"rotate","vms":["vm0"],"timeout_ms":500}"#,
    );
    let _ = readers.kill();
    let _ = readers.wait();
    assert!(
        reply.first().is_some_and(|l| l.starts_with("{\"rotate\"")),
        "{reply:?}"
    );
    assert!(reply.iter().all(|l| !l.contains("busy")), "{reply:?}");
}

/// Kills its child when dropped, so that a failed test leaves no helper
/// process behind (one blocked on a FIFO would keep its namespace alive).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl KillOnDrop {
    /// The child's output once it has exited on its own; panics if it
    /// has not within `limit` (a bound on waiting, not a timing check).
    fn output_within(mut self, limit: Duration, what: &str) -> Output {
        let end = Instant::now() + limit;
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "{what}: no answer within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = Vec::new();
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_end(&mut out).unwrap();
        }
        let mut err = Vec::new();
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_end(&mut err).unwrap();
        }
        Output {
            status: self.0.wait().unwrap(),
            stdout: out,
            stderr: err,
        }
    }
}

/// A control client running as `uid` with primary group `gid` and exactly
/// the supplementary `groups` (through `setpriv` and `socat`), which sends
/// `request` and then reads until the daemon closes; started, not waited
/// for.
fn client_as(uid: u32, gid: u32, groups: &[u32], socket: &Path, request: &str) -> KillOnDrop {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", list.join(","))
    };
    let mut child = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups)
        .args(["socat", "-t", "60", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    KillOnDrop(child)
}

/// `exchange` as root, in a thread; panics if no terminal line came within
/// `limit` (a bound on waiting for the answer, not a timing check).
fn exchange_within(limit: Duration, socket: PathBuf, request: &'static str) -> Vec<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let s = UnixStream::connect(socket).unwrap();
        let _ = tx.send(exchange(s, request));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("root's {request} got no answer within {limit:?}"))
}

/// `control_group` of the group-database test: a group that is not
/// `nobody`'s primary one, so that only a supplementary membership can
/// admit it (the test gives that membership to the client's process, not
/// to the group database).
const SUPPLEMENTARY_GROUP: (&str, u32) = ("users", 100);

#[test]
fn a_hanging_group_database_stalls_no_control_client() {
    let (group, gid) = SUPPLEMENTARY_GROUP;
    let dir = Agent::config(
        &format!("control_group = \"{group}\""),
        "[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n",
    );
    // The agent resolves control_group's name when it loads its config,
    // before the FIFO below is in place.
    let agent = Agent::start_under(
        &["unshare", "--mount", "--propagation", "private"],
        dir,
        None,
    );
    let fifo = agent.path().join("group.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let pid = agent.pid().to_string();
    let mounted = Command::new("nsenter")
        .args(["-t", &pid, "--mount", "--", "mount", "--bind"])
        .arg(&fifo)
        .arg("/etc/group")
        .status()
        .unwrap();
    assert!(mounted.success());
    // From now on a lookup in the group database inside the agent's
    // namespace blocks in open(2) until someone writes to the FIFO, as a
    // hanging LDAP or sssd would; this one shows that it does.
    let lookup = KillOnDrop(
        Command::new("nsenter")
            .args(["-t", &pid, "--mount", "--", "getent", "group", group])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // `nobody` holding the group as a supplementary one (as a member who
    // logged in does) while the group database cannot be read.
    let member = client_as(
        65534,
        65534,
        &[gid],
        &agent.control(),
        r#"{"cmd":"status"}"#,
    );
    let status = exchange_within(
        Duration::from_secs(30),
        agent.control(),
        r#"{"cmd":"status"}"#,
    );
    assert_eq!(
        status.last().map(String::as_str),
        Some(r#"{"done":{"count":1}}"#),
        "{status:?}"
    );
    let rotate = exchange_within(
        Duration::from_secs(30),
        agent.control(),
        r#"{"cmd":"rotate","vms":["a"],"timeout_ms":500}"#,
    );
    assert!(
        rotate.first().is_some_and(|l| l.starts_with("{\"rotate\"")),
        "{rotate:?}"
    );
    let out = member.output_within(Duration::from_secs(30), "the member's status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("{\"status\":{\"vm\":\"a\""), "{out:?}");
    assert!(text.contains(r#"{"done":{"count":1}}"#), "{out:?}");
    // Someone without the group (the socket's mode opened up for it) is
    // refused at once, with no lookup either.
    std::fs::set_permissions(agent.control(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = client_as(65534, 65534, &[], &agent.control(), r#"{"cmd":"status"}"#);
    let out = stranger.output_within(Duration::from_secs(30), "the stranger's refusal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("uid 65534 may not use the control socket"),
        "{out:?}"
    );
    // The group database was blocked all along: the lookup above is still
    // waiting, and ends once the FIFO is fed (with "not found": glibc's
    // reader cannot seek in a FIFO, which does not matter here).
    let mut lookup = lookup;
    assert!(
        lookup.0.try_wait().unwrap().is_none(),
        "getent finished without the FIFO being fed: the test proved nothing"
    );
    // The writer's open lets the lookup's open(2) return; glibc then gives
    // up on the FIFO (it cannot seek in it) and may close it before the
    // write, which then fails with EPIPE: either way the lookup ends.
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("the blocked lookup holds the FIFO open for reading");
    let _ = (&writer).write_all(format!("{group}:x:{gid}:\n").as_bytes());
    drop(writer);
    lookup.output_within(Duration::from_secs(30), "getent after the FIFO was fed");
}

#[test]
fn one_read_only_user_cannot_crowd_out_another() {
    let agent = agent_with_vms("control_group = \"nogroup\"", 2000);
    // `nobody` opens as many slow-read status connections as all read-only
    // users had in all.
    let (mut readers, _their_stdout) = start_slow_readers(&agent, 16);
    // `nobody`, over its share, is told so…
    let over = client_as(65534, 65534, &[], &agent.control(), r#"{"cmd":"status"}"#)
        .output_within(Duration::from_secs(90), "nobody's extra status");
    // …and another member of the group (uid 65533, primary group nogroup)
    // still gets its answer.
    let other = client_as(
        65533,
        65534,
        &[],
        &agent.control(),
        r#"{"cmd":"status","vms":["vm0"]}"#,
    )
    .output_within(Duration::from_secs(90), "the other member's status");
    let _ = readers.kill();
    let _ = readers.wait();
    let text = String::from_utf8_lossy(&other.stdout);
    assert!(text.starts_with("{\"status\":{\"vm\":\"vm0\""), "{other:?}");
    assert!(text.contains(r#"{"done":{"count":1}}"#), "{other:?}");
    let text = String::from_utf8_lossy(&over.stdout);
    assert!(text.starts_with("{\"busy\":"), "{over:?}");
    assert!(text.contains("uid 65534"), "{over:?}");
    assert!(text.contains("per user"), "{over:?}");
}

/// Not a test on its own: `one_user_cannot_keep_others_from_the_metrics_socket`
/// runs it as `nobody`. It opens `VMCRED_IDLE_CONNECTIONS` connections to
/// `VMCRED_IDLE_SOCKET`, sends nothing on them, says how many it opened,
/// and holds them until it is killed.
#[test]
#[ignore]
fn idle_connections() {
    let Ok(socket) = std::env::var("VMCRED_IDLE_SOCKET") else {
        return;
    };
    let n: usize = std::env::var("VMCRED_IDLE_CONNECTIONS")
        .unwrap()
        .parse()
        .unwrap();
    let held: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    println!("open {}", held.len());
    std::thread::sleep(Duration::from_secs(600));
}

/// An agent with `control_group = "nogroup"`, one VM and a metrics
/// socket, started and serving it; and that socket's path.
fn agent_with_metrics_socket() -> (Agent, PathBuf) {
    let dir = Agent::config("control_group = \"nogroup\"", "");
    let metrics = dir.path().join("run/metrics.sock");
    let cfg = dir.path().join("host.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}metrics_socket = \"{}\"\n[vms.a]\nunix_socket = \"/nonexistent/a.sock\"\n",
            metrics.display()
        ),
    )
    .unwrap();
    let agent = Agent::start_in(dir, None);
    wait_for(Duration::from_secs(30), || metrics.exists());
    (agent, metrics)
}

#[test]
fn one_user_cannot_keep_others_from_the_metrics_socket() {
    let (agent, metrics) = agent_with_metrics_socket();
    // A member of the group opens many connections and sends nothing on
    // them (each would hold a scrape slot until its deadline).
    let mut idle = KillOnDrop(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "idle_connections", "--ignored", "--nocapture"])
            .env("VMCRED_IDLE_SOCKET", &metrics)
            .env("VMCRED_IDLE_CONNECTIONS", "60")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Kept open until the end: the helper must not die of a closed pipe.
    let mut lines = BufReader::new(idle.0.stdout.take().unwrap()).lines();
    let opened = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("open "));
    assert_eq!(opened.as_deref(), Some("open 60"));
    // Root's scrape is still answered.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = metrics.clone();
    std::thread::spawn(move || {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vmcred\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        let _ = tx.send(got);
    });
    let limit = Duration::from_secs(60);
    let got = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("root's scrape got no answer within {limit:?}"));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("vmcred_vms 1"), "{got}");
    // `nobody`'s next connection is closed at once, with the reason
    // written first (best effort; a client that writes after the close
    // sees a broken pipe instead, so this one only reads).
    let over = KillOnDrop(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["socat", "-u"])
            .arg(format!("UNIX-CONNECT:{}", metrics.display()))
            .arg("-")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
    .output_within(Duration::from_secs(60), "nobody's extra scrape");
    let text = String::from_utf8_lossy(&over.stdout);
    assert!(text.starts_with("HTTP/1.1 503"), "{over:?}");
    assert!(
        text.contains("uid 65534") && text.contains("per user"),
        "{over:?}"
    );
    drop(idle);
    drop(lines);
    drop(agent);
}

/// Not a test on its own: `two_scrapes_of_one_uid_that_collide_are_both_served`
/// runs it as `nobody`. On `VMCRED_SCRAPE_SOCKET`, connection A opens and
/// sends nothing yet (a scrape in progress); B sends its request; C only
/// reads. C's answer means B was accepted before it (the backlog is
/// first in, first out); then A sends its request. It prints each
/// connection's status line.
#[test]
#[ignore]
fn colliding_scrapes() {
    let Ok(socket) = std::env::var("VMCRED_SCRAPE_SOCKET") else {
        return;
    };
    const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: vmcred\r\nConnection: close\r\n\r\n";
    let status = |mut s: UnixStream| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    };
    let mut a = UnixStream::connect(&socket).unwrap();
    let mut b = UnixStream::connect(&socket).unwrap();
    b.write_all(GET).unwrap();
    let c = UnixStream::connect(&socket).unwrap();
    println!("C {}", status(c));
    a.write_all(GET).unwrap();
    println!("A {}", status(a));
    println!("B {}", status(b));
}

/// Two scrapers under one uid that collide (a Prometheus HA pair through
/// one local proxy user) are both served: the second waits for the first
/// instead of being answered 503 at once (found in review: with one
/// scrape per uid, the loser recorded `up = 0`). A third at the same time
/// is still answered 503 at once, so a uid queues at most one.
#[test]
fn two_scrapes_of_one_uid_that_collide_are_both_served() {
    let (agent, metrics) = agent_with_metrics_socket();
    let out = KillOnDrop(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "colliding_scrapes", "--ignored", "--nocapture"])
            .env("VMCRED_SCRAPE_SOCKET", &metrics)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
    .output_within(Duration::from_secs(60), "nobody's colliding scrapes");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |who: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(who))
            .unwrap_or_else(|| panic!("no answer for {who}: {out:?}\n{}", agent.log()))
            .to_string()
    };
    assert!(line("A ").starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        line("B ").starts_with("HTTP/1.1 200"),
        "the colliding scrape was refused: {text}"
    );
    assert!(line("C ").starts_with("HTTP/1.1 503"), "{text}");
    drop(agent);
}
