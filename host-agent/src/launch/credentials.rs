//! The credentials passed at launch: their names checked, their values
//! read from `$CREDENTIALS_DIRECTORY` without blocking and within bounds.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use vmcred_proto::rules::{self, BOOTSTRAP_CREDENTIAL};
use zeroize::Zeroizing;

use super::{BootCredential, LaunchError, LaunchInput, Payload};

/// Characters a boot credential name may not contain: `=` ends the name in
/// an OEM string; the others are option syntax of the hypervisors and of
/// the kernel command line's quoting.
const FORBIDDEN_NAME_CHARS: &[char] = &['=', ',', '[', ']', '"'];

/// Names: systemd's rules, not reserved, no option-syntax characters,
/// unique.
pub(crate) fn check_names(vm: &str, creds: &[BootCredential]) -> Result<(), LaunchError> {
    let mut seen = std::collections::BTreeSet::new();
    for c in creds {
        rules::validate_name(&c.name).map_err(|source| LaunchError::BadName {
            vm: vm.to_string(),
            source,
        })?;
        if c.name == BOOTSTRAP_CREDENTIAL {
            return Err(LaunchError::ReservedName {
                vm: vm.to_string(),
                name: c.name.clone(),
            });
        }
        if let Some(ch) = c.name.chars().find(|ch| FORBIDDEN_NAME_CHARS.contains(ch)) {
            return Err(LaunchError::UnsafeName {
                vm: vm.to_string(),
                name: c.name.clone(),
                ch,
            });
        }
        if !seen.insert(c.name.as_str()) {
            return Err(LaunchError::Duplicate {
                vm: vm.to_string(),
                name: c.name.clone(),
            });
        }
    }
    Ok(())
}

/// The bootstrap (first) and every boot credential, values read from the
/// credentials directory and size-checked.
pub(crate) fn payloads(input: &LaunchInput) -> Result<Vec<Payload>, LaunchError> {
    let bootstrap = input.bootstrap.encode();
    let mut sizes = vec![bootstrap.len()];
    let mut out = vec![Payload {
        name: BOOTSTRAP_CREDENTIAL.to_string(),
        value: Zeroizing::new(bootstrap.into_bytes()),
        secret: false,
    }];
    if input.boot_credentials.is_empty() {
        return Ok(out);
    }
    let Some(dir) = &input.credentials_dir else {
        let names: Vec<&str> = input
            .boot_credentials
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        return Err(LaunchError::NoCredentialsDirectory {
            vm: input.vm.clone(),
            names: names.join(", "),
            first: names.first().copied().unwrap_or_default().to_string(),
        });
    };
    for c in &input.boot_credentials {
        let value = read_credential(&input.vm, dir, &c.name)?;
        sizes.push(value.len());
        rules::validate_total(sizes.iter().copied()).map_err(|source| LaunchError::Size {
            vm: input.vm.clone(),
            source,
        })?;
        out.push(Payload {
            name: c.name.clone(),
            value,
            secret: true,
        });
    }
    Ok(out)
}

/// Reads `dir/name`: not following a symlink, not blocking on a FIFO, only
/// a regular file, at most 1 MiB, into a buffer that is wiped on drop and
/// never reallocated.
fn read_credential(vm: &str, dir: &Path, name: &str) -> Result<Zeroizing<Vec<u8>>, LaunchError> {
    let path = dir.join(name);
    let fail = |source: io::Error| LaunchError::ReadCredential {
        vm: vm.to_string(),
        name: name.to_string(),
        path: path.clone(),
        source,
    };
    let not_regular = |what| LaunchError::NotRegularFile {
        vm: vm.to_string(),
        name: name.to_string(),
        path: path.clone(),
        what,
    };
    let mut file = match OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO must not hang; it is refused below.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LaunchError::MissingCredential {
                vm: vm.to_string(),
                name: name.to_string(),
                path,
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_regular("a symbolic link"))
        }
        Err(e) => return Err(fail(e)),
    };
    let meta = file.metadata().map_err(fail)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(not_regular(if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        }));
    }
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    rules::validate_size(name, len).map_err(|source| LaunchError::Size {
        vm: vm.to_string(),
        source,
    })?;
    // One byte more than expected, to notice a file that grew.
    let mut buf = Zeroizing::new(vec![0u8; len + 1]);
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
    if filled > len {
        return Err(LaunchError::ChangedWhileReading {
            vm: vm.to_string(),
            name: name.to_string(),
            path,
        });
    }
    buf.truncate(filled);
    Ok(buf)
}
