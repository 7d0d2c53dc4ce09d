//! End-to-end tests: real `vmcred-host` and `vmcred-guest` processes, real
//! TLS, real files, joined through the hybrid-vsock muxer stand-in. Build
//! the binaries first (`cargo build --bins`; tests/run.sh does).
//!
//! Tests that need a read-only ramfs make it in a private mount namespace,
//! which needs root; as non-root they say so and stop.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmcred_tests::{wait_until, World};

const T: Duration = Duration::from_secs(30);
const VM: &str = "vm1";

fn root() -> bool {
    let r = nix::unistd::geteuid().is_root();
    if !r {
        eprintln!("SKIP-REASON: this test needs root for a private mount namespace");
    }
    r
}

fn world(read_only: bool) -> World {
    let mut w = World::new().expect("world");
    w.log_level = "trace".into();
    w.add_vm(VM, read_only).expect("vm");
    w
}

/// A world whose guest booted and holds `creds` (all vsock-only).
fn booted(creds: &[(&str, &[u8])]) -> World {
    let mut w = world(false);
    for (name, value) in creds {
        w.set_secret(VM, name, value, false).unwrap();
    }
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    for (name, value) in creds {
        w.wait_for_guest_value(VM, name, value, T).unwrap();
    }
    w
}

fn stdout(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn initial_delivery_late_credential_and_rotation() {
    let mut w = world(false);
    w.set_secret(VM, "ENVIRONMENT", b"test", true).unwrap();
    w.set_secret(VM, "API_KEY", b"api-key-v1-4f1c", false)
        .unwrap();
    w.start_host().unwrap();
    let imported = w.boot_guest(VM).unwrap();
    assert!(imported.contains(&"vmcred.bootstrap".to_string()));
    assert!(imported.contains(&"ENVIRONMENT".to_string()));
    assert!(
        !imported.contains(&"API_KEY".to_string()),
        "API_KEY is not boot-time"
    );
    w.wait_for_guest_value(VM, "API_KEY", b"api-key-v1-4f1c", T)
        .unwrap();

    // Mode 0400, as systemd's own credentials.
    let meta = std::fs::metadata(w.guest_view(VM).unwrap().join("API_KEY")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);

    // A credential added on the host after the guest connected.
    w.set_secret(VM, "LATE_TOKEN", b"late-token-9a7e", false)
        .unwrap();
    w.reload_host().unwrap();
    w.wait_for_guest_value(VM, "LATE_TOKEN", b"late-token-9a7e", T)
        .unwrap();

    // Rotation returns 0 only once the guest file holds the new bytes.
    w.set_secret(VM, "API_KEY", b"api-key-v2-77d0", false)
        .unwrap();
    let out = w.rotate(VM, &["API_KEY"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(w.read_guest(VM, "API_KEY").unwrap(), b"api-key-v2-77d0");
    assert!(
        stdout(&out).contains("API_KEY: written"),
        "{}",
        stdout(&out)
    );

    // Rotating again with nothing new is a success that writes nothing.
    let out = w.rotate(VM, &[], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));

    let st = w.status_json().unwrap();
    assert_eq!(st[0]["connected"], true, "{st}");
    assert_eq!(
        st[0]["generation_applied"], st[0]["generation_sent"],
        "{st}"
    );
}

#[test]
fn removal_only_on_explicit_removal() {
    let mut w = booted(&[("KEEP", b"keep-1"), ("DROP", b"drop-1")]);

    // The host going away deletes nothing.
    w.kill_host().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.read_guest(VM, "DROP").unwrap(), b"drop-1");

    // A source file vanishing is not a removal either.
    let src = w.creds[VM]["KEEP"].0.clone();
    std::fs::remove_file(&src).unwrap();
    w.start_host().unwrap();
    let out = w.rotate(VM, &["KEEP"], "30s").unwrap();
    assert!(
        !out.status.success(),
        "a missing source must fail the rotate"
    );
    assert!(stdout(&out).contains("does not exist"), "{}", stdout(&out));
    assert_eq!(w.read_guest(VM, "KEEP").unwrap(), b"keep-1");

    // Removing it from the config is.
    w.set_secret(VM, "KEEP", b"keep-1", false).unwrap();
    w.remove_credential(VM, "DROP");
    w.reload_host().unwrap();
    wait_until(T, || w.read_guest(VM, "DROP").is_none()).expect("DROP removed");
    assert_eq!(w.read_guest(VM, "KEEP").unwrap(), b"keep-1");
}

#[test]
fn guest_agent_restart_keeps_files_and_resyncs() {
    let mut w = booted(&[("A", b"a-1")]);
    w.kill_guest_agent(VM).unwrap();
    assert_eq!(
        w.read_guest(VM, "A").unwrap(),
        b"a-1",
        "files survive the agent"
    );
    w.set_secret(VM, "A", b"a-2", false).unwrap();
    w.start_guest_agent(VM).unwrap();
    let out = w.rotate(VM, &["A"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(w.read_guest(VM, "A").unwrap(), b"a-2");
}

#[test]
fn host_agent_restart_redials_and_loses_nothing() {
    let mut w = world(false);
    w.set_secret(VM, "A", b"a-1", false).unwrap();
    w.set_secret(VM, "B", b"b-1", false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "B", b"b-1", T).unwrap();
    // The file is there before the acknowledgement reaches `status`.
    let applied = |w: &World| {
        w.status_json()
            .ok()
            .and_then(|s| s[0]["generation_applied"].as_u64())
            .unwrap_or(0)
    };
    wait_until(T, || applied(&w) > 0).unwrap();
    let before = applied(&w);
    // Killed hard, mid-life; a value changes while it is down.
    w.kill_host().unwrap();
    w.set_secret(VM, "A", b"a-2", false).unwrap();
    w.start_host().unwrap();
    w.wait_for_guest_value(VM, "A", b"a-2", T).unwrap();
    assert_eq!(w.read_guest(VM, "B").unwrap(), b"b-1");
    wait_until(T, || applied(&w) > before)
        .unwrap_or_else(|_| panic!("generation must move forward: {before} -> {}", applied(&w)));
    w.set_secret(VM, "B", b"b-2", false).unwrap();
    let out = w.rotate(VM, &["B"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(w.read_guest(VM, "B").unwrap(), b"b-2");
}

#[test]
fn rotate_to_a_down_guest_times_out_and_applies_when_back() {
    let mut w = booted(&[("A", b"a-1")]);
    w.kill_guest_agent(VM).unwrap();
    w.set_secret(VM, "A", b"a-2", false).unwrap();
    let out = w.rotate(VM, &["A"], "2s").unwrap();
    assert!(!out.status.success());
    assert!(stdout(&out).contains("timed out"), "{}", stdout(&out));
    w.start_guest_agent(VM).unwrap();
    w.wait_for_guest_value(VM, "A", b"a-2", T).unwrap();
}

#[test]
fn impostor_host_is_refused_and_nothing_written() {
    let mut w = booted(&[("A", b"genuine")]);
    w.stop_host().unwrap();
    // Same config, new key: a different host.
    std::fs::remove_dir_all(w.path().join("host-state")).unwrap();
    w.set_secret(VM, "A", b"forged", false).unwrap();
    w.set_secret(VM, "NEW", b"forged-new", false).unwrap();
    w.start_host().unwrap();
    let out = w.rotate(VM, &[], "3s").unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(w.read_guest(VM, "A").unwrap(), b"genuine");
    assert!(w.read_guest(VM, "NEW").is_none());
    let st = w.status_json().unwrap();
    assert_eq!(st[0]["connected"], false, "{st}");
    assert!(w.logs().contains("not the pinned one"));
}

#[test]
fn oversized_credential_and_set_are_refused_clearly() {
    let mut w = booted(&[("SMALL", b"small")]);
    w.set_secret(VM, "BIG", &vec![b'x'; 1024 * 1024 + 1], false)
        .unwrap();
    w.reload_host_applied().unwrap();
    let out = w.rotate(VM, &["BIG"], "10s").unwrap();
    assert!(!out.status.success());
    assert!(stdout(&out).contains("1 MiB"), "{}", stdout(&out));
    // Two values that fit alone but not together.
    w.set_secret(VM, "BIG", &vec![b'x'; 700 * 1024], false)
        .unwrap();
    w.set_secret(VM, "BIG2", &vec![b'y'; 700 * 1024], false)
        .unwrap();
    w.reload_host_applied().unwrap();
    let out = w.rotate(VM, &[], "10s").unwrap();
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("limit for one VM"),
        "{}",
        stdout(&out)
    );
    assert!(w.read_guest(VM, "BIG").is_none());
    assert_eq!(w.read_guest(VM, "SMALL").unwrap(), b"small");
}

#[test]
fn read_only_mount_readers_never_see_torn_values_and_mount_stays_read_only() {
    if !root() {
        return;
    }
    let mut w = world(true);
    let v = |i: u32| {
        format!("value-{i:04}-")
            .repeat(200 + (i as usize % 7) * 50)
            .into_bytes()
    };
    w.set_secret(VM, "ROT", &v(0), false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "ROT", &v(0), T).unwrap();
    // The file is visible from its rename; the guest remounts read-only
    // right after, before it acknowledges.
    wait_until(T, || {
        w.guest_mount_options(VM)
            .map(|o| o.split(',').any(|o| o == "ro"))
            .unwrap_or(false)
    })
    .expect("read-only again after the initial sync");

    let path = w.guest_view(VM).unwrap().join("ROT");
    let valid: Vec<Vec<u8>> = (0..=20).map(v).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, valid, path) = (stop.clone(), valid.clone(), path.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = std::fs::read(&path).expect("the file never disappears");
                assert!(
                    valid.contains(&got),
                    "torn or empty read ({} bytes)",
                    got.len()
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 1..=20 {
        w.set_secret(VM, "ROT", &v(i), false).unwrap();
        let out = w.rotate(VM, &["ROT"], "30s").unwrap();
        assert!(out.status.success(), "{}", stdout(&out));
        assert_eq!(w.read_guest(VM, "ROT").unwrap(), v(i));
        assert!(w
            .guest_mount_options(VM)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole values");
    assert!(reads > 20, "reader ran {reads} times");

    // A failed write (over the mount's 1 MiB with what is there) leaves
    // the mount read-only too.
    w.set_secret(VM, "FILL", &vec![b'f'; 1000 * 1024], false)
        .unwrap();
    w.reload_host_applied().unwrap();
    let _ = w.rotate(VM, &["FILL"], "10s").unwrap();
    assert!(w
        .guest_mount_options(VM)
        .unwrap()
        .split(',')
        .any(|o| o == "ro"));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
}

#[test]
fn unit_actions_are_run_and_reported() {
    let mut w = world(false);
    w.guests
        .get_mut(VM)
        .unwrap()
        .units
        .insert("API_KEY".into(), vec!["consumer.service".into()]);
    w.set_secret(VM, "API_KEY", b"k1", false).unwrap();
    w.set_secret(VM, "OTHER", b"o1", false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"k1", T).unwrap();
    w.set_secret(VM, "API_KEY", b"k2", false).unwrap();
    let out = w.rotate(VM, &["API_KEY"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("consumer.service"),
        "{}",
        stdout(&out)
    );
    let log = std::fs::read_to_string(&w.guests[VM].systemctl_log).unwrap();
    assert!(log.contains("consumer.service"), "{log}");
    // A credential without mapped units triggers no action.
    let before = log.lines().count();
    w.set_secret(VM, "OTHER", b"o2", false).unwrap();
    assert!(w.rotate(VM, &["OTHER"], "30s").unwrap().status.success());
    let log = std::fs::read_to_string(&w.guests[VM].systemctl_log).unwrap();
    assert_eq!(log.lines().count(), before, "{log}");
}

#[test]
fn secrets_never_reach_logs_or_status_even_at_trace() {
    let mut w = world(false);
    let secrets: [&[u8]; 3] = [b"s3cr3t-boot-41d9", b"s3cr3t-late-a0c2", b"s3cr3t-rot-77e1"];
    w.set_secret(VM, "BOOT", secrets[0], true).unwrap();
    w.set_secret(VM, "LATE", secrets[1], false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "LATE", secrets[1], T).unwrap();
    w.set_secret(VM, "LATE", secrets[2], false).unwrap();
    let out = w.rotate(VM, &[], "30s").unwrap();
    assert!(out.status.success());
    let status = w.host_cmd(&["status", "--json"]).unwrap();
    let mut everything = w.logs();
    everything.push_str(&stdout(&out));
    everything.push_str(&stdout(&status));
    assert!(
        everything.contains("TRACE") || everything.contains("DEBUG"),
        "trace logging was on"
    );
    for s in secrets {
        let s = std::str::from_utf8(s).unwrap();
        assert!(!everything.contains(s), "secret {s} leaked");
    }
}

#[test]
fn launch_output_for_both_hypervisors() {
    let mut w = world(false);
    w.set_secret(VM, "ENVIRONMENT", b"prod-env-5e2a", true)
        .unwrap();
    w.set_secret(VM, "API_KEY", b"api-key-never-argv", false)
        .unwrap();
    w.start_host().unwrap();
    let argv = w.launch_dry_run(VM, "qemu").unwrap();
    let joined = argv.join(" ");
    assert!(joined.contains("-smbios type=11,path="), "{joined}");
    assert!(!joined.contains("prod-env-5e2a") && !joined.contains("api-key-never-argv"));
    // base64 of the boot value must not be there either.
    assert!(!joined.contains("cHJvZC1lbnYtNWUyYQ"), "{joined}");
    // cloud-hypervisor: a boot secret not marked for the command line is refused.
    let err = w
        .launch_dry_run(VM, "cloud-hypervisor")
        .unwrap_err()
        .to_string();
    assert!(err.contains("allow_on_command_line"), "{err}");
    // With only public data it merges into the one --platform.
    w.remove_credential(VM, "ENVIRONMENT");
    w.write_config("").unwrap();
    let argv = w.launch_dry_run(VM, "cloud-hypervisor").unwrap();
    let platforms: Vec<&String> = argv.iter().filter(|a| *a == "--platform").collect();
    assert_eq!(platforms.len(), 1, "{argv:?}");
    let joined = argv.join(" ");
    assert!(
        joined.contains("io.systemd.credential:EXISTING=1"),
        "{joined}"
    );
    assert!(
        joined.contains("vmcred.bootstrap=vmcred-bootstrap-v1 port=700 pin=sha256:")
            && joined.contains(" host=hybrid"),
        "{joined}"
    );
}

#[test]
fn launch_tells_the_serving_agent_and_execs() {
    let mut w = world(false);
    w.set_secret(VM, "A", b"a-1", false).unwrap();
    w.start_host().unwrap();
    // /bin/true stands in for the hypervisor: it ignores the -smbios
    // arguments and exits 0, so the exec itself is exercised.
    let out = std::process::Command::new(&w.bins.host)
        .args(["launch", "--config"])
        .arg(w.config_path())
        .args(["--vm", VM, "--hypervisor", "qemu", "--runtime-dir"])
        .arg(w.path().join("launch-rt"))
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(!stdout(&out).contains("could not tell"), "{}", stdout(&out));
    wait_until(T, || w.logs().contains("VM launched; dialling now")).expect("agent woken");
}

/// A shared, writable mapping of a tmpfs file, unmapped and the file
/// removed on drop.
struct Mapped {
    path: std::path::PathBuf,
    at: *mut u8,
    len: usize,
}

impl Mapped {
    fn create(path: std::path::PathBuf, len: usize) -> Mapped {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of a file this test created and
        // sized; no other memory is touched. It stays valid after the
        // descriptor closes, until `drop` unmaps it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Mapped {
            path,
            at: at.cast(),
            len,
        }
    }

    /// Writes `value` (exactly `len` bytes) through the mapping: no
    /// `write(2)`, so on tmpfs the file's times stay as they were once the
    /// page is mapped writable.
    fn put(&self, value: &[u8]) {
        assert_eq!(value.len(), self.len);
        // SAFETY: `at` maps `len` writable bytes until drop.
        unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), self.at, self.len) };
    }

    fn stamp(&self) -> (u64, u64, i64, i64, i64, i64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.path).unwrap();
        (
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `create` made.
        unsafe { libc::munmap(self.at.cast(), self.len) };
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `rotate` re-reads its sources even when the host's cache of file stamps
/// says nothing changed: a writer that keeps a tmpfs file mapped and
/// rewrites it in place changes neither its inode, size nor times, and
/// before, such a rotate answered "unchanged" and the guest kept the old
/// value for good (found in review).
#[test]
fn rotate_rereads_a_source_rewritten_in_place_through_a_mapping() {
    let shm = std::path::Path::new("/dev/shm");
    let kind = nix::sys::statfs::statfs(shm)
        .unwrap_or_else(|e| panic!("this test needs a tmpfs at /dev/shm: {e}"))
        .filesystem_type();
    assert_eq!(
        kind,
        nix::sys::statfs::TMPFS_MAGIC,
        "this test needs a tmpfs at /dev/shm"
    );
    let src = Mapped::create(
        shm.join(format!("vmcred-e2e-mapped-{}", std::process::id())),
        16,
    );
    src.put(b"mapped-value-one");
    let mut w = world(false);
    w.set_source(VM, "TOKEN", &src.path, false);
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "TOKEN", b"mapped-value-one", T)
        .unwrap();
    // Once the version has been still for the cache's racy window, a read
    // of it caches its stamp: this rotate's (it returns after the ack).
    std::thread::sleep(vmcred_host::source::RACY + Duration::from_millis(500));
    let out = w.rotate(VM, &["TOKEN"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    let before = src.stamp();
    src.put(b"mapped-value-two");
    assert_eq!(
        src.stamp(),
        before,
        "the kernel changed the file's stamp on a write through a mapping; \
         this test's premise (tmpfs keeps it) does not hold here"
    );
    let out = w.rotate(VM, &["TOKEN"], "30s").unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(
        w.read_guest(VM, "TOKEN").unwrap(),
        b"mapped-value-two",
        "rotate trusted the cached stamp\n{}\nhost log:\n{}",
        stdout(&out),
        w.logs()
    );
}

/// A unit slower to restart than the host's `rpc_timeout` (10 s in these
/// worlds): the guest answers the `Apply` once the restart is done, within
/// its unit-action budget, and the host waits that long for an `Apply`
/// rather than dropping the session as lost and redialling (found in
/// review: every push to such a VM timed out and reported a failure).
#[test]
fn a_unit_slower_than_the_rpc_timeout_is_not_a_lost_guest() {
    let mut w = world(false);
    let g = w.guests.get_mut(VM).unwrap();
    g.units
        .insert("API_KEY".into(), vec!["slow.service".into()]);
    g.env
        .push(("VMCRED_TEST_SYSTEMCTL_SLEEP".into(), "12".into()));
    w.set_secret(VM, "API_KEY", b"k1", false).unwrap();
    w.start_host().unwrap();
    w.boot_guest(VM).unwrap();
    w.wait_for_guest_value(VM, "API_KEY", b"k1", T).unwrap();
    w.set_secret(VM, "API_KEY", b"k2", false).unwrap();
    let out = w.rotate(VM, &["API_KEY"], "60s").unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), w.logs());
    assert!(stdout(&out).contains("slow.service"), "{}", stdout(&out));
    let logs = w.logs();
    assert!(
        !logs.contains("timed out") && !logs.contains("lost the guest agent"),
        "{logs}"
    );
}
