//! The credentials passed at launch: their names checked, their values
//! read from `$CREDENTIALS_DIRECTORY` without blocking and within bounds.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use vmcred_proto::rules::{self, BOOTSTRAP_CREDENTIAL, LAUNCH_KEY_CREDENTIAL};
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
        let reserved_for = match c.name.as_str() {
            BOOTSTRAP_CREDENTIAL => Some("vmcred's own bootstrap"),
            LAUNCH_KEY_CREDENTIAL => Some("the VM's launch key, which vmcred passes itself when the VM has launch_key = \"required\""),
            _ => None,
        };
        if let Some(reserved_for) = reserved_for {
            return Err(LaunchError::ReservedName {
                vm: vm.to_string(),
                name: c.name.clone(),
                reserved_for,
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

/// The bootstrap (first), the launch key if the VM has one, and every boot
/// credential, values read from the credentials directory and
/// size-checked. The launch key is not one of the VM's credentials, so it
/// does not count towards their total.
pub(crate) fn payloads(input: &LaunchInput) -> Result<Vec<Payload>, LaunchError> {
    let bootstrap = input.bootstrap.encode();
    let mut sizes = vec![bootstrap.len()];
    let mut out = vec![Payload {
        name: BOOTSTRAP_CREDENTIAL.to_string(),
        value: Zeroizing::new(bootstrap.into_bytes()),
        secret: false,
    }];
    out.extend(super::launch_key::payload(input)?);
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
        let value = read_credential(&input.vm, dir, &c.name, |len| {
            rules::validate_size(&c.name, len)
        })
        .map_err(|e| match e {
            ReadError::Missing(path) => LaunchError::MissingCredential {
                vm: input.vm.clone(),
                name: c.name.clone(),
                path,
            },
            ReadError::TooLarge(source) => LaunchError::Size {
                vm: input.vm.clone(),
                source,
            },
            ReadError::Other(e) => e,
        })?;
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

/// Why [`read_credential`] read nothing: the two cases its callers word
/// themselves, and the rest.
pub(crate) enum ReadError<E> {
    /// No such file (the path).
    Missing(std::path::PathBuf),
    /// The size check refused the file's length.
    TooLarge(E),
    Other(LaunchError),
}

/// Reads `dir/name`: not following a symlink, not blocking on a FIFO, only
/// a regular file whose length `check_len` accepts, into a buffer that is
/// wiped on drop and never reallocated.
pub(crate) fn read_credential<E>(
    vm: &str,
    dir: &Path,
    name: &str,
    check_len: impl FnOnce(usize) -> Result<(), E>,
) -> Result<Zeroizing<Vec<u8>>, ReadError<E>> {
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing(path)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadError::Other(not_regular("a symbolic link")))
        }
        Err(e) => return Err(ReadError::Other(fail(e))),
    };
    let meta = file.metadata().map_err(|e| ReadError::Other(fail(e)))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(ReadError::Other(not_regular(if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        })));
    }
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    check_len(len).map_err(ReadError::TooLarge)?;
    // One byte more than expected, to notice a file that grew.
    let mut buf = Zeroizing::new(vec![0u8; len + 1]);
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Other(fail(e))),
        }
    }
    if filled > len {
        return Err(ReadError::Other(LaunchError::ChangedWhileReading {
            vm: vm.to_string(),
            name: name.to_string(),
            path,
        }));
    }
    buf.truncate(filled);
    Ok(buf)
}
