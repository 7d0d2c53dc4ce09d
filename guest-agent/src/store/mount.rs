//! The read-only credentials mount: how it was found, the remount guard,
//! and enlarging a size-limited tmpfs for one push.

use super::*;

/// What the store expects of the credentials mount, recorded at the first
/// start (before the agent ever remounts it), so that a later start can
/// repair what a crash left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MountRecord {
    pub(super) read_only: bool,
    /// A tmpfs's `size=` in bytes, to restore after a temporary enlarging.
    pub(super) size_bytes: Option<u64>,
}

impl Store {
    pub(super) fn is_read_only(&self) -> Result<bool, StoreError> {
        fstatvfs(self.dir.as_fd())
            .map(|s| s.flags().contains(FsFlags::ST_RDONLY))
            .map_err(|e| StoreError::Remount {
                dir: self.dir_display(),
                why: format!("statvfs: {e}"),
            })
    }

    /// The size limit of a tmpfs, `None` for anything else or no limit.
    /// (What file system the open directory is on cannot change; a
    /// tmpfs's size can.)
    pub(super) fn tmpfs_size(&self) -> Option<u64> {
        if !self.creds_tmpfs {
            return None;
        }
        tmpfs_size(&self.dir)
    }
}

/// A tmpfs's size limit in bytes; `None` for other file systems (ramfs
/// has no limit) and for a tmpfs without one.
fn tmpfs_size(dir: &OwnedFd) -> Option<u64> {
    let fs = nix::sys::statfs::fstatfs(dir).ok()?;
    if fs.filesystem_type().0 as i64 != TMPFS_MAGIC {
        return None;
    }
    let vfs = fstatvfs(dir.as_fd()).ok()?;
    let blocks = vfs.blocks() as u64;
    (blocks > 0).then(|| blocks.saturating_mul(vfs.fragment_size() as u64))
}

