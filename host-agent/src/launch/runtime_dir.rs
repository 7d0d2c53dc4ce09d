//! The private directory for the files a hypervisor reads (qemu's SMBIOS
//! and fw_cfg files, firecracker's config copy).
//!
//! `microvm@<vm>.service` runs the hypervisor as `User=microvm`, which
//! cannot create anything under `/run`; systemd's `RuntimeDirectory=` on
//! that unit gives it one, owned by that user. Every file may hold a
//! secret, and file names are the same for every VM (`NN-<cred>.<ext>`),
//! so the files always go in a directory of the VM's own, `<base>/<vm>`,
//! private to the current user: two VMs given one base directory (one
//! `$VMCRED_LAUNCH_RUNTIME_DIR` for all, microvm.nix starting them in
//! parallel) never see, replace or remove each other's files.
//!
//! The hypervisor opens these files by path after `exec`, so nobody but
//! root and the current user may be able to change what a path names:
//! every directory a lookup of the base passes through must belong to
//! root or the current user and, if group or others may write to it,
//! carry the sticky bit (so that only an entry's owner may rename or
//! remove it, as in `/tmp`).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::LaunchError;

/// Root's base directory; its launches keep their files in `<this>/<vm>`.
pub const ROOT_DEFAULT: &str = "/run/vmcred/launch";

/// Suffixes of the files a launch writes; an earlier launch's are removed.
pub(crate) const STALE_SUFFIXES: &[&str] = &[".smbios", ".fw_cfg", ".firecracker.json"];

/// Symbolic links followed while checking a path, as the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// The base directory, by precedence: `--runtime-dir`,
/// `$VMCRED_LAUNCH_RUNTIME_DIR`, the first entry of `$RUNTIME_DIRECTORY`,
/// then `/run/vmcred/launch` only for root. The files go in `<base>/<vm>`
/// ([`prepare`]). `None`: none applies (an error once a file is needed).
pub fn choose(
    given: Option<PathBuf>,
    env_launch_dir: Option<&OsStr>,
    env_runtime_directory: Option<&OsStr>,
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
        .or_else(|| is_root.then(|| PathBuf::from(ROOT_DEFAULT)))
}

/// Makes `<base>/<vm>` ready and returns it: the base is created 0700 if
/// missing (its parents too) and must be a real directory of the current
/// user that group and others cannot write to, reached only through
/// directories nobody else can change; `<base>/<vm>` is created 0700 if
/// missing and must be a real directory of the current user with no
/// access for group or others. Files an earlier launch of this VM left
/// there are removed; nothing outside it is touched.
pub fn prepare(base: &Path, vm: &str) -> Result<PathBuf, LaunchError> {
    if vm.is_empty() || vm.starts_with('.') || vm.contains('/') {
        return Err(LaunchError::RuntimeDir {
            path: base.to_path_buf(),
            problem: format!(
                "VM name {vm:?} cannot name a directory in it (empty, starts with '.' or holds '/')"
            ),
        });
    }
    let base = if base.is_absolute() {
        base.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|source| LaunchError::RuntimeDirIo {
            path: base.to_path_buf(),
            source,
        })?;
        cwd.join(base)
    };
    let me = nix::unistd::geteuid().as_raw();
    // What exists must be safe before anything is created through it.
    check_lookup(&base, me, true)?;
    create_private_dir(&base, true)?;
    check_lookup(&base, me, false)?;
    check_owned(&base, me, 0o022, "group or others can write to it")?;

    let dir = base.join(vm);
    create_private_dir(&dir, false)?;
    check_owned(&dir, me, 0o077, "group or others have access")?;
    let io_fail = |source| LaunchError::RuntimeDirIo {
        path: dir.clone(),
        source,
    };
    for entry in fs::read_dir(&dir).map_err(io_fail)? {
        let entry = entry.map_err(io_fail)?;
        let name = entry.file_name();
        if STALE_SUFFIXES
            .iter()
            .any(|s| name.as_bytes().ends_with(s.as_bytes()))
        {
            fs::remove_file(entry.path()).map_err(io_fail)?;
        }
    }
    Ok(dir)
}

