//! The credential store: the only code that touches `/run/credentials/@system`.
//!
//! Everything here runs as root in a directory whose contents other services
//! trust, so every operation is relative to one directory file descriptor
//! opened with `O_NOFOLLOW`, no symlink is ever followed, and no path is
//! built from anything but a validated credential name. A write goes to a
//! temporary file that is renamed over the credential, so a reader sees the
//! old bytes or the new ones and never a torn or empty file.
//!
//! systemd mounts the directory read-only after PID 1 imported the boot-time
//! credentials; a [`Batch`] remounts it read-write only while it writes, and
//! its drop remounts it read-only again, on failure too.
//!
//! - `push.rs`: one push, all or nothing (stage, keep the old values, swap,
//!   commit through state.json).
//! - `recovery.rs`: the push journal and the repair at open after a crash.
//! - `mount.rs`: the read-only mount: the record of how it was found, the
//!   remount guard, enlarging a size-limited tmpfs for a push.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fchmod, fstat, fstatat, FileStat, Mode, SFlag};
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use vmcred_proto::rules::{validate_name, MAX_FILES, MAX_NAME_LEN, MAX_TOTAL_BYTES};
use zeroize::Zeroizing;

use crate::units::Action;

mod mount;
mod push;
mod recovery;

use mount::{mount_record, MountRecord, ReadWrite};
pub use push::{Batch, Change, TxError};
use recovery::{Journal, JournalEntry};

/// Suffix of the temporary file a write goes through. Names that look like
/// one are refused as credentials (see [`reserved_name`]), so a stale-tmp
/// cleanup can never delete a credential.
const TMP_SUFFIX: &str = ".vmcred-tmp";
/// Prefix of the temporary name used when `.NAME.vmcred-tmp` would exceed
/// the file name limit, and of the backup names a push keeps the old
/// values under until it is committed.
const TMP_HASHED_PREFIX: &str = ".vmcred-tmp.";
/// tmpfs's magic number (`statfs.f_type`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// ramfs's magic number (`statfs.f_type`).
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// Largest state file we read: 1024 names of 255 bytes is about 270 KiB.
const MAX_STATE_BYTES: u64 = 4 * 1024 * 1024;

/// The mount's capacity, checked before a write so that a full mount gives a
/// clear error instead of a half-understood `ENOSPC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_total_bytes: u64,
    pub max_files: u64,
}

impl Default for Limits {
    /// systemd's credentials mount: 1 MiB, `nr_inodes=1024`.
    fn default() -> Self {
        Limits {
            max_total_bytes: MAX_TOTAL_BYTES as u64,
            max_files: MAX_FILES as u64,
        }
    }
}

/// What survives an agent restart: the rollback floor and which files are
/// ours to replace and remove. Lives on `/run`, so it ends with the boot,
/// as do the credentials it describes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub generation: u64,
    pub managed: BTreeSet<String>,
    /// Unit actions the guest still owes (planned and not yet succeeded),
    /// so that a failure or a crash never forgets one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed: Vec<Owed>,
}

/// One unit action still owed, and the credentials it is owed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owed {
    pub unit: String,
    pub action: Action,
    pub credentials: BTreeSet<String>,
    /// The last attempt's error; empty while the first attempt is pending.
    #[serde(default)]
    pub error: String,
}

/// What is at a credential's name right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    Missing,
    /// A symlink, directory, FIFO, device or socket: never read, never
    /// written through.
    NotRegular,
    Regular {
        sha256: [u8; 32],
        mode: u32,
    },
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("credentials directory {path}: {why}")]
    Dir { path: String, why: String },
    #[error("state directory {path}: {why}")]
    StateDir { path: String, why: String },
    #[error(
        "state file {path} is unreadable or corrupt ({why}); refusing to start rather than \
         forget the applied generation (rollback protection). To resync this VM from scratch, \
         remove the file and restart vmcred-guest"
    )]
    CorruptState { path: String, why: String },
    #[error("cannot save state to {path}: {why}")]
    SaveState { path: String, why: String },
    #[error("cannot lock {path}: {why}")]
    Lock { path: String, why: String },
    #[error("cannot {op} {name} in {dir}: {errno}")]
    Io {
        op: &'static str,
        name: String,
        dir: String,
        errno: Errno,
    },
    #[error("cannot {op} {dir}: {errno}")]
    DirIo {
        op: &'static str,
        dir: String,
        errno: Errno,
    },
    #[error(
        "writing {name} ({len} bytes) would bring {dir} to {total} bytes; its limit is {limit}{why}"
    )]
    TotalLimit {
        name: String,
        len: usize,
        dir: String,
        total: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("writing {name} would need inode {needed} in {dir}; its limit is {limit}{why}")]
    FileLimit {
        name: String,
        dir: String,
        needed: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("{name} in {dir} is not a regular file; left in place")]
    NotRegular { name: String, dir: String },
    #[error("{0}")]
    BadName(String),
    #[error("cannot remount {dir} read-write for the write: {why}")]
    Remount { dir: String, why: String },
    #[error(
        "{path} is locked by another process (another vmcred-guest?); nothing was changed, \
         retry later"
    )]
    Busy { path: String },
    #[error("{name} in {dir} is a directory; a credential cannot replace it")]
    IsDirectory { name: String, dir: String },
}

/// Why `name` may not be used as a credential name even though systemd
/// would accept it: it could collide with the store's temporary files.
pub fn reserved_name(name: &str) -> Option<&'static str> {
    if (name.starts_with('.') && name.ends_with(TMP_SUFFIX)) || name.starts_with(TMP_HASHED_PREFIX)
    {
        Some("names of the form .NAME.vmcred-tmp are reserved for vmcred's temporary files")
    } else {
        None
    }
}

/// The store's own check, so that no caller can make it leave the
/// directory or touch a temporary file, whatever it validated before.
fn check_name(name: &str) -> Result<(), StoreError> {
    validate_name(name).map_err(|e| StoreError::BadName(e.to_string()))?;
    if let Some(why) = reserved_name(name) {
        return Err(StoreError::BadName(format!(
            "credential name {:?} is not allowed: {why}",
            vmcred_proto::rules::display_name(name)
        )));
    }
    Ok(())
}

/// The temporary file for `name`; a hashed name when the readable one would
/// exceed the file name limit.
fn tmp_name(name: &str) -> String {
    let readable = format!(".{name}{TMP_SUFFIX}");
    if readable.len() <= MAX_NAME_LEN {
        readable
    } else {
        let d = Sha256::digest(name.as_bytes());
        format!("{TMP_HASHED_PREFIX}{}", hex::encode(&d[..16]))
    }
}

