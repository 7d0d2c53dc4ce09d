//! Launch keys: the per-VM secret that tells the real VM from another VM
//! started on its CID.
//!
//! An AF_VSOCK VM is dialled by its CID alone, and while it is stopped
//! anyone who can open `/dev/vhost-vsock` can start a VM of their own on
//! that CID and run a stock guest agent with the public bootstrap pin.
//! TLS proves the host to the guest, not the guest to the host. So for a
//! VM with `launch_key = "required"` the agent keeps a random key
//! (`<state_dir>/launch-keys/<vm>`, 0600), the VM's unit loads it with
//! `LoadCredential=vmcred.launch-key:…`, `vmcred-host launch` hands it to
//! the guest through a private carrier (qemu's SMBIOS or fw_cfg files,
//! never a command line), and the guest returns it in `HelloReply`, to the
//! pinned host only. The agent pushes nothing to a guest whose key differs.
//!
//! The key is static per VM: it needs no round trip at launch, works while
//! the agent is down, and a guest that once held it gains nothing from it
//! (its root already holds that VM's credentials). A new key is made by
//! removing the file and restarting the agent; running VMs are then
//! refused until relaunched.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;
use thiserror::Error;
use vmcred_proto::rules::MAX_LAUNCH_KEY_BYTES;
use zeroize::Zeroizing;

/// The directory under `state_dir` that holds one key file per VM.
pub const DIR: &str = "launch-keys";
/// Random bytes per key; the file holds them as lowercase hex digits, so
/// that every carrier (SMBIOS strings, fw_cfg) takes it as text.
const KEY_BYTES: usize = 32;

#[derive(Debug, Error)]
pub enum LaunchKeyError {
    #[error("launch key directory {}: {error}", .path.display())]
    Dir { path: PathBuf, error: io::Error },
    #[error("launch key directory {} is {problem}; it must be a directory only root can enter (0700)", .path.display())]
    DirUnsafe { path: PathBuf, problem: String },
    #[error("launch key {}: {error}", .path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("launch key {} is {problem}: remove it and restart vmcred-host to make a new one (VMs then need a relaunch)", .path.display())]
    Malformed { path: PathBuf, problem: String },
    #[error("cannot make a launch key: the system's random source failed")]
    Random,
}

/// One VM's key. Wiped on drop; never shown.
pub struct LaunchKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for LaunchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LaunchKey(<redacted>)")
    }
}

impl LaunchKey {
    /// Whether a guest's claim is this key, in time that does not depend
    /// on where they differ.
    pub fn matches(&self, claim: &[u8]) -> bool {
        claim.len() == self.0.len() && bool::from(self.0.as_slice().ct_eq(claim))
    }
}

/// What a guest's `HelloReply.launch_key` proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The VM does not require a key.
    NotRequired,
    /// The guest returned the VM's key.
    Matches,
    /// The guest returned no key: launched before the key existed, or not
    /// by `vmcred-host launch`, or an impostor.
    Missing,
    /// The guest returned another key: an impostor, or a VM launched with
    /// a key since replaced.
    Mismatch,
    /// The VM requires a key and the agent has none for it (its file could
    /// not be made or read): nothing is pushed.
    NoHostKey,
}

/// Which VMs require a key, and the keys, shared by `serve` (which sets
/// them at start and on every reload) and the VM tasks (which check guests
/// against them). The set lives here, not only in each task's copy of the
/// config: a task that has not yet taken a reload's new config (its queue
/// full) still checks under the new setting, so turning the key on never
/// waits on a busy task.
#[derive(Debug, Clone, Default)]
pub struct LaunchKeys(Arc<RwLock<Held>>);

#[derive(Debug, Default)]
struct Held {
    required: BTreeSet<String>,
    keys: BTreeMap<String, Arc<LaunchKey>>,
}

