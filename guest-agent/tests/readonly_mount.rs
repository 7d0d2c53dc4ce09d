//! Writing into a read-only credentials mount, as systemd leaves
//! `/run/credentials/@system`: the store must remount it read-write only
//! for the write and read-only again afterwards, after a failed write too.
//!
//! Mounting needs root and must not touch this machine's mounts, so each
//! test re-executes this test binary under `unshare --mount` (a private
//! mount namespace whose mounts vanish with it) and runs its body there.

mod common;

use std::path::{Path, PathBuf};

use common::in_private_mount_namespace;

use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use vmcred_guest::store::{Limits, Store};

fn flags(dir: &Path) -> FsFlags {
    statvfs(dir).expect("statvfs").flags()
}

fn is_ro(dir: &Path) -> bool {
    flags(dir).contains(FsFlags::ST_RDONLY)
}

/// A fresh file system at `creds`, holding one boot-time credential, made
/// read-only the way systemd does it (per mount, `MS_BIND|MS_REMOUNT`), or
/// mounted read-only outright (`superblock`).
fn mount_credentials(creds: &Path, fstype: &str, superblock: bool) {
    std::fs::create_dir_all(creds).unwrap();
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // systemd's own options (tmpfs gets `noswap` where the kernel has it).
    let data = if fstype == "tmpfs" {
        "mode=0700,nr_inodes=1024,size=1M,noswap"
    } else {
        "mode=0700"
    };
    if mount(Some(fstype), creds, Some(fstype), base, Some(data)).is_err() {
        // A kernel before 6.4 has no `noswap`; systemd then mounts without.
        let data = data.trim_end_matches(",noswap");
        mount(Some(fstype), creds, Some(fstype), base, Some(data)).expect("mount");
    }
    std::fs::write(creds.join("BOOT"), b"from SMBIOS").unwrap();
    std::fs::create_dir(creds.join("ADIR")).unwrap();
    if superblock {
        mount(
            None::<&str>,
            creds,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
            None::<&str>,
        )
        .expect("remount ro");
    } else {
        mount(
            None::<&str>,
            creds,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
            None::<&str>,
        )
        .expect("bind remount ro");
    }
    assert!(is_ro(creds));
    assert!(
        std::fs::write(creds.join("X"), b"x").is_err(),
        "the mount should refuse plain writes"
    );
}

/// A temporary directory with [`mount_credentials`]' file system at its
/// `credentials`.
fn mounted(fstype: &str, superblock: bool) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    mount_credentials(&creds, fstype, superblock);
    (tmp, creds)
}

