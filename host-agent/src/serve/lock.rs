//! One daemon per state directory. Two agents on one state directory would
//! dial the same guests with the same key and fight over the sockets, so
//! `serve` takes an exclusive `flock` on `state_dir/lock` for its whole
//! life. The kernel drops the lock when the process dies, however it dies,
//! so a stale lock file never blocks a restart.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("cannot open the state lock {path}: {error}")]
    Open { path: String, error: std::io::Error },
    #[error("another vmcred-host serve{} already uses {state_dir} (it holds {path}); stop it first, or give this one its own state_dir", pid.map(|p| format!(" (PID {p})")).unwrap_or_default())]
    Held {
        path: String,
        state_dir: String,
        pid: Option<u32>,
    },
    #[error("cannot lock {path}: {error}")]
    Lock { path: String, error: nix::Error },
}

/// Held for as long as the daemon runs; dropping it releases the lock.
pub struct StateLock {
    _file: Flock<File>,
    pub path: PathBuf,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join("lock");
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|error| LockError::Open {
                path: shown.clone(),
                error,
            })?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    path: shown,
                    state_dir: state_dir.display().to_string(),
                    pid: read_pid(&mut file),
                })
            }
            Err((_, error)) => return Err(LockError::Lock { path: shown, error }),
        };
        // The PID is only a hint for the error above; failing to write it
        // costs nothing but that hint.
        let _ = locked
            .set_len(0)
            .and_then(|()| locked.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(locked, "{}", std::process::id()));
        Ok(StateLock {
            _file: locked,
            path,
        })
    }
}

/// The PID the holder wrote, if it is a number.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_pid_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let e = StateLock::acquire(dir.path()).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("PID {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }
}
