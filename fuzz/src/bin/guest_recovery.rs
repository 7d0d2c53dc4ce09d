//! What a crash of the guest agent leaves behind, as `Store::open` repairs
//! it at the next start: the push journal (`push.json`), the mount record
//! (`mount.json`), staging files, a backup of an old value, a mount left
//! writable. The credentials directory is a real tmpfs (mounted like
//! systemd's, `nr_inodes=1024`) in this process's private mount namespace,
//! so the real remount and resize paths run and nothing outside changes.
//!
//! Input: a flag byte (bit 0: the mount starts read-only; bit 1: staging
//! files are left; bit 2: `API_KEY` holds a new value and its backup the
//! old one, as mid-push; bit 3: state.json has the journal's generation
//! already, i.e. the push was committed), then `push.json`, a NUL, then
//! `mount.json` (no NUL: no mount record yet; no journal bytes: no
//! `push.json`).
//!
//! Invariants: no panic; a mount that started read-only is read-only after
//! the open, whether it succeeded or not, and so is one the record says
//! must be; after a successful open no staging file and no journal is
//! left, state.json is as it was, every name the journal does not list is
//! exactly as it was, a committed push keeps its new values and a rolled
//! back one gets its old value back (or loses a name it had created); a
//! refused open leaves the journal as it was.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use vmcred_fuzz::{is_temp_name, scratch_dir, snapshot, Entry};
use vmcred_guest::store::{Limits, State, Store};
use vmcred_proto::rules::digest;

const GEN: u64 = 5;
const OLD: &[u8] = b"old-value";
const NEW: &[u8] = b"new-value";

#[derive(serde::Deserialize)]
struct Journal {
    generation: u64,
    entries: Vec<JournalEntry>,
}

#[derive(serde::Deserialize)]
struct JournalEntry {
    name: String,
    remove: bool,
    had_old: bool,
}

#[derive(serde::Deserialize)]
struct MountRecord {
    read_only: bool,
}

/// The store's backup name for `name` (`.vmcred-tmp.old.` and half of the
/// name's SHA-256 in hex), and its staging name.
fn backup_name(name: &str) -> String {
    let d = digest(name.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(".vmcred-tmp.old.{hex}")
}

/// Enters a mount namespace of this process's own, where every mount is
/// private: a remount here can never reach the machine's mounts. Refuses
/// to go on otherwise.
fn private_mounts() {
    let ns = || std::fs::read_link("/proc/self/ns/mnt").expect("read our mount namespace");
    let machine = ns();
    unshare(CloneFlags::CLONE_NEWNS)
        .expect("guest_recovery needs root to make a private mount namespace (unshare)");
    assert_ne!(ns(), machine, "still in the machine's mount namespace");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make every mount private");
}

struct Fixture {
    _dir: tempfile::TempDir,
    creds: PathBuf,
    state: PathBuf,
}

static FX: OnceLock<Fixture> = OnceLock::new();

fn read_only(p: &Path) -> bool {
    statvfs(p)
        .expect("statvfs of the credentials mount")
        .flags()
        .contains(FsFlags::ST_RDONLY)
}

fn main() {
    private_mounts();
    afl::fuzz!(|data: &[u8]| {
        let fx = FX.get_or_init(|| {
            let dir = scratch_dir("vmcred-fuzz-recovery-");
            let creds = dir.path().join("creds");
            let state = dir.path().join("state");
            std::fs::create_dir(&creds).expect("creds dir");
            Fixture {
                _dir: dir,
                creds,
                state,
            }
        });
        let Some((&flags, rest)) = data.split_first() else {
            return;
        };
        let (journal, record) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };

        // A fresh tmpfs like systemd's for every input.
        mount(
            Some("tmpfs"),
            &fx.creds,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=1m,nr_inodes=1024,mode=0700"),
        )
        .expect("mount the credentials tmpfs");
        let put = |name: &str, bytes: &[u8]| {
            let p = fx.creds.join(name);
            std::fs::write(&p, bytes).expect("seed a file");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).expect("mode");
        };
        put("FOREIGN", b"from-smbios");
        put("vmcred.bootstrap", b"vmcred-bootstrap-v1 port=700");
        put("DB_PASSWORD", b"db");
        if flags & 4 != 0 {
            put("API_KEY", NEW);
            put(&backup_name("API_KEY"), OLD);
        } else {
            put("API_KEY", OLD);
        }
        if flags & 2 != 0 {
            put(".API_KEY.vmcred-tmp", b"staged");
            put(".vmcred-tmp.0123456789abcdef", b"staged");
        }
        let started_ro = flags & 1 != 0;
        if started_ro {
            mount(
                None::<&str>,
                &fx.creds,
                None::<&str>,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .expect("make the credentials mount read-only");
        }

        let _ = std::fs::remove_dir_all(&fx.state);
        std::fs::create_dir(&fx.state).expect("state dir");
        let journal_gen = serde_json::from_slice::<Journal>(journal)
            .map(|j| j.generation)
            .unwrap_or(GEN + 1);
        let st = State {
            generation: if flags & 8 != 0 { journal_gen } else { GEN },
            managed: ["API_KEY".to_string(), "DB_PASSWORD".to_string()]
                .into_iter()
                .collect(),
            owed: Vec::new(),
        };
        let state_bytes = serde_json::to_vec(&st).expect("state json");
        std::fs::write(fx.state.join("state.json"), &state_bytes).expect("state file");
        if !journal.is_empty() {
            std::fs::write(fx.state.join("push.json"), journal).expect("push.json");
        }
        if let Some(r) = record {
            std::fs::write(fx.state.join("mount.json"), r).expect("mount.json");
        }

        let before = snapshot(&fx.creds);
        let opened = Store::open(&fx.creds, &fx.state, Limits::default());
        let after = snapshot(&fx.creds);
        let now_ro = read_only(&fx.creds);
        if started_ro {
            assert!(
                now_ro,
                "a read-only mount was left writable (ok: {})",
                opened.is_ok()
            );
        }
        match &opened {
            Ok(_) => check_repaired(fx, journal, &state_bytes, &before, &after, now_ro),
            Err(_) => {
                let left = std::fs::read(fx.state.join("push.json")).unwrap_or_default();
                assert_eq!(left, journal, "a refused open changed the journal");
            }
        }
        drop(opened);
        umount2(&fx.creds, MntFlags::MNT_DETACH).expect("unmount the credentials tmpfs");
    });
}

