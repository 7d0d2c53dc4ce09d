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
//!   the mount's unique ID (Linux 6.8+, never reused), from cached
//!   attributes;
//! - `statmount(STATMOUNT_SB_BASIC)` for a mount ID not seen before: the
//!   superblock's magic, read from the mount table, not the file system;
//! - only then, for a regular file on tmpfs or ramfs, a real open of the
//!   same inode through `/proc/self/fd` (not the path again: it may have
//!   been replaced by then).
//!
//! Anything else (an older kernel, a lookup not in the cache, another file
//! system, any error) answers `None`, and the caller reads on a reader
//! thread under its deadline as before, which also produces the precise
//! error for missing files, FIFOs and directories.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

/// `statmount(2)` (Linux 6.8); the same number on every architecture
/// using the common syscall table. Elsewhere the fast path is off.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const SYS_STATMOUNT: libc::c_long = 457;
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
const SYS_STATMOUNT: libc::c_long = -1;
/// `statx`'s unique mount ID (Linux 6.8): never reused while the system runs.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const STATMOUNT_SB_BASIC: u64 = 0x1;
const RESOLVE_CACHED: u64 = 0x20;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;
/// Mounts remembered at most; past it the cache starts over.
const MAX_MOUNTS: usize = 4096;

/// `struct open_how` of `openat2(2)`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `struct mnt_id_req` (version 0, 24 bytes).
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// The head of `struct statmount` this code reads, in a buffer as large as
/// the whole fixed part (the kernel fills at most what it is given).
#[repr(C)]
struct StatmountBuf {
    size: u32,
    mnt_opts: u32,
    mask: u64,
    sb_dev_major: u32,
    sb_dev_minor: u32,
    sb_magic: u64,
    rest: [u64; 64],
}

/// Unique mount ID → whether it is a memory file system. Unique IDs are
/// never reused, so an entry never goes stale.
static MOUNTS: Mutex<Option<HashMap<u64, bool>>> = Mutex::new(None);

/// Opens `path` for reading if that cannot block (see the module comment);
/// `None`: read it on a reader thread instead.
pub fn open(path: &Path) -> Option<File> {
    if SYS_STATMOUNT < 0 {
        return None;
    }
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_CACHED,
    };
    // SAFETY: `cpath` is a valid NUL-terminated string and `how` a valid
    // `open_how` of the size passed; the returned descriptor is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            cpath.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned by openat2 and owned by no one else.
    let opath = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH, and a buffer of the right type.
    let r = unsafe {
        libc::statx(
            opath.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE | STATX_MNT_ID_UNIQUE,
            &mut stx,
        )
    };
    if r != 0
        || stx.stx_mask & STATX_MNT_ID_UNIQUE == 0
        || stx.stx_mask & libc::STATX_TYPE == 0
        || u32::from(stx.stx_mode) & libc::S_IFMT != libc::S_IFREG
    {
        return None;
    }
    if !is_memory_fs(stx.stx_mnt_id)? {
        return None;
    }
    // The same inode, opened for reading: a path lookup now could find
    // another file put there since.
    let proc = CString::new(format!("/proc/self/fd/{}", opath.as_raw_fd())).ok()?;
    // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
    let fd = unsafe {
        libc::open(
            proc.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned by open and owned by no one else.
    Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether the mount with this unique ID is tmpfs or ramfs; `None` when the
/// kernel cannot say.
fn is_memory_fs(mnt_id: u64) -> Option<bool> {
    if let Some(known) = MOUNTS
        .lock()
        .ok()?
        .as_ref()
        .and_then(|m| m.get(&mnt_id).copied())
    {
        return Some(known);
    }
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id,
        param: STATMOUNT_SB_BASIC,
    };
    // SAFETY: plain data; all zeroes is a valid value.
    let mut buf: StatmountBuf = unsafe { std::mem::zeroed() };
    // SAFETY: `req` is a valid mnt_id_req of the size it states, `buf` a
    // writable buffer of the size passed.
    let r = unsafe {
        libc::syscall(
            SYS_STATMOUNT,
            &req as *const MntIdReq,
            &mut buf as *mut StatmountBuf,
            std::mem::size_of::<StatmountBuf>(),
            0u32,
        )
    };
    if r != 0 || buf.mask & STATMOUNT_SB_BASIC == 0 {
        return None;
    }
    let memory = matches!(buf.sb_magic, TMPFS_MAGIC | RAMFS_MAGIC);
    if let Ok(mut m) = MOUNTS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() >= MAX_MOUNTS {
            m.clear();
        }
        m.insert(mnt_id, memory);
    }
    Some(memory)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether this kernel has what the fast path needs, judged on a file
    /// in /dev/shm (tmpfs wherever systemd or a container runtime set it up).
    pub(crate) fn available() -> bool {
        let Ok(d) = tempfile::tempdir_in("/dev/shm") else {
            return false;
        };
        let p = d.path().join("probe");
        std::fs::write(&p, b"x").is_ok() && {
            // The first lookup may not be cached yet.
            let _ = std::fs::metadata(&p);
            open(&p).is_some()
        }
    }

    #[test]
    fn only_regular_files_on_memory_file_systems_are_opened_inline() {
        if !available() {
            eprintln!("skipped: no statmount/unique mount IDs here, or /dev/shm is not tmpfs");
            return;
        }
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let f = shm.path().join("f");
        std::fs::write(&f, b"v").unwrap();
        let _ = std::fs::metadata(&f);
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
            .map(|s| {
                let t = s.filesystem_type().0 as u64;
                t != TMPFS_MAGIC && t != RAMFS_MAGIC
            })
            .unwrap_or(false);
        if on_disk {
            let g = other.path().join("g");
            std::fs::write(&g, b"v").unwrap();
            let _ = std::fs::metadata(&g);
            assert!(open(&g).is_none());
        }
    }
}
