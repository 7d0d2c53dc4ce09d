//! The `vmcred-guest` binary as systemd runs it: flags, clear start-up
//! errors, sd_notify readiness, logs without secrets, state across a
//! restart. Always with --listen-unix: this machine is itself a VM, and
//! AF_VSOCK from here would reach infrastructure that is not ours.

mod common;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{applied, apply, connect, cred, recording_systemctl};
use vmcred_proto::bootstrap::Bootstrap;
use vmcred_proto::rpc::pb::HelloRequest;
use vmcred_proto::tls::Identity;

const BIN: &str = env!("CARGO_BIN_EXE_vmcred-guest");
const SECRET: &[u8] = b"S3cr3t-Value-7f2c91";

fn hello() -> HelloRequest {
    HelloRequest {
        host_version: "test".into(),
        vm: "test-vm".into(),
    }
}

struct Setup {
    tmp: tempfile::TempDir,
    host: Identity,
    /// `--allow-uid`: this process's by default.
    allow_uid: u32,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let host = Identity::generate("vmcred-host").unwrap();
        let b = Bootstrap {
            port: 700,
            pin: host.pin().unwrap(),
            host: vmcred_proto::bootstrap::HostTransport::Hybrid,
        };
        std::fs::create_dir(tmp.path().join("credentials")).unwrap();
        std::fs::write(tmp.path().join("credentials/vmcred.bootstrap"), b.encode()).unwrap();
        std::fs::write(
            tmp.path().join("guest.toml"),
            "initial_sync_timeout = \"1h\"\n[credentials.API_KEY]\nrestart_units = [\"demo-consumer.service\"]\n",
        )
        .unwrap();
        recording_systemctl(tmp.path(), &tmp.path().join("calls"));
        Setup {
            tmp,
            host,
            allow_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(self.p("guest.toml"))
            .arg("--bootstrap")
            .arg(self.p("credentials/vmcred.bootstrap"))
            .arg("--credentials-dir")
            .arg(self.p("credentials"))
            .arg("--state-dir")
            .arg(self.p("state"))
            .arg("--listen-unix")
            .arg(self.p("guest.sock"))
            .arg("--allow-uid")
            .arg(self.allow_uid.to_string())
            .arg("--systemctl")
            .arg(self.p("systemctl"))
            .arg("--log-level")
            .arg("trace")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Starts the agent with a notify socket of our own.
    fn spawn(&self, extra: &[&str]) -> (Agent, UnixDatagram) {
        let notify_path = self.p("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let _ = std::fs::remove_file(self.p("guest.sock"));
        let child = self
            .command()
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .spawn()
            .unwrap();
        let agent = Agent::new(child);
        wait_for(&self.p("guest.sock"));
        (agent, notify)
    }
}

/// A running agent whose log is drained as it goes (a full pipe would
/// block it). Killed if a test fails before stopping it.
struct Agent(Option<Child>, Option<std::thread::JoinHandle<String>>);

impl Agent {
    fn new(mut child: Child) -> Agent {
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut log = Vec::new();
            let _ = stderr.read_to_end(&mut log);
            String::from_utf8_lossy(&log).into_owned()
        });
        Agent(Some(child), Some(log))
    }

    /// SIGTERM, then its exit status and everything it logged.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.0.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.1.take().unwrap().join().unwrap();
        (status, log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn notifications(sock: &UnixDatagram, until: &str) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {until:?} notification (got {got:?}): {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == until);
        got.push(msg);
        if done {
            return got;
        }
    }
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--bootstrap",
        "--credentials-dir",
        "--state-dir",
        "--listen-unix",
        "--allow-uid",
        "--initial-sync-timeout",
        "--systemctl",
        "--max-total-bytes",
        "--max-files",
        "--log-level",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert!(help.contains("/run/credentials/@system/vmcred.bootstrap"));
    assert!(help.contains("/run/vmcred"));
}

#[test]
fn a_missing_bootstrap_is_explained() {
    let s = Setup::new();
    let missing = s.p("credentials/vmcred.bootstrap");
    std::fs::remove_file(&missing).unwrap();
    let out = s.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(
        err.contains("SMBIOS") && err.contains("vmcred-host launch"),
        "{err}"
    );
    assert!(
        !s.p("guest.sock").exists(),
        "must not listen without a bootstrap"
    );
}

/// Issue 8: "listening" (and the socket) only after the bind succeeded; a
/// bind failure is one clear error and a non-zero exit.
#[test]
fn a_bind_failure_is_one_clear_error_and_never_says_listening() {
    let s = Setup::new();
    // A directory where the socket should go: the bind cannot succeed.
    let sock = s.p("guest.sock");
    std::fs::create_dir(&sock).unwrap();
    let out = s.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {}", sock.display())),
        "{err}"
    );
    assert!(
        !err.to_lowercase().contains("listening"),
        "said listening without a bound socket:\n{err}"
    );
    assert_eq!(err.matches("cannot listen").count(), 1, "{err}");
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
}