fn check_repaired(
    fx: &Fixture,
    journal: &[u8],
    state_bytes: &[u8],
    before: &BTreeMap<String, Entry>,
    after: &BTreeMap<String, Entry>,
    now_ro: bool,
) {
    for name in after.keys() {
        assert!(
            !is_temp_name(name),
            "staging file {name:?} left after a repair"
        );
    }
    assert!(
        !fx.state.join("push.json").exists(),
        "the journal outlived a successful repair"
    );
    assert_eq!(
        std::fs::read(fx.state.join("state.json")).expect("state.json"),
        state_bytes,
        "the repair changed state.json"
    );
    let record: MountRecord = serde_json::from_slice(
        &std::fs::read(fx.state.join("mount.json")).expect("a mount record after open"),
    )
    .expect("the mount record the store kept reads back");
    if record.read_only {
        assert!(now_ro, "the record says read-only, the mount is writable");
    }
    let j: Option<Journal> = if journal.is_empty() {
        None
    } else {
        serde_json::from_slice(journal).ok()
    };
    let listed: Vec<&str> = j
        .as_ref()
        .map(|j| j.entries.iter().map(|e| e.name.as_str()).collect())
        .unwrap_or_default();
    for (name, entry) in before {
        if is_temp_name(name) || listed.contains(&name.as_str()) {
            continue;
        }
        assert_eq!(
            after.get(name),
            Some(entry),
            "{name:?} changed, not in the journal"
        );
    }
    let Some(j) = j else { return };
    let state: State = serde_json::from_slice(state_bytes).expect("state json");
    let committed = state.generation >= j.generation;
    // A name listed more than once is undone several times over; only
    // names listed once have a simple expected outcome.
    let mut count: BTreeMap<&str, (usize, &JournalEntry)> = BTreeMap::new();
    for e in &j.entries {
        count.entry(e.name.as_str()).or_insert((0, e)).0 += 1;
    }
    for (name, (n, e)) in count {
        if n > 1 {
            continue;
        }
        let was = before.get(name);
        let is = after.get(name);
        if committed {
            assert_eq!(is, was, "a committed push lost its value of {name:?}");
        } else if e.had_old {
            if let Some(old) = before.get(&backup_name(name)) {
                assert_eq!(
                    is.map(|x| &x.bytes),
                    Some(&old.bytes),
                    "{name:?} not rolled back"
                );
            }
        } else if !e.remove {
            assert!(
                is.is_none(),
                "{name:?}, new in an uncommitted push, survived"
            );
        }
    }
}
