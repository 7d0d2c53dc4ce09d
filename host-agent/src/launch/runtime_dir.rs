//! The private directory for the files a hypervisor reads (qemu's SMBIOS
//! and fw_cfg files, firecracker's config copy).
//!
//! `microvm@<vm>.service` runs the hypervisor as `User=microvm`, which
//! cannot create anything under `/run`; systemd's `RuntimeDirectory=` on
//! that unit gives it one, owned by that user. The directory must be
//! private to the current user: every file in it may hold a secret.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::LaunchError;

/// Where root's launches keep their files, one directory per VM.
pub const ROOT_DEFAULT: &str = "/run/vmcred/launch";

/// Suffixes of the files a launch writes; an earlier launch's are removed.
pub(crate) const STALE_SUFFIXES: &[&str] = &[".smbios", ".fw_cfg", ".firecracker.json"];

/// The runtime directory, by precedence: `--runtime-dir`,
/// `$VMCRED_LAUNCH_RUNTIME_DIR`, the first entry of `$RUNTIME_DIRECTORY`
/// (as is: the unit names it per VM), then `/run/vmcred/launch/<vm>` only
/// for root. `None`: none applies (an error once a file is needed).
pub fn choose(
    given: Option<PathBuf>,
    env_launch_dir: Option<&OsStr>,
    env_runtime_directory: Option<&OsStr>,
    vm: &str,
    is_root: bool,
) -> Option<PathBuf> {
    let non_empty = |s: &&OsStr| !s.is_empty();
    given
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| env_launch_dir.filter(non_empty).map(PathBuf::from))
        .or_else(|| {
            env_runtime_directory.and_then(|d| {
                // systemd passes several, separated by ':'.
                let first = d.as_bytes().split(|b| *b == b':').next()?;
                (!first.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(first)))
            })
        })
        .or_else(|| is_root.then(|| Path::new(ROOT_DEFAULT).join(vm)))
}

/// Creates the directory 0700 if missing (its parents too); refuses one
/// that is a symlink, not a directory, not ours or open to group or
/// others; removes files an earlier launch left.
pub fn prepare(dir: &Path) -> Result<(), LaunchError> {
    let io_fail = |source| LaunchError::RuntimeDirIo {
        path: dir.to_path_buf(),
        source,
    };
    let refuse = |problem: String| LaunchError::RuntimeDir {
        path: dir.to_path_buf(),
        problem,
    };
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_fail)?;
            }
            match DirBuilder::new().mode(0o700).create(dir) {
                // Not subject to the umask.
                Ok(()) => {
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_fail)?
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_fail(e)),
            }
        }
        Err(e) => return Err(io_fail(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_fail)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link; refusing to write through it".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("exists and is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(format!(
            "is owned by uid {}, not by this user (uid {me}); it must belong to the user the hypervisor runs as (RuntimeDirectory= on the VM's unit does that)",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "has mode {mode:04o}; it must be 0700 (no access for group or others): chmod 0700 it, or set RuntimeDirectoryMode=0700 on the VM's unit"
        )));
    }
    for entry in fs::read_dir(dir).map_err(io_fail)? {
        let entry = entry.map_err(io_fail)?;
        let name = entry.file_name();
        if STALE_SUFFIXES
            .iter()
            .any(|s| name.as_bytes().ends_with(s.as_bytes()))
        {
            fs::remove_file(entry.path()).map_err(io_fail)?;
        }
    }
    Ok(())
}

/// Creates `path` (which must not exist, and is not followed if a link)
/// with mode 0400 and `content`.
pub fn write_private_file(path: &Path, content: &[u8]) -> Result<(), LaunchError> {
    let fail = |source| LaunchError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(fail)?;
    file.set_permissions(fs::Permissions::from_mode(0o400))
        .map_err(fail)?;
    file.write_all(content).map_err(fail)?;
    Ok(())
}

/// A credential name reduced to characters that are harmless in a file
/// name and in a qemu option.
pub(crate) fn file_name_part(name: &str) -> String {
    name.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
