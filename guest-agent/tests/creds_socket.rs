//! The credential socket, asked the way systemd asks: a real Unix socket, a
//! client that binds `\0<random>/unit/<unit>/<credential>` before it
//! connects and reads to EOF with systemd's size limit, values delivered
//! by real Applies through the real service, and a non-root peer run as
//! another uid with setpriv.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{applied, apply, cred, start, Guest};
use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vmcred_guest::config::GuestConfig;
use vmcred_guest::creds_socket::{CredsSocket, MAX_LINGERING, REFUSAL_BYTES, REFUSAL_GRACE};
use vmcred_guest::store::Limits;

/// systemd's CREDENTIAL_SIZE_MAX: a longer read fails with E2BIG.
const SYSTEMD_MAX: usize = 1024 * 1024;

#[derive(PartialEq, Eq)]
enum Got {
    /// Read to EOF within the limit: what systemd would store.
    Value(Vec<u8>),
    /// More than systemd accepts: the unit's credential load fails.
    TooBig,
    /// connect() or read() failed.
    Error(String),
}

/// A value shows as its length and first bytes: a failed assertion on
/// a refusal's zeros would otherwise print hundreds of KiB.
impl std::fmt::Debug for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Got::Value(v) if v.len() > 64 => write!(
                f,
                "Value({} bytes, starting {:?})",
                v.len(),
                String::from_utf8_lossy(&v[..32])
            ),
            Got::Value(v) => write!(f, "Value({:?})", String::from_utf8_lossy(v)),
            Got::TooBig => f.write_str("TooBig"),
            Got::Error(e) => write!(f, "Error({e})"),
        }
    }
}

/// A client socket bound to `address` (abstract, without the NUL) if
/// given, connected to `path`, as systemd's end of a LoadCredential=
/// socket; not read from yet.
fn systemd_end(path: &Path, address: Option<&[u8]>) -> Result<std::os::fd::OwnedFd, String> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    if let Some(a) = address {
        bind(fd.as_raw_fd(), &UnixAddr::new_abstract(a).unwrap()).unwrap();
    }
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).map_err(|e| format!("connect: {e}"))?;
    Ok(fd)
}

/// Reads `fd` as systemd's read_full_file_full does: to EOF, failing past
/// its size limit.
fn read_as_systemd(fd: std::os::fd::OwnedFd) -> Got {
    let mut file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Got::Value(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > SYSTEMD_MAX {
                    return Got::TooBig;
                }
            }
            Err(e) => return Got::Error(format!("read: {e}")),
        }
    }
}

/// [`systemd_end`], then [`read_as_systemd`].
fn ask(path: &Path, address: Option<&[u8]>) -> Got {
    match systemd_end(path, address) {
        Ok(fd) => read_as_systemd(fd),
        Err(e) => Got::Error(e),
    }
}

fn systemd_address(unit: &str, credential: &str) -> Vec<u8> {
    let random: u64 = rand_u64();
    format!("{random:x}/unit/{unit}/{credential}").into_bytes()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_ne_bytes(b)
}

/// [`ask`] off the runtime's threads, as a separate client would.
async fn ask_apart(path: &Path, address: Option<Vec<u8>>) -> Got {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || ask(&path, address.as_deref()))
        .await
        .unwrap()
}

async fn ask_as_systemd(path: &Path, unit: &str, credential: &str) -> Got {
    ask_apart(path, Some(systemd_address(unit, credential))).await
}

/// systemd, asking for `unit`'s `credential`, reads exactly `want`.
async fn assert_serves(path: &Path, unit: &str, credential: &str, want: &[u8]) {
    assert_eq!(
        ask_as_systemd(path, unit, credential).await,
        Got::Value(want.to_vec()),
        "{unit} {credential}"
    );
}

const CONFIG: &str = r#"
[credentials.API_KEY]
socket_units = ["api.service", "getty@tty1.service"]
reload_units = ["api.service"]

[credentials.NEVER_SENT]
socket_units = ["api.service"]

[credentials.FILE_ONLY]
restart_units = ["other.service"]
"#;