impl LaunchKeys {
    /// Makes `required` the VMs that require a key, and loads or makes the
    /// key of each that is not already held (a reload reads only new VMs'
    /// files). Returns the VMs whose key could not be had, with why; those
    /// VMs are refused every push.
    pub fn ensure<'a>(
        &self,
        state_dir: &Path,
        required: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, LaunchKeyError)> {
        let required: BTreeSet<String> = required.into_iter().map(str::to_string).collect();
        let held: BTreeSet<String> = self
            .0
            .read()
            .map(|h| h.keys.keys().cloned().collect())
            .unwrap_or_default();
        let mut failed = Vec::new();
        let mut new = Vec::new();
        for vm in required.difference(&held) {
            match load_or_make(state_dir, vm) {
                Ok(k) => new.push((vm.clone(), Arc::new(k))),
                Err(e) => failed.push((vm.clone(), e)),
            }
        }
        // A poisoned lock is recovered: the set must change whatever
        // happened to a reader.
        let mut h = self.0.write().unwrap_or_else(|p| p.into_inner());
        h.keys.extend(new);
        h.required = required;
        failed
    }

    /// Whether `vm` requires a key now.
    pub fn requires(&self, vm: &str) -> bool {
        self.0
            .read()
            .map(|h| h.required.contains(vm))
            // Fail closed.
            .unwrap_or(true)
    }

    /// Checks a guest's claim for `vm`.
    pub fn check(&self, vm: &str, claim: &[u8]) -> Proof {
        let key = match self.0.read() {
            Ok(h) if !h.required.contains(vm) => return Proof::NotRequired,
            Ok(h) => h.keys.get(vm).cloned(),
            Err(_) => None,
        };
        match key {
            None => Proof::NoHostKey,
            Some(_) if claim.is_empty() => Proof::Missing,
            // Longer than any key: not compared, not kept.
            Some(_) if claim.len() > MAX_LAUNCH_KEY_BYTES => Proof::Mismatch,
            Some(k) if k.matches(claim) => Proof::Matches,
            Some(_) => Proof::Mismatch,
        }
    }
}

/// `<state_dir>/launch-keys/<vm>`.
pub fn path(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(DIR).join(vm)
}

