//! The host's keys during a rollover: the current key (`host.*`), the
//! next one once prepared (`host.next.*`), the previous one after a
//! switch until it is retired (`host.prev.*`), all in `state_dir`.
//!
//! Each step is a short sequence of atomic file writes and renames whose
//! last action is the step's marker, so a host agent killed at any point
//! finds a state it can name on restart:
//! - prepare writes `host.next.crt`, `host.next.key` (0600), then
//!   `host.next.pin`: without that pin file the next key does not exist;
//! - switch writes the current key as `host.prev.crt`, `.key`, then
//!   `host.prev.pin`, then renames the next files over `host.crt`,
//!   `host.key` and finally `host.pin`. Both `host.next.pin` and
//!   `host.prev.pin` present means a switch was interrupted after its
//!   point of no return: [`KeyRing::load`] finishes it;
//! - retire deletes `host.prev.key` first (the secret), then the rest.
//!
//! `vmcred-host launch` reads `host.pin`, so VMs launched after a switch
//! pin the new key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmcred_proto::fsutil::write_atomic;
use vmcred_proto::tls::{self, Identity, Pin, TlsError};

#[derive(Debug, Error)]
pub enum KeyError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("{0}")]
    OutOfOrder(String),
}

/// A step of `vmcred-host rotate-key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyStep {
    /// Only report where the rollover stands.
    Show,
    Prepare,
    Switch,
    Retire,
    /// Switch if not yet, then retire at once: for a leaked old key.
    RevokeOld,
}

/// Where a rollover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One key, nothing in progress.
    Steady,
    /// A next key exists; guests are being handed its pin.
    Prepared,
    /// The next key is current; the previous is kept for guests that were
    /// down, until retired.
    Switched,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Done,
    /// The step had already been done: nothing changed.
    AlreadyDone,
    /// Nothing was asked to change.
    Shown,
}

/// A key usable for dialling: its client config and pin.
#[derive(Clone)]
pub struct DialKey {
    pub config: Arc<rustls::ClientConfig>,
    pub pin: Pin,
}

struct Keys {
    current: DialKey,
    prev: Option<DialKey>,
    next: Option<Pin>,
}

/// The host's keys, shared by every VM task and the control socket.
pub struct KeyRing {
    dir: PathBuf,
    keys: RwLock<Keys>,
}

fn file_err(p: &Path, why: impl std::fmt::Display) -> KeyError {
    KeyError::File {
        path: p.display().to_string(),
        why: why.to_string(),
    }
}

fn dial_key(id: &Identity) -> Result<DialKey, KeyError> {
    Ok(DialKey {
        config: tls::host_client_config(id)?,
        pin: id.pin()?,
    })
}

struct Names {
    key: PathBuf,
    crt: PathBuf,
    pin: PathBuf,
}

fn names(dir: &Path, stem: &str) -> Names {
    Names {
        key: dir.join(format!("{stem}.key")),
        crt: dir.join(format!("{stem}.crt")),
        pin: dir.join(format!("{stem}.pin")),
    }
}

fn remove(p: &Path) -> Result<(), KeyError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err(p, format!("cannot remove: {e}"))),
    }
}

