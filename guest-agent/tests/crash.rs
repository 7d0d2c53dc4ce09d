//! Crash suite (issue 9): the real `vmcred-guest` binary is killed with
//! SIGKILL at random points while a driver playing the host pushes
//! rotations to it over real TLS on a Unix socket; as root, into a real
//! read-only ramfs mount (systemd's options) in a private mount namespace.
//! After every kill and restart: no torn file, no leftover staging file,
//! no writable mount, no lost credential, no generation going back, and
//! the generation the guest reports is exactly the set it holds.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{apply, connect, cred, in_private_mount_namespace};
use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use vmcred_proto::bootstrap::{Bootstrap, HostTransport};
use vmcred_proto::rpc::pb::HelloRequest;
use vmcred_proto::tls::Identity;

const BIN: &str = env!("CARGO_BIN_EXE_vmcred-guest");
const CYCLES: u64 = 60;
const NAMES: [&str; 4] = ["A", "B", "C", "D"];

type Set = BTreeMap<String, Vec<u8>>;

/// The credential set of generation `generation`: some of the names, each
/// with a value that names its generation, of a size from 1 B to 160 KiB;
/// in one set of four, one value of 560 to 700 KiB (more than half of the
/// 1 MiB mount, so old and new do not fit at once) and the others small.
fn set_for(generation: u64, rng: &mut fastrand::Rng) -> Set {
    let mut set = Set::new();
    let big = (rng.u64(..4) == 0).then(|| NAMES[rng.u64(..4) as usize]);
    for name in NAMES {
        if Some(name) != big && rng.u64(..4) == 0 {
            continue;
        }
        let len = if Some(name) == big {
            560 * 1024 + rng.u64(..140 * 1024)
        } else if big.is_some() {
            1 + rng.u64(..8 * 1024)
        } else {
            match rng.u64(..3) {
                0 => 1 + rng.u64(..64),
                1 => 1 + rng.u64(..8 * 1024),
                _ => 1 + rng.u64(..160 * 1024),
            }
        } as usize;
        let mut v = format!("{name}@{generation}:").into_bytes();
        v.resize(len.max(v.len()), b'0' + (generation % 10) as u8);
        set.insert(name.to_string(), v);
    }
    set
}

struct Env {
    tmp: tempfile::TempDir,
    creds: PathBuf,
    host: Identity,
    /// The file system mounted read-only at `creds`, if any.
    mounted: Option<&'static str>,
}

impl Env {
    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn spawn(&self) -> Child {
        let sock = self.p("guest.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("agent.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("--bootstrap")
            .arg(self.creds.join("vmcred.bootstrap"))
            .arg("--credentials-dir")
            .arg(&self.creds)
            .arg("--state-dir")
            .arg(self.p("state"))
            .arg("--listen-unix")
            .arg(&sock)
            .arg("--allow-uid")
            .arg(nix::unistd::geteuid().as_raw().to_string())
            .arg("--initial-sync-timeout")
            .arg("1h")
            .arg("--log-level")
            .arg("info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "the agent did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("agent.log")).unwrap_or_default()
    }

    fn on_disk(&self) -> (Set, Vec<String>) {
        let mut set = Set::new();
        let mut staging = Vec::new();
        for e in std::fs::read_dir(&self.creds).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.contains("vmcred-tmp") {
                staging.push(name);
            } else if NAMES.contains(&name.as_str()) {
                set.insert(name.clone(), std::fs::read(self.creds.join(&name)).unwrap());
            }
        }
        (set, staging)
    }
}

fn is_ro(dir: &Path) -> bool {
    statvfs(dir).unwrap().flags().contains(FsFlags::ST_RDONLY)
}

fn tmpfs_size(dir: &Path) -> u64 {
    let st = statvfs(dir).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// The credentials directory, mounted as systemd mounts it when `mounted`
/// names a file system.
fn setup(mounted: Option<&'static str>) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mounted {
        Some("tmpfs") => {
            let opts = "mode=0700,nr_inodes=1024,size=1M";
            let with_noswap = format!("{opts},noswap");
            if mount(
                Some("tmpfs"),
                &creds,
                Some("tmpfs"),
                base,
                Some(with_noswap.as_str()),
            )
            .is_err()
            {
                // Before Linux 6.4 there is no noswap; systemd goes without.
                mount(Some("tmpfs"), &creds, Some("tmpfs"), base, Some(opts)).unwrap();
            }
        }
        Some(fs) => mount(Some(fs), &creds, Some(fs), base, Some("mode=0700")).unwrap(),
        None => {}
    }
    let host = Identity::generate("vmcred-host").unwrap();
    let b = Bootstrap {
        port: 700,
        pin: host.pin().unwrap(),
        host: HostTransport::Hybrid,
    };
    std::fs::write(creds.join("vmcred.bootstrap"), b.encode()).unwrap();
    std::fs::write(creds.join("BOOT"), b"from SMBIOS").unwrap();
    if mounted.is_some() {
        mount(
            None::<&str>,
            &creds,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
            None::<&str>,
        )
        .unwrap();
        assert!(is_ro(&creds));
    }
    Env {
        tmp,
        creds,
        host,
        mounted,
    }
}

/// The socket file appears at bind(), a moment before listen(): retry a
/// refused connection for a bounded time.
async fn connect_retry(
    sock: &Path,
    host: &Identity,
) -> vmcred_proto::rpc::GuestClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match connect(sock, host).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn hello() -> HelloRequest {
    HelloRequest {
        host_version: "crash-driver".into(),
        vm: "crash".into(),
    }
}

