//! A minimal inotify reader for the benchmark: it learns that a guest
//! wrote its credential (or that anyone opened a file) from the kernel,
//! instead of polling files in a loop whose CPU would compete with what is
//! measured. Linux only; libc directly, since the workspace's `nix` is
//! built without its `inotify` and `poll` features and adding them would
//! rebuild every crate above `nix` in the shared build.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

pub use libc::{IN_ACCESS, IN_CLOSE_WRITE, IN_MOVED_TO, IN_OPEN, IN_Q_OVERFLOW};

/// One event: the watch it came from and its mask. Names are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub wd: i32,
    pub mask: u32,
}

/// An inotify instance (non-blocking, close-on-exec).
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    pub fn new() -> Result<Inotify> {
        // SAFETY: inotify_init1 takes no pointers; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        Ok(Inotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `path` for the events in `mask`; returns the watch id.
    pub fn watch(&self, path: &Path, mask: u32) -> Result<i32> {
        let c = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{} has a NUL byte", path.display()))?;
        // SAFETY: c is a valid NUL-terminated string for the call's length.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot watch {}", path.display()));
        }
        Ok(wd)
    }

    /// Waits up to `timeout` for events, then returns every queued one
    /// (empty on timeout).
    pub fn wait(&self, timeout: Duration) -> Result<Vec<Event>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Vec::new());
            }
            return Err(e).context("poll on inotify");
        }
        self.drain()
    }

    /// Every queued event, without waiting.
    pub fn drain(&self) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(out);
                }
                return Err(e).context("read from inotify");
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Ok(out);
            }
            parse(&buf[..n], &mut out);
        }
    }
}

/// Parses `struct inotify_event` records (wd, mask, cookie, len, name).
fn parse(mut b: &[u8], out: &mut Vec<Event>) {
    let word = |b: &[u8], i: usize| -> Option<[u8; 4]> { b.get(i * 4..i * 4 + 4)?.try_into().ok() };
    while let (Some(wd), Some(mask), Some(len)) = (word(b, 0), word(b, 1), word(b, 3)) {
        out.push(Event {
            wd: i32::from_ne_bytes(wd),
            mask: u32::from_ne_bytes(mask),
        });
        let next = 16 + u32::from_ne_bytes(len) as usize;
        b = b.get(next..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_rename_into_a_watched_directory_and_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let ino = Inotify::new().unwrap();
        let wd = ino
            .watch(dir.path(), IN_MOVED_TO | IN_CLOSE_WRITE | IN_OPEN)
            .unwrap();
        assert!(ino.wait(Duration::from_millis(1)).unwrap().is_empty());
        crate::write_atomic(&dir.path().join("x"), b"v", 0o400).unwrap();
        std::fs::read(dir.path().join("x")).unwrap();
        let evs = ino.wait(Duration::from_secs(5)).unwrap();
        assert!(evs.iter().all(|e| e.wd == wd));
        for m in [IN_MOVED_TO, IN_CLOSE_WRITE, IN_OPEN] {
            assert!(evs.iter().any(|e| e.mask & m != 0), "no {m:#x} in {evs:?}");
        }
    }
}
