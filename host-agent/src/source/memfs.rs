//! Opening a source without the reader-thread round trip when the kernel
//! proves it cannot hang: the path resolves from the dentry cache alone and
//! the file lives on a memory file system (tmpfs, ramfs: where sops-nix,
//! agenix and systemd's credentials put secrets). Reads there never wait for
//! a device, a network or a FUSE daemon, so they run in the VM's task and a
//! rotate skips two thread wake-ups (ARCHITECTURE.md, "Local sockets").
//!
//! Every step is one that cannot block on the file system it inspects:
//! - `openat2(O_PATH, RESOLVE_CACHED)`: the lookup is done from the dentry
//!   cache or fails with `EAGAIN` (no `d_revalidate` that waits on NFS or
//!   FUSE); `O_PATH` calls no file system `open`;
//! - `statx(AT_STATX_DONT_SYNC)` on that descriptor: the kind of file and
//!   the mount's unique ID (Linux 6.8+, never reused while the system
//!   runs), from cached attributes;
//! - the mount's kind, looked up in what the reader threads learnt: a read
//!   there (which may block: it is under its deadline) records the unique
//!   mount ID of the file it opened with `fstatfs`'s magic ([`learn`]); no
//!   newer syscall (`statmount`) is needed, so no seccomp filter that
//!   predates one can kill the agent for calling it;
//! - only then, for a regular file on tmpfs or ramfs, a real open of the
//!   same inode through `/proc/self/fd` (not the path again: it may have
//!   been replaced by then).
//!
//! Anything else (an older kernel, a lookup not in the cache, a mount not
//! yet seen by a reader thread, another file system, any error such as
//! `openat2` refused by a seccomp filter: systemd's `RestrictSUIDSGID=`
//! refuses it) answers `None`, and the caller reads on a reader thread
//! under its deadline as before, which also produces the precise error for
//! missing files, FIFOs and directories.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// `ramfs`'s `statfs` magic (not in `libc` or `nix`).
const RAMFS_MAGIC: u64 = 0x8584_58f6;
/// Mounts remembered at most; past it the cache starts over.
const MAX_MOUNTS: usize = 4096;

/// Unique mount ID → whether it is a memory file system. Unique IDs are
/// never reused, so an entry never goes stale.
static MOUNTS: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

/// Opens `path` for reading if that cannot block (see the module comment);
/// `None`: read it on a reader thread instead.
pub fn open(path: &Path) -> Option<File> {
    // `RESOLVE_CACHED` is not among nix's named flags; the kernel's value.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::from_bits_retain(libc::RESOLVE_CACHED));
    let opath = nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how).ok()?;
    let mnt_id = regular_file_mount(opath.as_raw_fd())?;
    if !known_memory_fs(mnt_id)? {
        return None;
    }
    // The same inode, opened for reading: a path lookup now could find
    // another file put there since.
    let fd = nix::fcntl::open(
        format!("/proc/self/fd/{}", opath.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    Some(File::from(fd))
}

/// The unique ID of the mount a regular file is on, from cached
/// attributes; `None` for anything else or when the kernel cannot say.
fn regular_file_mount(fd: libc::c_int) -> Option<u64> {
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH, and a buffer of the right type.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE | libc::STATX_MNT_ID_UNIQUE,
            &mut stx,
        )
    };
    let regular = stx.stx_mask & libc::STATX_TYPE != 0
        && u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFREG;
    (r == 0 && regular && stx.stx_mask & libc::STATX_MNT_ID_UNIQUE != 0).then_some(stx.stx_mnt_id)
}

/// What a reader thread learnt of this mount: whether it is tmpfs or
/// ramfs; `None` when no reader has seen it yet.
fn known_memory_fs(mnt_id: u64) -> Option<bool> {
    MOUNTS.lock().ok()?.as_ref()?.get(&mnt_id).copied()
}

/// Records the kind of the mount `file` (a regular file a reader thread
/// just opened) is on, for [`open`]. Runs on a reader thread: `fstatfs`
/// may ask the file system (a FUSE daemon), under the read's deadline.
/// Costs one `statx` when the mount is known already.
pub fn learn(file: &File) {
    let Some(mnt_id) = regular_file_mount(file.as_raw_fd()) else {
        return;
    };
    if known_memory_fs(mnt_id).is_some() {
        return;
    }
    let Ok(fs) = nix::sys::statfs::fstatfs(file) else {
        return;
    };
    let memory = is_memory_fs(fs.filesystem_type());
    if let Ok(mut m) = MOUNTS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() >= MAX_MOUNTS {
            m.clear();
        }
        m.insert(mnt_id, memory);
    }
}

/// tmpfs or ramfs: memory, no device, no daemon.
fn is_memory_fs(kind: nix::sys::statfs::FsType) -> bool {
    kind == nix::sys::statfs::TMPFS_MAGIC || kind.0 as u64 == RAMFS_MAGIC
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether this kernel has what the fast path needs, judged on a file
    /// in /dev/shm (tmpfs wherever systemd or a container runtime set it up).
    /// Whether this machine can run the inline-read tests; under
    /// `CI=true` it must (a skipped test there is a failure).
    pub(crate) fn available_or_skip() -> bool {
        if available() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the inline-read tests need unique mount IDs (Linux 6.8) and a tmpfs /dev/shm"
        );
        eprintln!("skipped: no unique mount IDs (Linux 6.8) here, or /dev/shm is not tmpfs");
        false
    }

    pub(crate) fn available() -> bool {
        let Ok(d) = tempfile::tempdir_in("/dev/shm") else {
            return false;
        };
        let p = d.path().join("probe");
        std::fs::write(&p, b"x").is_ok() && {
            // What a reader thread's read of the file teaches.
            if let Ok(f) = File::open(&p) {
                learn(&f);
            }
            open(&p).is_some()
        }
    }

    #[test]
    fn only_regular_files_on_memory_file_systems_are_opened_inline() {
        if !available_or_skip() {
            return;
        }
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let f = shm.path().join("f");
        std::fs::write(&f, b"v").unwrap();
        learn(&File::open(&f).unwrap());
        let mut opened = open(&f).expect("a cached tmpfs file opens inline");
        let mut s = String::new();
        std::io::Read::read_to_string(&mut opened, &mut s).unwrap();
        assert_eq!(s, "v");
        // A directory, a FIFO and a missing file go to the reader thread,
        // which names what is wrong.
        assert!(open(shm.path()).is_none());
        let fifo = shm.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(open(&fifo).is_none());
        assert!(open(&shm.path().join("missing")).is_none());
        // A symlink elsewhere to a tmpfs file: the file counts.
        let other = tempfile::tempdir().unwrap();
        let link = other.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let _ = std::fs::metadata(&link);
        assert!(open(&link).is_some());
        // A file on a disk file system is read on a reader thread.
        let on_disk = nix::sys::statfs::statfs(other.path())
            .map(|s| !is_memory_fs(s.filesystem_type()))
            .unwrap_or(false);
        if on_disk {
            let g = other.path().join("g");
            std::fs::write(&g, b"v").unwrap();
            // Unknown mount: not inline; once learnt as a disk one: still not.
            assert!(open(&g).is_none());
            learn(&File::open(&g).unwrap());
            assert!(open(&g).is_none());
        }
    }
}
