//! The host key pins the guest accepts, and how a key rollover changes
//! them.
//!
//! The trust chain: at boot the only pin is the bootstrap's (the VM's
//! launch-time data). After that the set changes only through a session
//! authenticated with a pin already in it:
//! - `Trust(next)` from a session authenticated with pin `P` makes the set
//!   `[P, next]`: at most two pins, and a next pin never seen in a session
//!   is replaced rather than kept beside a third;
//! - a session authenticated with the newest of two pins proves the host
//!   has switched to it: the older pin is dropped at once.
//!
//! The set lives in `pins.json` in the guest's state directory (written
//! atomically), so an agent restart keeps it. It records the bootstrap pin
//! it grew from (`root`): a VM relaunch brings a fresh `/run` (no file) or,
//! with a persistent state directory, a different bootstrap pin; either
//! way the bootstrap is the root again. With the same bootstrap pin the
//! stored set wins even when it no longer holds that pin: the key it
//! names was retired, possibly because it leaked.

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
        write_atomic(path, &bytes, 0o644).map_err(|source| PinError::Write {
            path: path.display().to_string(),
            source,
        })
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
    /// becomes `[session, next]` (unchanged if `next` is already pinned).
    pub fn add_next(&self, session: Pin, next: Pin) -> Result<Vec<Pin>, PinError> {
        let mut pins = self.lock();
        if !pins.contains(&session) {
            return Err(PinError::NotPinned);
        }
        if pins.contains(&next) {
            return Ok(pins.clone());
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

    #[test]
    fn never_more_than_two_and_unseen_next_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = PinStore::open(dir.path(), A).unwrap();
        s.add_next(A, B).unwrap();
        assert_eq!(s.add_next(A, C).unwrap(), vec![A, C]);
        assert_eq!(s.add_next(A, C).unwrap(), vec![A, C]);
        assert!(!s.accepts(&B));
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