/// The name the old value of `name` is kept under during a push.
fn backup_name(name: &str) -> String {
    let d = Sha256::digest(name.as_bytes());
    format!("{TMP_HASHED_PREFIX}old.{}", hex::encode(&d[..16]))
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// How many times a batch reopens a lock file that was unlinked or
/// replaced under it before it gives up: once is what a root who removed
/// or recreated the file causes; more means something keeps swapping it.
const LOCK_REOPENS: u32 = 3;

/// `write.lock`, open for the store's life: a push takes and drops the
/// `flock` on it, with no open and close of its own. Kept inside the
/// in-process writers' mutex, so a batch can swap it for the file now at
/// the path (see [`Store::batch`]) while no one else uses it.
struct LockFile {
    file: File,
    /// The open file's identity, which never changes (taken once, at the
    /// open): what the path must still name once the file is locked.
    id: (u64, u64),
}

impl LockFile {
    /// Opens (creating, 0600) the lock file at `path`, never through a
    /// symlink.
    fn open(path: &Path) -> Result<LockFile, StoreError> {
        let err = |why: String| StoreError::Lock {
            path: path.display().to_string(),
            why,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let st = fstat(&file).map_err(|e| err(format!("cannot inspect it: {e}")))?;
        Ok(LockFile {
            file,
            id: (st.st_dev, st.st_ino),
        })
    }

    fn try_exclusive(&self) -> Result<(), Errno> {
        // SAFETY: flock(2) on a descriptor of an open file we own; no
        // memory is passed.
        let r = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            Ok(())
        } else {
            Err(Errno::last())
        }
    }

    fn unlock(&self) {
        // SAFETY: as in `try_exclusive`.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }

    /// Whether `path` names this open file now (not following a
    /// symlink). An unlinked or replaced lock file is no lock at all: a
    /// second agent opening the path locks another inode.
    fn is_at(&self, path: &Path) -> Result<bool, Errno> {
        match fstatat(nix::fcntl::AT_FDCWD, path, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok((st.st_dev, st.st_ino) == self.id),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The store's locks, held for one batch: the in-process writers' mutex
/// and the `flock` on the lock file it guards, taken without waiting
/// (another holder is [`StoreError::Busy`]). Dropping it releases the
/// `flock`, then the mutex. `flock` locks belong to the open file, so a
/// second store or process opening the same file conflicts.
pub struct FileLock<'a>(MutexGuard<'a, LockFile>);

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

/// Keeps writers out until dropped (see [`Store::quiesce`]).
pub struct Quiesced<'a>(#[allow(dead_code)] MutexGuard<'a, LockFile>);

/// The credentials directory, its limits and the agent's state.
pub struct Store {
    dir: OwnedFd,
    dir_path: PathBuf,
    state_path: PathBuf,
    journal_path: PathBuf,
    lock_path: PathBuf,
    limits: Limits,
    mount: MountRecord,
    /// Serializes writers inside this process; the `flock` on the lock
    /// file it holds (`lock_path`) serializes them across processes.
    write_lock: Mutex<LockFile>,
    state: Mutex<State>,
    /// Digests of the managed files by their [`Stamp`], so that an idle
    /// host's Hello reads no file.
    digests: Mutex<std::collections::HashMap<String, (Stamp, [u8; 32])>>,
    /// Files hashed since open: lets tests prove an idle Hello reads none.
    hashed: std::sync::atomic::AtomicU64,
    /// Whether an fsync of the credentials directory or of the state
    /// directory can make anything durable (see [`keeps_data`]).
    creds_durable: bool,
    state_durable: bool,
    /// The credentials directory is on a tmpfs (which may have a size
    /// limit to enlarge for a push).
    creds_tmpfs: bool,
    /// What a remount names: the directory we opened, through
    /// `/proc/self/fd`, even if its path was swapped for something else
    /// since (the path itself where /proc is missing).
    remount_target: PathBuf,
    /// fsyncs done since open: lets tests prove none is spent on tmpfs.
    synced: std::sync::atomic::AtomicU64,
}

/// Whether a file system (by its `statfs` magic) keeps data that an
/// fsync would protect.
/// tmpfs and ramfs (systemd's `@system` mount, and `/run` where the state
/// lives by default) lose everything at power-off and implement fsync as
/// a no-op, so there a sync is a syscall that buys nothing; every other
/// file system (and one that cannot be told) is synced. `pin_state_dir`
/// is not the store's: the pins are always synced (`pins.rs`).
fn keeps_data(magic: Option<i64>) -> bool {
    !matches!(magic, Some(TMPFS_MAGIC | RAMFS_MAGIC))
}

/// `statfs.f_type`, whose integer type differs between platforms.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(fd: BorrowedFd<'_>) -> Option<i64> {
    nix::sys::statfs::fstatfs(fd)
        .ok()
        .map(|fs| fs.filesystem_type().0 as i64)
}

/// What changes when a file is replaced or written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(st: &FileStat) -> Stamp {
        Stamp {
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

impl Store {
    /// Opens the credentials directory (creating it, 0700, if systemd has
    /// not), loads the state, and repairs what a crash may have left: a
    /// push half done is rolled back (or finished, if it was committed),
    /// staging files are removed, an enlarged tmpfs is shrunk back, and a
    /// mount that was read-only is made read-only again. A corrupt state
    /// file is an error: silently starting from generation 0 would let an
    /// old generation be replayed.
    pub fn open(
        credentials_dir: &Path,
        state_dir: &Path,
        limits: Limits,
    ) -> Result<Store, StoreError> {
        let dir_err = |why: String| StoreError::Dir {
            path: credentials_dir.display().to_string(),
            why,
        };
        let state_err = |why: String| StoreError::StateDir {
            path: state_dir.display().to_string(),
            why,
        };
        ensure_private_dir(state_dir).map_err(state_err)?;
        match std::fs::symlink_metadata(credentials_dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(credentials_dir)
                    .map_err(|e| dir_err(format!("does not exist and cannot be created: {e}")))?;
                tracing::info!(dir = %credentials_dir.display(), "created the missing credentials directory (mode 0700)");
            }
            Err(e) => return Err(dir_err(e.to_string())),
        }
        let fd = nix::fcntl::open(
            credentials_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // O_DIRECTORY reports a symlink as ENOTDIR, O_NOFOLLOW as ELOOP.
            Errno::ELOOP | Errno::ENOTDIR
                if std::fs::symlink_metadata(credentials_dir)
                    .is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                dir_err("is a symlink; refusing to write credentials through it".into())
            }
            Errno::ENOTDIR => dir_err("is not a directory".into()),
            e => dir_err(format!("cannot open: {e}")),
        })?;
        let dir = fd;
        let creds_magic = fs_magic(dir.as_fd());
        let creds_durable = keeps_data(creds_magic);
        let creds_tmpfs = creds_magic == Some(TMPFS_MAGIC);
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let remount_target = if proc_path.exists() {
            proc_path
        } else {
            credentials_dir.to_path_buf()
        };
        let state_durable = match File::open(state_dir) {
            Ok(d) => keeps_data(fs_magic(d.as_fd())),
            Err(e) => return Err(state_err(format!("cannot open: {e}"))),
        };
        let state_path = state_dir.join("state.json");
        let state = load_state(&state_path)?;
        let synced = std::sync::atomic::AtomicU64::new(0);
        let mount = mount_record(
            &dir,
            credentials_dir,
            &state_dir.join("mount.json"),
            state_durable.then_some(&synced),
        )
        .map_err(|why| dir_err(format!("cannot record how it is mounted: {why}")))?;
        let lock_path = state_dir.join("write.lock");
        let lock_file = LockFile::open(&lock_path)?;
        let store = Store {
            dir,
            dir_path: credentials_dir.to_path_buf(),
            lock_path,
            journal_path: state_dir.join("push.json"),
            state_path,
            limits,
            mount,
            write_lock: Mutex::new(lock_file),
            state: Mutex::new(state),
            digests: Mutex::new(Default::default()),
            hashed: Default::default(),
            creds_durable,
            state_durable,
            creds_tmpfs,
            remount_target,
            synced,
        };
        store.recover()?;
        Ok(store)
    }

    pub fn dir_path(&self) -> &Path {
        &self.dir_path
    }

    /// A snapshot of the applied generation and managed names.
    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// How many fsyncs the store did since open (diagnostics).
    pub fn fsyncs(&self) -> u64 {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where state files are synced: the counter to count them in, or
    /// `None` on a state directory that keeps nothing (see [`keeps_data`]).
    fn state_sync(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.state_durable.then_some(&self.synced)
    }

    /// Counts an fsync of the credentials directory or a file in it.
    fn count_sync(&self) {
        self.synced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many files were read and hashed since open (diagnostics).
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn dirfd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    fn dir_display(&self) -> String {
        self.dir_path.display().to_string()
    }

    fn io(&self, op: &'static str, name: &str, errno: Errno) -> StoreError {
        StoreError::Io {
            op,
            name: name.to_string(),
            dir: self.dir_display(),
            errno,
        }
    }

    /// Opens a credential for reading without following a symlink, and
    /// without blocking or side effects if something other than a regular
    /// file was swapped in (a FIFO, a device): callers fstat what they got.
    fn open_for_read(&self, name: &str) -> nix::Result<std::os::fd::OwnedFd> {
        openat(
            self.dirfd(),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    /// The `lstat` of `name` when it is a regular file; otherwise what
    /// [`Store::current`] reports for it (missing, or not a regular file).
    fn stat_regular(&self, name: &str) -> Result<Result<FileStat, Current>, StoreError> {
        check_name(name)?;
        match fstatat(self.dirfd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_regular(&st) => Ok(Ok(st)),
            Ok(_) => Ok(Err(Current::NotRegular)),
            Err(Errno::ENOENT) => Ok(Err(Current::Missing)),
            Err(e) => Err(self.io("inspect", name, e)),
        }
    }

    /// What is at `name` now, hashed without holding the value in one
    /// buffer. Only regular files are opened: opening a FIFO or a device
    /// could block or have side effects.
    pub fn current(&self, name: &str) -> Result<Current, StoreError> {
        if let Err(other) = self.stat_regular(name)? {
            return Ok(other);
        }
        let fd = match self.open_for_read(name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Current::Missing),
            Err(Errno::ELOOP) => return Ok(Current::NotRegular),
            Err(e) => return Err(self.io("open", name, e)),
        };
        let st2 = fstat(&fd).map_err(|e| self.io("inspect", name, e))?;
        if !is_regular(&st2) {
            // Swapped between the two looks; judge what we actually opened.
            return Ok(Current::NotRegular);
        }
        self.hashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut file = File::from(fd);
        let mut hasher = Sha256::new();
        let mut buf = Zeroizing::new([0u8; 8192]);
        loop {
            let n = file
                .read(&mut buf[..])
                .map_err(|e| self.io("read", name, errno_of(&e)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Current::Regular {
            sha256: hasher.finalize().into(),
            mode: st2.st_mode & 0o7777,
        })
    }

    /// As [`Store::current`], but a file whose inode, size and change
    /// times are what they were when it was last hashed (or written by a
    /// push) is not read again: one `fstatat`.
    pub fn current_cached(&self, name: &str) -> Result<Current, StoreError> {
        let st = match self.stat_regular(name)? {
            Ok(st) => st,
            Err(other) => return Ok(other),
        };
        let stamp = Stamp::of(&st);
        if let Some((s, d)) = lock(&self.digests).get(name) {
            if *s == stamp {
                return Ok(Current::Regular {
                    sha256: *d,
                    mode: st.st_mode & 0o7777,
                });
            }
        }
        let current = self.current(name)?;
        if let Current::Regular { sha256, .. } = current {
            // Hashed after the stat: if the file changed in between, the
            // stamp no longer matches next time and it is re-read.
            lock(&self.digests).insert(name.to_string(), (stamp, sha256));
        }
        Ok(current)
    }

    /// Records the digest of `value`, just written to `name` by a push,
    /// under the file's stamp now.
    fn remember_digest(&self, name: &str, value: &[u8]) {
        if let Ok(st) = fstatat(self.dirfd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            if is_regular(&st) {
                let digest: [u8; 32] = Sha256::digest(value).into();
                lock(&self.digests).insert(name.to_string(), (Stamp::of(&st), digest));
                return;
            }
        }
        self.forget_digest(name);
    }

    fn forget_digest(&self, name: &str) {
        lock(&self.digests).remove(name);
    }

    /// The digests of the managed credentials whose files are still there.
    /// An idle host's Hello costs one `fstatat` per credential and no file
    /// read (see [`Store::current_cached`]).
    pub fn held(&self) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let managed = self.state().managed;
        let mut out = Vec::with_capacity(managed.len());
        for name in managed {
            if let Current::Regular { sha256, .. } = self.current_cached(&name)? {
                out.push((name, sha256));
            }
        }
        Ok(out)
    }

    /// The committed value of the managed credential `name`, for the
    /// credential socket. Read under the writers' lock, so never while a
    /// push is between its renames and its commit (or its rollback): a
    /// reader gets the value of the last committed push, never one that
    /// is then rolled back, nor one credential of a push without the
    /// others. `None`: not managed, or its file is gone. The buffer is
    /// sized once from the open file and zeroizing.
    pub fn read_committed(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        check_name(name)?;
        let _writers = lock(&self.write_lock);
        if !lock(&self.state).managed.contains(name) {
            return Ok(None);
        }
        let fd = match self.open_for_read(name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(StoreError::NotRegular {
                    name: name.to_string(),
                    dir: self.dir_display(),
                })
            }
            Err(e) => return Err(self.io("open", name, e)),
        };
        let st = fstat(&fd).map_err(|e| self.io("inspect", name, e))?;
        if !is_regular(&st) {
            return Err(StoreError::NotRegular {
                name: name.to_string(),
                dir: self.dir_display(),
            });
        }
        let len = usize::try_from(st.st_size).unwrap_or(usize::MAX);
        if len > vmcred_proto::rules::MAX_CREDENTIAL_BYTES {
            return Err(self.io("read (over the 1 MiB limit)", name, Errno::EFBIG));
        }
        let mut value = Zeroizing::new(vec![0u8; len]);
        let mut file = File::from(fd);
        file.read_exact(&mut value)
            .map_err(|e| self.io("read", name, errno_of(&e)))?;
        let mut probe = [0u8; 1];
        if file
            .read(&mut probe)
            .map_err(|e| self.io("read", name, errno_of(&e)))?
            != 0
        {
            // Only a writer outside the agent can change an open file.
            return Err(self.io("read (it grew while read)", name, Errno::EAGAIN));
        }
        Ok(Some(value))
    }

    /// Starts a series of changes: takes the process and file locks. The
    /// directory is remounted read-write lazily, on the first change. A
    /// lock another process holds is [`StoreError::Busy`] at once: the
    /// caller says so (the host retries) rather than waiting blind.
    ///
    /// Once locked, the lock file must still be the one at its path (one
    /// `fstatat`): if root unlinked or replaced it since the store opened
    /// it, another agent would open and lock the file now there, and both
    /// would write. Then the lock is dropped and the file now at the path
    /// is opened (created if gone) and locked instead.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch {
            remount: None,
            store: self,
            _lock: self.lock_for_writing()?,
        })
    }

    fn lock_for_writing(&self) -> Result<FileLock<'_>, StoreError> {
        let path = || self.lock_path.display().to_string();
        let mut guard = lock(&self.write_lock);
        let inspect = |e: Errno| StoreError::Lock {
            path: path(),
            why: format!("cannot inspect it: {e}"),
        };
        for reopened in 0..=LOCK_REOPENS {
            match guard.try_exclusive() {
                Ok(()) => match guard.is_at(&self.lock_path) {
                    Ok(true) => return Ok(FileLock(guard)),
                    Ok(false) => guard.unlock(),
                    Err(e) => {
                        guard.unlock();
                        return Err(inspect(e));
                    }
                },
                // Held by another: busy, unless the file held is no longer
                // the one at the path (whoever holds it holds nothing);
                // then the one there now is tried.
                Err(Errno::EWOULDBLOCK) => {
                    if guard.is_at(&self.lock_path).map_err(inspect)? {
                        return Err(StoreError::Busy { path: path() });
                    }
                }
                Err(e) => {
                    return Err(StoreError::Lock {
                        path: path(),
                        why: e.to_string(),
                    })
                }
            }
            if reopened == LOCK_REOPENS {
                break;
            }
            tracing::warn!(
                path = %self.lock_path.display(),
                "the lock file was removed or replaced while the agent ran; locking the one there now"
            );
            *guard = LockFile::open(&self.lock_path)?;
            #[cfg(test)]
            tests::AFTER_LOCK_REOPEN.with(|h| {
                if let Some(h) = h.borrow_mut().as_mut() {
                    h()
                }
            });
        }
        Err(StoreError::Lock {
            path: path(),
            why: format!(
                "it was removed or replaced again each of the {} times it was reopened and \
                 locked; something keeps swapping it. Nothing was changed; stop whatever \
                 replaces it",
                LOCK_REOPENS
            ),
        })
    }

    /// Waits for any write in progress and keeps others out, so the process
    /// can exit without leaving the directory remounted read-write.
    pub fn quiesce(&self) -> Quiesced<'_> {
        Quiesced(lock(&self.write_lock))
    }

    /// Bytes in regular files and inodes in use (the directory's own
    /// included, as tmpfs counts it).
    fn usage(&self) -> Result<(u64, u64), StoreError> {
        let dir_io = |op, errno| StoreError::DirIo {
            op,
            dir: self.dir_display(),
            errno,
        };
        let d = Dir::openat(
            self.dirfd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| dir_io("list", e))?;
        let (mut bytes, mut inodes) = (0u64, 1u64);
        // Owned: the listing is read once and closed, with no rewind
        // (`Dir::iter`'s `rewinddir`, an `lseek`) before the close.
        for entry in d {
            let entry = entry.map_err(|e| dir_io("list", e))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            inodes += 1;
            match fstatat(self.dirfd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_regular(&st) => bytes = bytes.saturating_add(st.st_size.max(0) as u64),
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(dir_io("inspect entries of", e)),
            }
        }
        Ok((bytes, inodes))
    }

    fn sync_dir(&self) {
        // Elsewhere than on tmpfs/ramfs (where it would be a no-op) it
        // makes the rename durable. The rename is already visible, so a
        // failure here is not a failed write.
        if !self.creds_durable {
            return;
        }
        self.count_sync();
        if let Err(e) = fsync(self.dirfd()) {
            tracing::warn!(dir = %self.dir_path.display(), error = %e, "fsync of the credentials directory failed");
        }
    }
}