/// What a crash between the agent's remount and the end of its write
/// leaves: systemd's mount, writable (its other options kept).
fn remount_writable(creds: &Path) {
    mount(
        None::<&str>,
        creds,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .unwrap();
}

/// `check` on tmpfs and on ramfs: two tests of the given names, each in a
/// private mount namespace.
macro_rules! on_tmpfs_and_ramfs {
    ($tmpfs:ident, $ramfs:ident, $check:expr) => {
        #[test]
        fn $tmpfs() {
            in_private_mount_namespace(stringify!($tmpfs), || $check("tmpfs"));
        }

        #[test]
        fn $ramfs() {
            in_private_mount_namespace(stringify!($ramfs), || $check("ramfs"));
        }
    };
}

fn exercise(fstype: &str, superblock: bool) {
    let (tmp, creds) = mounted(fstype, superblock);
    let before = flags(&creds);
    let store = Store::open(
        &creds,
        &tmp.path().join("state"),
        Limits {
            max_total_bytes: 4096,
            max_files: 1024,
        },
    )
    .unwrap();

    // A successful write: new content, read-only again, same flags.
    store
        .batch()
        .unwrap()
        .write("API_KEY", b"v1", 0o400)
        .unwrap();
    assert_eq!(std::fs::read(creds.join("API_KEY")).unwrap(), b"v1");
    assert!(is_ro(&creds), "read-only again after a write");
    assert_eq!(flags(&creds), before, "mount flags kept");

    // Several changes in one batch, then a failure inside the batch (over
    // the limit, after the remount): read-only again, old values kept.
    {
        let mut b = store.batch().unwrap();
        b.write("API_KEY", b"v2", 0o400).unwrap();
        b.write("OTHER", b"o", 0o440).unwrap();
        assert!(!is_ro(&creds), "writable while the batch runs");
        let err = b.write("API_KEY", &[0u8; 5000], 0o400).unwrap_err();
        assert!(err.to_string().contains("its limit is 4096"), "{err}");
    }
    assert!(is_ro(&creds), "read-only again after a failed write");
    assert_eq!(flags(&creds), before);
    assert_eq!(std::fs::read(creds.join("API_KEY")).unwrap(), b"v2");

    // A failure at the rename (a directory at the name).
    {
        let err = store.batch().unwrap().write("ADIR", b"x", 0o400);
        assert!(err.is_err());
    }
    assert!(is_ro(&creds));
    assert!(creds.join("ADIR").is_dir());

    // Removal goes through the same remount.
    store.batch().unwrap().remove("OTHER").unwrap();
    assert!(!creds.join("OTHER").exists());
    assert!(is_ro(&creds));
    assert_eq!(std::fs::read(creds.join("BOOT")).unwrap(), b"from SMBIOS");

    // A batch that changes nothing does not remount at all.
    drop(store.batch().unwrap());
    assert!(is_ro(&creds));
}

on_tmpfs_and_ramfs!(
    tmpfs_made_read_only_per_mount,
    ramfs_made_read_only_per_mount,
    (|fs| exercise(fs, false))
);

#[test]
fn tmpfs_mounted_read_only() {
    in_private_mount_namespace("tmpfs_mounted_read_only", || exercise("tmpfs", true));
}

#[test]
fn writable_directory_is_not_remounted() {
    in_private_mount_namespace("writable_directory_is_not_remounted", || {
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("credentials");
        std::fs::create_dir(&creds).unwrap();
        mount(
            Some("tmpfs"),
            &creds,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=0700"),
        )
        .unwrap();
        let store = Store::open(&creds, &tmp.path().join("state"), Limits::default()).unwrap();
        store.batch().unwrap().write("A", b"a", 0o400).unwrap();
        assert!(!is_ro(&creds), "a writable mount stays writable");
    });
}

fn tmpfs_size(dir: &Path) -> u64 {
    let st = statvfs(dir).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Issue 9.2: a kill -9 mid-write leaves the mount writable with staging
/// files in it; the next start makes it read-only and removes them, and
/// the guard works even when the mount is found writable.
fn repaired_after_a_crash(fstype: &str) {
    let (tmp, creds) = mounted(fstype, false);
    let state = tmp.path().join("state");
    let before = flags(&creds);
    let store = Store::open(&creds, &state, Limits::default()).unwrap();
    store.batch().unwrap().write("A", b"a1", 0o400).unwrap();
    drop(store);
    // What a crash between the remount and the end of a write leaves.
    remount_writable(&creds);
    assert!(!is_ro(&creds));
    std::fs::write(creds.join(".A.vmcred-tmp"), b"a2-half").unwrap();
    std::fs::write(creds.join(".vmcred-tmp.0123"), b"x").unwrap();

    let store = Store::open(&creds, &state, Limits::default()).unwrap();
    assert!(is_ro(&creds), "read-only again at start");
    assert_eq!(flags(&creds), before, "with the flags it had");
    assert_eq!(names(&creds), ["A", "ADIR", "BOOT"]);
    assert_eq!(std::fs::read(creds.join("A")).unwrap(), b"a1");

    // Made writable behind the agent's back: the next write still leaves
    // it read-only (the guard is not skipped).
    remount_writable(&creds);
    store.batch().unwrap().write("A", b"a2", 0o400).unwrap();
    assert!(
        is_ro(&creds),
        "read-only after a write that found it writable"
    );
    assert_eq!(flags(&creds), before);
}

on_tmpfs_and_ramfs!(
    tmpfs_repaired_after_a_crash,
    ramfs_repaired_after_a_crash,
    repaired_after_a_crash
);

/// Issue 9, "also": a credential larger than half of the 1 MiB mount can
/// be rotated (old and new exist at once during the push); the tmpfs is
/// back at its size afterwards; a set that would not fit is refused with
/// the old value intact.
fn rotates_a_large_credential(fstype: &str) {
    let (tmp, creds) = mounted(fstype, false);
    let size = tmpfs_size(&creds);
    let store = Store::open(&creds, &tmp.path().join("state"), Limits::default()).unwrap();
    let big = |b: u8| vec![b; 700 * 1024];
    store.batch().unwrap().write("BIG", &big(1), 0o400).unwrap();
    for round in 2..5u8 {
        store
            .batch()
            .unwrap()
            .write("BIG", &big(round), 0o400)
            .unwrap();
        assert_eq!(std::fs::read(creds.join("BIG")).unwrap(), big(round));
        assert!(is_ro(&creds));
        assert_eq!(tmpfs_size(&creds), size, "{fstype} size restored");
        assert_eq!(names(&creds), ["ADIR", "BIG", "BOOT"]);
    }
    // 700 KiB + 400 KiB is more than the mount holds once committed.
    let err = store
        .batch()
        .unwrap()
        .write("OTHER", &[9u8; 400 * 1024], 0o400)
        .unwrap_err()
        .to_string();
    assert!(err.contains("its limit is 1048576"), "{err}");
    assert_eq!(std::fs::read(creds.join("BIG")).unwrap(), big(4));
    assert!(is_ro(&creds));
    assert_eq!(names(&creds), ["ADIR", "BIG", "BOOT"]);
}

on_tmpfs_and_ramfs!(
    tmpfs_rotates_a_large_credential,
    ramfs_rotates_a_large_credential,
    rotates_a_large_credential
);

/// A crash of an agent that kept no mount record (or lost it) left
/// systemd's mount writable: recognised by its file system and options,
/// made read-only at start.
fn systemd_mount_without_record_is_made_read_only(fstype: &str) {
    let (tmp, creds) = mounted(fstype, false);
    remount_writable(&creds);
    std::fs::write(creds.join(".A.vmcred-tmp"), b"half").unwrap();
    assert!(!is_ro(&creds));
    let store = Store::open(&creds, &tmp.path().join("state"), Limits::default()).unwrap();
    assert!(is_ro(&creds), "{fstype}: read-only at start");
    assert_eq!(names(&creds), ["ADIR", "BOOT"]);
    store.batch().unwrap().write("A", b"a", 0o400).unwrap();
    assert!(is_ro(&creds));
}

on_tmpfs_and_ramfs!(
    tmpfs_systemd_mount_without_record_is_made_read_only,
    ramfs_systemd_mount_without_record_is_made_read_only,
    systemd_mount_without_record_is_made_read_only
);
