//! `vmcred-host launch`: the hypervisor wrapper.
//!
//! It runs as the hypervisor's user just before the hypervisor, reads the
//! VM's boot-time credentials from `$CREDENTIALS_DIRECTORY` (what
//! `LoadCredential=` on the VM's unit provided), and adds them, with the
//! public `vmcred.bootstrap`, to the hypervisor's SMBIOS type 11 OEM strings,
//! where the guest's PID 1 imports them into `/run/credentials/@system`.
//!
//! - qemu reads each OEM string from a file (`-smbios type=11,path=FILE`), so
//!   no value reaches its command line. The files live in a private 0700
//!   runtime directory, each 0400.
//! - cloud-hypervisor only takes OEM strings on its command line, inside its
//!   one `--platform ...,oem_strings=[a,b]`. The public bootstrap always goes
//!   there; a secret goes there only if the user marked it
//!   `allow_on_command_line`, and then with a warning.
//!
//! Values are encoded in systemd's binary form
//! (`io.systemd.credential.binary:NAME=<base64>`), which carries any bytes
//! and never contains `,`, `[`, `]`, `"` or white space, so it survives both
//! hypervisors' option syntax. No value ever appears in an error or warning.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use thiserror::Error;
use vmcred_proto::bootstrap::Bootstrap;
use vmcred_proto::rules::{self, RuleError, BOOTSTRAP_CREDENTIAL};
use zeroize::Zeroizing;

/// Prefix of a text credential in an SMBIOS OEM string.
const TEXT_PREFIX: &str = "io.systemd.credential:";
/// Prefix of a base64-encoded credential in an SMBIOS OEM string.
const BINARY_PREFIX: &str = "io.systemd.credential.binary:";
/// qemu's fw_cfg name prefix for systemd credentials.
const FW_CFG_PREFIX: &str = "opt/io.systemd.credentials/";
/// Characters a boot credential name may not contain: `=` ends the name in
/// an OEM string; the others are cloud-hypervisor option syntax.
const FORBIDDEN_NAME_CHARS: &[char] = &['=', ',', '[', ']', '"'];
/// How long `notify_launched` waits for the agent, in all.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest reply line `notify_launched` reads.
const NOTIFY_REPLY_MAX: usize = 1024;

/// The hypervisor whose argv is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hypervisor {
    /// cloud-hypervisor: OEM strings in `--platform oem_strings=[...]`.
    #[value(name = "cloud-hypervisor")]
    CloudHypervisor,
    /// qemu (`qemu-system-*`, `qemu-kvm`): `-smbios type=11,path=FILE`.
    #[value(name = "qemu")]
    Qemu,
}

impl Hypervisor {
    /// Guesses the hypervisor from the program name (`argv[0]`): basename
    /// `cloud-hypervisor`, `qemu-system-*` or `qemu-kvm`, also as Nix's
    /// `.NAME-wrapped`.
    pub fn guess(program: &OsStr) -> Option<Hypervisor> {
        let base = Path::new(program).file_name()?.to_str()?;
        let base = base
            .strip_prefix('.')
            .and_then(|b| b.strip_suffix("-wrapped"))
            .unwrap_or(base);
        if base == "cloud-hypervisor" {
            Some(Hypervisor::CloudHypervisor)
        } else if base == "qemu-kvm" || base.starts_with("qemu-system-") {
            Some(Hypervisor::Qemu)
        } else {
            None
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Qemu => "qemu",
        })
    }
}

impl FromStr for Hypervisor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cloud-hypervisor" => Ok(Hypervisor::CloudHypervisor),
            "qemu" => Ok(Hypervisor::Qemu),
            _ => Err(format!(
                "unknown hypervisor {:?}: expected cloud-hypervisor or qemu",
                rules::display_name(s)
            )),
        }
    }
}

/// The hypervisor to use: the one given with `--hypervisor`, else the one
/// guessed from `argv[0]`, else an error asking for `--hypervisor`.
pub fn resolve_hypervisor(
    given: Option<Hypervisor>,
    argv: &[OsString],
) -> Result<Hypervisor, LaunchError> {
    if let Some(h) = given {
        return Ok(h);
    }
    let program = argv.first().ok_or(LaunchError::NoCommand)?;
    Hypervisor::guess(program).ok_or_else(|| LaunchError::UnknownHypervisor {
        program: PathBuf::from(program),
    })
}

/// A credential the VM gets at boot (`boot = true` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCredential {
    pub name: String,
    /// cloud-hypervisor only: the user accepts this value on its argv.
    pub allow_on_command_line: bool,
}

/// Everything `prepare` needs; filled from the host config and the CLI.
#[derive(Debug, Clone)]
pub struct LaunchInput {
    pub vm: String,
    pub hypervisor: Hypervisor,
    pub bootstrap: Bootstrap,
    pub boot_credentials: Vec<BootCredential>,
    /// `$CREDENTIALS_DIRECTORY` of the VM's unit: boot credential `NAME` is
    /// read from `credentials_dir/NAME`.
    pub credentials_dir: Option<PathBuf>,
    /// Private directory for qemu's OEM string files.
    pub runtime_dir: PathBuf,
    /// The hypervisor argv, `argv[0]` being the binary.
    pub argv: Vec<OsString>,
}

/// The rewritten argv, ready for `exec`, and what to warn the user about.
/// For cloud-hypervisor the argv can hold values marked
/// `allow_on_command_line`, so `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Prepared {
    pub argv: Vec<OsString>,
    pub warnings: Vec<String>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("argv", &format_args!("<{} arguments>", self.argv.len()))
            .field("warnings", &self.warnings)
            .finish()
    }
}