/// Creates (0700) if needed, then checks at every start, that a directory
/// the agent keeps state in can
/// be changed by this user alone: whoever else could write it could plant
/// `state.json`, `pins.json` or a journal and so roll generations back or
/// widen the trusted host keys. Not followed if it is a symlink, which is
/// itself refused: its target could be swapped.
pub fn ensure_private_dir(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| format!("cannot create: {e}"))?;
    check_private_dir(path)
}

/// The check half of [`ensure_private_dir`], for a directory that exists.
pub fn check_private_dir(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot inspect: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.file_type().is_symlink() {
        return Err("is a symlink; give the real directory (owned by the agent, mode 0700)".into());
    }
    if !meta.is_dir() {
        return Err("is not a directory".into());
    }
    if meta.uid() != me {
        return Err(format!(
            "is owned by uid {}, not by the agent's uid {me}; chown it to {me} (mode 0700) or \
             remove it so the agent creates it",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "is mode {mode:04o}: writable by group or others, who could plant state files; \
             chmod 0700 it"
        ));
    }
    Ok(())
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every update is a whole-value replace).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

fn load_state(path: &Path) -> Result<State, StoreError> {
    let corrupt = |why: String| StoreError::CorruptState {
        path: path.display().to_string(),
        why,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let mut text = Vec::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| corrupt(e.to_string()))?;
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(corrupt(format!("larger than {MAX_STATE_BYTES} bytes")));
    }
    let state: State = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    for name in &state.managed {
        validate_name(name).map_err(|e| corrupt(e.to_string()))?;
    }
    Ok(state)
}

