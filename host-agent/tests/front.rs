//! The `vmcred-host` front against the full agent (`vmcred-host-agent`):
//! what it hands on reaches the agent unchanged (same output, same exit
//! code, same PID), what it runs itself (`rotate`, `status`, `--version`)
//! prints byte for byte what the agent prints, even with no agent beside
//! it, and a missing or unusable agent is a precise error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FRONT: &str = env!("CARGO_BIN_EXE_vmcred-host");
const AGENT: &str = env!("CARGO_BIN_EXE_vmcred-host-agent");

/// Runs `exe` with `args`, `argv[0]` = the front's path (as the front
/// passes it on), no stdin, stdout and stderr captured (not terminals:
/// no progress line, no cut to a width).
fn run(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe)
        .arg0(FRONT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn shown(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_same(front: &Path, args: &[&str]) {
    let (f, a) = (run(front, args), run(Path::new(AGENT), args));
    assert_eq!(shown(&f), shown(&a), "vmcred-host {args:?}");
}

/// A directory with a copy of the front and no agent beside it.
fn lone_front() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let front = dir.path().join("vmcred-host");
    if std::fs::hard_link(FRONT, &front).is_err() {
        std::fs::copy(FRONT, &front).unwrap();
    }
    (dir, front)
}

#[test]
fn what_the_front_does_not_take_reaches_the_agent_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let missing = missing.to_str().unwrap();
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["help", "rotate"],
        &["rotate", "--help"],
        &["status", "-h"],
        &["serve", "--help"],
        &["launch", "--help"],
        &["rotate", "--bogus", "vm1"],
        &["rotate", "--json", "--json", "vm1"],
        &["rotate", "--all", "--vm", "a"],
        &["rotate", "--timeout", "soon", "vm1"],
        &["status", "vm1"],
        &["bogus"],
        &[],
        &["serve", "--config", missing],
        &["check-config", "--config", missing],
        &["pin", "--config", missing],
        &["--version"],
        &["-V"],
    ] {
        assert_same(Path::new(FRONT), args);
    }
}

/// A stand-in daemon on a control socket: canned reply lines by request.
fn fake_daemon(socket: &Path) {
    let l = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut line = String::new();
            if BufReader::new(&s).read_line(&mut line).is_err() {
                continue;
            }
            let req: serde_json::Value = serde_json::from_str(&line).unwrap();
            let _ = (&s).write_all(replies(&req).as_bytes());
        }
    });
}

fn status(vm: &str, connected: bool, applied: u64, error: Option<&str>) -> String {
    serde_json::json!({"status": {
        "vm": vm, "target": format!("unix:/run/{vm}.sock"), "connected": connected,
        "generation_sent": 7, "generation_applied": applied, "last_error": error,
        "last_sync": 1_700_000_000u64,
        "credentials": [{"name": "API_KEY", "boot": false, "state": "applied", "error": null}],
    }})
    .to_string()
}

fn report(vm: &str, applied: bool) -> String {
    serde_json::json!({"rotate": {
        "vm": vm, "applied": applied, "generation": 9,
        "credentials": [
            {"name": "API_KEY", "outcome": if applied { "written" } else { "failed" },
             "error": if applied { None } else { Some("disk full") }},
            {"name": "DB", "outcome": "unchanged", "error": null},
        ],
        "units": [{"unit": "app.service", "action": "restart", "ok": applied, "error": null}],
        "error": if applied { None } else { Some("guest said no") },
    }})
    .to_string()
}

