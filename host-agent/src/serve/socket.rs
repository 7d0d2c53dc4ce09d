//! Creating the agent's listening sockets without ever changing the mode
//! or owner of a path someone else can swap.
//!
//! `chmod`/`chown` on a path follow a symlink, and there is no way to set
//! a Unix socket file's mode through its descriptor (`fchmod` on a socket
//! changes the socket, not the file). So the socket is bound inside a
//! fresh private directory (0700, ours), given its mode and group there,
//! where nobody else can replace it, and only then renamed to its path.
//! `rename` replaces a symlink planted at the path instead of following
//! it. The directory holding the path should still be root's: whoever can
//! write it can remove the socket and put their own in its place (their
//! own socket, never a mode change of a file of ours).

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::net::UnixListener;

/// A listening socket and the identity of the file it created, so that
/// shutdown removes only its own file.
pub(super) struct Bound {
    pub(super) listener: Option<UnixListener>,
    path: PathBuf,
    inode: (u64, u64),
}

/// The socket's group: its gid, and its name for errors.
pub(super) struct Group<'a> {
    pub(super) gid: u32,
    pub(super) name: &'a str,
}

impl Bound {
    /// Binds `path` with `mode` (and `group`). A leftover file is removed
    /// only if it is a socket nobody answers on: a live listener (another
    /// agent with another state_dir, say) is never taken over.
    pub(super) fn new(path: &Path, mode: u32, group: Option<Group<'_>>) -> Result<Bound> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let Some(name) = path.file_name() else {
            bail!("socket path {} has no file name", path.display());
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
            Ok(m) if !m.file_type().is_socket() => bail!(
                "{} exists and is not a socket; refusing to replace it (remove it if it is not needed)",
                path.display()
            ),
            Ok(_) => {
                if socket_is_live(path) {
                    bail!(
                        "another process is listening on {} (another vmcred-host serve with a different state_dir?); refusing to take it over",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale {}", path.display()))?;
            }
        }
        // Same directory, so the rename stays on one file system. A short
        // name, so the private path is no longer than most real ones (a
        // socket path has at most 107 bytes).
        let private = nix::unistd::mkdtemp(&dir.join(".vbXXXXXX"))
            .with_context(|| format!("cannot create a private directory in {}", dir.display()))?;
        let private = PrivateDir(private);
        let staged = private.0.join(name);
        let listener = UnixListener::bind(&staged).with_context(|| {
            format!(
                "cannot listen on {} (bound first as {})",
                path.display(),
                staged.display()
            )
        })?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        if let Some(g) = group {
            nix::unistd::chown(&staged, None, Some(nix::unistd::Gid::from_raw(g.gid)))
                .with_context(|| format!("cannot give {} to group {}", path.display(), g.name))?;
        }
        let m = std::fs::symlink_metadata(&staged)
            .with_context(|| format!("cannot inspect {}", staged.display()))?;
        std::fs::rename(&staged, path).with_context(|| {
            format!(
                "cannot move the socket into place at {} (something was put there meanwhile?)",
                path.display()
            )
        })?;
        drop(private);
        Ok(Bound {
            listener: Some(listener),
            path: path.to_path_buf(),
            inode: (m.dev(), m.ino()),
        })
    }

    pub(super) fn remove_if_ours(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A directory `mkdtemp` made (0700, ours), removed when dropped: by then
/// it is empty, or holds only the socket of a failed attempt. If it cannot
/// be removed it is left behind, ours and private, which is harmless.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Whether something accepts connections on the socket at `path`. A full
/// backlog (`EAGAIN`) counts as live.
fn socket_is_live(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn binds_with_the_mode_and_group_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("control.sock");
        let gid = nix::unistd::getegid().as_raw();
        let b = Bound::new(&path, 0o660, Some(Group { gid, name: "mine" })).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o660);
        assert_eq!(m.gid(), gid);
        // Only the socket is left in the directory.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("control.sock")]);
        // It answers at its final path.
        tokio::net::UnixStream::connect(&path).await.unwrap();
        b.remove_if_ours();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_symlink_placed_at_the_path_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = tmp.path().join("launch.sock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = Bound::new(&path, 0o666, None).err().unwrap().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(mode_of(&victim), 0o600);
    }

    /// A hostile user who can write the socket's directory swaps the
    /// socket for a symlink to a file of root's, over and over, while the
    /// agent binds: the file's mode must never change. With `chmod` after
    /// `bind` at the final path, the swap lands between the two often
    /// enough to make the file 0666 within these rounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_racing_the_bind_never_changes_another_files_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.join("launch.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let racer = {
            let (path, victim, stop) = (path.clone(), victim.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket())
                        && std::fs::remove_file(&path).is_ok()
                        && std::os::unix::fs::symlink(&victim, &path).is_ok()
                    {
                        swaps += 1;
                    }
                }
                swaps
            })
        };
        let mut bound = 0;
        for _ in 0..1000 {
            // The racer's symlink makes the next bind refuse; clear it.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = std::fs::remove_file(&path);
            }
            if let Ok(b) = Bound::new(&path, 0o666, None) {
                bound += 1;
                b.remove_if_ours();
            }
            if mode_of(&victim) != 0o600 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = racer.join().unwrap();
        assert!(bound > 0 && swaps > 0, "bound {bound}, swapped {swaps}");
        assert_eq!(
            mode_of(&victim),
            0o600,
            "the bind changed the mode of a file a symlink pointed to ({swaps} swaps)"
        );
    }
}