/// A guest agent with the credential socket served next to it.
async fn guest_with_socket(config: &str) -> (Guest, PathBuf) {
    let g = start(config, Limits::default()).await;
    let path = g.tmp.path().join("creds.sock");
    let socket = CredsSocket::bind(&path).unwrap();
    let config = Arc::new(GuestConfig::parse(config).unwrap());
    tokio::spawn(socket.serve(g.store.clone(), config, g.memory.clone()));
    (g, path)
}

#[tokio::test]
async fn mapped_unit_gets_the_current_value_after_each_rotation() {
    let (g, sock) = guest_with_socket(CONFIG).await;
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("API_KEY", b"one")], &[]).await;
    assert_serves(&sock, "api.service", "API_KEY", b"one").await;
    assert_serves(&sock, "getty@tty1.service", "API_KEY", b"one").await;
    applied(&mut c, 2, vec![cred("API_KEY", b"two\0binary\n")], &[]).await;
    assert_serves(&sock, "api.service", "API_KEY", b"two\0binary\n").await;
    // The reload that, with RefreshOnReload=credentials, makes systemd ask
    // again.
    assert!(
        g.calls().contains("try-reload-or-restart api.service"),
        "{}",
        g.calls()
    );
    // A refused push (not newer) changes nothing the socket hands out.
    assert!(c
        .apply(apply(2, vec![cred("API_KEY", b"rollback")], &[]))
        .await
        .is_err());
    assert_serves(&sock, "api.service", "API_KEY", b"two\0binary\n").await;
    // Removed by the host: no longer handed out.
    applied(&mut c, 3, vec![], &["API_KEY"]).await;
    assert_eq!(
        ask_as_systemd(&sock, "api.service", "API_KEY").await,
        Got::TooBig
    );
}

#[tokio::test]
async fn everything_else_fails_systemds_read() {
    let (g, sock) = guest_with_socket(CONFIG).await;
    let mut c = g.client().await;
    applied(
        &mut c,
        1,
        vec![cred("API_KEY", b"k"), cred("FILE_ONLY", b"f")],
        &[],
    )
    .await;
    // A unit the credential is not mapped to; a credential mapped to no
    // socket unit; one mapped but never delivered; one unknown entirely;
    // the bootstrap, which vmcred never hands out.
    for (unit, credential) in [
        ("other.service", "API_KEY"),
        ("api.service", "FILE_ONLY"),
        ("other.service", "FILE_ONLY"),
        ("api.service", "NEVER_SENT"),
        ("api.service", "UNKNOWN"),
        ("api.service", "vmcred.bootstrap"),
    ] {
        assert_eq!(
            ask_as_systemd(&sock, unit, credential).await,
            Got::TooBig,
            "{unit} {credential}"
        );
    }
    // Malformed addresses, and no address at all.
    for addr in [
        &b"garbage"[..],
        b"zz/unit/api.service/API_KEY",
        b"ab/unit/api.service/API_KEY/x",
        b"ab/unit/api.service/API_KEY\0",
        b"ab/unit/../API_KEY",
    ] {
        assert_eq!(ask_apart(&sock, Some(addr.to_vec())).await, Got::TooBig);
    }
    assert_eq!(ask_apart(&sock, None).await, Got::TooBig);
    // The refusal is bounded: exactly REFUSAL_BYTES to a peer that reads on.
    let path = sock.clone();
    let total = tokio::task::spawn_blocking(move || {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        let mut all = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut all).unwrap();
        all.len()
    })
    .await
    .unwrap();
    assert_eq!(total, REFUSAL_BYTES);
    // And the mapped unit is still served afterwards.
    assert_serves(&sock, "api.service", "API_KEY", b"k").await;
}

#[tokio::test]
async fn many_concurrent_units_are_all_served() {
    let (g, sock) = guest_with_socket(CONFIG).await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("API_KEY", b"v")], &[]).await;
    let asks: Vec<_> = (0..64)
        .map(|_| {
            let sock = sock.clone();
            tokio::spawn(async move { ask_as_systemd(&sock, "api.service", "API_KEY").await })
        })
        .collect();
    for a in asks {
        assert_eq!(a.await.unwrap(), Got::Value(b"v".to_vec()));
    }
}

const CHILD: &str = "VMCRED_CREDSOCK_TEST_CHILD";

