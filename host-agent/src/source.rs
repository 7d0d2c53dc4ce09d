//! Reading credential values on the host. Values go straight into zeroizing
//! buffers and are bounded while reading, so a runaway source (a device, a
//! huge file) costs at most 1 MiB + 1 byte.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vmcred_proto::rules::{self, MAX_CREDENTIAL_BYTES};
use zeroize::Zeroizing;

use crate::config::{Credential, Source, Vm};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SourceError {
    #[error("source {source_desc} does not exist (yet)")]
    Missing { source_desc: String },
    #[error("cannot read source {source_desc}: {why}")]
    Unreadable { source_desc: String, why: String },
    #[error("source {source_desc} is not a regular file")]
    NotAFile { source_desc: String },
    #[error("$CREDENTIALS_DIRECTORY is not set, but credential {name} is configured as credential = \"{id}\"; add LoadCredential={id}:SOURCE to vmcred-host.service")]
    NoCredentialsDirectory { name: String, id: String },
    #[error(transparent)]
    Rule(#[from] rules::RuleError),
}

/// One credential's value as read now.
pub struct Value {
    pub bytes: Zeroizing<Vec<u8>>,
    pub digest: [u8; 32],
}

/// The path a credential's value is read from.
pub fn resolve(cred: &Credential, credentials_dir: Option<&Path>) -> Result<PathBuf, SourceError> {
    match &cred.source {
        Source::Path(p) => Ok(p.clone()),
        Source::Credential(id) => {
            credentials_dir
                .map(|d| d.join(id))
                .ok_or_else(|| SourceError::NoCredentialsDirectory {
                    name: cred.name.clone(),
                    id: id.clone(),
                })
        }
    }
}

/// Reads one credential. Symlinks are followed on purpose: sops-nix and
/// clan publish secrets as links into a generation directory.
pub fn read(cred: &Credential, credentials_dir: Option<&Path>) -> Result<Value, SourceError> {
    let path = resolve(cred, credentials_dir)?;
    let desc = cred.source.to_string();
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Missing { source_desc: desc })
        }
        Err(e) => {
            return Err(SourceError::Unreadable {
                source_desc: desc,
                why: e.to_string(),
            })
        }
    };
    let meta = file.metadata().map_err(|e| SourceError::Unreadable {
        source_desc: desc.clone(),
        why: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(SourceError::NotAFile { source_desc: desc });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(
        (meta.len() as usize).min(MAX_CREDENTIAL_BYTES) + 1,
    ));
    file.take(MAX_CREDENTIAL_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SourceError::Unreadable {
            source_desc: desc,
            why: e.to_string(),
        })?;
    rules::validate_size(&cred.name, bytes.len())?;
    let digest = rules::digest(&bytes);
    Ok(Value { bytes, digest })
}

/// Reads the named credentials of a VM (all when `only` is empty). Values
/// that cannot be read are reported per name, not fatal: a late credential
/// whose file does not exist yet must not block the others.
pub fn read_vm(
    vm: &Vm,
    only: &[String],
    credentials_dir: Option<&Path>,
) -> (BTreeMap<String, Value>, BTreeMap<String, SourceError>) {
    let mut values = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (name, cred) in &vm.credentials {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        match read(cred, credentials_dir) {
            Ok(v) => {
                values.insert(name.clone(), v);
            }
            Err(e) => {
                errors.insert(name.clone(), e);
            }
        }
    }
    // The guest's mount holds 1 MiB in all: refuse a set that cannot fit,
    // before any byte of it leaves the host.
    if let Err(e) = rules::validate_total(values.values().map(|v| v.bytes.len())) {
        for name in values.keys() {
            errors.insert(name.clone(), SourceError::Rule(e.clone()));
        }
        values.clear();
    }
    (values, errors)
}

/// `$CREDENTIALS_DIRECTORY` of this process, if systemd set it.
pub fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Credential;

    fn cred(name: &str, source: Source) -> Credential {
        Credential {
            name: name.into(),
            source,
            boot: false,
            allow_on_command_line: false,
        }
    }

    #[test]
    fn reads_paths_and_credentials_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"v1").unwrap();
        let v = read(&cred("A", Source::Path(d.path().join("f"))), None).unwrap();
        assert_eq!(&v.bytes[..], b"v1");
        assert_eq!(v.digest, rules::digest(b"v1"));
        let v = read(&cred("A", Source::Credential("f".into())), Some(d.path())).unwrap();
        assert_eq!(&v.bytes[..], b"v1");
        let e = read(&cred("A", Source::Credential("f".into())), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("LoadCredential=f:"), "{e}");
    }

    #[test]
    fn missing_oversized_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let e = read(&cred("A", Source::Path(d.path().join("nope"))), None)
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::Missing { .. }));
        let e = read(&cred("A", Source::Path(d.path().to_path_buf())), None)
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::NotAFile { .. }));
        std::fs::write(d.path().join("big"), vec![b'x'; MAX_CREDENTIAL_BYTES + 1]).unwrap();
        let e = read(&cred("A", Source::Path(d.path().join("big"))), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("1 MiB"), "{e}");
    }
}