/// Reads the VM's key, or makes it when there is none. The directory is
/// made 0700 and must stay so; the file must be a regular file of ours,
/// not readable by others, holding 64 lowercase hex digits.
pub fn load_or_make(state_dir: &Path, vm: &str) -> Result<LaunchKey, LaunchKeyError> {
    let dir = state_dir.join(DIR);
    ensure_dir(&dir)?;
    let path = dir.join(vm);
    match read(&path) {
        Ok(k) => return Ok(k),
        Err(LaunchKeyError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = Zeroizing::new([0u8; KEY_BYTES]);
    ring::rand::SystemRandom::new()
        .fill(raw.as_mut())
        .map_err(|_| LaunchKeyError::Random)?;
    let mut hex = Zeroizing::new(Vec::with_capacity(KEY_BYTES * 2));
    for b in raw.iter() {
        hex.push(HEX[usize::from(b >> 4)]);
        hex.push(HEX[usize::from(b & 15)]);
    }
    vmcred_proto::fsutil::write_atomic(&path, &hex, 0o600).map_err(|error| LaunchKeyError::Io {
        path: path.clone(),
        error,
    })?;
    Ok(LaunchKey(hex))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn ensure_dir(dir: &Path) -> Result<(), LaunchKeyError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => {
            return Err(LaunchKeyError::Dir {
                path: dir.to_path_buf(),
                error,
            })
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|error| LaunchKeyError::Dir {
        path: dir.to_path_buf(),
        error,
    })?;
    let unsafe_dir = |problem: String| LaunchKeyError::DirUnsafe {
        path: dir.to_path_buf(),
        problem,
    };
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory".into()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(unsafe_dir(format!("owned by uid {}", meta.uid())));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o}",
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

fn read(path: &Path) -> Result<LaunchKey, LaunchKeyError> {
    let io_err = |error| LaunchKeyError::Io {
        path: path.to_path_buf(),
        error,
    };
    let malformed = |problem: &str| LaunchKeyError::Malformed {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(malformed("a symbolic link"))
        }
        Err(e) => return Err(io_err(e)),
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(malformed("not a regular file"));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(malformed("owned by another user"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(malformed("readable or writable by others than its owner"));
    }
    let mut hex = Zeroizing::new(Vec::with_capacity(KEY_BYTES * 2 + 1));
    file.take(KEY_BYTES as u64 * 2 + 1)
        .read_to_end(&mut hex)
        .map_err(io_err)?;
    if hex.len() != KEY_BYTES * 2 || !hex.iter().all(|b| HEX.contains(b)) {
        return Err(malformed("not 64 lowercase hex digits"));
    }
    Ok(LaunchKey(hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_read_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_make(dir.path(), "vm-a").expect("make");
        let p = path(dir.path(), "vm-a");
        let meta = fs::metadata(&p).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dmeta = fs::metadata(dir.path().join(DIR)).expect("stat dir");
        assert_eq!(dmeta.permissions().mode() & 0o777, 0o700);
        let text = fs::read(&p).expect("read");
        assert_eq!(text.len(), 64);
        assert!(a.matches(&text));
        let again = load_or_make(dir.path(), "vm-a").expect("load");
        assert!(again.matches(&text), "the file is kept, not remade");
        let b = load_or_make(dir.path(), "vm-b").expect("make b");
        assert!(!b.matches(&text), "each VM has its own key");
        assert!(!format!("{a:?}").contains(std::str::from_utf8(&text).expect("hex")));
    }

    #[test]
    fn a_claim_matches_only_the_exact_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = LaunchKeys::default();
        assert!(keys.ensure(dir.path(), ["a", "b"]).is_empty());
        let text = fs::read(path(dir.path(), "a")).expect("read");
        let b_key = fs::read(path(dir.path(), "b")).expect("read b");
        assert_eq!(keys.check("a", &text), Proof::Matches);
        assert_eq!(keys.check("a", b""), Proof::Missing);
        assert_eq!(keys.check("a", &text[..63]), Proof::Mismatch);
        assert_eq!(keys.check("a", &b_key), Proof::Mismatch, "another VM's key");
        let mut longer = text.clone();
        longer.push(b'0');
        assert_eq!(keys.check("a", &longer), Proof::Mismatch);
        for at in [0, 10, 31, 32, 63] {
            let mut flipped = text.clone();
            flipped[at] ^= 1;
            assert_eq!(keys.check("a", &flipped), Proof::Mismatch, "byte {at}");
        }
        assert_eq!(keys.check("a", &vec![b'a'; 100_000]), Proof::Mismatch);
        assert_eq!(keys.check("c", &text), Proof::NotRequired);
        // A reload that drops the requirement, then brings it back: the
        // key held is the same.
        assert!(keys.ensure(dir.path(), ["b"]).is_empty());
        assert!(!keys.requires("a"));
        assert_eq!(keys.check("a", b""), Proof::NotRequired);
        assert!(keys.ensure(dir.path(), ["a", "b"]).is_empty());
        assert_eq!(keys.check("a", &text), Proof::Matches);
    }

    #[test]
    fn unsafe_or_malformed_files_are_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join(DIR);
        fs::DirBuilder::new().mode(0o700).create(&d).expect("mkdir");
        let cases: [(&str, &[u8], u32, &str); 4] = [
            ("short", b"abc", 0o600, "64 lowercase hex"),
            ("upper", &[b'A'; 64], 0o600, "64 lowercase hex"),
            ("wide", &[b'a'; 64], 0o644, "readable or writable by others"),
            ("long", &[b'a'; 65], 0o600, "64 lowercase hex"),
        ];
        for (vm, content, mode, want) in cases {
            let p = d.join(vm);
            fs::write(&p, content).expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            let e = load_or_make(dir.path(), vm).expect_err(vm).to_string();
            assert!(e.contains(want), "{vm}: {e}");
            assert_eq!(
                fs::read(&p).expect("kept"),
                content,
                "{vm}: the file is kept"
            );
        }
        std::os::unix::fs::symlink("/etc/hostname", d.join("link")).expect("symlink");
        let e = load_or_make(dir.path(), "link")
            .expect_err("symlink")
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let e = load_or_make(dir.path(), "new")
            .expect_err("open dir")
            .to_string();
        assert!(e.contains("mode 0755"), "{e}");
        assert!(
            !d.join("new").exists(),
            "nothing is made in an open directory"
        );
    }

    #[test]
    fn a_vm_whose_key_cannot_be_had_is_reported_and_gets_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join(DIR);
        fs::DirBuilder::new().mode(0o700).create(&d).expect("mkdir");
        fs::write(d.join("bad"), b"x").expect("write");
        fs::set_permissions(d.join("bad"), fs::Permissions::from_mode(0o600)).expect("chmod");
        let keys = LaunchKeys::default();
        let failed = keys.ensure(dir.path(), ["bad", "good"]);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "bad");
        assert!(keys.requires("bad"));
        assert_eq!(keys.check("bad", b"x"), Proof::NoHostKey);
        let good = fs::read(path(dir.path(), "good")).expect("read");
        assert_eq!(keys.check("good", &good), Proof::Matches);
    }
}