/// Why a launch was refused. Never carries a credential value.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("no hypervisor command given: expected `vmcred-host launch --vm NAME -- /path/to/cloud-hypervisor ARGS...`")]
    NoCommand,
    #[error("cannot tell which hypervisor {} is (expected a program named cloud-hypervisor, qemu-system-* or qemu-kvm): pass --hypervisor cloud-hypervisor or --hypervisor qemu", .program.display())]
    UnknownHypervisor { program: PathBuf },
    #[error("VM {vm:?}: boot credential: {source}")]
    BadName { vm: String, source: RuleError },
    #[error("VM {vm:?}: boot credential name {name:?} is reserved for vmcred's own bootstrap")]
    ReservedName { vm: String, name: String },
    #[error("VM {vm:?}: boot credential {name:?} cannot go into SMBIOS OEM strings: its name contains {ch:?} (names of boot credentials may not contain = , [ ] or \")")]
    UnsafeName { vm: String, name: String, ch: char },
    #[error("VM {vm:?}: boot credential {name:?} is listed twice")]
    Duplicate { vm: String, name: String },
    #[error("VM {vm:?} has boot credentials ({names}) but $CREDENTIALS_DIRECTORY is not set: `vmcred-host launch` reads them from the credentials of the VM's systemd unit; add LoadCredential=NAME:SOURCE for each (e.g. LoadCredential={first}:/run/secrets/...) to the VM's unit (microvm@{vm}.service)")]
    NoCredentialsDirectory {
        vm: String,
        names: String,
        first: String,
    },
    #[error("VM {vm:?}: boot credential {name:?} not found at {}: add LoadCredential={name}:SOURCE to the VM's unit (microvm@{vm}.service)", .path.display())]
    MissingCredential {
        vm: String,
        name: String,
        path: PathBuf,
    },
    #[error("VM {vm:?}: boot credential {name:?} at {} is {what}; only a regular file is read", .path.display())]
    NotRegularFile {
        vm: String,
        name: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("VM {vm:?}: cannot read boot credential {name:?} at {}: {source}", .path.display())]
    ReadCredential {
        vm: String,
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("VM {vm:?}: boot credential {name:?} at {} changed while it was read", .path.display())]
    ChangedWhileReading {
        vm: String,
        name: String,
        path: PathBuf,
    },
    #[error("VM {vm:?}: {source}")]
    Size { vm: String, source: RuleError },
    #[error("VM {vm:?}: boot credential{plural} {names} would have to go on cloud-hypervisor's command line, where every local user can read {them} through /proc/PID/cmdline (cloud-hypervisor has no way to read OEM strings from a file). Choose one for each: set allow_on_command_line = true on it in the host config to accept that; or set boot = false so that it arrives over vsock from the host agent right after boot; or run this VM under qemu, which reads OEM strings from private files")]
    CommandLineNotAllowed {
        vm: String,
        names: String,
        plural: &'static str,
        them: &'static str,
    },
    #[error("the {hypervisor} command line already defines credential {name:?} ({place}); systemd keeps the first value of a name, so vmcred will not add a second one: remove it from the hypervisor arguments (vmcred passes it itself)")]
    AlreadyDefined {
        hypervisor: Hypervisor,
        name: String,
        place: &'static str,
    },
    #[error("cloud-hypervisor argv: {0}")]
    Platform(&'static str),
    #[error("runtime directory {}: {problem}", .path.display())]
    RuntimeDir { path: PathBuf, problem: String },
    #[error("runtime directory {}: {source}", .path.display())]
    RuntimeDirIo { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", .path.display())]
    WriteFile { path: PathBuf, source: io::Error },
    #[error("cannot execute {}: {source}", .program.display())]
    Exec { program: PathBuf, source: io::Error },
}

/// One SMBIOS OEM string to add. Its text holds the value, so it is wiped
/// on drop.
struct OemString {
    name: String,
    text: Zeroizing<String>,
    /// A credential value, as opposed to the public bootstrap.
    secret: bool,
}

/// Reads the boot credentials, adds them and the bootstrap as OEM strings
/// to the hypervisor argv (writing qemu's files), and returns the new argv
/// with warnings. Errors name credentials and paths, never values.
pub fn prepare(input: &LaunchInput) -> Result<Prepared, LaunchError> {
    if input.argv.is_empty() {
        return Err(LaunchError::NoCommand);
    }
    check_names(&input.vm, &input.boot_credentials)?;
    let names: Vec<&str> = std::iter::once(BOOTSTRAP_CREDENTIAL)
        .chain(input.boot_credentials.iter().map(|c| c.name.as_str()))
        .collect();
    // Refuse what cannot work before reading any secret.
    match input.hypervisor {
        Hypervisor::Qemu => check_qemu_argv(&input.argv, &names)?,
        Hypervisor::CloudHypervisor => {
            let refused: Vec<&str> = input
                .boot_credentials
                .iter()
                .filter(|c| !c.allow_on_command_line)
                .map(|c| c.name.as_str())
                .collect();
            if !refused.is_empty() {
                let one = refused.len() == 1;
                return Err(LaunchError::CommandLineNotAllowed {
                    vm: input.vm.clone(),
                    names: refused.join(", "),
                    plural: if one { "" } else { "s" },
                    them: if one { "it" } else { "them" },
                });
            }
            // Parsing checks the existing --platform for duplicates.
            if let Some((_, value)) = find_platform(&input.argv)? {
                merge_platform(value, &[], &names)?;
            }
        }
    }

    let strings = oem_strings(input)?;
    let mut warnings = Vec::new();
    let argv = match input.hypervisor {
        Hypervisor::Qemu => apply_qemu(&input.argv, &input.runtime_dir, &strings)?,
        Hypervisor::CloudHypervisor => {
            for s in &strings {
                if s.secret {
                    warnings.push(format!(
                        "credential {} is on cloud-hypervisor's command line, readable by every local user via /proc/PID/cmdline: marked allow_on_command_line",
                        s.name
                    ));
                }
            }
            apply_cloud_hypervisor(&input.argv, &strings, &names)?
        }
    };
    Ok(Prepared { argv, warnings })
}

/// Replaces this process with the hypervisor. Returns only on failure.
pub fn exec(argv: &[OsString]) -> LaunchError {
    let Some((program, args)) = argv.split_first() else {
        return LaunchError::NoCommand;
    };
    let source = Command::new(program).args(args).exec();
    LaunchError::Exec {
        program: PathBuf::from(program),
        source,
    }
}

/// Tells the serving agent, through its launch socket, that `vm` is about
/// to start, so that it dials the guest at once: writes one line
/// `control::Request::Launched` and waits for the reply line; an error reply
/// (an unknown VM, say) is returned. Everything is bounded by one second. A failure is only
/// worth a warning: the agent dials with back-off anyway.
pub fn notify_launched(socket: &Path, vm: &str) -> Result<(), String> {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType};
    let shown = socket.display();
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    // Non-blocking connect: a full backlog gives EAGAIN instead of waiting.
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("launch socket {shown}: cannot create a socket: {e}"))?;
    let addr = nix::sys::socket::UnixAddr::new(socket)
        .map_err(|e| format!("launch socket {shown}: {e}"))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(format!(
                "launch socket {shown}: the agent is not accepting connections (backlog full)"
            ))
        }
        Err(e) => return Err(format!("cannot connect to launch socket {shown}: {e}")),
    }
    let mut stream = UnixStream::from(fd);
    let io_err = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!("launch socket {shown}: no reply within {NOTIFY_TIMEOUT:?}")
        } else {
            format!("launch socket {shown}: {e}")
        }
    };
    stream.set_nonblocking(false).map_err(io_err)?;
    stream
        .set_write_timeout(Some(NOTIFY_TIMEOUT))
        .map_err(io_err)?;
    let request = crate::control::Request::Launched { vm: vm.to_string() };
    let mut line = serde_json::to_vec(&request)
        .map_err(|e| format!("launch socket {shown}: cannot encode the request: {e}"))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;

    let mut reply = [0u8; NOTIFY_REPLY_MAX];
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "launch socket {shown}: no reply within {NOTIFY_TIMEOUT:?}"
            ));
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        match stream.read(&mut reply[filled..]) {
            Ok(0) => {
                return Err(format!(
                    "launch socket {shown}: the agent closed the connection without a reply"
                ))
            }
            Ok(n) => {
                filled += n;
                if let Some(end) = reply[..filled].iter().position(|b| *b == b'\n') {
                    return match serde_json::from_slice::<crate::control::Reply>(&reply[..end]) {
                        Ok(crate::control::Reply::Error(e)) => Err(format!(
                            "launch socket {shown}: the agent answered: {}",
                            crate::vm::guest_text(&e)
                        )),
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("launch socket {shown}: unreadable reply: {e}")),
                    };
                }
                if filled == reply.len() {
                    return Err(format!(
                        "launch socket {shown}: reply line longer than {NOTIFY_REPLY_MAX} bytes"
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// Names: systemd's rules, not reserved, no OEM-syntax characters, unique.
fn check_names(vm: &str, creds: &[BootCredential]) -> Result<(), LaunchError> {
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

/// The bootstrap and every boot credential as OEM strings, values read
/// from the credentials directory and size-checked.
fn oem_strings(input: &LaunchInput) -> Result<Vec<OemString>, LaunchError> {
    let bootstrap = input.bootstrap.encode();
    let mut out = vec![OemString {
        name: BOOTSTRAP_CREDENTIAL.to_string(),
        text: Zeroizing::new(format!("{TEXT_PREFIX}{BOOTSTRAP_CREDENTIAL}={bootstrap}")),
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
    let mut sizes = vec![bootstrap.len()];
    for c in &input.boot_credentials {
        let value = read_credential(&input.vm, dir, &c.name)?;
        sizes.push(value.len());
        rules::validate_total(sizes.iter().copied()).map_err(|source| LaunchError::Size {
            vm: input.vm.clone(),
            source,
        })?;
        out.push(OemString {
            name: c.name.clone(),
            text: encode_binary(&c.name, &value),
            secret: true,
        });
    }
    Ok(out)
}

/// `io.systemd.credential.binary:NAME=<base64>`, built in one allocation
/// so that no unwiped copy of the value is left behind.
fn encode_binary(name: &str, value: &[u8]) -> Zeroizing<String> {
    let b64_len = value.len().div_ceil(3) * 4;
    let mut text = Zeroizing::new(String::with_capacity(
        BINARY_PREFIX.len() + name.len() + 1 + b64_len,
    ));
    text.push_str(BINARY_PREFIX);
    text.push_str(name);
    text.push('=');
    base64::engine::general_purpose::STANDARD.encode_string(value, &mut text);
    text
}

/// Reads `dir/name`: not following a symlink, only a regular file, at most
/// 1 MiB, into a buffer that is wiped on drop and never reallocated.
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

// ---------------------------------------------------------------- qemu --

/// Refuses a qemu argv that already passes one of our credentials through
/// `-smbios type=11,value=...` or `-fw_cfg name=opt/io.systemd.credentials/...`.
fn check_qemu_argv(argv: &[OsString], names: &[&str]) -> Result<(), LaunchError> {
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let opt = arg.as_bytes();
        let is_smbios = opt == b"-smbios" || opt == b"--smbios";
        let is_fw_cfg = opt == b"-fw_cfg" || opt == b"--fw_cfg";
        if !is_smbios && !is_fw_cfg {
            continue;
        }
        let Some(value) = args.next() else { break };
        let value = value.to_string_lossy();
        let params = split_qemu_opts(&value);
        if is_smbios {
            if !params.iter().any(|p| p == "type=11") {
                continue;
            }
            for p in &params {
                if let Some(v) = p.strip_prefix("value=") {
                    if let Some(name) = oem_credential_name(v) {
                        if names.contains(&name) {
                            return Err(LaunchError::AlreadyDefined {
                                hypervisor: Hypervisor::Qemu,
                                name: name.to_string(),
                                place: "in -smbios type=11,value=...",
                            });
                        }
                    }
                }
            }
        } else {
            // `-fw_cfg [name=]NAME,file=F`: the name may be implicit.
            let fw_name = params.iter().enumerate().find_map(|(i, p)| {
                p.strip_prefix("name=")
                    .or_else(|| (i == 0 && !p.contains('=')).then_some(p.as_str()))
            });
            if let Some(name) = fw_name.and_then(|n| n.strip_prefix(FW_CFG_PREFIX)) {
                if names.contains(&name) {
                    return Err(LaunchError::AlreadyDefined {
                        hypervisor: Hypervisor::Qemu,
                        name: name.to_string(),
                        place: "in -fw_cfg name=opt/io.systemd.credentials/...",
                    });
                }
            }
        }
    }
    Ok(())
}

/// Splits a qemu option string on `,`, where `,,` is a literal comma.
fn split_qemu_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

/// The credential name an OEM string defines, if it is a systemd one.
fn oem_credential_name(entry: &str) -> Option<&str> {
    let entry = entry.trim_start();
    let rest = entry
        .strip_prefix(BINARY_PREFIX)
        .or_else(|| entry.strip_prefix(TEXT_PREFIX))?;
    Some(rest.split('=').next().unwrap_or(rest))
}

/// Writes one file per OEM string into the private runtime directory and
/// appends `-smbios type=11,path=FILE` for each.
fn apply_qemu(
    argv: &[OsString],
    dir: &Path,
    strings: &[OemString],
) -> Result<Vec<OsString>, LaunchError> {
    prepare_runtime_dir(dir)?;
    let mut out = argv.to_vec();
    for (i, s) in strings.iter().enumerate() {
        let path = dir.join(format!("{i:02}-{}.smbios", file_name_part(&s.name)));
        write_private_file(&path, s.text.as_bytes())?;
        let mut opt = b"type=11,path=".to_vec();
        for &b in path.as_os_str().as_bytes() {
            // qemu splits options on ','; ',,' is a literal comma.
            if b == b',' {
                opt.push(b',');
            }
            opt.push(b);
        }
        out.push("-smbios".into());
        out.push(OsString::from_vec(opt));
    }
    Ok(out)
}

/// A credential name reduced to characters that are harmless in a file
/// name and a qemu option.
fn file_name_part(name: &str) -> String {
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

/// Creates the runtime directory 0700 if needed; refuses one that is a
/// symlink, not ours or open to others; removes stale `*.smbios` files.
fn prepare_runtime_dir(dir: &Path) -> Result<(), LaunchError> {
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
            "is owned by uid {}, not by this user (uid {me}); it must be private to the hypervisor's user",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "has mode {mode:04o}; it must be 0700 (no access for group or others)"
        )));
    }
    for entry in fs::read_dir(dir).map_err(io_fail)? {
        let entry = entry.map_err(io_fail)?;
        if entry.file_name().as_bytes().ends_with(b".smbios") {
            fs::remove_file(entry.path()).map_err(io_fail)?;
        }
    }
    Ok(())
}

/// Creates `path` (which must not exist) with mode 0400 and `content`.
fn write_private_file(path: &Path, content: &[u8]) -> Result<(), LaunchError> {
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

// ---------------------------------------------------- cloud-hypervisor --

/// Where the one `--platform` value is: `(index, value)`, where the value is
/// `argv[index]` itself minus `--platform=`, or `argv[index]` after a
/// separate `--platform`.
enum PlatformArg {
    Separate(usize),
    Inline(usize),
}

fn find_platform(argv: &[OsString]) -> Result<Option<(PlatformArg, &str)>, LaunchError> {
    let mut found = None;
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].as_bytes();
        let hit = if arg == b"--platform" {
            if i + 1 >= argv.len() {
                return Err(LaunchError::Platform("--platform has no value"));
            }
            i += 1;
            Some((PlatformArg::Separate(i), argv[i].as_os_str()))
        } else {
            arg.strip_prefix(b"--platform=")
                .map(|v| (PlatformArg::Inline(i), OsStr::from_bytes(v)))
        };
        if let Some((at, value)) = hit {
            if found.is_some() {
                return Err(LaunchError::Platform(
                    "--platform is given more than once; cloud-hypervisor takes one",
                ));
            }
            let value = value
                .to_str()
                .ok_or(LaunchError::Platform("the --platform value is not UTF-8"))?;
            found = Some((at, value));
        }
        i += 1;
    }
    Ok(found)
}

/// Splits an option value on commas outside brackets and quotes, as
/// cloud-hypervisor's option parser does; each piece keeps its text.
fn split_ch_top_level(value: &str) -> Result<Vec<&str>, LaunchError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(LaunchError::Platform(
                        "the --platform value has an unmatched ']'",
                    ));
                }
            }
            '"' => quoted = !quoted,
            ',' if depth == 0 && !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || quoted {
        return Err(LaunchError::Platform(
            "the --platform value has an unmatched '[' or '\"'",
        ));
    }
    out.push(&value[start..]);
    Ok(out)
}