/// Whether `dir` is a mount point the way systemd mounts the system
/// credentials: ramfs, or tmpfs with `nr_inodes=1024` (its own option).
fn looks_like_systemd_credentials_mount(dir: &Path) -> bool {
    let (Ok(info), Ok(canon)) = (
        std::fs::read_to_string("/proc/self/mountinfo"),
        std::fs::canonicalize(dir),
    ) else {
        return false;
    };
    let target = canon.to_string_lossy();
    // The last mount on a path is the one in effect.
    let Some(post) = info.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount_point = pre.split(' ').nth(4)?;
        (unescape_mountinfo(mount_point) == target).then_some(post)
    }) else {
        return false;
    };
    let mut fields = post.split(' ');
    let fstype = fields.next().unwrap_or("");
    let options = fields.nth(1).unwrap_or("");
    match fstype {
        "ramfs" => true,
        "tmpfs" => options.split(',').any(|o| o == "nr_inodes=1024"),
        _ => false,
    }
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Reads the mount record, writing it first if there is none: what the
/// mount looks like now, before this agent ever remounted it. A mount found
/// read-only is always expected read-only from then on.
pub(super) fn mount_record(
    dir: &OwnedFd,
    dir_path: &Path,
    path: &Path,
    sync: Option<&std::sync::atomic::AtomicU64>,
) -> Result<MountRecord, String> {
    let now_ro = fstatvfs(dir.as_fd())
        .map_err(|e| format!("statvfs: {e}"))?
        .flags()
        .contains(FsFlags::ST_RDONLY);
    let recorded: Option<MountRecord> = match std::fs::read(path) {
        Ok(t) => Some(serde_json::from_slice(&t).map_err(|e| format!("{}: {e}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    match recorded {
        Some(r) if r.read_only || !now_ro => Ok(r),
        _ => {
            // No record, yet writable: systemd never leaves its mount so,
            // so this is what a crash of an agent that kept no record left.
            let systemd = !now_ro && looks_like_systemd_credentials_mount(dir_path);
            if systemd {
                tracing::warn!(dir = %dir_path.display(), "systemd's credentials mount is writable; making it read-only again");
            }
            let read_only = now_ro || systemd;
            let r = MountRecord {
                read_only,
                size_bytes: if read_only { tmpfs_size(dir) } else { None },
            };
            save_json(path, &r, sync).map_err(|e| e.to_string())?;
            Ok(r)
        }
    }
}

/// A read-only credentials mount made writable for one batch (or a mount
/// found writable that is expected read-only). Drop shrinks an enlarged
/// tmpfs back and makes the mount read-only again with the flags it had.
pub(super) struct ReadWrite {
    target: PathBuf,
    dir: String,
    flags: MsFlags,
    /// Per-mount flag cleared with `MS_BIND|MS_REMOUNT` (how systemd made
    /// the mount read-only).
    bind: bool,
    /// Superblock flag cleared with a plain `MS_REMOUNT` (a file system
    /// mounted `ro`).
    superblock: bool,
    /// The tmpfs size to restore, once enlarged for a push.
    restore_size: Option<u64>,
}

impl ReadWrite {
    /// `None` when the directory is writable and that is how it was found
    /// at the first start.
    pub(super) fn acquire(store: &Store) -> Result<Option<ReadWrite>, StoreError> {
        let dir = store.dir_display();
        let rdonly = || store.is_read_only();
        let st = fstatvfs(store.dir.as_fd()).map_err(|e| StoreError::Remount {
            dir: dir.clone(),
            why: format!("statvfs: {e}"),
        })?;
        let now_ro = st.flags().contains(FsFlags::ST_RDONLY);
        if !now_ro && !store.mount.read_only {
            return Ok(None);
        }
        let target = store.remount_target.clone();
        let mut rw = ReadWrite {
            target,
            dir: dir.clone(),
            flags: mount_flags(st.flags()),
            bind: false,
            superblock: false,
            restore_size: store.mount.size_bytes,
        };
        if !now_ro {
            // Writable though it must not be (a crash, or someone else):
            // this guard makes it read-only when dropped, per mount as
            // systemd does, or the whole file system if it is no mount
            // point of its own.
            tracing::warn!(dir = %rw.dir, "the credentials mount is writable; it is made read-only again after this write");
            rw.bind = true;
            return Ok(Some(rw));
        }
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
        let mut read_only = rdonly()?;
        if read_only {
            if let Err(e) = rw.remount(false, false) {
                // `rw` drops here and undoes the bind remount, if any.
                return Err(StoreError::Remount {
                    dir,
                    why: e.to_string(),
                });
            }
            rw.superblock = true;
            read_only = rdonly()?;
        }
        if read_only {
            return Err(StoreError::Remount {
                dir,
                why: "still read-only after remounting".into(),
            });
        }
        tracing::debug!(dir = %rw.dir, bind = rw.bind, superblock = rw.superblock, "remounted read-write");
        Ok(Some(rw))
    }

    /// Makes room for `bytes` more on a size-limited tmpfs (systemd's
    /// 1 MiB), so that a value larger than half of it can replace its old
    /// value: both exist until the push is committed. Shrunk back on drop.
    pub(super) fn ensure_room(&mut self, store: &Store, bytes: u64) -> Result<(), Errno> {
        let Some(size) = store.tmpfs_size() else {
            return Ok(());
        };
        let vfs = fstatvfs(store.dir.as_fd())?;
        let free = (vfs.blocks_available() as u64).saturating_mul(vfs.fragment_size() as u64);
        if free >= bytes {
            return Ok(());
        }
        let grown = size + (bytes - free) + 64 * 1024;
        self.resize(grown)?;
        if self.restore_size.is_none() {
            self.restore_size = Some(size);
        }
        tracing::debug!(dir = %self.dir, from = size, to = grown, "enlarged the credentials tmpfs for the push");
        Ok(())
    }

    fn resize(&self, bytes: u64) -> Result<(), Errno> {
        mount(
            None::<&str>,
            &self.target,
            None::<&str>,
            MsFlags::MS_REMOUNT | self.flags,
            Some(format!("size={bytes}").as_str()),
        )
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
        if let Some(size) = self.restore_size {
            let fd = nix::fcntl::open(
                &self.target,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            let current = fd.ok().and_then(|fd| tmpfs_size(&fd));
            if current.is_some_and(|c| c != size) {
                if let Err(e) = self.resize(size) {
                    tracing::warn!(dir = %self.dir, size, error = %e, "cannot shrink the credentials tmpfs back to its size (it holds more than that now)");
                }
            }
        }
        if self.superblock {
            if let Err(e) = self.remount(false, true) {
                tracing::error!(dir = %self.dir, error = %e, "cannot remount the credentials file system read-only again");
            }
        }
        if self.bind {
            match self.remount(true, true) {
                Ok(()) => {}
                // Not a mount point of its own: the file system, then.
                Err(Errno::EINVAL) if !self.superblock => {
                    if let Err(e) = self.remount(false, true) {
                        tracing::error!(dir = %self.dir, error = %e, "cannot remount the credentials file system read-only again");
                    }
                }
                Err(e) => {
                    tracing::error!(dir = %self.dir, error = %e, "cannot remount the credentials directory read-only again")
                }
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