fn replies(req: &serde_json::Value) -> String {
    let vms: Vec<&str> = req["vms"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let lines: Vec<String> = match req["cmd"].as_str() {
        Some("status") => vec![
            status("vm1", true, 7, None),
            status("vm2", false, 3, Some("dial failed: refused")),
            r#"{"done":{"count":2}}"#.into(),
        ],
        Some("rotate") if vms.contains(&"ghost") => {
            vec![r#"{"unknown":"no VM named \"ghost\""}"#.into()]
        }
        Some("rotate") if vms.contains(&"busy") => vec![r#"{"busy":"all slots taken"}"#.into()],
        Some("rotate") if req["all"] == true || vms.len() > 1 => vec![
            report("vm2", false),
            report("vm1", true),
            r#"{"done":{"count":2}}"#.into(),
        ],
        Some("rotate") => vec![report(vms[0], true), r#"{"done":{"count":1}}"#.into()],
        _ => vec![r#"{"error":"unexpected"}"#.into()],
    };
    // Every canned line is a reply the client decodes.
    for l in &lines {
        serde_json::from_str::<vmcred_host::control::Reply>(l)
            .unwrap_or_else(|e| panic!("{l}: {e}"));
    }
    lines.join("\n") + "\n"
}

#[test]
fn rotate_and_status_run_in_the_front_with_the_agent_s_output() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    fake_daemon(&socket);
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\n[vms.vm1]\nunix_socket = \"/x\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let dead = dir.path().join("dead.toml");
    std::fs::write(
        &dead,
        format!(
            "control_socket = \"{}\"\n",
            dir.path().join("nothing.sock").display()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let d = dead.to_str().unwrap();
    let missing = dir.path().join("none.toml");
    let m = missing.to_str().unwrap();
    // No agent beside this copy: whatever it prints, it printed itself.
    let (_keep, lone) = lone_front();
    for args in [
        &["status", "--config", c][..],
        &["--config", c, "status", "--json"],
        &["status", "--vm", "vm1", "--config", c],
        &["rotate", "--config", c, "vm1"],
        &["rotate", "--config", c, "vm1", "API_KEY", "--json"],
        &[
            "rotate",
            "--timeout",
            "2s",
            "--config",
            c,
            "--vm",
            "vm1",
            "--vm",
            "vm2",
        ],
        &["rotate", "--config", c, "--all", "--json"],
        &["rotate", "--config", c, "ghost"],
        &["rotate", "--config", c, "busy"],
        &["rotate", "--config", c],
        &["status", "--config", d],
        &["rotate", "--config", d, "vm1"],
        &["status", "--config", m],
        &["rotate", "--config", m, "vm1"],
    ] {
        let o = run(&lone, args);
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("vmcred-host-agent"),
            "{args:?} went to the agent: {}",
            shown(&o)
        );
        assert_same(&lone, args);
    }
    // The exit codes are the documented ones, not just equal.
    assert_eq!(
        run(&lone, &["status", "--config", c]).status.code(),
        Some(1)
    );
    assert_eq!(
        run(&lone, &["rotate", "--config", c, "vm1"]).status.code(),
        Some(0)
    );
    assert_eq!(
        run(&lone, &["rotate", "--config", c, "ghost"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&lone, &["status", "--config", d]).status.code(),
        Some(3)
    );
    assert_eq!(
        run(&lone, &["status", "--config", m]).status.code(),
        Some(4)
    );
}

#[test]
fn a_missing_or_unusable_agent_is_named_with_exit_127_or_126() {
    let (dir, lone) = lone_front();
    let agent = dir.path().join("vmcred-host-agent");
    let o = run(&lone, &["serve"]);
    assert_eq!(o.status.code(), Some(127), "{}", shown(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot run {}", agent.display())),
        "{err}"
    );
    assert!(o.stdout.is_empty());

    std::fs::write(&agent, "not a program\n").unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&lone, &["--help"]);
    assert_eq!(o.status.code(), Some(126), "{}", shown(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("cannot run {}", agent.display())),
        "{}",
        shown(&o)
    );
    // `--version` needs no agent.
    assert_eq!(run(&lone, &["--version"]).status.code(), Some(0));
}

/// Another `vmcred-host-agent` earlier in `PATH` is not the one run.
#[test]
fn the_agent_is_found_beside_the_front_not_in_path() {
    let (_keep, lone) = lone_front();
    let decoy_dir = tempfile::tempdir().unwrap();
    let decoy = decoy_dir.path().join("vmcred-host-agent");
    let marker = decoy_dir.path().join("ran");
    std::fs::write(&decoy, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&decoy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(&lone)
        .arg("serve")
        .env("PATH", decoy_dir.path())
        .current_dir(decoy_dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(127), "{}", shown(&o));
    assert!(!marker.exists(), "the decoy in PATH ran");
}

/// `serve` through the front: the agent runs in the front's process (the
/// PID systemd knows as MainPID sends READY=1), named `vmcred-host`.
#[test]
fn serve_through_the_front_keeps_the_pid_and_the_name() {
    use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    common::config_with_unreachable_vm(p, "");
    let notify = UnixDatagram::bind(p.join("notify.sock")).unwrap();
    setsockopt(&notify, sockopt::PassCred, &true).unwrap();
    let mut child = Command::new(FRONT)
        .args(["serve", "--config"])
        .arg(p.join("host.toml"))
        .env("NOTIFY_SOCKET", p.join("notify.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let end = Instant::now() + Duration::from_secs(30);
    let mut ready_from = None;
    while ready_from.is_none() && Instant::now() < end {
        notify
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let Ok(msg) = recvmsg::<()>(
            notify.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) else {
            continue;
        };
        let sender = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(u) => Some(u.pid()),
                _ => None,
            })
        });
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == "READY=1") {
            ready_from = sender;
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready_from, Some(pid), "READY=1 from the spawned PID");
    assert_eq!(comm, "vmcred-host\n");
    assert_eq!(exe.as_deref(), Some(Path::new(AGENT)));
}