/// The new `--platform` value: `value` with `ours` appended to its
/// `oem_strings=[...]` (added if missing). Other keys keep their text;
/// existing OEM strings keep their order, as cloud-hypervisor reads them.
/// Refuses an existing OEM string that defines one of `names`.
fn merge_platform(value: &str, ours: &[&str], names: &[&str]) -> Result<String, LaunchError> {
    let items = split_ch_top_level(value)?;
    let is_oem = |item: &&str| {
        let unquoted: String = item.chars().filter(|c| *c != '"').collect();
        unquoted.split('=').next() == Some("oem_strings")
    };
    if items.iter().filter(|i| is_oem(i)).count() > 1 {
        return Err(LaunchError::Platform(
            "the --platform value has oem_strings more than once",
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len() + 1);
    let mut merged = false;
    for item in items {
        if !is_oem(&item) {
            out.push(item.to_string());
            continue;
        }
        // What cloud-hypervisor does: drop quotes, take what follows the
        // first '=', trim, strip brackets, split on ','.
        let unquoted: String = item.chars().filter(|c| *c != '"').collect();
        let list = unquoted
            .split_once('=')
            .map(|(_, v)| v)
            .unwrap_or_default()
            .trim()
            .trim_matches(|c| c == '[' || c == ']');
        let mut entries: Vec<&str> = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',').collect()
        };
        for e in &entries {
            if let Some(name) = oem_credential_name(e) {
                if names.contains(&name) {
                    return Err(LaunchError::AlreadyDefined {
                        hypervisor: Hypervisor::CloudHypervisor,
                        name: name.to_string(),
                        place: "in --platform oem_strings=[...]",
                    });
                }
            }
        }
        entries.extend_from_slice(ours);
        out.push(format!("oem_strings=[{}]", entries.join(",")));
        merged = true;
    }
    if !merged {
        out.push(format!("oem_strings=[{}]", ours.join(",")));
    }
    Ok(out.join(","))
}