#[test]
fn a_corrupt_state_file_stops_the_start() {
    let s = Setup::new();
    std::fs::create_dir(s.p("state")).unwrap();
    std::fs::write(s.p("state/state.json"), b"{\"generation\": ").unwrap();
    let out = s.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state.json") && err.contains("rollback"),
        "{err}"
    );
}

#[test]
fn a_bad_config_stops_the_start() {
    let s = Setup::new();
    std::fs::write(s.p("guest.toml"), "[credentials.A]\nmode = \"0644\"\n").unwrap();
    let out = s.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("guest.toml") && err.contains("0444"), "{err}");
}

#[test]
fn syncs_notifies_restarts_units_and_never_logs_values() {
    let s = Setup::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (agent, notify) = s.spawn(&[]);
    let first = notifications(&notify, "STATUS=waiting for the host's first sync");
    assert!(!first.iter().any(|m| m.contains("READY=1")));

    rt.block_on(async {
        let mut c = connect(&s.p("guest.sock"), &s.host).await.unwrap();
        assert_eq!(
            c.hello(hello())
                .await
                .unwrap()
                .into_inner()
                .applied_generation,
            0
        );
        let r = applied(&mut c, 1, vec![cred("API_KEY", SECRET)], &[]).await;
        assert_eq!(r.applied_generation, 1);
        assert_eq!(r.units.len(), 1);
        assert!(r.units[0].ok, "{:?}", r.units[0].error);
        // Refused requests carrying the value must not log it either.
        let mut bad = cred("API_KEY", SECRET);
        bad.sha256[0] ^= 1;
        assert!(c.apply(apply(2, vec![bad], &[])).await.is_err());
        assert!(c
            .apply(apply(1, vec![cred("API_KEY", SECRET)], &[]))
            .await
            .is_err());
    });
    let ready = notifications(&notify, "READY=1");
    assert!(
        ready
            .iter()
            .any(|m| m.contains("STATUS=generation 1 applied")),
        "{ready:?}"
    );
    assert_eq!(std::fs::read(s.p("credentials/API_KEY")).unwrap(), SECRET);
    assert_eq!(
        std::fs::read_to_string(s.p("calls")).unwrap(),
        "try-restart demo-consumer.service\n"
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "SIGTERM is a clean stop: {status}\n{log}");
    assert!(log.contains("API_KEY"), "names are logged:\n{log}");
    assert!(log.contains("TRACE"), "the check below ran at trace level");
    let secret = std::str::from_utf8(SECRET).unwrap();
    assert!(!log.contains(secret), "a value reached the log");
    assert!(
        !log.contains(&hex::encode(SECRET)),
        "a value reached the log (hex)"
    );

    // Restarted, the agent still holds generation 1 and is ready as soon
    // as the host has looked, without a new Apply.
    let (agent, notify) = s.spawn(&[]);
    rt.block_on(async {
        let mut c = connect(&s.p("guest.sock"), &s.host).await.unwrap();
        let h = c.hello(hello()).await.unwrap().into_inner();
        assert_eq!(h.applied_generation, 1);
        assert_eq!(h.held.len(), 1);
        let e = c
            .apply(apply(1, vec![cred("API_KEY", b"older")], &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    });
    notifications(&notify, "READY=1");
    assert_eq!(std::fs::read(s.p("credentials/API_KEY")).unwrap(), SECRET);
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn ready_after_the_initial_sync_timeout_without_a_host() {
    let s = Setup::new();
    let start = Instant::now();
    let (agent, notify) = s.spawn(&["--initial-sync-timeout", "300ms"]);
    let got = notifications(&notify, "READY=1");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        got.iter().any(|m| m.contains("initial sync timeout")),
        "{got:?}"
    );
    let (status, log) = agent.stop();
    assert!(status.success());
    assert!(log.contains("no sync with the host yet"), "{log}");
}

/// Refused connections are logged one per period, not one per attempt:
/// any host user can connect in a loop (on AF_VSOCK from an unprivileged
/// port), and a line each would flood the guest's journal and push the
/// agent's other messages past journald's per-unit rate limit.
#[test]
fn refused_connections_in_a_loop_are_logged_once_per_period() {
    let mut s = Setup::new();
    // Nobody this test runs as may connect: every connection is refused.
    s.allow_uid = nix::unistd::geteuid().as_raw().wrapping_add(4242);
    let (agent, _notify) = s.spawn(&[]);
    for _ in 0..200 {
        let mut c = std::os::unix::net::UnixStream::connect(s.p("guest.sock")).unwrap();
        // The agent closes a refused connection without a byte.
        let mut buf = [0u8; 1];
        let _ = c.read(&mut buf);
    }
    let (_, log) = agent.stop();
    let lines = log
        .lines()
        .filter(|l| l.contains("refused a connection before TLS"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} refusal lines for 200 refused connections:\n{log}"
    );
}