/// Creates `dir` with mode 0700 if it is missing (with `parents`, its
/// missing parents too, with the usual mode).
fn create_private_dir(dir: &Path, parents: bool) -> Result<(), LaunchError> {
    let io_fail = |source| LaunchError::RuntimeDirIo {
        path: dir.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(dir) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_fail(e)),
    }
    if parents {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_fail)?;
        }
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        // Not subject to the umask.
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_fail),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_fail(e)),
    }
}

/// Refuses `dir` unless it is a real directory (not a symbolic link) of
/// user `me` with none of the `forbidden` mode bits.
fn check_owned(dir: &Path, me: u32, forbidden: u32, why: &str) -> Result<(), LaunchError> {
    let refuse = |problem: String| LaunchError::RuntimeDir {
        path: dir.to_path_buf(),
        problem,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| LaunchError::RuntimeDirIo {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link; refusing to write through it".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("exists and is not a directory".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!(
            "is owned by uid {}, not by this user (uid {me}); it must belong to the user the hypervisor runs as (RuntimeDirectory= on the VM's unit does that)",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & forbidden != 0 {
        return Err(refuse(format!(
            "has mode {mode:04o} ({why}); it must be 0700: chmod 0700 it, or set RuntimeDirectoryMode=0700 on the VM's unit"
        )));
    }
    Ok(())
}

/// Walks `path` as the kernel resolves it (from `/`, following symbolic
/// links) and refuses it if a directory the lookup passes through could
/// be changed by a user other than root and `me`: one owned by another
/// user, or one group or others can write to without the sticky bit.
/// With `allow_missing`, a missing component ends the walk (what follows
/// is created by us).
fn check_lookup(path: &Path, me: u32, allow_missing: bool) -> Result<(), LaunchError> {
    let refuse = |problem: String| LaunchError::RuntimeDir {
        path: path.to_path_buf(),
        problem,
    };
    let io_fail = |at: &Path, source| LaunchError::RuntimeDirIo {
        path: at.to_path_buf(),
        source,
    };
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front(&mut pending, path);
    // Always a real directory reached through checked ones.
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == "." {
            continue;
        }
        if name == ".." {
            cur.pop();
            continue;
        }
        let meta = fs::symlink_metadata(&cur).map_err(|e| io_fail(&cur, e))?;
        if let Some(problem) = changeable_by_others(&meta, me) {
            return Err(refuse(format!(
                "{} {problem}, so another user could replace what it holds; use a directory whose every parent belongs to root or this user (uid {me})",
                cur.display()
            )));
        }
        let next = cur.join(&name);
        let meta = match fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if allow_missing && e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_fail(&next, e)),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(refuse(format!(
                    "more than {MAX_SYMLINKS} symbolic links on the way"
                )));
            }
            let target = fs::read_link(&next).map_err(|e| io_fail(&next, e))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_front(&mut pending, &target);
        } else if meta.is_dir() {
            cur = next;
        } else if pending.iter().any(|c| c != "." && c != "..") {
            return Err(refuse(format!("{} is not a directory", next.display())));
        } else {
            // The last component: the caller says what is wrong with it.
            return Ok(());
        }
    }
    Ok(())
}

/// Puts the components of `path` (without its root) before `pending`.
fn push_front(pending: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => pending.push_front(n.to_os_string()),
            Component::CurDir => pending.push_front(".".into()),
            Component::ParentDir => pending.push_front("..".into()),
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
}

/// Why another user could change the entries of this directory, if one
/// could.
fn changeable_by_others(meta: &Metadata, me: u32) -> Option<String> {
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    if uid != 0 && uid != me {
        return Some(format!("is owned by uid {uid}"));
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Some(format!(
            "has mode {mode:04o} (group or others can write to it, and it is not sticky)"
        ));
    }
    None
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