/// Run as another uid by `non_root_peers_get_nothing`: asks as systemd
/// would and prints what it got.
#[test]
fn child_client() {
    let Some(path) = std::env::var_os(CHILD) else {
        return;
    };
    let got = ask(
        Path::new(&path),
        Some(&systemd_address("api.service", "API_KEY")),
    );
    match got {
        Got::Value(v) => println!("CHILD-GOT {} bytes", v.len()),
        Got::TooBig => println!("CHILD-GOT too big"),
        Got::Error(e) => println!("CHILD-GOT error {e}"),
    }
}

fn run_child_as_nobody(sock: &Path) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--no-new-privs",
        ])
        .arg(&exe)
        .args(["--exact", "child_client", "--nocapture", "--test-threads=1"])
        .env(CHILD, sock)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    stdout
        .lines()
        .find_map(|l| l.find("CHILD-GOT").map(|i| &l[i..]))
        .unwrap_or_else(|| {
            panic!(
                "child printed no result: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

#[tokio::test]
async fn non_root_peers_get_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a peer as another uid");
        return;
    }
    let (g, sock) = guest_with_socket(CONFIG).await;
    let mut c = g.client().await;
    applied(&mut c, 1, vec![cred("API_KEY", b"secret")], &[]).await;
    // As bound (0600, in a 0700 directory), another uid cannot connect.
    let dir = g.tmp.path().to_path_buf();
    let s = sock.clone();
    let got = tokio::task::spawn_blocking(move || run_child_as_nobody(&s))
        .await
        .unwrap();
    assert!(got.contains("error connect"), "{got}");
    // With the file permissions opened up, the peer check alone still
    // refuses it, with a plain close: no value, no refusal flood.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let s = sock.clone();
    let got = tokio::task::spawn_blocking(move || run_child_as_nobody(&s))
        .await
        .unwrap();
    assert_eq!(got, "CHILD-GOT 0 bytes");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_serves(&sock, "api.service", "API_KEY", b"secret").await;
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let err = CredsSocket::bind(&path).err().unwrap().to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    std::fs::remove_file(&path).unwrap();
    // A socket left by an earlier run.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let s = CredsSocket::bind(&path).unwrap();
    assert_eq!(s.path(), path);
    drop(s);
    // A directory others can write to could let them swap the socket.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = CredsSocket::bind(&open.join("creds.sock"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("writable by no one else"), "{err}");
}

/// The real agent binary, started on a temporary directory, its log
/// drained line by line.
struct Binary {
    tmp: tempfile::TempDir,
    host: vmcred_proto::tls::Identity,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
}

impl Binary {
    /// Starts the agent with `guest_toml` and waits until it serves the
    /// credential socket.
    fn start(guest_toml: &str) -> Binary {
        use std::io::BufRead;
        use vmcred_proto::bootstrap::{Bootstrap, HostTransport};
        use vmcred_proto::tls::Identity;

        let tmp = tempfile::tempdir().unwrap();
        let p = |rel: &str| tmp.path().join(rel);
        let host = Identity::generate("vmcred-host").unwrap();
        let b = Bootstrap {
            port: 700,
            pin: host.pin().unwrap(),
            host: HostTransport::Hybrid,
        };
        std::fs::create_dir(p("credentials")).unwrap();
        std::fs::write(p("credentials/vmcred.bootstrap"), b.encode()).unwrap();
        std::fs::write(p("guest.toml"), guest_toml).unwrap();
        let systemctl = common::recording_systemctl(tmp.path(), &p("calls"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmcred-guest"))
            .arg("--config")
            .arg(p("guest.toml"))
            .arg("--bootstrap")
            .arg(p("credentials/vmcred.bootstrap"))
            .arg("--credentials-dir")
            .arg(p("credentials"))
            .arg("--state-dir")
            .arg(p("state"))
            .arg("--listen-unix")
            .arg(p("guest.sock"))
            .arg("--systemctl")
            .arg(&systemctl)
            .arg("--log-level")
            .arg("trace")
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let b = Binary {
            tmp,
            host,
            child,
            lines,
            reader,
        };
        b.wait_for_line("serving the credential socket");
        b
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn wait_for_line(&self, needle: &str) {
        loop {
            let line = self
                .lines
                .recv_timeout(std::time::Duration::from_secs(15))
                .unwrap_or_else(|_| panic!("the agent never logged {needle:?}"));
            if line.contains(needle) {
                return;
            }
        }
    }

    fn term(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Waits for the exit; returns whether it was 0, and the whole log.
    fn wait(mut self) -> (bool, String) {
        let ok = self.child.wait().unwrap().success();
        (ok, self.reader.join().unwrap())
    }

    /// SIGTERM, then [`Binary::wait`].
    fn stop(self) -> (bool, String) {
        self.term();
        self.wait()
    }
}

/// The real binary: with `socket_units` in its config it serves
/// `<state dir>/creds.sock` (0600) from the values its pushes applied,
/// and logs refusals by name, never a value.
#[test]
fn the_binary_serves_the_socket_in_its_state_dir() {
    const SECRET: &[u8] = b"Sock-S3cr3t-4b1d";
    let b = Binary::start(
        "initial_sync_timeout = \"1h\"\n[credentials.API_KEY]\nsocket_units = [\"api.service\"]\nreload_units = [\"api.service\"]\n[credentials.MEM]\ndeliver = \"socket\"\nsocket_units = [\"api.service\"]\n",
    );
    let sock = b.path("state/creds.sock");
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = common::connect(&b.path("guest.sock"), &b.host)
            .await
            .unwrap();
        applied(
            &mut c,
            1,
            vec![cred("API_KEY", SECRET), cred("MEM", b"in-memory-only")],
            &[],
        )
        .await;
        assert_eq!(
            ask_as_systemd(&sock, "api.service", "API_KEY").await,
            Got::Value(SECRET.to_vec())
        );
        // deliver = "socket": served from the agent's memory, no file.
        assert_serves(&sock, "api.service", "MEM", b"in-memory-only").await;
        assert!(!b.path("credentials/MEM").exists());
        assert_eq!(
            ask_as_systemd(&sock, "evil.service", "API_KEY").await,
            Got::TooBig
        );
    });
    let (ok, log) = b.stop();
    assert!(ok);
    assert!(log.contains("serving the credential socket"), "{log}");
    assert!(log.contains("value handed to the unit"), "{log}");
    assert!(log.contains("evil.service"), "{log}");
    assert!(
        !log.contains(std::str::from_utf8(SECRET).unwrap()),
        "a value reached the log"
    );
    assert!(
        !log.contains(&hex::encode(SECRET)),
        "a value reached the log (hex)"
    );
}

/// Bytes queued for reading on `fd` (FIONREAD).
fn queued(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap_or(0)
}

/// A unit loading its credential while the agent stops (a switch that
/// restarts both, a shutdown) must see its load fail, never a value cut
/// short: a 768 KiB value does not fit the socket's buffer, so the agent
/// is mid-write when SIGTERM comes, and systemd reads to EOF whatever
/// arrived. Its reader starts `read_after` the agent said it is stopping.
fn stop_mid_value(read_after: std::time::Duration) {
    let b = Binary::start(
        "initial_sync_timeout = \"1h\"\n[credentials.BIG]\nsocket_units = [\"api.service\"]\n",
    );
    // Within the credentials directory's 1 MiB budget, next to the bootstrap.
    let big = vec![b'v'; 768 * 1024];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = common::connect(&b.path("guest.sock"), &b.host)
            .await
            .unwrap();
        applied(&mut c, 1, vec![cred("BIG", &big)], &[]).await;
    });
    // systemd's side: bound to its address, connected, not reading yet.
    let fd = systemd_end(
        &b.path("state/creds.sock"),
        Some(&systemd_address("api.service", "BIG")),
    )
    .unwrap();
    // The agent has started writing the value (and, with 768 KiB against
    // a socket buffer far smaller, cannot have finished).
    while queued(&fd) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    b.term();
    b.wait_for_line("stopping");
    // A busy systemd reads late.
    std::thread::sleep(read_after);
    let stopping = std::thread::spawn(move || b.wait());
    let got = read_as_systemd(fd);
    let (ok, log) = stopping.join().unwrap();
    assert!(ok, "{log}");
    assert_eq!(
        got,
        Got::TooBig,
        "systemd would have read the answer to EOF and taken it as the credential (the value has {} bytes)",
        big.len()
    );
    assert!(log.contains("value cut off"), "{log}");
}

#[test]
fn an_agent_stopping_mid_value_never_hands_over_a_cut_off_value() {
    stop_mid_value(std::time::Duration::ZERO);
}

/// The same with a reader slower than the refusal's grace: the refusal
/// lingers until it is read, and the agent waits for it before exiting.
#[test]
fn a_late_reader_of_a_stopping_agent_still_gets_a_refusal() {
    stop_mid_value(REFUSAL_GRACE + std::time::Duration::from_secs(1));
}

/// A refusal its reader takes only after the grace still ends past
/// systemd's limit: the socket's buffer holds only part of it, and a close
/// then would hand the reader that part (zeros) as the credential.
#[tokio::test]
async fn a_refusal_read_late_is_still_a_refusal() {
    let (_g, path) = guest_with_socket(CONFIG).await;
    let got = tokio::task::spawn_blocking(move || {
        let fd = systemd_end(&path, Some(&systemd_address("evil.service", "API_KEY"))).unwrap();
        // The refusal has started and filled the socket's buffer.
        while queued(&fd) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(REFUSAL_GRACE + std::time::Duration::from_secs(1));
        read_as_systemd(fd)
    })
    .await
    .unwrap();
    assert_eq!(
        got,
        Got::TooBig,
        "a late reader read the answer to EOF: systemd would take it as the credential"
    );
}

/// Root peers that never read fill the refusals that linger; one more
/// closes the oldest of them, not the newest: a unit asking now, whose
/// systemd reads late, still gets its refusal whole (found in review: the
/// newest was closed on, a short answer of zeros taken as its credential).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_refusals_full_close_the_oldest_not_a_new_one() {
    let (_g, path) = guest_with_socket(CONFIG).await;
    let late = tokio::task::spawn_blocking(move || {
        // More never-reading peers than may linger, each refused.
        let stuck: Vec<_> = (0..MAX_LINGERING + 1)
            .map(|_| systemd_end(&path, Some(&systemd_address("evil.service", "API_KEY"))).unwrap())
            .collect();
        // Each lingers once its grace has passed, 16 being served at once;
        // the last one's refusal has started when it has bytes queued.
        for fd in &stuck {
            while queued(fd) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        std::thread::sleep(REFUSAL_GRACE + std::time::Duration::from_secs(1));
        let fd = systemd_end(&path, Some(&systemd_address("evil.service", "API_KEY"))).unwrap();
        while queued(&fd) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(REFUSAL_GRACE + std::time::Duration::from_secs(1));
        let got = read_as_systemd(fd);
        drop(stuck);
        got
    })
    .await
    .unwrap();
    assert_eq!(late, Got::TooBig, "the late reader's refusal was cut short");
}

/// A request the agent cannot decide within the connection's deadline
/// (here: the store held by a writer) is refused the way systemd notices,
/// not closed, which systemd would read as an empty credential.
#[tokio::test]
async fn a_request_past_its_deadline_is_refused_not_answered_empty() {
    let g = start(CONFIG, Limits::default()).await;
    let path = g.tmp.path().join("creds.sock");
    let socket = CredsSocket::bind(&path)
        .unwrap()
        .with_deadline(std::time::Duration::from_millis(300));
    let config = Arc::new(GuestConfig::parse(CONFIG).unwrap());
    tokio::spawn(socket.serve(g.store.clone(), config, g.memory.clone()));
    let mut c = common::connect(&g.socket, &g.host).await.unwrap();
    applied(&mut c, 1, vec![cred("API_KEY", b"k-1")], &[]).await;
    // A writer holds the store: the committed value cannot be read.
    let held = g.store.quiesce();
    assert_eq!(
        ask_as_systemd(&path, "api.service", "API_KEY").await,
        Got::TooBig
    );
    drop(held);
    assert_serves(&path, "api.service", "API_KEY", b"k-1").await;
}

/// Stopping the socket's service refuses a request still waiting to be
/// decided, and then refuses new connections outright.
#[tokio::test]
async fn stopping_refuses_a_waiting_request_and_later_connections() {
    let g = start(CONFIG, Limits::default()).await;
    let path = g.tmp.path().join("creds.sock");
    let socket = CredsSocket::bind(&path).unwrap();
    let stopper = socket.stopper();
    let config = Arc::new(GuestConfig::parse(CONFIG).unwrap());
    tokio::spawn(socket.serve(g.store.clone(), config, g.memory.clone()));
    let mut c = common::connect(&g.socket, &g.host).await.unwrap();
    applied(&mut c, 1, vec![cred("API_KEY", b"k-1")], &[]).await;
    let held = g.store.quiesce();
    let before = Arc::strong_count(&g.store);
    let asking = tokio::spawn({
        let path = path.clone();
        async move { ask_as_systemd(&path, "api.service", "API_KEY").await }
    });
    // The request is in once its read of the store (which waits for the
    // held lock) holds a reference to the store.
    while Arc::strong_count(&g.store) == before {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stopper.stop().await;
    assert_eq!(asking.await.unwrap(), Got::TooBig);
    drop(held);
    assert!(matches!(
        ask_as_systemd(&path, "api.service", "API_KEY").await,
        Got::Error(_)
    ));
}

const MEMORY_CONFIG: &str = r#"
[credentials.MEMORY]
deliver = "socket"
socket_units = ["api.service"]
reload_units = ["api.service"]

[credentials.PLAIN]
restart_units = ["plain.service"]
"#;

fn held_names(h: &vmcred_proto::rpc::pb::HelloReply) -> Vec<(String, Vec<u8>)> {
    h.held
        .iter()
        .map(|x| (x.name.clone(), x.sha256.clone()))
        .collect()
}

fn hello() -> vmcred_proto::rpc::pb::HelloRequest {
    vmcred_proto::rpc::pb::HelloRequest {
        host_version: "test".into(),
        vm: "test-vm".into(),
    }
}

#[tokio::test]
async fn deliver_socket_keeps_the_value_out_of_the_credentials_directory() {
    use vmcred_proto::rpc::pb::Outcome;
    use vmcred_proto::rules::digest;
    let (g, sock) = guest_with_socket(MEMORY_CONFIG).await;
    let mut c = g.client().await;
    let r = applied(
        &mut c,
        1,
        vec![cred("MEMORY", b"m1"), cred("PLAIN", b"p1")],
        &[],
    )
    .await;
    assert!(r
        .results
        .iter()
        .all(|x| x.outcome == Outcome::Written as i32));
    assert_eq!(
        g.read("MEMORY"),
        None,
        "no file for a socket-only credential"
    );
    assert_eq!(g.read("PLAIN"), Some(b"p1".to_vec()));
    assert_serves(&sock, "api.service", "MEMORY", b"m1").await;
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(
        held_names(&h),
        vec![
            ("MEMORY".to_string(), digest(b"m1").to_vec()),
            ("PLAIN".to_string(), digest(b"p1").to_vec())
        ]
    );
    // Rotation: the new value, and the reload that makes systemd re-read.
    applied(&mut c, 2, vec![cred("MEMORY", b"m2")], &[]).await;
    assert_serves(&sock, "api.service", "MEMORY", b"m2").await;
    assert!(g.calls().contains("try-reload-or-restart api.service"));
    // The same value again changes nothing and runs nothing.
    let calls = g.calls();
    let r = applied(&mut c, 3, vec![cred("MEMORY", b"m2")], &[]).await;
    assert_eq!(r.results[0].outcome, Outcome::Unchanged as i32);
    assert_eq!(g.calls(), calls);
    // Not newer: refused, the value stays.
    assert!(c
        .apply(apply(3, vec![cred("MEMORY", b"rollback")], &[]))
        .await
        .is_err());
    // All or nothing: a push whose other part fails leaves the old value.
    std::fs::write(g.creds.join("FOREIGN"), b"not ours").unwrap();
    let r = applied(&mut c, 4, vec![cred("MEMORY", b"m3")], &["FOREIGN"]).await;
    assert_eq!(r.applied_generation, 3);
    assert_serves(&sock, "api.service", "MEMORY", b"m2").await;
    // Removed: refused from then on, no longer held.
    let r = applied(&mut c, 5, vec![], &["MEMORY"]).await;
    assert_eq!(r.results[0].outcome, Outcome::Removed as i32);
    assert_eq!(
        ask_as_systemd(&sock, "api.service", "MEMORY").await,
        Got::TooBig
    );
    let h = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(held_names(&h).len(), 1);
    assert_eq!(g.read("MEMORY"), None);
}

/// An agent restart loses socket-only values: its Hello says so, and the
/// host's next push (newer, as always) restores them. A credential that
/// was a file before its config said `deliver = "socket"` is not reported
/// held until that push, which removes the file.
#[tokio::test]
async fn socket_values_after_a_restart_and_a_switch_from_file() {
    use vmcred_guest::notify::Readiness;
    use vmcred_guest::service::GuestService;
    use vmcred_guest::units::UnitRunner;
    use vmcred_proto::rpc::Guest as _;

    // First run: both delivered as files.
    let g = start(
        "[credentials.MEMORY]\nsocket_units = [\"api.service\"]\n",
        Limits::default(),
    )
    .await;
    let mut c = g.client().await;
    applied(
        &mut c,
        1,
        vec![cred("MEMORY", b"v1"), cred("PLAIN", b"p")],
        &[],
    )
    .await;
    assert_eq!(g.read("MEMORY"), Some(b"v1".to_vec()));

    // "Restart" with deliver = "socket": a new service on the same store.
    let config = Arc::new(GuestConfig::parse(MEMORY_CONFIG).unwrap());
    let memory = Arc::new(vmcred_guest::creds_socket::SocketValues::default());
    let svc = GuestService::with_socket_values(
        g.store.clone(),
        config,
        UnitRunner::new(common::recording_systemctl(g.tmp.path(), &g.calls)),
        Arc::new(Readiness::new()),
        memory.clone(),
    );
    let h = svc
        .hello(tonic::Request::new(hello()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.applied_generation, 1);
    assert_eq!(
        held_names(&h).into_iter().map(|x| x.0).collect::<Vec<_>>(),
        vec!["PLAIN".to_string()],
        "the file-era MEMORY is not reported held"
    );
    let r = svc
        .apply(tonic::Request::new(apply(
            2,
            vec![cred("MEMORY", b"v1")],
            &[],
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.applied_generation, 2);
    assert_eq!(g.read("MEMORY"), None, "the push removed the old file");
    assert_eq!(
        memory.get("MEMORY").as_deref().map(|v| v.as_slice()),
        Some(&b"v1"[..])
    );
    let h = svc
        .hello(tonic::Request::new(hello()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.held.len(), 2);
}

/// Pushes that fail at their commit (state.json cannot be saved) are
/// rolled back after their files were renamed into place; units asking
/// all the while only ever get the committed value. The push names the
/// asked credential first and 20 more after it, so the window between its
/// rename and the rollback is as wide as the push makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_never_gets_a_value_that_is_rolled_back() {
    let (g, sock) = guest_with_socket(CONFIG).await;
    let mut c = g.client().await;
    let fillers: Vec<String> = (0..20).map(|i| format!("FILL{i:02}")).collect();
    let push = |generation: u64, key: &[u8], round: usize| {
        let mut creds = vec![cred("API_KEY", key)];
        creds.extend(
            fillers
                .iter()
                .map(|n| cred(n, format!("{n}-{round}").as_bytes())),
        );
        apply(generation, creds, &[])
    };
    c.apply(push(1, b"committed", 0)).await.unwrap();
    // Every later commit fails: a directory where state.json's temporary
    // file goes cannot be removed.
    let blocker = g.state.join("state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"").unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut asked = 0u64;
                let mut wrong = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = ask(&sock, Some(&systemd_address("api.service", "API_KEY")));
                    asked += 1;
                    if got != Got::Value(b"committed".to_vec()) {
                        wrong.push(got);
                    }
                }
                (asked, wrong)
            })
        })
        .collect();
    for round in 1..=20 {
        let r = c.apply(push(2, b"rolled back", round)).await;
        let applied = r.map(|r| r.into_inner().applied_generation).unwrap_or(1);
        assert_eq!(applied, 1, "round {round}: a push was committed");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let (asked, wrong) = r.join().unwrap();
        assert!(asked > 0);
        assert!(
            wrong.is_empty(),
            "{} of {asked} reads got something else, first: {:?}",
            wrong.len(),
            wrong.first()
        );
    }
    assert_eq!(g.store.state().generation, 1);
    assert_eq!(g.read("API_KEY").unwrap(), b"committed");
}
