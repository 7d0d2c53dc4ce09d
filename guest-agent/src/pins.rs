//! The host key pins the guest accepts, and how a key rollover changes
//! them.
//!
//! The trust chain: at boot the only pin is the bootstrap's (the VM's
//! launch-time data). After that the set changes only through a session
//! authenticated with a pin already in it:
//! - `Trust(next)` from a session authenticated with pin `P` makes the set
//!   `[P, next]`: at most two pins, and only once per current pin: a
//!   stored next pin is never replaced by another. Whoever holds `P` may
//!   name the next key, so a leaked `P` could otherwise replace the host's
//!   next pin with its own and outlive the rollover meant to revoke it.
//!   Now the first `Trust` wins, and a host that comes second sees the
//!   guest refuse its pin (`status`: "lacks next pin", with the pins the
//!   guest holds) and does not switch;
//! - a session authenticated with the newest of two pins proves the host
//!   has switched to it: the older pin is dropped at once.
//!
//! The set lives in `pins.json` in the guest's state directory, or in
//! `pin_state_dir` when the guest config names one (written atomically and
//! synced), so an agent restart keeps it. It records the bootstrap pin it
//! grew from (`root`): a VM relaunch brings a fresh `/run` (no file) or,
//! on persistent storage, a different bootstrap pin; either way the
//! bootstrap is the root again. With the same bootstrap pin the stored set
//! wins even when it no longer holds that pin: the key it names was
//! retired, possibly because it leaked. A guest that reboots inside the
//! same hypervisor process is handed the same bootstrap again, so only a
//! `pins.json` on storage that survives the reboot keeps a dropped key
//! out then; on `/run` the bootstrap pin is trusted again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmcred_proto::fsutil::write_atomic;
use vmcred_proto::tls::{Pin, PinPolicy};

/// The pin of a host key (SHA-256 of its certificate).
pub use vmcred_proto::tls::Pin as HostPin;

/// At most this many pins at once: the current key and the next.
pub const MAX_PINS: usize = 2;

#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "host key pins {path}: {why}. The guest does not fall back to the bootstrap pin on its \
         own, since that key may have been retired; remove the file to trust the bootstrap pin \
         again, or relaunch the VM"
    )]
    Corrupt { path: String, why: String },
    #[error("cannot store the host key pins in {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the session's host key is no longer pinned (the pins changed since it connected)")]
    NotPinned,
    #[error(
        "a next host key pin ({stored}) is already stored for the current key; the guest takes \
         one next pin per current key, so that a leaked current key cannot replace the host's. \
         If that pin is not the host's next key, relaunch the VM"
    )]
    NextAlreadySet { stored: Pin },
    #[error(
        "pin directory {path}: {why}. It holds the host key pins, which decide who may push \
         credentials"
    )]
    Dir { path: String, why: String },
}

#[derive(Serialize, Deserialize)]
struct PinFile {
    root: String,
    pins: Vec<String>,
}

/// The guest's pin set; shared by the TLS verifier and the service.
#[derive(Debug)]
pub struct PinStore {
    /// None: kept in memory only (a fixed pin, see [`PinStore::fixed`]).
    path: Option<PathBuf>,
    root: Pin,
    pins: Mutex<Vec<Pin>>,
}