/// Adds the OEM strings to cloud-hypervisor's one `--platform` (or a new
/// one at the end).
fn apply_cloud_hypervisor(
    argv: &[OsString],
    strings: &[OemString],
    names: &[&str],
) -> Result<Vec<OsString>, LaunchError> {
    let ours: Vec<&str> = strings.iter().map(|s| s.text.as_str()).collect();
    let mut out = argv.to_vec();
    match find_platform(argv)? {
        Some((PlatformArg::Separate(i), value)) => {
            out[i] = merge_platform(value, &ours, names)?.into();
        }
        Some((PlatformArg::Inline(i), value)) => {
            out[i] = format!("--platform={}", merge_platform(value, &ours, names)?).into();
        }
        None => {
            out.push("--platform".into());
            out.push(merge_platform("", &ours, names)?.into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixListener;
    use vmcred_proto::tls::Pin;

    /// A value with every character that could break an option syntax.
    const SECRET: &[u8] = b"hunter2,with]odd\"[bytes=\n\x00\xff";
    const OTHER: &[u8] = b"staging-xyzzy";

    struct Fixture {
        tmp: tempfile::TempDir,
        creds: PathBuf,
        run: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("creds");
        fs::create_dir(&creds).unwrap();
        let run = tmp.path().join("run").join("test-vm");
        Fixture { tmp, creds, run }
    }

    impl Fixture {
        fn put(&self, name: &str, value: &[u8]) {
            fs::write(self.creds.join(name), value).unwrap();
        }

        fn input(
            &self,
            hypervisor: Hypervisor,
            creds: &[(&str, bool)],
            argv: &[&str],
        ) -> LaunchInput {
            LaunchInput {
                vm: "test-vm".into(),
                hypervisor,
                bootstrap: bootstrap(),
                boot_credentials: creds
                    .iter()
                    .map(|(name, allow)| BootCredential {
                        name: name.to_string(),
                        allow_on_command_line: *allow,
                    })
                    .collect(),
                credentials_dir: Some(self.creds.clone()),
                runtime_dir: self.run.clone(),
                argv: argv.iter().map(OsString::from).collect(),
            }
        }
    }

    fn bootstrap() -> Bootstrap {
        Bootstrap {
            port: 700,
            pin: Pin([0xab; 32]),
            host: vmcred_proto::bootstrap::HostTransport::Vsock,
        }
    }

    fn bootstrap_oem() -> String {
        format!(
            "io.systemd.credential:vmcred.bootstrap=vmcred-bootstrap-v1 port=700 pin=sha256:{} host=vsock",
            "ab".repeat(32)
        )
    }

    fn binary_oem(name: &str, value: &[u8]) -> String {
        format!(
            "io.systemd.credential.binary:{name}={}",
            STANDARD.encode(value)
        )
    }

    fn strs(argv: &[OsString]) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_str().unwrap().to_string())
            .collect()
    }

    fn has(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Asserts that no form of a secret is in `text`.
    fn assert_no_secret(text: &[u8]) {
        for v in [SECRET, OTHER] {
            assert!(!has(text, v), "value leaked");
            assert!(
                !has(text, STANDARD.encode(v).as_bytes()),
                "base64 value leaked"
            );
        }
        assert!(!has(text, b"hunter2"), "value leaked");
    }

    fn argv_bytes(argv: &[OsString]) -> Vec<u8> {
        argv.iter()
            .flat_map(|a| a.as_bytes().iter().copied().chain([0]))
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// cloud-hypervisor's own reading of a `--platform` value
    /// (`option_parser::split_commas`, `OptionParser::parse`,
    /// `StringList::from_str`), to check what it would see.
    fn ch_parse(value: &str) -> BTreeMap<String, String> {
        let mut list = Vec::new();
        let (mut depth, mut quoted, mut cur) = (0, false, String::new());
        for c in value.trim().chars() {
            match c {
                '[' => {
                    depth += 1;
                    cur.push(c)
                }
                ']' => {
                    depth -= 1;
                    assert!(depth >= 0);
                    cur.push(c)
                }
                '"' => quoted = !quoted,
                ',' if depth == 0 && !quoted => list.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        list.push(cur);
        assert!(depth == 0 && !quoted);
        list.iter()
            .map(|o| {
                let (k, v) = o.split_once('=').unwrap();
                (k.to_string(), v.trim().to_string())
            })
            .collect()
    }

    fn ch_oem_strings(value: &str) -> Vec<String> {
        ch_parse(value)["oem_strings"]
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(str::to_string)
            .collect()
    }

    // ------------------------------------------------------------ qemu --

    #[test]
    fn qemu_writes_private_files_and_keeps_values_off_argv() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        f.put("ENVIRONMENT", OTHER);
        let input = f.input(
            Hypervisor::Qemu,
            &[("API_KEY", false), ("ENVIRONMENT", false)],
            &["qemu-system-x86_64", "-m", "512"],
        );
        let p = prepare(&input).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(mode(&f.run), 0o700);

        let expected = [
            ("00-vmcred.bootstrap.smbios", bootstrap_oem().into_bytes()),
            (
                "01-API_KEY.smbios",
                binary_oem("API_KEY", SECRET).into_bytes(),
            ),
            (
                "02-ENVIRONMENT.smbios",
                binary_oem("ENVIRONMENT", OTHER).into_bytes(),
            ),
        ];
        let mut want_argv = vec!["qemu-system-x86_64".to_string(), "-m".into(), "512".into()];
        for (file, content) in &expected {
            let path = f.run.join(file);
            assert_eq!(&fs::read(&path).unwrap(), content, "{file}");
            assert_eq!(mode(&path), 0o400, "{file}");
            want_argv.push("-smbios".into());
            want_argv.push(format!("type=11,path={}", path.display()));
        }
        assert_eq!(strs(&p.argv), want_argv);
        assert_eq!(fs::read_dir(&f.run).unwrap().count(), 3);
        assert_no_secret(&argv_bytes(&p.argv));

        // The binary form decodes back to the exact bytes.
        let text = fs::read_to_string(f.run.join("01-API_KEY.smbios")).unwrap();
        let b64 = text
            .strip_prefix("io.systemd.credential.binary:API_KEY=")
            .unwrap();
        assert_eq!(STANDARD.decode(b64).unwrap(), SECRET);
    }

    #[test]
    fn qemu_relaunch_replaces_stale_files_only() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        let input = f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"]);
        let first = prepare(&input).unwrap();
        fs::write(f.run.join("07-OLD.smbios"), b"stale").unwrap();
        fs::write(f.run.join("keep.txt"), b"not ours").unwrap();
        f.put("API_KEY", OTHER);
        let second = prepare(&input).unwrap();
        assert_eq!(first.argv, second.argv);
        assert!(!f.run.join("07-OLD.smbios").exists());
        assert!(f.run.join("keep.txt").exists());
        assert_eq!(
            fs::read(f.run.join("01-API_KEY.smbios")).unwrap(),
            binary_oem("API_KEY", OTHER).into_bytes()
        );
    }

    #[test]
    fn qemu_escapes_commas_in_paths() {
        let mut f = fixture();
        f.run = f.tmp.path().join("a,b").join("run");
        let p = prepare(&f.input(Hypervisor::Qemu, &[], &["qemu-system-aarch64"])).unwrap();
        let want = format!(
            "type=11,path={}/a,,b/run/00-vmcred.bootstrap.smbios",
            f.tmp.path().display()
        );
        assert_eq!(strs(&p.argv)[2], want);
        assert!(f.run.join("00-vmcred.bootstrap.smbios").is_file());
    }

    #[test]
    fn runtime_dir_must_be_private_and_real() {
        let f = fixture();
        let input = f.input(Hypervisor::Qemu, &[], &["qemu-system-x86_64"]);
        let err = |input: &LaunchInput| prepare(input).unwrap_err().to_string();

        // A symlink to a private directory is still refused.
        let real = f.tmp.path().join("real");
        DirBuilder::new().mode(0o700).create(&real).unwrap();
        fs::create_dir_all(f.run.parent().unwrap()).unwrap();
        symlink(&real, &f.run).unwrap();
        assert!(err(&input).contains("symbolic link"), "{}", err(&input));
        fs::remove_file(&f.run).unwrap();

        fs::write(&f.run, b"").unwrap();
        assert!(err(&input).contains("not a directory"), "{}", err(&input));
        fs::remove_file(&f.run).unwrap();

        fs::create_dir(&f.run).unwrap();
        fs::set_permissions(&f.run, fs::Permissions::from_mode(0o750)).unwrap();
        assert!(err(&input).contains("mode 0750"), "{}", err(&input));

        fs::set_permissions(&f.run, fs::Permissions::from_mode(0o700)).unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&f.run, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            assert!(err(&input).contains("owned by uid 4242"), "{}", err(&input));
            nix::unistd::chown(&f.run, Some(nix::unistd::geteuid()), None).unwrap();
        }
        assert!(prepare(&input).is_ok());
    }

    #[test]
    fn qemu_refuses_credentials_the_argv_already_defines() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        let cases = [
            (
                vec![
                    "-smbios",
                    "type=11,value=io.systemd.credential:vmcred.bootstrap=x",
                ],
                "vmcred.bootstrap",
            ),
            (
                vec![
                    "-smbios",
                    "type=11,value=io.systemd.credential.binary:API_KEY=aHVudGVyMg==",
                ],
                "API_KEY",
            ),
            (
                vec!["-fw_cfg", "name=opt/io.systemd.credentials/API_KEY,file=/x"],
                "API_KEY",
            ),
            (
                vec!["-fw_cfg", "opt/io.systemd.credentials/API_KEY,file=/x"],
                "API_KEY",
            ),
        ];
        for (extra, name) in cases {
            let mut argv = vec!["qemu-system-x86_64"];
            argv.extend(&extra);
            let e = prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &argv))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("credential {name:?}")), "{e}");
            assert!(e.contains("first value"), "{e}");
            assert!(!e.contains("aHVudGVyMg"), "{e}");
        }
        // Other credentials and other SMBIOS types are fine.
        let ok = [
            "qemu-system-x86_64",
            "-smbios",
            "type=11,value=io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888",
            "-smbios",
            "type=1,serial=API_KEY",
            "-fw_cfg",
            "name=opt/io.systemd.credentials/OTHER,file=/x",
        ];
        assert!(prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &ok)).is_ok());
    }

    // ------------------------------------------------ cloud-hypervisor --

    const NOTIFY: &str = "io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888";

    fn warning(name: &str) -> String {
        format!("credential {name} is on cloud-hypervisor's command line, readable by every local user via /proc/PID/cmdline: marked allow_on_command_line")
    }

    #[test]
    fn ch_merges_into_existing_oem_strings_keeping_entries_and_keys() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        f.put("ENVIRONMENT", OTHER);
        let platform = format!(
            "oem_strings=[{NOTIFY},io.systemd.credential:CLUSTER=a],serial_number=abc,uuid=1234"
        );
        let argv = [
            "/nix/store/x-cloud-hypervisor-41/bin/cloud-hypervisor",
            "--cpus",
            "boot=2",
            "--platform",
            &platform,
            "--vsock",
            "cid=3,socket=notify.vsock",
        ];
        let input = f.input(
            Hypervisor::CloudHypervisor,
            &[("API_KEY", true), ("ENVIRONMENT", true)],
            &argv,
        );
        let p = prepare(&input).unwrap();
        let out = strs(&p.argv);
        assert_eq!(out.len(), argv.len());
        for i in [0, 1, 2, 3, 5, 6] {
            assert_eq!(out[i], argv[i]);
        }
        let parsed = ch_parse(&out[4]);
        assert_eq!(parsed["serial_number"], "abc");
        assert_eq!(parsed["uuid"], "1234");
        assert_eq!(
            ch_oem_strings(&out[4]),
            [
                NOTIFY.to_string(),
                "io.systemd.credential:CLUSTER=a".into(),
                bootstrap_oem(),
                binary_oem("API_KEY", SECRET),
                binary_oem("ENVIRONMENT", OTHER),
            ]
        );
        assert_eq!(p.warnings, [warning("API_KEY"), warning("ENVIRONMENT")]);
        assert!(!f.run.exists(), "cloud-hypervisor needs no runtime files");
    }

    #[test]
    fn ch_platform_equals_form() {
        let f = fixture();
        let argv = [
            "cloud-hypervisor",
            "--platform=serial_number=abc,oem_strings=[x=1]",
        ];
        let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
        let out = strs(&p.argv);
        let value = out[1].strip_prefix("--platform=").unwrap();
        assert_eq!(
            value,
            format!("serial_number=abc,oem_strings=[x=1,{}]", bootstrap_oem())
        );
        assert_eq!(ch_oem_strings(value), ["x=1".to_string(), bootstrap_oem()]);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn ch_adds_oem_strings_to_a_platform_without_them() {
        let f = fixture();
        let argv = [
            "cloud-hypervisor",
            "--platform",
            "serial_number=abc,uuid=u",
            "--cpus",
            "boot=1",
        ];
        let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
        let out = strs(&p.argv);
        assert_eq!(
            out[2],
            format!("serial_number=abc,uuid=u,oem_strings=[{}]", bootstrap_oem())
        );
        assert_eq!(out[3..], ["--cpus", "boot=1"]);

        // microvm.nix emits an empty --platform when it has nothing for it.
        let argv = ["cloud-hypervisor", "--platform", "", "--cpus", "boot=1"];
        let p = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap();
        assert_eq!(
            strs(&p.argv)[2],
            format!("oem_strings=[{}]", bootstrap_oem())
        );
    }

    #[test]
    fn ch_adds_a_platform_when_there_is_none() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        let argv = ["cloud-hypervisor", "--cpus", "boot=1"];
        let p =
            prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", true)], &argv)).unwrap();
        let out = strs(&p.argv);
        assert_eq!(out[..3], argv);
        assert_eq!(out[3], "--platform");
        assert_eq!(
            ch_oem_strings(&out[4]),
            [bootstrap_oem(), binary_oem("API_KEY", SECRET)]
        );
        assert_eq!(out.len(), 5);
        assert_eq!(p.warnings, [warning("API_KEY")]);
    }

    #[test]
    fn ch_refuses_credentials_already_in_oem_strings() {
        let f = fixture();
        // No file is needed: this is refused before anything is read.
        for (entry, name) in [
            (
                "io.systemd.credential:vmcred.bootstrap=old",
                "vmcred.bootstrap",
            ),
            ("io.systemd.credential:API_KEY=hunter2", "API_KEY"),
            (
                "io.systemd.credential.binary:API_KEY=aHVudGVyMg==",
                "API_KEY",
            ),
        ] {
            let platform = format!("oem_strings=[{NOTIFY},{entry}]");
            let argv = ["cloud-hypervisor", "--platform", &platform];
            let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", true)], &argv))
                .unwrap_err();
            assert!(matches!(e, LaunchError::AlreadyDefined { .. }), "{e}");
            let e = e.to_string();
            assert!(e.contains(&format!("credential {name:?}")), "{e}");
            assert!(e.contains("first value"), "{e}");
            assert!(!e.contains("hunter2") && !e.contains("aHVudGVyMg"), "{e}");
        }
    }

    #[test]
    fn ch_refuses_malformed_or_repeated_platform_without_echoing_it() {
        let f = fixture();
        for argv in [
            vec![
                "cloud-hypervisor",
                "--platform",
                "oem_strings=[io.systemd.credential:X=hunter2",
            ],
            vec!["cloud-hypervisor", "--platform", "oem_strings=hunter2]"],
            vec![
                "cloud-hypervisor",
                "--platform",
                "a=1",
                "--platform=b=hunter2",
            ],
            vec![
                "cloud-hypervisor",
                "--platform",
                "oem_strings=[a],oem_strings=[hunter2]",
            ],
            vec!["cloud-hypervisor", "--platform"],
        ] {
            let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[], &argv)).unwrap_err();
            assert!(matches!(e, LaunchError::Platform(_)), "{argv:?}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn ch_refuses_a_secret_not_allowed_on_the_command_line() {
        let f = fixture();
        f.put("API_KEY", SECRET);
        f.put("DB", OTHER);
        f.put("ENVIRONMENT", OTHER);
        let argv = ["cloud-hypervisor", "--cpus", "boot=1"];
        let e = prepare(&f.input(
            Hypervisor::CloudHypervisor,
            &[("API_KEY", false), ("DB", false), ("ENVIRONMENT", true)],
            &argv,
        ))
        .unwrap_err()
        .to_string();
        for needle in [
            "boot credentials API_KEY, DB would",
            "/proc/PID/cmdline",
            "allow_on_command_line = true",
            "boot = false",
            "over vsock",
            "qemu",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in: {e}");
        }
        assert!(!e.contains("ENVIRONMENT"), "{e}");
        assert_no_secret(e.as_bytes());

        let e = prepare(&f.input(Hypervisor::CloudHypervisor, &[("API_KEY", false)], &argv))
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot credential API_KEY would"), "{e}");
        assert!(e.contains("can read it"), "{e}");
    }

    // -------------------------------------------------------- reading --

    #[test]
    fn missing_credentials_directory_says_what_to_add() {
        let f = fixture();
        let mut input = f.input(
            Hypervisor::Qemu,
            &[("API_KEY", false), ("DB", false)],
            &["qemu-kvm"],
        );
        input.credentials_dir = None;
        let e = prepare(&input).unwrap_err();
        assert!(
            matches!(e, LaunchError::NoCredentialsDirectory { .. }),
            "{e}"
        );
        let e = e.to_string();
        for needle in [
            "$CREDENTIALS_DIRECTORY",
            "API_KEY, DB",
            "LoadCredential=API_KEY:",
            "microvm@test-vm.service",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in: {e}");
        }
        // Without boot credentials, no directory is needed.
        input.boot_credentials.clear();
        assert!(prepare(&input).is_ok());
    }

    #[test]
    fn missing_file_names_credential_and_path() {
        let f = fixture();
        let e =
            prepare(&f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"])).unwrap_err();
        assert!(matches!(e, LaunchError::MissingCredential { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("\"API_KEY\""), "{e}");
        assert!(
            e.contains(&f.creds.join("API_KEY").display().to_string()),
            "{e}"
        );
        assert!(e.contains("LoadCredential=API_KEY:SOURCE"), "{e}");
    }

    #[test]
    fn only_regular_files_are_read() {
        let f = fixture();
        let input = f.input(Hypervisor::Qemu, &[("API_KEY", false)], &["qemu-kvm"]);
        let real = f.tmp.path().join("real");
        fs::write(&real, SECRET).unwrap();
        let target = f.creds.join("API_KEY");

        symlink(&real, &target).unwrap();
        let e = prepare(&input).unwrap_err();
        assert!(matches!(e, LaunchError::NotRegularFile { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_no_secret(e.to_string().as_bytes());
        fs::remove_file(&target).unwrap();

        fs::create_dir(&target).unwrap();
        assert!(prepare(&input)
            .unwrap_err()
            .to_string()
            .contains("a directory"));
        fs::remove_dir(&target).unwrap();

        nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(prepare(&input).unwrap_err().to_string().contains("a FIFO"));
        assert!(!f.run.exists(), "nothing written after a refusal");
    }

    #[test]
    fn oversize_values_are_refused() {
        let f = fixture();
        f.put("BIG", &vec![b'x'; rules::MAX_CREDENTIAL_BYTES + 1]);
        let e = prepare(&f.input(Hypervisor::Qemu, &[("BIG", false)], &["qemu-kvm"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"BIG\"") && e.contains("1 MiB"), "{e}");

        f.put("A", &vec![b'a'; 600 * 1024]);
        f.put("B", &vec![b'b'; 600 * 1024]);
        let e = prepare(&f.input(
            Hypervisor::Qemu,
            &[("A", false), ("B", false)],
            &["qemu-kvm"],
        ))
        .unwrap_err();
        assert!(
            matches!(
                e,
                LaunchError::Size {
                    source: RuleError::TotalTooLarge { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(prepare(&f.input(Hypervisor::Qemu, &[("A", false)], &["qemu-kvm"])).is_ok());
    }

    #[test]
    fn names_are_checked() {
        let f = fixture();
        let cases: [(&[(&str, bool)], &str); 6] = [
            (&[("a=b", false)], "'='"),
            (&[("a,b", false)], "','"),
            (&[("a]", false)], "']'"),
            (&[("vmcred.bootstrap", false)], "reserved"),
            (&[("X", false), ("X", true)], "listed twice"),
            (&[("a/b", false)], "'/'"),
        ];
        for (creds, why) in cases {
            let e = prepare(&f.input(Hypervisor::Qemu, creds, &["qemu-kvm"]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{creds:?}: {e}");
        }
    }

    #[test]
    fn hypervisor_is_guessed_from_the_program_name() {
        let g = |p: &str| Hypervisor::guess(OsStr::new(p));
        let ch = Some(Hypervisor::CloudHypervisor);
        let qemu = Some(Hypervisor::Qemu);
        assert_eq!(
            g("/nix/store/abc-cloud-hypervisor-41.0/bin/cloud-hypervisor"),
            ch
        );
        assert_eq!(g("cloud-hypervisor"), ch);
        assert_eq!(g("/nix/store/abc/bin/.cloud-hypervisor-wrapped"), ch);
        assert_eq!(g("/usr/bin/qemu-system-x86_64"), qemu);
        assert_eq!(g("qemu-system-aarch64"), qemu);
        assert_eq!(g("/usr/libexec/qemu-kvm"), qemu);
        assert_eq!(g("/x/.qemu-system-x86_64-wrapped"), qemu);
        for other in ["/usr/bin/firecracker", "qemu-img", "crosvm", "", "/"] {
            assert_eq!(g(other), None, "{other}");
        }

        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let fc = argv(&["/usr/bin/firecracker", "--api-sock", "x"]);
        let e = resolve_hypervisor(None, &fc).unwrap_err().to_string();
        assert!(
            e.contains("/usr/bin/firecracker") && e.contains("--hypervisor qemu"),
            "{e}"
        );
        assert_eq!(
            resolve_hypervisor(Some(Hypervisor::Qemu), &fc).unwrap(),
            Hypervisor::Qemu
        );
        assert_eq!(
            resolve_hypervisor(None, &argv(&["cloud-hypervisor"])).unwrap(),
            Hypervisor::CloudHypervisor
        );
        assert!(matches!(
            resolve_hypervisor(None, &[]),
            Err(LaunchError::NoCommand)
        ));

        for h in [Hypervisor::CloudHypervisor, Hypervisor::Qemu] {
            assert_eq!(h.to_string().parse::<Hypervisor>(), Ok(h));
            assert_eq!(
                <Hypervisor as clap::ValueEnum>::from_str(&h.to_string(), false),
                Ok(h)
            );
        }
        assert!("firecracker".parse::<Hypervisor>().is_err());
    }

    #[test]
    fn empty_argv_and_failed_exec_are_errors() {
        let f = fixture();
        assert!(matches!(
            prepare(&f.input(Hypervisor::Qemu, &[], &[])),
            Err(LaunchError::NoCommand)
        ));
        assert!(matches!(exec(&[]), LaunchError::NoCommand));
        let e = exec(&[OsString::from("/nonexistent/vmcred-test-hypervisor")]);
        assert!(matches!(e, LaunchError::Exec { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("/nonexistent/vmcred-test-hypervisor"),
            "{e}"
        );
    }

    // --------------------------------------------------------- notify --

    #[test]
    fn notify_sends_one_line_and_reads_the_reply() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("launch.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            reader.get_mut().write_all(b"\"ok\"\n").unwrap();
            line
        });
        notify_launched(&path, "test-vm").unwrap();
        assert_eq!(
            server.join().unwrap(),
            "{\"cmd\":\"launched\",\"vm\":\"test-vm\"}\n"
        );
    }

    #[test]
    fn notify_failures_are_bounded_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("launch.sock");
        let e = notify_launched(&path, "test-vm").unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");

        // An agent that never answers costs about a second.
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(2500));
            drop(conn);
        });
        let start = Instant::now();
        let e = notify_launched(&path, "test-vm").unwrap_err();
        assert!(e.contains("no reply"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        server.join().unwrap();

        // An agent that hangs up without a reply.
        let listener = UnixListener::bind(tmp.path().join("b.sock")).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            BufReader::new(conn).read_line(&mut String::new()).unwrap();
        });
        let e = notify_launched(&tmp.path().join("b.sock"), "test-vm").unwrap_err();
        assert!(e.contains("without a reply"), "{e}");
        server.join().unwrap();
    }
}