fn remove_file_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes the state atomically (tmp + rename, 0600).
fn save_state(
    path: &Path,
    state: &State,
    sync: Option<&std::sync::atomic::AtomicU64>,
) -> Result<(), StoreError> {
    save_json(path, state, sync)
}

/// Writes `value` as JSON atomically (tmp + rename, 0600), synced with
/// its directory when `sync` gives the counter of fsyncs (where they keep
/// anything, see [`keeps_data`]).
fn save_json<T: Serialize>(
    path: &Path,
    value: &T,
    sync: Option<&std::sync::atomic::AtomicU64>,
) -> Result<(), StoreError> {
    let durable = sync.is_some();
    if let Some(n) = sync {
        n.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    }
    let err = |why: String| StoreError::SaveState {
        path: path.display().to_string(),
        why,
    };
    let json = serde_json::to_vec_pretty(value).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    // A stale temporary file is removed only when it is in the way.
    let mut f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(format!("cannot remove stale {}: {e}", tmp.display()))),
            }
            create()
        }
        other => other,
    }
    .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    let written = f
        .write_all(&json)
        .and_then(|_| if durable { f.sync_all() } else { Ok(()) });
    drop(f);
    let renamed = written.and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    if let Some(parent) = path.parent().filter(|_| durable) {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Fixture {
        _tmp: tempfile::TempDir,
        creds: PathBuf,
        state: PathBuf,
    }

    fn fixture() -> Fixture {
        fixture_in(tempfile::tempdir().unwrap())
    }

    fn fixture_in(tmp: tempfile::TempDir) -> Fixture {
        let creds = tmp.path().join("creds");
        let state = tmp.path().join("state");
        std::fs::create_dir(&creds).unwrap();
        Fixture {
            creds,
            state,
            _tmp: tmp,
        }
    }

    fn open(f: &Fixture, limits: Limits) -> Store {
        Store::open(&f.creds, &f.state, limits).unwrap()
    }

    fn write(store: &Store, name: &str, value: &[u8]) -> Result<(), StoreError> {
        store.batch()?.write(name, value, 0o400)
    }

    #[test]
    fn atomic_write_with_mode_0400() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "API_KEY", b"one").unwrap();
        let p = f.creds.join("API_KEY");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o400);
        write(&store, "API_KEY", b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        store.batch().unwrap().write("SHARED", b"x", 0o440).unwrap();
        let m = std::fs::metadata(f.creds.join("SHARED")).unwrap().mode();
        assert_eq!(m & 0o7777, 0o440);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&f.creds)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains("vmcred-tmp")), "{names:?}");
        assert_eq!(
            store.current("API_KEY").unwrap(),
            Current::Regular {
                sha256: vmcred_proto::rules::digest(b"two"),
                mode: 0o400
            }
        );
        assert_eq!(store.current("NOPE").unwrap(), Current::Missing);
    }

    #[test]
    fn readers_never_see_a_torn_or_empty_value() {
        let f = fixture();
        let store = open(&f, Limits::default());
        let a = vec![b'a'; 64 * 1024];
        let b = vec![b'b'; 32 * 1024];
        write(&store, "ROT", &a).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let path = f.creds.join("ROT");
        let reader = {
            let stop = stop.clone();
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let got = std::fs::read(&path).expect("the file never disappears");
                    assert!(got == a || got == b, "torn read of {} bytes", got.len());
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..200 {
            write(&store, "ROT", if i % 2 == 0 { &b } else { &a }).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
    }

    #[test]
    fn symlink_at_name_is_replaced_not_written_through() {
        let f = fixture();
        let store = open(&f, Limits::default());
        let outside = f._tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, f.creds.join("API_KEY")).unwrap();
        assert_eq!(store.current("API_KEY").unwrap(), Current::NotRegular);
        write(&store, "API_KEY", b"new").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(f.creds.join("API_KEY")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(std::fs::read(f.creds.join("API_KEY")).unwrap(), b"new");
    }

    #[test]
    fn symlink_at_tmp_name_is_not_followed() {
        let f = fixture();
        let store = open(&f, Limits::default());
        let outside = f._tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, f.creds.join(".API_KEY.vmcred-tmp")).unwrap();
        write(&store, "API_KEY", b"new").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!f.creds.join(".API_KEY.vmcred-tmp").exists());
        assert!(std::fs::symlink_metadata(f.creds.join(".API_KEY.vmcred-tmp")).is_err());
    }

    #[test]
    fn symlinked_credentials_dir_is_refused() {
        let f = fixture();
        let link = f._tmp.path().join("link");
        std::os::unix::fs::symlink(&f.creds, &link).unwrap();
        let err = Store::open(&link, &f.state, Limits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
    }

    #[test]
    fn missing_credentials_dir_is_created_0700() {
        let f = fixture();
        let creds = f._tmp.path().join("new/creds");
        let store = Store::open(&creds, &f.state, Limits::default()).unwrap();
        let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let smode = std::fs::metadata(&f.state).unwrap().permissions().mode();
        assert_eq!(smode & 0o777, 0o700);
        write(&store, "A", b"1").unwrap();
    }

    #[test]
    fn stale_tmp_is_cleaned_and_long_names_work() {
        let f = fixture();
        let store = open(&f, Limits::default());
        std::fs::write(f.creds.join(".A.vmcred-tmp"), b"stale").unwrap();
        write(&store, "A", b"fresh").unwrap();
        assert!(!f.creds.join(".A.vmcred-tmp").exists());
        let long = "L".repeat(255);
        write(&store, &long, b"long").unwrap();
        assert_eq!(std::fs::read(f.creds.join(&long)).unwrap(), b"long");
        assert_eq!(std::fs::read_dir(&f.creds).unwrap().count(), 2);
    }

    #[test]
    fn failed_write_leaves_no_tmp_and_the_old_value() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "D", b"old").unwrap();
        // A directory at the name: the rename fails after the tmp was written.
        std::fs::create_dir(f.creds.join("DIR")).unwrap();
        let err = write(&store, "DIR", b"v").unwrap_err().to_string();
        assert!(err.contains("DIR"), "{err}");
        assert!(!f.creds.join(".DIR.vmcred-tmp").exists());
        assert_eq!(std::fs::read(f.creds.join("D")).unwrap(), b"old");
    }

    #[test]
    fn total_limit_is_clear_and_keeps_the_old_value() {
        let f = fixture();
        let store = open(
            &f,
            Limits {
                max_total_bytes: 1000,
                max_files: 100,
            },
        );
        write(&store, "A", &[1u8; 400]).unwrap();
        write(&store, "B", &[1u8; 300]).unwrap();
        // The set after the write (300 + 800) would not fit.
        let err = write(&store, "A", &[2u8; 800]).unwrap_err().to_string();
        assert!(
            err.contains("writing A (800 bytes) would bring")
                && err.contains("to 1100 bytes; its limit is 1000"),
            "{err}"
        );
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), vec![1u8; 400]);
        assert!(!f.creds.join(".A.vmcred-tmp").exists());
        // Old (400) and new (700) together exceed the budget, but the set
        // after the write fits: allowed (the file system is enlarged for
        // the push where it has a limit).
        write(&store, "A", &[3u8; 700]).unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), vec![3u8; 700]);
    }

    fn names(f: &Fixture) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(&f.creds)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn st(generation: u64, managed: &[&str]) -> State {
        State {
            generation,
            managed: managed.iter().map(|s| s.to_string()).collect(),
            owed: Vec::new(),
        }
    }

    #[test]
    fn a_push_is_all_or_nothing() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "A", b"a1").unwrap();
        write(&store, "B", b"b1").unwrap();
        store.batch().unwrap().commit(st(1, &["A", "B"])).unwrap();
        // The one push tried three times: A=a2, B removed, C new.
        let push_2 = |store: &Store| {
            store.batch().unwrap().push(
                &[
                    Change::Write {
                        name: "A",
                        value: b"a2",
                        mode: 0o400,
                    },
                    Change::Remove { name: "B" },
                    Change::Write {
                        name: "C",
                        value: b"c",
                        mode: 0o400,
                    },
                ],
                Some(2),
                st(2, &["A", "C"]),
            )
        };
        // C's name is taken by a directory: found at planning, nothing done.
        std::fs::create_dir(f.creds.join("C")).unwrap();
        let err = push_2(&store).unwrap_err();
        match &err {
            TxError::NothingApplied { name, .. } => assert_eq!(name.as_deref(), Some("C")),
            other => panic!("{other}"),
        }
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a1");
        assert_eq!(std::fs::read(f.creds.join("B")).unwrap(), b"b1");
        assert_eq!(store.state(), st(1, &["A", "B"]));
        assert_eq!(names(&f), ["A", "B", "C"]);
        std::fs::remove_dir(f.creds.join("C")).unwrap();

        // A failure at the commit (state.json cannot be written): every
        // rename is undone.
        let state_json = f.state.join("state.json");
        std::fs::remove_file(&state_json).unwrap();
        std::fs::create_dir(&state_json).unwrap();
        let err = push_2(&store).unwrap_err();
        assert!(
            matches!(err, TxError::NothingApplied { name: None, .. }),
            "{err}"
        );
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a1");
        assert_eq!(std::fs::read(f.creds.join("B")).unwrap(), b"b1");
        assert_eq!(names(&f), ["A", "B"]);
        assert_eq!(store.state().generation, 1);
        assert!(!f.state.join("push.json").exists());
        std::fs::remove_dir(&state_json).unwrap();

        push_2(&store).unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
        assert_eq!(std::fs::read(f.creds.join("C")).unwrap(), b"c");
        assert_eq!(names(&f), ["A", "C"]);
        assert_eq!(store.state(), st(2, &["A", "C"]));
    }

    /// What a kill -9 at each step of a push leaves, repaired by the next
    /// open: rolled back before the commit, finished after it.
    #[test]
    fn open_repairs_an_interrupted_push() {
        for committed in [false, true] {
            let f = fixture();
            let store = open(&f, Limits::default());
            write(&store, "A", b"a1").unwrap();
            write(&store, "B", b"b1").unwrap();
            store.batch().unwrap().commit(st(1, &["A", "B"])).unwrap();
            drop(store);
            // The push of generation 2 (A=a2, B removed, C new) stopped
            // after its renames.
            let backup_a = f.creds.join(backup_name("A"));
            std::fs::hard_link(f.creds.join("A"), &backup_a).unwrap();
            std::fs::write(f.creds.join(".A.tmp"), b"a2").unwrap();
            std::fs::rename(f.creds.join(".A.tmp"), f.creds.join("A")).unwrap();
            std::fs::rename(f.creds.join("B"), f.creds.join(backup_name("B"))).unwrap();
            std::fs::write(f.creds.join("C"), b"c").unwrap();
            std::fs::write(f.creds.join(".D.vmcred-tmp"), b"staged").unwrap();
            let j = Journal {
                generation: 2,
                entries: vec![
                    JournalEntry {
                        name: "A".into(),
                        remove: false,
                        had_old: true,
                    },
                    JournalEntry {
                        name: "B".into(),
                        remove: true,
                        had_old: true,
                    },
                    JournalEntry {
                        name: "C".into(),
                        remove: false,
                        had_old: false,
                    },
                ],
            };
            save_json(&f.state.join("push.json"), &j, None).unwrap();
            if committed {
                save_state(&f.state.join("state.json"), &st(2, &["A", "C"]), None).unwrap();
            }
            let store = open(&f, Limits::default());
            assert!(!f.state.join("push.json").exists());
            if committed {
                assert_eq!(names(&f), ["A", "C"]);
                assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
                assert_eq!(store.state(), st(2, &["A", "C"]));
            } else {
                assert_eq!(names(&f), ["A", "B"]);
                assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a1");
                assert_eq!(std::fs::read(f.creds.join("B")).unwrap(), b"b1");
                assert_eq!(store.state(), st(1, &["A", "B"]));
            }
        }
    }

    /// Checked at every start, not only when the agent creates it.
    #[test]
    fn a_state_dir_others_can_change_is_refused_at_every_start() {
        let f = fixture();
        drop(open(&f, Limits::default()));
        std::fs::set_permissions(&f.state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Store::open(&f.creds, &f.state, Limits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("0777") && err.contains("chmod 0700"), "{err}");
        std::fs::set_permissions(&f.state, std::fs::Permissions::from_mode(0o750)).unwrap();
        drop(open(&f, Limits::default()));

        // A symlink to a directory that is fine in itself.
        let real = f._tmp.path().join("real");
        std::fs::rename(&f.state, &real).unwrap();
        std::os::unix::fs::symlink(&real, &f.state).unwrap();
        let err = Store::open(&f.creds, &f.state, Limits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
        std::fs::remove_file(&f.state).unwrap();
        std::fs::rename(&real, &f.state).unwrap();

        // Owned by someone else (needs root to arrange).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&f.state, Some(65534), None).unwrap();
            let err = Store::open(&f.creds, &f.state, Limits::default())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn a_lock_held_elsewhere_is_busy_at_once() {
        let f = fixture();
        let store = open(&f, Limits::default());
        let other = std::fs::File::open(f.state.join("write.lock")).unwrap();
        let held = Flock::lock(other, FlockArg::LockExclusive).unwrap();
        let err = store.batch().err().unwrap();
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("another vmcred-guest"), "{err}");
        drop(held);
        write(&store, "A", b"a").unwrap();
        // The store keeps its lock file open; a finished batch leaves the
        // lock free for another process, and one in progress does not.
        let other = std::fs::File::open(f.state.join("write.lock")).unwrap();
        let other = Flock::lock(other, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("a finished batch released the lock");
        let other = other.unlock().map_err(|(_, e)| e).unwrap();
        let batch = store.batch().unwrap();
        let e = Flock::lock(other, FlockArg::LockExclusiveNonblock)
            .map(|_| ())
            .map_err(|(_, e)| e)
            .unwrap_err();
        assert_eq!(e, Errno::EWOULDBLOCK);
        drop(batch);
    }

    /// Root unlinks `write.lock` between two batches, and a second store
    /// (another agent, or a recovery run) opens the state directory
    /// after: it creates and locks a new file. The first store's next
    /// batch must lock that file too, not the unlinked one it still has
    /// open, so that only one of them writes at a time.
    #[test]
    fn an_unlinked_lock_file_is_not_a_lock_of_its_own() {
        let f = fixture();
        let first = open(&f, Limits::default());
        write(&first, "A", b"a").unwrap();
        std::fs::remove_file(f.state.join("write.lock")).unwrap();
        let second = open(&f, Limits::default());

        let held = second.batch().unwrap();
        let err = first
            .batch()
            .err()
            .expect("both stores hold a batch at once");
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        drop(held);

        let held = first.batch().unwrap();
        let err = second
            .batch()
            .err()
            .expect("both stores hold a batch at once");
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        drop(held);
        write(&second, "A", b"a2").unwrap();
        write(&first, "A", b"a3").unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a3");
    }

    /// The same when the file is replaced (renamed over) rather than
    /// removed, and when the process that holds the lock is not a store:
    /// the store locks the file now at the path, so one holding it is
    /// busy (ABORTED for the host).
    #[test]
    fn a_replaced_lock_file_is_not_a_lock_of_its_own() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "A", b"a").unwrap();
        let fresh = f.state.join("write.lock.new");
        std::fs::write(&fresh, b"").unwrap();
        std::fs::rename(&fresh, f.state.join("write.lock")).unwrap();
        let other = std::fs::File::open(f.state.join("write.lock")).unwrap();
        let held = Flock::lock(other, FlockArg::LockExclusive).unwrap();
        let err = store
            .batch()
            .err()
            .expect("the store locked the replaced file and wrote");
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a");
        drop(held);
        write(&store, "A", b"a2").unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
    }

    /// The other way round: a process still holds the `flock` on the old
    /// file after it was replaced, and the file now at the path is free.
    /// That holder holds nothing (a new agent would lock the new file), so
    /// the store locks the new file and writes instead of answering busy
    /// until the stale holder lets go.
    #[test]
    fn a_holder_of_a_replaced_lock_file_does_not_make_the_store_busy() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "A", b"a").unwrap();
        let old = std::fs::File::open(f.state.join("write.lock")).unwrap();
        let stale = Flock::lock(old, FlockArg::LockExclusive).unwrap();
        let fresh = f.state.join("write.lock.new");
        std::fs::write(&fresh, b"").unwrap();
        std::fs::rename(&fresh, f.state.join("write.lock")).unwrap();
        write(&store, "A", b"a2").unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
        // And it holds the file at the path now: another holder of that
        // one makes it busy.
        let now = std::fs::File::open(f.state.join("write.lock")).unwrap();
        let held = Flock::lock(now, FlockArg::LockExclusive).unwrap();
        let err = store.batch().err().expect("two holders of the same file");
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        drop((held, stale));
    }

    thread_local! {
        /// Runs right after a batch reopened the lock file: lets a test
        /// replace it again at exactly that point, every time.
        pub(super) static AFTER_LOCK_REOPEN: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// A lock file that is replaced again after every reopen is an error
    /// that names it, after a bounded number of tries, and nothing is
    /// written.
    #[test]
    fn a_lock_file_that_keeps_being_replaced_is_an_error() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "A", b"a").unwrap();
        let lock_path = f.state.join("write.lock");
        let replace = {
            let (lock_path, fresh) = (lock_path.clone(), f.state.join("fresh"));
            move || {
                std::fs::write(&fresh, b"").unwrap();
                std::fs::rename(&fresh, &lock_path).unwrap();
            }
        };
        replace();
        let reopens = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = reopens.clone();
        let replace_again = replace.clone();
        AFTER_LOCK_REOPEN.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                replace_again();
            }))
        });
        let err = store
            .batch()
            .err()
            .expect("locked a file no longer in place");
        AFTER_LOCK_REOPEN.with(|h| *h.borrow_mut() = None);
        assert!(matches!(err, StoreError::Lock { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&lock_path.display().to_string()), "{text}");
        assert!(text.contains("keeps swapping it"), "{text}");
        assert_eq!(reopens.load(Ordering::SeqCst), LOCK_REOPENS);
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a");
        // Once it stays put, the next batch locks it.
        write(&store, "A", b"a2").unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
    }

    /// A lock file replaced by a symlink is not followed: the batch is
    /// refused with an error that names the file, and the symlink's
    /// target is untouched.
    #[test]
    fn a_lock_file_replaced_by_a_symlink_is_refused() {
        let f = fixture();
        let store = open(&f, Limits::default());
        let target = f._tmp.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let lock_path = f.state.join("write.lock");
        std::fs::remove_file(&lock_path).unwrap();
        std::os::unix::fs::symlink(&target, &lock_path).unwrap();
        let err = store.batch().err().expect("locked through a symlink");
        assert!(matches!(err, StoreError::Lock { .. }), "{err}");
        assert!(
            err.to_string().contains(&lock_path.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        // Once the symlink is gone the store locks (and creates) the file.
        std::fs::remove_file(&lock_path).unwrap();
        write(&store, "A", b"a").unwrap();
        assert!(std::fs::symlink_metadata(&lock_path).unwrap().is_file());
    }

    #[test]
    fn default_limit_message_names_systemd() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "BIG", &vec![0u8; 1024 * 1024 - 10]).unwrap();
        let err = write(&store, "API_KEY", &[0u8; 2048])
            .unwrap_err()
            .to_string();
        assert!(err.contains("its limit is 1048576"), "{err}");
        assert!(err.contains("systemd's 1 MiB credentials mount"), "{err}");
        assert!(err.contains(&f.creds.display().to_string()), "{err}");
    }

    #[test]
    fn inode_limit_is_clear_and_keeps_the_old_value() {
        let f = fixture();
        // Room for the directory, A and B; a write needs one more for its
        // temporary file.
        let store = open(
            &f,
            Limits {
                max_total_bytes: 1 << 20,
                max_files: 3,
            },
        );
        write(&store, "A", b"a1").unwrap();
        write(&store, "B", b"b1").unwrap();
        let err = write(&store, "C", b"c").unwrap_err().to_string();
        assert!(err.contains("writing C would need inode 4"), "{err}");
        assert!(err.contains("its limit is 3"), "{err}");
        assert!(!f.creds.join("C").exists());
        // Full: even a replace needs the temporary inode, and keeps the old value.
        assert!(write(&store, "A", b"a2").is_err());
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a1");
        store.batch().unwrap().remove("B").unwrap();
        write(&store, "A", b"a2").unwrap();
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a2");
    }

    #[test]
    fn removal_only_of_regular_files() {
        let f = fixture();
        let store = open(&f, Limits::default());
        write(&store, "A", b"a").unwrap();
        store.batch().unwrap().remove("A").unwrap();
        assert!(!f.creds.join("A").exists());
        // Already gone is fine.
        store.batch().unwrap().remove("A").unwrap();
        std::fs::create_dir(f.creds.join("D")).unwrap();
        let err = store.batch().unwrap().remove("D").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let outside = f._tmp.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, f.creds.join("L")).unwrap();
        assert!(store.batch().unwrap().remove("L").is_err());
        assert!(outside.exists());
    }

    #[test]
    fn state_persists_across_reopen() {
        let f = fixture();
        let store = open(&f, Limits::default());
        assert_eq!(store.state(), State::default());
        let st = State {
            generation: 7,
            managed: ["A".to_string(), "B".to_string()].into(),
            owed: Vec::new(),
        };
        store.batch().unwrap().commit(st.clone()).unwrap();
        drop(store);
        let store = open(&f, Limits::default());
        assert_eq!(store.state(), st);
        let mode = std::fs::metadata(f.state.join("state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(f.state.join("state.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["generation"], 7);
        assert_eq!(v["managed"], serde_json::json!(["A", "B"]));
    }

    #[test]
    fn corrupt_state_refuses_to_open() {
        let f = fixture();
        std::fs::create_dir_all(&f.state).unwrap();
        for bad in [
            &b"{not json"[..],
            br#"{"generation": 3}"#,
            br#"{"generation": 3, "managed": ["a/b"]}"#,
            br#"{"generation": 3, "managed": [], "extra": 1}"#,
        ] {
            std::fs::write(f.state.join("state.json"), bad).unwrap();
            let err = Store::open(&f.creds, &f.state, Limits::default())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("rollback protection"), "{err}");
        }
    }

    #[test]
    fn names_are_checked_by_the_store_itself() {
        let f = fixture();
        let store = open(&f, Limits::default());
        for bad in ["../escape", "a/b", "", "..", ".X.vmcred-tmp"] {
            assert!(write(&store, bad, b"v").is_err(), "{bad:?}");
            assert!(store.batch().unwrap().remove(bad).is_err(), "{bad:?}");
            assert!(store.current(bad).is_err(), "{bad:?}");
        }
        assert!(!f._tmp.path().join("escape").exists());
        assert_eq!(std::fs::read_dir(&f.creds).unwrap().count(), 0);
    }

    /// tmpfs and ramfs keep nothing an fsync could protect: a push there
    /// does none; elsewhere the staged file, the directory and the state
    /// files are synced as before.
    #[test]
    fn fsyncs_only_where_they_keep_something() {
        let push = |f: &Fixture| {
            let store = open(f, Limits::default());
            let before = store.fsyncs();
            store
                .batch()
                .unwrap()
                .push(
                    &[Change::Write {
                        name: "A",
                        value: b"a",
                        mode: 0o400,
                    }],
                    Some(1),
                    st(1, &["A"]),
                )
                .unwrap();
            assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), b"a");
            assert_eq!(open(f, Limits::default()).state(), st(1, &["A"]));
            store.fsyncs() - before
        };
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && !keeps_data(fs_magic(File::open(shm).unwrap().as_fd())) {
            let tmp = tempfile::tempdir_in(shm).unwrap();
            let f = fixture_in(tmp);
            assert_eq!(push(&f), 0, "fsyncs on tmpfs");
        }
        let f = fixture();
        if keeps_data(fs_magic(File::open(&f.creds).unwrap().as_fd())) {
            // The staged file, the directory twice, the journal and the
            // state file with their directory.
            assert!(push(&f) >= 5, "no fsync on a disk file system");
        }
    }

    #[test]
    fn reserved_names() {
        assert!(reserved_name(".A.vmcred-tmp").is_some());
        assert!(reserved_name(".vmcred-tmp.abc").is_some());
        assert!(reserved_name("A.vmcred-tmp").is_none());
        assert!(reserved_name("API_KEY").is_none());
        assert!(tmp_name(&"x".repeat(255)).len() <= MAX_NAME_LEN);
        assert!(reserved_name(&tmp_name(&"x".repeat(255))).is_some());
        assert!(reserved_name(&tmp_name("A")).is_some());
    }

    #[test]
    fn fifo_and_device_are_never_opened() {
        let f = fixture();
        let store = open(&f, Limits::default());
        nix::unistd::mkfifo(&f.creds.join("FIFO"), Mode::from_bits_truncate(0o600)).unwrap();
        // Would block forever if opened for reading.
        assert_eq!(store.current("FIFO").unwrap(), Current::NotRegular);
        write(&store, "FIFO", b"v").unwrap();
        assert_eq!(std::fs::read(f.creds.join("FIFO")).unwrap(), b"v");
    }
}