impl PinStore {
    /// Opens the set in `state_dir` for a guest booted with `bootstrap`
    /// (see the module doc for which wins).
    pub fn open(state_dir: &Path, bootstrap: Pin) -> Result<PinStore, PinError> {
        let dir_err = |why: String| PinError::Dir {
            path: state_dir.display().to_string(),
            why,
        };
        crate::store::ensure_private_dir(state_dir).map_err(dir_err)?;
        let path = state_dir.join("pins.json");
        let corrupt = |why: String| PinError::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let stored = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: PinFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let root: Pin = f.root.parse().map_err(|e| corrupt(format!("root: {e}")))?;
                let pins = f
                    .pins
                    .iter()
                    .map(|p| p.parse::<Pin>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| corrupt(format!("pins: {e}")))?;
                if pins.is_empty() || pins.len() > MAX_PINS {
                    return Err(corrupt(format!(
                        "holds {} pins; expected 1 to {MAX_PINS}",
                        pins.len()
                    )));
                }
                Some((root, pins))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(corrupt(e.to_string())),
        };
        let store = PinStore {
            path: Some(path),
            root: bootstrap,
            pins: Mutex::new(vec![bootstrap]),
        };
        match stored {
            Some((root, pins)) if root == bootstrap => {
                *store.lock() = pins;
            }
            Some((root, _)) => {
                tracing::info!(stored_root = %root, bootstrap = %bootstrap,
                    "the bootstrap pin changed (the VM was relaunched): trusting the bootstrap pin only");
                store.persist(&[bootstrap])?;
            }
            None => store.persist(&[bootstrap])?,
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pin>> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One pin, in memory only: nothing survives a restart.
    pub fn fixed(pin: Pin) -> PinStore {
        PinStore {
            path: None,
            root: pin,
            pins: Mutex::new(vec![pin]),
        }
    }

    fn persist(&self, pins: &[Pin]) -> Result<(), PinError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = PinFile {
            root: self.root.to_string(),
            pins: pins.iter().map(Pin::to_string).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&f).map_err(|e| PinError::Write {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let write_err = |source| PinError::Write {
            path: path.display().to_string(),
            source,
        };
        write_atomic(path, &bytes, 0o644).map_err(write_err)?;
        // On persistent storage the rename must survive a power cut: a
        // dropped pin that came back after one would trust a retired key.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
        }
        Ok(())
    }

    /// The pins now accepted, oldest first.
    pub fn pins(&self) -> Vec<Pin> {
        self.lock().clone()
    }

    /// A session was authenticated with `pin`. If it is the newer of two,
    /// the host has switched to it and the older pin is dropped. A failed
    /// write keeps both (on disk and here) and is retried next session.
    pub fn seen(&self, pin: Pin) {
        let mut pins = self.lock();
        if pins.len() > 1 && pins.last() == Some(&pin) {
            let next = vec![pin];
            match self.persist(&next) {
                Ok(()) => {
                    tracing::info!(dropped = %pins[0], kept = %pin, "the host switched to its next key; dropped the old pin");
                    *pins = next;
                }
                Err(e) => tracing::warn!(error = %e, "cannot drop the old host key pin yet"),
            }
        }
    }

    /// `Trust(next)` from a session authenticated with `session`: the set
    /// becomes `[session, next]` (unchanged if `next` is already pinned);
    /// refused if another next pin is already stored.
    pub fn add_next(&self, session: Pin, next: Pin) -> Result<Vec<Pin>, PinError> {
        let mut pins = self.lock();
        if !pins.contains(&session) {
            return Err(PinError::NotPinned);
        }
        if pins.contains(&next) {
            return Ok(pins.clone());
        }
        if let Some(stored) = pins.iter().find(|p| **p != session) {
            tracing::warn!(stored = %stored, refused = %next, "refused a second next host key pin for the current key");
            return Err(PinError::NextAlreadySet { stored: *stored });
        }
        let new = vec![session, next];
        self.persist(&new)?;
        tracing::info!(next = %next, "stored the pin of the host's next key");
        *pins = new;
        Ok(pins.clone())
    }
}

impl PinPolicy for PinStore {
    fn accepts(&self, pin: &Pin) -> bool {
        self.lock().contains(pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Pin = Pin([1; 32]);
    const B: Pin = Pin([2; 32]);
    const C: Pin = Pin([3; 32]);

    #[test]
    fn rollover_adds_then_drops_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = PinStore::open(dir.path(), A).unwrap();
        assert_eq!(s.pins(), vec![A]);
        assert_eq!(s.add_next(A, B).unwrap(), vec![A, B]);
        // Restart: both kept.
        let s = PinStore::open(dir.path(), A).unwrap();
        assert_eq!(s.pins(), vec![A, B]);
        // A session with the old key changes nothing.
        s.seen(A);
        assert_eq!(s.pins(), vec![A, B]);
        s.seen(B);
        assert_eq!(s.pins(), vec![B]);
        // Restart with the same bootstrap: the old key stays out.
        let s = PinStore::open(dir.path(), A).unwrap();
        assert_eq!(s.pins(), vec![B]);
        assert!(!s.accepts(&A));
        assert!(matches!(s.add_next(A, C), Err(PinError::NotPinned)));
    }

    /// A leaked current key cannot replace the next pin the host stored,
    /// nor race in a second one: one next pin per current key.
    #[test]
    fn one_next_pin_per_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = PinStore::open(dir.path(), A).unwrap();
        s.add_next(A, B).unwrap();
        let err = s.add_next(A, C).unwrap_err();
        assert!(matches!(err, PinError::NextAlreadySet { stored } if stored == B));
        assert!(err.to_string().contains("relaunch"), "{err}");
        assert_eq!(s.pins(), vec![A, B]);
        assert!(!s.accepts(&C));
        // Repeating the stored one is fine (a host redialling).
        assert_eq!(s.add_next(A, B).unwrap(), vec![A, B]);
        // After the switch, the new key may name its own next.
        s.seen(B);
        assert_eq!(s.add_next(B, C).unwrap(), vec![B, C]);
        // And it survives a restart.
        let s = PinStore::open(dir.path(), A).unwrap();
        assert!(matches!(
            s.add_next(B, A),
            Err(PinError::NextAlreadySet { .. })
        ));
    }

    /// The pin directory is checked like the state directory, and created
    /// private when missing.
    #[test]
    fn a_pin_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("persist/vmcred");
        PinStore::open(&pins, A).unwrap();
        let mode = std::fs::metadata(&pins).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = PinStore::open(&pins, A).unwrap_err().to_string();
        assert!(
            err.contains("0777") && err.contains("pin directory"),
            "{err}"
        );
    }

    #[test]
    fn a_new_bootstrap_pin_is_the_root_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = PinStore::open(dir.path(), A).unwrap();
        s.add_next(A, B).unwrap();
        let s = PinStore::open(dir.path(), C).unwrap();
        assert_eq!(s.pins(), vec![C]);
    }

    #[test]
    fn a_corrupt_file_is_refused_not_widened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pins.json"), "{").unwrap();
        let err = PinStore::open(dir.path(), A).unwrap_err().to_string();
        assert!(
            err.contains("pins.json") && err.contains("remove the file"),
            "{err}"
        );
        let three = format!(r#"{{"root":"{A}","pins":["{A}","{B}","{C}"]}}"#);
        std::fs::write(dir.path().join("pins.json"), three).unwrap();
        assert!(PinStore::open(dir.path(), A).is_err());
    }
}