fn run(mounted: Option<&'static str>) {
    let seed = std::env::var("VMCRED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash suite: seed {seed}, {CYCLES} cycles, read-only mount: {mounted:?}");
    // Seeded and printed above, so a failure replays with the same seed.
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = setup(mounted);
    let size = (mounted == Some("tmpfs")).then(|| tmpfs_size(&env.creds));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Every set the driver ever sent, by generation; generation 0 is none.
    let mut sent: BTreeMap<u64, Set> = BTreeMap::from([(0, Set::new())]);
    let mut acked = 0u64;
    let mut seen = 0u64;
    let mut next_gen = 1u64;
    let mut kills_mid_apply = 0;
    // Kills that left staging files or a writable mount for the restart to
    // repair: proof that the kills land inside writes.
    let mut left_dirty = 0;
    let mut applied_unacked = 0;
    let mut child = env.spawn();
    for cycle in 0..CYCLES {
        // Push a few rotations and kill the agent at a random moment.
        let pushes: Vec<(u64, Set)> = (0..1 + rng.u64(..4))
            .map(|_| {
                let g = next_gen;
                next_gen += 1 + rng.u64(..3);
                (g, set_for(g, &mut rng))
            })
            .collect();
        for (g, set) in &pushes {
            sent.insert(*g, set.clone());
        }
        let delay = Duration::from_micros(rng.u64(..40_000));
        let sock = env.p("guest.sock");
        let host = &env.host;
        let acks = rt.block_on(async {
            let mut c = connect_retry(&sock, host).await;
            let driver = async {
                let mut acks = Vec::new();
                for (g, set) in &pushes {
                    let upserts = set.iter().map(|(n, v)| cred(n, v)).collect();
                    let removals: Vec<&str> = NAMES
                        .iter()
                        .copied()
                        .filter(|n| !set.contains_key(*n))
                        .collect();
                    match c.apply(apply(*g, upserts, &removals)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert_eq!(
                                r.applied_generation, *g,
                                "push {g} not applied: {:?}",
                                r.results
                            );
                            acks.push(*g);
                        }
                        Err(_) => break,
                    }
                }
                acks
            };
            tokio::pin!(driver);
            tokio::select! {
                acks = &mut driver => acks,
                () = tokio::time::sleep(delay) => {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    ).unwrap();
                    kills_mid_apply += 1;
                    driver.await
                }
            }
        });
        if let Some(&g) = acks.last() {
            acked = g;
        }
        let _ = child.kill();
        child.wait().unwrap();

        // What the kill left: every file whole (some generation's value).
        let (disk, staging) = env.on_disk();
        if !staging.is_empty() || (env.mounted.is_some() && !is_ro(&env.creds)) {
            left_dirty += 1;
        }
        for (name, v) in &disk {
            assert!(
                sent.values().any(|s| s.get(name) == Some(v)),
                "cycle {cycle}: {name} is torn ({} bytes)",
                v.len()
            );
        }

        child = env.spawn();
        let (disk, staging) = env.on_disk();
        assert!(
            staging.is_empty(),
            "cycle {cycle}: staging files left: {staging:?}"
        );
        if env.mounted.is_some() {
            assert!(is_ro(&env.creds), "cycle {cycle}: mount left writable");
        }
        if let Some(size) = size {
            assert_eq!(
                tmpfs_size(&env.creds),
                size,
                "cycle {cycle}: tmpfs left enlarged"
            );
        }
        assert_eq!(
            std::fs::read(env.creds.join("BOOT")).unwrap(),
            b"from SMBIOS"
        );
        let h = rt.block_on(async {
            let mut c = connect_retry(&sock, &env.host).await;
            c.hello(hello()).await.unwrap().into_inner()
        });
        let g = h.applied_generation;
        assert!(
            g >= acked,
            "cycle {cycle}: generation {g} is behind the acknowledged {acked}"
        );
        assert!(
            g >= seen,
            "cycle {cycle}: generation went back from {seen} to {g}"
        );
        if g > acked {
            applied_unacked += 1;
        }
        seen = g;
        let want = sent
            .get(&g)
            .unwrap_or_else(|| panic!("cycle {cycle}: generation {g} was never sent"));
        assert_eq!(
            disk.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "cycle {cycle}: the guest claims generation {g} but holds another set"
        );
        assert!(
            disk == *want,
            "cycle {cycle}: the guest claims generation {g} but holds other values"
        );
        let held: Vec<_> = h.held.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(held, want.keys().map(String::as_str).collect::<Vec<_>>());
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "crash suite: {CYCLES} cycles, {kills_mid_apply} kills while pushing, {left_dirty} left \
         a write to repair, {applied_unacked} applied a push the host never saw acknowledged, \
         last generation {seen}"
    );
}

#[test]
fn kill_9_during_rotations_never_tears_loses_or_rolls_back() {
    if nix::unistd::geteuid().is_root() {
        in_private_mount_namespace(
            "kill_9_during_rotations_never_tears_loses_or_rolls_back",
            || run(Some("ramfs")),
        );
    } else {
        eprintln!("not root: running on a plain directory, without the read-only mount");
        run(None);
    }
}

/// The same on systemd's tmpfs (1 MiB, 1024 inodes), which the agent
/// enlarges for a push of a value over half of it: a kill while enlarged
/// must leave it at its size after the restart.
#[test]
fn kill_9_on_a_size_limited_tmpfs() {
    if nix::unistd::geteuid().is_root() {
        in_private_mount_namespace("kill_9_on_a_size_limited_tmpfs", || run(Some("tmpfs")));
    } else {
        eprintln!("SKIPPED kill_9_on_a_size_limited_tmpfs: needs root to mount");
    }
}
