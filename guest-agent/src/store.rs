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

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, Flock, FlockArg, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fchmod, fstat, fstatat, FileStat, Mode, SFlag};
use nix::sys::statvfs::{fstatvfs, FsFlags};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use vmcred_proto::rules::{validate_name, MAX_FILES, MAX_NAME_LEN, MAX_TOTAL_BYTES};
use zeroize::Zeroizing;

/// Suffix of the temporary file a write goes through. Names that look like
/// one are refused as credentials (see [`reserved_name`]), so a stale-tmp
/// cleanup can never delete a credential.
const TMP_SUFFIX: &str = ".vmcred-tmp";
/// Prefix of the temporary name used when `.NAME.vmcred-tmp` would exceed
/// the file name limit.
const TMP_HASHED_PREFIX: &str = ".vmcred-tmp.";
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

/// Takes ownership of a descriptor a `nix` call just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful open(2)/openat(2) call a
    // moment ago and nothing else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// The credentials directory, its limits and the agent's state.
pub struct Store {
    dir: OwnedFd,
    dir_path: PathBuf,
    state_path: PathBuf,
    lock_path: PathBuf,
    limits: Limits,
    /// Serializes writers inside this process; the `flock` on `lock_path`
    /// serializes them across processes.
    write_lock: Mutex<()>,
    state: Mutex<State>,
}