/// Removes a retired key's files, its pin (the marker) first.
fn remove_retired(n: &Names) -> Result<(), KeyError> {
    remove(&n.pin)?;
    remove(&n.key)?;
    remove(&n.crt)?;
    if let Some(dir) = n.pin.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn rename_if_present(from: &Path, to: &Path) -> Result<(), KeyError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err(
            from,
            format!("cannot rename to {}: {e}", to.display()),
        )),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_pin(path: &Path, pin: Pin) -> Result<(), KeyError> {
    write_atomic(path, format!("{pin}\n").as_bytes(), 0o644)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// Loads a key whose pin file marks it complete, checking that the pin
/// file names the key in the pair.
fn load_marked(n: &Names) -> Result<Option<Identity>, KeyError> {
    if !n.pin.exists() {
        return Ok(None);
    }
    let id = Identity::load_pair(&n.key, &n.crt)?;
    let text = std::fs::read_to_string(&n.pin).map_err(|e| file_err(&n.pin, e))?;
    let pin: Pin = text
        .trim()
        .parse()
        .map_err(|e| file_err(&n.pin, format!("not a pin: {e}")))?;
    if pin != id.pin()? {
        return Err(file_err(
            &n.pin,
            "does not name the key beside it; the key files were changed by hand",
        ));
    }
    Ok(Some(id))
}

impl KeyRing {
    /// Loads the keys in `dir`, creating the current one on first start
    /// and finishing a switch that was interrupted.
    pub fn load(dir: &Path) -> Result<KeyRing, KeyError> {
        let (next, prev) = (names(dir, "host.next"), names(dir, "host.prev"));
        if next.pin.exists() && prev.pin.exists() {
            tracing::warn!("finishing a host key switch that was interrupted");
            finish_switch(dir)?;
        }
        let current = Identity::load_or_create(dir)?;
        // Remains of a retire that was killed part-way: the previous key's
        // pin without its key (the order of earlier versions, or a key
        // shredded by hand), or its key without the pin (this version's
        // order). Either way the retire was asked for: finish it.
        if prev.pin.exists() != prev.key.exists() || (!prev.pin.exists() && prev.crt.exists()) {
            tracing::warn!("finishing a retire of the previous host key that was interrupted");
            remove_retired(&prev)?;
        }
        let next_id = load_marked(&next)?;
        let prev_id = load_marked(&prev)?;
        let keys = Keys {
            current: dial_key(&current)?,
            prev: prev_id.as_ref().map(dial_key).transpose()?,
            next: next_id.map(|id| id.pin()).transpose()?,
        };
        Ok(KeyRing {
            dir: dir.to_path_buf(),
            keys: RwLock::new(keys),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current(&self) -> DialKey {
        self.read().current.clone()
    }

    pub fn prev(&self) -> Option<DialKey> {
        self.read().prev.clone()
    }

    pub fn next_pin(&self) -> Option<Pin> {
        self.read().next
    }

    pub fn phase(&self) -> Phase {
        let k = self.read();
        match (k.next.is_some(), k.prev.is_some()) {
            (true, _) => Phase::Prepared,
            (false, true) => Phase::Switched,
            (false, false) => Phase::Steady,
        }
    }

    /// Runs one step. Blocking (file I/O): call off the async workers.
    pub fn step(&self, step: KeyStep) -> Result<StepOutcome, KeyError> {
        match step {
            KeyStep::Show => Ok(StepOutcome::Shown),
            KeyStep::Prepare => self.prepare(),
            KeyStep::Switch => self.switch(),
            KeyStep::Retire => self.retire(),
            KeyStep::RevokeOld => {
                let switched = match self.phase() {
                    Phase::Steady => {
                        return Err(KeyError::OutOfOrder(
                            "no next key exists, so no guest holds a pin to fall back on: run \
                             `vmcred-host rotate-key prepare` first (guests that are connected \
                             store the next pin), then `revoke-old`; a guest that cannot be \
                             handed the next pin must be relaunched"
                                .into(),
                        ))
                    }
                    Phase::Prepared => self.switch()?,
                    Phase::Switched => StepOutcome::AlreadyDone,
                };
                let retired = self.retire()?;
                Ok(
                    if switched == StepOutcome::Done || retired == StepOutcome::Done {
                        StepOutcome::Done
                    } else {
                        StepOutcome::AlreadyDone
                    },
                )
            }
        }
    }

    fn prepare(&self) -> Result<StepOutcome, KeyError> {
        let mut k = self.write();
        if k.next.is_some() {
            return Ok(StepOutcome::AlreadyDone);
        }
        if k.prev.is_some() {
            return Err(KeyError::OutOfOrder(
                "the previous key of the last switch is not retired yet: run `vmcred-host \
                 rotate-key retire` first (at most two keys are trusted at once)"
                    .into(),
            ));
        }
        let n = names(&self.dir, "host.next");
        let id = Identity::generate("vmcred-host")?;
        id.store_pair(&n.key, &n.crt)?;
        let pin = id.pin()?;
        write_pin(&n.pin, pin)?;
        sync_dir(&self.dir);
        k.next = Some(pin);
        tracing::info!(next = %pin, "prepared the host's next key");
        Ok(StepOutcome::Done)
    }

    fn switch(&self) -> Result<StepOutcome, KeyError> {
        let mut k = self.write();
        if k.next.is_none() {
            if k.prev.is_some() {
                return Ok(StepOutcome::AlreadyDone);
            }
            return Err(KeyError::OutOfOrder(
                "there is no next key to switch to: run `vmcred-host rotate-key prepare` first"
                    .into(),
            ));
        }
        let (cur, next, prev) = (
            names(&self.dir, "host"),
            names(&self.dir, "host.next"),
            names(&self.dir, "host.prev"),
        );
        let next_id = Identity::load_pair(&next.key, &next.crt)?;
        let current_id = Identity::load_pair(&cur.key, &cur.crt)?;
        current_id.store_pair(&prev.key, &prev.crt)?;
        write_pin(&prev.pin, current_id.pin()?)?;
        sync_dir(&self.dir);
        // The point of no return: from here a restart finishes the switch.
        finish_switch(&self.dir)?;
        let old = std::mem::replace(&mut k.current, dial_key(&next_id)?);
        tracing::info!(current = %k.current.pin, previous = %old.pin, "switched to the next host key");
        k.prev = Some(old);
        k.next = None;
        Ok(StepOutcome::Done)
    }

    fn retire(&self) -> Result<StepOutcome, KeyError> {
        let mut k = self.write();
        if k.next.is_some() {
            return Err(KeyError::OutOfOrder(
                "a next key is prepared but not switched to: run `vmcred-host rotate-key switch` \
                 first (or `revoke-old` to switch and retire at once)"
                    .into(),
            ));
        }
        let prev = names(&self.dir, "host.prev");
        if k.prev.is_none() && !prev.key.exists() {
            return Ok(StepOutcome::AlreadyDone);
        }
        // The pin file first: it is what marks the previous key as one to
        // load, so a retire killed part-way leaves files that `load`
        // ignores and removes, never a pin without its key (which stopped
        // the agent from starting).
        remove_retired(&prev)?;
        if let Some(old) = k.prev.take() {
            tracing::info!(retired = %old.pin, "retired the previous host key");
        }
        Ok(StepOutcome::Done)
    }
}

/// How `status` judges a guest: from the pins it reports and whether it
/// refused the current key at the last dial.
pub fn trust_of(ring: &KeyRing, guest_pins: &[String], refused: bool) -> crate::control::KeyTrust {
    use crate::control::KeyTrust;
    let holds = |p: Pin| guest_pins.iter().any(|g| *g == p.to_string());
    if refused && ring.prev().is_none() {
        return KeyTrust::Untrusted;
    }
    if guest_pins.is_empty() {
        return KeyTrust::Unknown;
    }
    match ring.next_pin() {
        Some(next) if holds(next) => KeyTrust::HasNext,
        Some(_) => KeyTrust::LacksNext,
        None if holds(ring.current().pin) => KeyTrust::Current,
        None if refused => KeyTrust::Untrusted,
        None => KeyTrust::Unknown,
    }
}

/// Moves the next key's files over the current ones, the pin last.
fn finish_switch(dir: &Path) -> Result<(), KeyError> {
    let (cur, next) = (names(dir, "host"), names(dir, "host.next"));
    rename_if_present(&next.crt, &cur.crt)?;
    rename_if_present(&next.key, &cur.key)?;
    rename_if_present(&next.pin, &cur.pin)?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pin_file(dir: &Path, stem: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(format!("{stem}.pin")))
            .ok()
            .map(|s| s.trim().to_string())
    }

    #[test]
    fn steps_in_order_idempotent_and_refused_out_of_order() {
        let d = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        let first = ring.current().pin;
        assert_eq!(ring.phase(), Phase::Steady);
        let e = ring.step(KeyStep::Switch).unwrap_err().to_string();
        assert!(e.contains("prepare"), "{e}");
        assert!(ring.step(KeyStep::RevokeOld).is_err());
        assert_eq!(
            ring.step(KeyStep::Retire).unwrap(),
            StepOutcome::AlreadyDone
        );

        assert_eq!(ring.step(KeyStep::Prepare).unwrap(), StepOutcome::Done);
        assert_eq!(
            ring.step(KeyStep::Prepare).unwrap(),
            StepOutcome::AlreadyDone
        );
        let next = ring.next_pin().unwrap();
        assert_eq!(pin_file(d.path(), "host.next").unwrap(), next.to_string());
        let mode = std::fs::metadata(d.path().join("host.next.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = ring.step(KeyStep::Retire).unwrap_err().to_string();
        assert!(e.contains("switch"), "{e}");

        assert_eq!(ring.step(KeyStep::Switch).unwrap(), StepOutcome::Done);
        assert_eq!(
            ring.step(KeyStep::Switch).unwrap(),
            StepOutcome::AlreadyDone
        );
        assert_eq!(ring.current().pin, next);
        assert_eq!(ring.prev().unwrap().pin, first);
        assert_eq!(pin_file(d.path(), "host").unwrap(), next.to_string());
        let e = ring.step(KeyStep::Prepare).unwrap_err().to_string();
        assert!(e.contains("retire"), "{e}");

        assert_eq!(ring.step(KeyStep::Retire).unwrap(), StepOutcome::Done);
        assert_eq!(
            ring.step(KeyStep::Retire).unwrap(),
            StepOutcome::AlreadyDone
        );
        assert!(!d.path().join("host.prev.key").exists());
        assert!(ring.prev().is_none());
        // A restart sees the same.
        let again = KeyRing::load(d.path()).unwrap();
        assert_eq!(again.current().pin, next);
        assert_eq!(again.phase(), Phase::Steady);
    }

    #[test]
    fn an_interrupted_switch_is_finished_on_load() {
        let d = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        let first = ring.current().pin;
        ring.step(KeyStep::Prepare).unwrap();
        let next = ring.next_pin().unwrap();
        drop(ring);
        // As if killed right after the point of no return and one rename:
        // host.crt is the new one, host.key still the old.
        let cur =
            Identity::load_pair(&d.path().join("host.key"), &d.path().join("host.crt")).unwrap();
        cur.store_pair(
            &d.path().join("host.prev.key"),
            &d.path().join("host.prev.crt"),
        )
        .unwrap();
        write_pin(&d.path().join("host.prev.pin"), first).unwrap();
        std::fs::rename(d.path().join("host.next.crt"), d.path().join("host.crt")).unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        assert_eq!(ring.current().pin, next);
        assert_eq!(ring.prev().unwrap().pin, first);
        assert_eq!(ring.phase(), Phase::Switched);
    }

    /// A retire killed part-way, in either order of its removals (this
    /// version removes the pin first; earlier ones removed the key first,
    /// and an admin may shred the old key by hand): the agent starts, the
    /// retire is finished, and the current key is untouched. Before, a pin
    /// left without its key stopped every start (found in review).
    #[test]
    fn a_retire_cut_short_is_finished_on_load() {
        for gone in ["host.prev.key", "host.prev.pin"] {
            let d = tempfile::tempdir().unwrap();
            let ring = KeyRing::load(d.path()).unwrap();
            ring.step(KeyStep::Prepare).unwrap();
            ring.step(KeyStep::Switch).unwrap();
            let current = ring.current().pin;
            drop(ring);
            std::fs::remove_file(d.path().join(gone)).unwrap();
            let ring = KeyRing::load(d.path()).unwrap_or_else(|e| panic!("{gone} removed: {e}"));
            assert_eq!(ring.current().pin, current, "{gone}");
            assert!(ring.prev().is_none(), "{gone}");
            assert_eq!(ring.phase(), Phase::Steady, "{gone}");
            for f in ["host.prev.key", "host.prev.crt", "host.prev.pin"] {
                assert!(!d.path().join(f).exists(), "{gone}: {f} left");
            }
        }
    }

    /// A host certificate that is gone (a first start killed between the
    /// key and the certificate by an earlier version, or removed by hand)
    /// is made again for the same key: the pin every guest holds stays.
    #[test]
    fn a_missing_certificate_is_made_again_for_the_same_key() {
        let d = tempfile::tempdir().unwrap();
        let pin = KeyRing::load(d.path()).unwrap().current().pin;
        std::fs::remove_file(d.path().join("host.crt")).unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        assert_eq!(ring.current().pin, pin);
        assert_eq!(pin_file(d.path(), "host").unwrap(), pin.to_string());
        assert!(d.path().join("host.crt").exists());
    }

    #[test]
    fn a_prepare_cut_short_is_not_a_next_key() {
        let d = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        drop(ring);
        // Killed after the key files, before the pin marker.
        let id = Identity::generate("vmcred-host").unwrap();
        id.store_pair(
            &d.path().join("host.next.key"),
            &d.path().join("host.next.crt"),
        )
        .unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        assert_eq!(ring.phase(), Phase::Steady);
        assert_eq!(ring.step(KeyStep::Prepare).unwrap(), StepOutcome::Done);
        assert_ne!(ring.next_pin().unwrap(), id.pin().unwrap());
    }

    #[test]
    fn revoke_old_switches_and_retires() {
        let d = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(d.path()).unwrap();
        ring.step(KeyStep::Prepare).unwrap();
        let next = ring.next_pin().unwrap();
        assert_eq!(ring.step(KeyStep::RevokeOld).unwrap(), StepOutcome::Done);
        assert_eq!(ring.current().pin, next);
        assert!(ring.prev().is_none());
        assert!(!d.path().join("host.prev.key").exists());
        let e = ring.step(KeyStep::RevokeOld).unwrap_err().to_string();
        assert!(e.contains("prepare"), "{e}");
    }
}
