//! Reading the `vmcred.bootstrap` credential: the host key pin and port
//! that PID 1 imported from SMBIOS at boot. Parsing is `vmcred_proto`'s;
//! this is about finding it and explaining clearly when it is not there.

use std::io::Read;
use std::path::Path;

use thiserror::Error;
use vmcred_proto::bootstrap::{Bootstrap, BootstrapError, MAX_BOOTSTRAP_BYTES};
use vmcred_proto::rules::MAX_LAUNCH_KEY_BYTES;
use zeroize::Zeroizing;

/// Ports from here on can be bound by any guest user, who could then pose
/// as the guest agent to the host.
pub use crate::admission::FIRST_UNPRIVILEGED_PORT;

#[derive(Debug, Error)]
pub enum BootstrapReadError {
    #[error(
        "bootstrap {path} does not exist. It is the vmcred.bootstrap credential (the host key pin \
         and vsock port) that `vmcred-host launch` passes to the VM through SMBIOS OEM strings \
         and systemd imports at boot; start the VM through `vmcred-host launch` (the NixOS host \
         module does), or pass --bootstrap"
    )]
    Missing { path: String },
    /// The cause is in the message and deliberately not a `source()`:
    /// every guest error carries its cause once, and `main` prints `{e:#}`.
    #[error("cannot read bootstrap {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("bootstrap {path}: {error}")]
    Parse { path: String, error: BootstrapError },
    #[error(
        "bootstrap {path} names vsock port {port}, which is not privileged: any guest user could \
         bind it and pose as the guest agent. The port must be below {FIRST_UNPRIVILEGED_PORT}"
    )]
    UnprivilegedPort { path: String, port: u32 },
}

/// Reads and parses the bootstrap at `path`.
pub fn read(path: &Path) -> Result<Bootstrap, BootstrapReadError> {
    let shown = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            BootstrapReadError::Missing { path: shown() }
        } else {
            BootstrapReadError::Read {
                path: shown(),
                error,
            }
        }
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_BOOTSTRAP_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| BootstrapReadError::Read {
            path: shown(),
            error,
        })?;
    Bootstrap::parse(&bytes).map_err(|error| BootstrapReadError::Parse {
        path: shown(),
        error,
    })
}

/// Reads the launch key at `path`: `None` when there is none (the host
/// does not require one for this VM, or the VM was not started by
/// `vmcred-host launch`). Not followed through a symlink, and at most
/// `MAX_LAUNCH_KEY_BYTES`; the bytes are wiped on drop.
pub fn read_launch_key(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open launch key {}: {e}", path.display())),
    };
    let mut key = Zeroizing::new(Vec::with_capacity(MAX_LAUNCH_KEY_BYTES + 1));
    file.take(MAX_LAUNCH_KEY_BYTES as u64 + 1)
        .read_to_end(&mut key)
        .map_err(|e| format!("cannot read launch key {}: {e}", path.display()))?;
    if key.is_empty() || key.len() > MAX_LAUNCH_KEY_BYTES {
        return Err(format!(
            "launch key {} is {} bytes; expected 1 to {MAX_LAUNCH_KEY_BYTES}",
            path.display(),
            key.len()
        ));
    }
    Ok(Some(key))
}

/// Refuses a port that an unprivileged guest process could bind.
pub fn check_vsock_port(path: &Path, b: &Bootstrap) -> Result<(), BootstrapReadError> {
    if b.port >= FIRST_UNPRIVILEGED_PORT {
        return Err(BootstrapReadError::UnprivilegedPort {
            path: path.display().to_string(),
            port: b.port,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcred_proto::tls::Pin;

    /// A directory opens but does not read (EISDIR): the Read variant,
    /// rendered as `main` does, names its cause once.
    #[test]
    fn an_unreadable_bootstrap_names_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(matches!(err, BootstrapReadError::Read { .. }), "{err}");
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(shown.matches("os error 21").count(), 1, "{shown}");
    }

    #[test]
    fn reads_and_explains() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmcred.bootstrap");
        let err = read(&p).unwrap_err().to_string();
        assert!(
            err.contains(&p.display().to_string()) && err.contains("SMBIOS"),
            "{err}"
        );
        let b = Bootstrap {
            port: 700,
            pin: Pin([1; 32]),
            host: vmcred_proto::bootstrap::HostTransport::Vsock,
        };
        std::fs::write(&p, format!("{}\n", b.encode())).unwrap();
        assert_eq!(read(&p).unwrap(), b);
        check_vsock_port(&p, &b).unwrap();
        let high = Bootstrap { port: 1024, ..b };
        let err = check_vsock_port(&p, &high).unwrap_err().to_string();
        assert!(err.contains("1024") && err.contains("privileged"), "{err}");
        std::fs::write(&p, "garbage").unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("vmcred-bootstrap-v1"), "{err}");
        std::fs::write(&p, vec![b' '; MAX_BOOTSTRAP_BYTES * 2]).unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("bytes"));
    }
}