impl Store {
    /// Opens the credentials directory (creating it, 0700, if systemd has
    /// not) and loads the state. A corrupt state file is an error: silently
    /// starting from generation 0 would let an old generation be replayed.
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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| state_err(format!("cannot create: {e}")))?;
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
        let dir = owned(fd);
        let state_path = state_dir.join("state.json");
        let state = load_state(&state_path)?;
        Ok(Store {
            dir,
            dir_path: credentials_dir.to_path_buf(),
            lock_path: state_dir.join("write.lock"),
            state_path,
            limits,
            write_lock: Mutex::new(()),
            state: Mutex::new(state),
        })
    }

    pub fn dir_path(&self) -> &Path {
        &self.dir_path
    }

    /// A snapshot of the applied generation and managed names.
    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    fn dirfd(&self) -> RawFd {
        self.dir.as_raw_fd()
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

    /// What is at `name` now, hashed without holding the value in one
    /// buffer. Only regular files are opened: opening a FIFO or a device
    /// could block or have side effects.
    pub fn current(&self, name: &str) -> Result<Current, StoreError> {
        check_name(name)?;
        let st = match fstatat(Some(self.dirfd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(Current::Missing),
            Err(e) => return Err(self.io("inspect", name, e)),
        };
        if !is_regular(&st) {
            return Ok(Current::NotRegular);
        }
        let fd = match openat(
            Some(self.dirfd()),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => owned(fd),
            Err(Errno::ENOENT) => return Ok(Current::Missing),
            Err(Errno::ELOOP) => return Ok(Current::NotRegular),
            Err(e) => return Err(self.io("open", name, e)),
        };
        let st2 = fstat(fd.as_raw_fd()).map_err(|e| self.io("inspect", name, e))?;
        if !is_regular(&st2) {
            // Swapped between the two looks; judge what we actually opened.
            return Ok(Current::NotRegular);
        }
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

    /// The digests of the managed credentials whose files are still there.
    pub fn held(&self) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let managed = self.state().managed;
        let mut out = Vec::with_capacity(managed.len());
        for name in managed {
            if let Current::Regular { sha256, .. } = self.current(&name)? {
                out.push((name, sha256));
            }
        }
        Ok(out)
    }

    /// Starts a series of changes: takes the process and file locks. The
    /// directory is remounted read-write lazily, on the first change.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        let guard = lock(&self.write_lock);
        let lock_err = |why: String| StoreError::Lock {
            path: self.lock_path.display().to_string(),
            why,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.lock_path)
            .map_err(|e| lock_err(e.to_string()))?;
        let flock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| lock_err(e.to_string()))?;
        Ok(Batch {
            remount: None,
            store: self,
            _flock: flock,
            _guard: guard,
        })
    }

    /// Waits for any write in progress and keeps others out, so the process
    /// can exit without leaving the directory remounted read-write.
    pub fn quiesce(&self) -> MutexGuard<'_, ()> {
        lock(&self.write_lock)
    }

    /// Bytes in regular files and inodes in use (the directory's own
    /// included, as tmpfs counts it).
    fn usage(&self) -> Result<(u64, u64), StoreError> {
        let dir_io = |op, errno| StoreError::DirIo {
            op,
            dir: self.dir_display(),
            errno,
        };
        let mut d = Dir::openat(
            Some(self.dirfd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| dir_io("list", e))?;
        let (mut bytes, mut inodes) = (0u64, 1u64);
        for entry in d.iter() {
            let entry = entry.map_err(|e| dir_io("list", e))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            inodes += 1;
            match fstatat(Some(self.dirfd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_regular(&st) => bytes = bytes.saturating_add(st.st_size.max(0) as u64),
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(dir_io("inspect entries of", e)),
            }
        }
        Ok((bytes, inodes))
    }

    fn check_limits(&self, name: &str, len: usize) -> Result<(), StoreError> {
        let (bytes, inodes) = self.usage()?;
        let total = bytes.saturating_add(len as u64);
        if total > self.limits.max_total_bytes {
            return Err(StoreError::TotalLimit {
                name: name.to_string(),
                len,
                dir: self.dir_display(),
                total,
                limit: self.limits.max_total_bytes,
                why: if self.limits.max_total_bytes == MAX_TOTAL_BYTES as u64 {
                    " (systemd's 1 MiB credentials mount; old and new value must fit together during the replace)"
                } else {
                    " (old and new value must fit together during the replace)"
                },
            });
        }
        let needed = inodes + 1;
        if needed > self.limits.max_files {
            return Err(StoreError::FileLimit {
                name: name.to_string(),
                dir: self.dir_display(),
                needed,
                limit: self.limits.max_files,
                why: if self.limits.max_files == MAX_FILES as u64 {
                    " (systemd's credentials mount has nr_inodes=1024)"
                } else {
                    ""
                },
            });
        }
        Ok(())
    }

    fn sync_dir(&self) {
        // On tmpfs/ramfs this is a no-op; elsewhere it makes the rename
        // durable. The rename is already visible, so a failure here is not
        // a failed write.
        if let Err(e) = fsync(self.dirfd()) {
            tracing::warn!(dir = %self.dir_path.display(), error = %e, "fsync of the credentials directory failed");
        }
    }
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

/// Writes the state atomically (tmp + rename, 0600).
fn save_state(path: &Path, state: &State) -> Result<(), StoreError> {
    let err = |why: String| StoreError::SaveState {
        path: path.display().to_string(),
        why,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("cannot remove stale {}: {e}", tmp.display()))),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    let written = f.write_all(&json).and_then(|_| f.sync_all());
    drop(f);
    let renamed = written.and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    if let Some(parent) = path.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Changes made under the store's locks. Dropping it remounts the
/// directory read-only again if it was remounted for these changes.
pub struct Batch<'a> {
    // Field order is drop order: remount read-only before unlocking.
    remount: Option<ReadWrite>,
    store: &'a Store,
    _flock: Flock<File>,
    _guard: MutexGuard<'a, ()>,
}

impl Batch<'_> {
    fn ensure_writable(&mut self) -> Result<(), StoreError> {
        if self.remount.is_none() {
            self.remount = ReadWrite::acquire(self.store)?;
        }
        Ok(())
    }

    /// Replaces `name` with `value` (mode `mode`) atomically.
    pub fn write(&mut self, name: &str, value: &[u8], mode: u32) -> Result<(), StoreError> {
        check_name(name)?;
        if mode & !0o444 != 0 || mode & 0o400 == 0 {
            // The config refuses these; the store does not trust callers.
            return Err(StoreError::BadName(format!(
                "mode {mode:04o} for {name} is not a read-only mode the owner can read"
            )));
        }
        let store = self.store;
        self.ensure_writable()?;
        let dirfd = store.dirfd();
        let tmp = tmp_name(name);
        match unlinkat(Some(dirfd), tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(store.io("remove the stale temporary file for", name, e)),
        }
        store.check_limits(name, value.len())?;
        let fd = openat(
            Some(dirfd),
            tmp.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| store.io("create the temporary file for", name, e))?;
        let fd = owned(fd);
        let result = (|| {
            // The umask may have narrowed the mode; set exactly what was asked.
            fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
                .map_err(|e| store.io("set the mode of", name, e))?;
            let mut file = File::from(fd);
            file.write_all(value)
                .map_err(|e| store.io("write", name, errno_of(&e)))?;
            file.sync_all()
                .map_err(|e| store.io("sync", name, errno_of(&e)))?;
            drop(file);
            renameat(Some(dirfd), tmp.as_str(), Some(dirfd), name)
                .map_err(|e| store.io("move into place", name, e))
        })();
        if result.is_err() {
            let _ = unlinkat(Some(dirfd), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return result;
        }
        store.sync_dir();
        Ok(())
    }

    /// Removes `name` if it is a regular file; a missing file is already
    /// removed. The caller decides whether the name is vmcred's to remove.
    pub fn remove(&mut self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        let store = self.store;
        match fstatat(Some(store.dirfd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_regular(&st) => {}
            Ok(_) => {
                return Err(StoreError::NotRegular {
                    name: name.to_string(),
                    dir: store.dir_display(),
                })
            }
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(store.io("inspect", name, e)),
        }
        self.ensure_writable()?;
        match unlinkat(Some(store.dirfd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(store.io("remove", name, e)),
        }
        store.sync_dir();
        Ok(())
    }

    /// Persists `state`, then makes it current. If it cannot be saved, the
    /// managed set still changes in memory (what is on disk changed), but
    /// the generation does not advance: a generation counts as applied
    /// only once it survives a restart.
    pub fn commit(&mut self, state: State) -> Result<(), StoreError> {
        let store = self.store;
        let saved = save_state(&store.state_path, &state);
        let mut current = lock(&store.state);
        match saved {
            Ok(()) => {
                *current = state;
                Ok(())
            }
            Err(e) => {
                current.managed = state.managed;
                Err(e)
            }
        }
    }
}

/// A read-only credentials mount made writable for one batch. Drop makes it
/// read-only again with the flags it had.
struct ReadWrite {
    target: PathBuf,
    dir: String,
    flags: MsFlags,
    /// Per-mount flag cleared with `MS_BIND|MS_REMOUNT` (how systemd made
    /// the mount read-only).
    bind: bool,
    /// Superblock flag cleared with a plain `MS_REMOUNT` (a file system
    /// mounted `ro`).
    superblock: bool,
}

impl ReadWrite {
    /// `None` when the directory is writable already.
    fn acquire(store: &Store) -> Result<Option<ReadWrite>, StoreError> {
        let dir = store.dir_display();
        let rdonly = || -> Result<bool, StoreError> {
            fstatvfs(store.dir.as_fd())
                .map(|s| s.flags().contains(FsFlags::ST_RDONLY))
                .map_err(|e| StoreError::Remount {
                    dir: dir.clone(),
                    why: format!("statvfs: {e}"),
                })
        };
        let st = fstatvfs(store.dir.as_fd()).map_err(|e| StoreError::Remount {
            dir: dir.clone(),
            why: format!("statvfs: {e}"),
        })?;
        if !st.flags().contains(FsFlags::ST_RDONLY) {
            return Ok(None);
        }
        // Remount exactly the directory we opened, even if its path was
        // swapped for something else since.
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", store.dirfd()));
        let target = if proc_path.exists() {
            proc_path
        } else {
            store.dir_path.clone()
        };
        let mut rw = ReadWrite {
            target,
            dir: dir.clone(),
            flags: mount_flags(st.flags()),
            bind: false,
            superblock: false,
        };
        match rw.remount(true, false) {
            Ok(()) => rw.bind = true,
            // Not a mount point of its own (or an old kernel): try the
            // superblock below.
            Err(Errno::EINVAL) => {}
            Err(e) => {
                return Err(StoreError::Remount {
                    dir,
                    why: e.to_string(),
                })
            }
        }
        if rdonly()? {
            if let Err(e) = rw.remount(false, false) {
                // `rw` drops here and undoes the bind remount, if any.
                return Err(StoreError::Remount {
                    dir,
                    why: e.to_string(),
                });
            }
            rw.superblock = true;
        }
        if rdonly()? {
            return Err(StoreError::Remount {
                dir,
                why: "still read-only after remounting".into(),
            });
        }
        tracing::debug!(dir = %rw.dir, bind = rw.bind, superblock = rw.superblock, "remounted read-write");
        Ok(Some(rw))
    }

    fn remount(&self, bind: bool, rdonly: bool) -> Result<(), Errno> {
        let mut flags = MsFlags::MS_REMOUNT | self.flags;
        if bind {
            flags |= MsFlags::MS_BIND;
        }
        if rdonly {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            None::<&str>,
            &self.target,
            None::<&str>,
            flags,
            None::<&str>,
        )
    }
}

impl Drop for ReadWrite {
    fn drop(&mut self) {
        if self.superblock {
            if let Err(e) = self.remount(false, true) {
                tracing::error!(dir = %self.dir, error = %e, "cannot remount the credentials file system read-only again");
            }
        }
        if self.bind {
            if let Err(e) = self.remount(true, true) {
                tracing::error!(dir = %self.dir, error = %e, "cannot remount the credentials directory read-only again");
            }
        }
        tracing::debug!(dir = %self.dir, "remounted read-only");
    }
}

/// The mount flags to keep when remounting, from what statvfs reports.
fn mount_flags(st: FsFlags) -> MsFlags {
    let map = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_SYNCHRONOUS, MsFlags::MS_SYNCHRONOUS),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    map.iter()
        .filter(|(s, _)| st.contains(*s))
        .fold(MsFlags::empty(), |acc, (_, m)| acc | *m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Fixture {
        _tmp: tempfile::TempDir,
        creds: PathBuf,
        state: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
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
        // Old (400) + new (700) would not fit together during the rename.
        let err = write(&store, "A", &[2u8; 700]).unwrap_err().to_string();
        assert!(
            err.contains("writing A (700 bytes) would bring")
                && err.contains("to 1100 bytes; its limit is 1000"),
            "{err}"
        );
        assert_eq!(std::fs::read(f.creds.join("A")).unwrap(), vec![1u8; 400]);
        assert!(!f.creds.join(".A.vmcred-tmp").exists());
        write(&store, "A", &[3u8; 600]).unwrap();
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
