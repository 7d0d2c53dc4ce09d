//! `vmcred-host launch`: the hypervisor wrapper.
//!
//! It runs as the hypervisor's user just before the hypervisor, reads the
//! VM's boot-time credentials from `$CREDENTIALS_DIRECTORY` (what
//! `LoadCredential=` on the VM's unit provided), and hands them, with the
//! public `vmcred.bootstrap`, to the guest through a *carrier* the guest's
//! PID 1 imports into `/run/credentials/@system`:
//!
//! - SMBIOS type 11 OEM strings (`carrier/smbios.rs`): qemu reads them from
//!   private files, cloud-hypervisor only from its one `--platform`;
//! - qemu fw_cfg (`carrier/fw_cfg.rs`): private files, any machine type;
//! - the kernel command line (`carrier/cmdline.rs`): every hypervisor has
//!   one, but every guest process can read it, so public data only unless a
//!   credential is marked `allow_on_command_line`.
//!
//! With `launch_key = "required"` the VM's launch key (`launch_key.rs`)
//! goes the same way, through qemu's private files only.
//!
//! One module per hypervisor (`hypervisor/*.rs`, the shape of microvm.nix's
//! `lib/runners/*.nix`) knows that hypervisor's argv: where its kernel
//! command line is, which carriers it offers, and which it picks. No value
//! ever appears in an error or warning.

pub mod carrier;
mod credentials;
pub mod hypervisor;
mod launch_key;
mod notify;
pub mod runtime_dir;

#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use thiserror::Error;
use vmcred_proto::bootstrap::Bootstrap;
use vmcred_proto::rules::{self, RuleError};
use zeroize::Zeroizing;

pub use launch_key::LaunchKey;
pub use notify::notify_launched;

/// The hypervisor whose argv is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hypervisor {
    /// qemu (`qemu-system-*`, `qemu-kvm`): SMBIOS or fw_cfg files.
    #[value(name = "qemu")]
    Qemu,
    /// cloud-hypervisor: OEM strings in `--platform oem_strings=[...]`.
    #[value(name = "cloud-hypervisor")]
    CloudHypervisor,
    /// firecracker: `boot-source.boot_args` in a private copy of its config.
    #[value(name = "firecracker")]
    Firecracker,
    /// crosvm: kernel command line (`-p`).
    #[value(name = "crosvm")]
    Crosvm,
    /// kvmtool (`lkvm`): kernel command line (`-p`).
    #[value(name = "kvmtool")]
    Kvmtool,
    /// alioth: kernel command line (`-c`).
    #[value(name = "alioth")]
    Alioth,
}

/// Every hypervisor, for messages that list the choices.
const ALL_HYPERVISORS: &str = "qemu, cloud-hypervisor, firecracker, crosvm, kvmtool, alioth";

impl Hypervisor {
    pub const ALL: [Hypervisor; 6] = [
        Hypervisor::Qemu,
        Hypervisor::CloudHypervisor,
        Hypervisor::Firecracker,
        Hypervisor::Crosvm,
        Hypervisor::Kvmtool,
        Hypervisor::Alioth,
    ];

    /// Guesses the hypervisor from the program name (`argv[0]`), also as
    /// Nix's `.NAME-wrapped`.
    pub fn guess(program: &OsStr) -> Option<Hypervisor> {
        let base = Path::new(program).file_name()?.to_str()?;
        let base = base
            .strip_prefix('.')
            .and_then(|b| b.strip_suffix("-wrapped"))
            .unwrap_or(base);
        match base {
            "cloud-hypervisor" => Some(Hypervisor::CloudHypervisor),
            "qemu-kvm" => Some(Hypervisor::Qemu),
            "firecracker" => Some(Hypervisor::Firecracker),
            "crosvm" => Some(Hypervisor::Crosvm),
            "lkvm" | "kvmtool" => Some(Hypervisor::Kvmtool),
            "alioth" => Some(Hypervisor::Alioth),
            b if b.starts_with("qemu-system-") => Some(Hypervisor::Qemu),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::Crosvm => "crosvm",
            Hypervisor::Kvmtool => "kvmtool",
            Hypervisor::Alioth => "alioth",
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Hypervisor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hypervisor::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown hypervisor {:?}: expected one of {ALL_HYPERVISORS}",
                    rules::display_name(s)
                )
            })
    }
}

/// Where launch-time data reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Carrier {
    /// SMBIOS type 11 OEM strings.
    Smbios,
    /// qemu fw_cfg `opt/io.systemd.credentials/NAME`.
    FwCfg,
    /// `systemd.set_credential=` on the kernel command line.
    Cmdline,
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Carrier::Smbios => "smbios",
            Carrier::FwCfg => "fw-cfg",
            Carrier::Cmdline => "cmdline",
        })
    }
}

/// `--carrier`: the bootstrap's carrier, or `auto` for the hypervisor's
/// (and for qemu the machine type's) best one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CarrierChoice {
    #[default]
    Auto,
    Smbios,
    #[value(name = "fw-cfg")]
    FwCfg,
    Cmdline,
}

impl CarrierChoice {
    fn forced(self) -> Option<Carrier> {
        match self {
            CarrierChoice::Auto => None,
            CarrierChoice::Smbios => Some(Carrier::Smbios),
            CarrierChoice::FwCfg => Some(Carrier::FwCfg),
            CarrierChoice::Cmdline => Some(Carrier::Cmdline),
        }
    }
}

/// The hypervisor to use: the one given with `--hypervisor`, else the one
/// guessed from `argv[0]`, else an error listing the choices.
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
    /// The user accepts this value on a command line (the hypervisor's,
    /// or the guest kernel's) where no private carrier exists.
    pub allow_on_command_line: bool,
}

/// Everything `prepare` needs; filled from the host config and the CLI.
#[derive(Debug, Clone)]
pub struct LaunchInput {
    pub vm: String,
    pub hypervisor: Hypervisor,
    pub carrier: CarrierChoice,
    /// The process name the hypervisor gets (`--argv0`); `None`: `argv[0]`.
    pub argv0: Option<OsString>,
    pub bootstrap: Bootstrap,
    pub boot_credentials: Vec<BootCredential>,
    /// Whether the guest is passed its launch key.
    pub launch_key: LaunchKey,
    /// `$CREDENTIALS_DIRECTORY` of the VM's unit: boot credential `NAME` is
    /// read from `credentials_dir/NAME`.
    pub credentials_dir: Option<PathBuf>,
    /// Base directory for the files carriers need, which go in
    /// `<runtime_dir>/<vm>`; `None` when none could be chosen (an error
    /// only if a file is needed).
    pub runtime_dir: Option<PathBuf>,
    /// The hypervisor argv, `argv[0]` being the binary.
    pub argv: Vec<OsString>,
}

impl LaunchInput {
    /// The boot credentials the user has not allowed on a command line,
    /// worded for the refusal errors; `None` when there are none.
    pub(crate) fn not_allowed_on_command_line(&self) -> Option<NotAllowed> {
        let refused: Vec<&str> = self
            .boot_credentials
            .iter()
            .filter(|c| !c.allow_on_command_line)
            .map(|c| c.name.as_str())
            .collect();
        if refused.is_empty() {
            return None;
        }
        let one = refused.len() == 1;
        Some(NotAllowed {
            names: refused.join(", "),
            plural: if one { "" } else { "s" },
            them: if one { "it" } else { "them" },
        })
    }
}

/// See [`LaunchInput::not_allowed_on_command_line`].
pub(crate) struct NotAllowed {
    pub names: String,
    pub plural: &'static str,
    pub them: &'static str,
}

/// A file written for the hypervisor to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateFile {
    pub path: PathBuf,
    pub mode: u32,
    pub carrier: Carrier,
    /// The credential it carries, or `firecracker-config` for the copy of
    /// firecracker's config file.
    pub name: String,
}

/// The rewritten argv, ready for `exec`, and what to tell the user. The
/// argv can hold values marked `allow_on_command_line`, so `Debug` shows
/// only its length; `shown_argv` is the same with those values redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Prepared {
    pub argv0: OsString,
    pub argv: Vec<OsString>,
    pub shown_argv: Vec<OsString>,
    pub files: Vec<PrivateFile>,
    /// Credentials whose values `shown_argv` replaces by `<redacted>`.
    pub redacted: Vec<String>,
    pub warnings: Vec<String>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("argv0", &self.argv0)
            .field("argv", &format_args!("<{} arguments>", self.argv.len()))
            .field("files", &self.files)
            .field("warnings", &self.warnings)
            .finish()
    }
}

/// Why a launch was refused. Never carries a credential value.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("no hypervisor command given: expected `vmcred-host launch --vm NAME -- /path/to/HYPERVISOR ARGS...`")]
    NoCommand,
    #[error("cannot tell which hypervisor {} is (expected a program named qemu-system-*, qemu-kvm, cloud-hypervisor, firecracker, crosvm, lkvm, kvmtool or alioth): pass --hypervisor with one of {ALL_HYPERVISORS}", .program.display())]
    UnknownHypervisor { program: PathBuf },
    #[error("VM {vm:?}: boot credential: {source}")]
    BadName { vm: String, source: RuleError },
    #[error("VM {vm:?}: boot credential name {name:?} is reserved for {reserved_for}")]
    ReservedName {
        vm: String,
        name: String,
        reserved_for: &'static str,
    },
    #[error("VM {vm:?}: boot credential {name:?} cannot be passed at launch: its name contains {ch:?} (names of boot credentials may not contain = , [ ] or \")")]
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
    #[error("VM {vm:?} has launch_key = \"required\" but {what}: add LoadCredential=vmcred.launch-key:{} to the VM's unit (microvm@{vm}.service), with After= and Wants=vmcred-host.service: the host agent makes that file when it starts, before it reports ready", .agent_file.display())]
    LaunchKeyMissing {
        vm: String,
        what: String,
        agent_file: PathBuf,
    },
    #[error("VM {vm:?}: the launch key in $CREDENTIALS_DIRECTORY/vmcred.launch-key is {len} bytes; expected 1 to {max} (the host agent writes 64 hex digits): point LoadCredential=vmcred.launch-key: at the agent's state_dir/launch-keys/{vm}", max = rules::MAX_LAUNCH_KEY_BYTES)]
    LaunchKeySize { vm: String, len: usize },
    #[error("VM {vm:?} has launch_key = \"required\", but {hypervisor} could pass the launch key only on {place}; whoever reads the key can answer as this VM, so vmcred never puts it on a command line, whatever allow_on_command_line says. Choose one: run this VM under qemu, which passes the key through a private file (SMBIOS or fw_cfg); or set launch_key = \"off\" on it in the host config, {off_is}")]
    LaunchKeyNoPrivateCarrier {
        vm: String,
        hypervisor: Hypervisor,
        place: &'static str,
        off_is: &'static str,
    },
    #[error("VM {vm:?}: boot credential{plural} {names} would have to go on cloud-hypervisor's command line, where every local user can read {them} through /proc/PID/cmdline (cloud-hypervisor has no way to read OEM strings from a file). Choose one for each: set allow_on_command_line = true on it in the host config to accept that; or set boot = false so that it arrives over vsock from the host agent right after boot; or run this VM under qemu, which reads OEM strings from private files")]
    CommandLineNotAllowed {
        vm: String,
        names: String,
        plural: &'static str,
        them: &'static str,
    },
    #[error("VM {vm:?}: {hypervisor} can pass boot credential{plural} {names} only on the guest's kernel command line, {exposure}. Make {them} a vsock credential: set boot = false on {them} in the host config, so that the host agent delivers {them} over vsock right after boot; or, to accept the exposure, set allow_on_command_line = true; or run this VM under qemu, which passes boot credentials through private files")]
    KernelCommandLineNotAllowed {
        vm: String,
        hypervisor: Hypervisor,
        names: String,
        plural: &'static str,
        them: &'static str,
        exposure: &'static str,
    },
    #[error("VM {vm:?}: boot credential {name:?} cannot go on the kernel command line: {why}; set boot = false on it so that it arrives over vsock instead")]
    NotCommandLineSafe {
        vm: String,
        name: String,
        why: &'static str,
    },
    #[error("the {hypervisor} command line already defines credential {name:?} ({place}); systemd keeps the first value of a name, so vmcred will not add a second one: remove it from the hypervisor arguments (vmcred passes it itself)")]
    AlreadyDefined {
        hypervisor: Hypervisor,
        name: String,
        place: &'static str,
    },
    #[error("{hypervisor} argv: {problem}")]
    BadArgv {
        hypervisor: Hypervisor,
        problem: String,
    },
    #[error("--carrier {carrier} is not possible with {hypervisor}{detail}: {hypervisor} offers {offers}")]
    CarrierUnsupported {
        hypervisor: Hypervisor,
        carrier: Carrier,
        detail: String,
        offers: &'static str,
    },
    #[error("VM {vm:?}: credential {name:?} cannot go through qemu fw_cfg: its name is {len} bytes, and fw_cfg file names are at most 55 bytes, which leaves {max} bytes for a credential name after \"opt/io.systemd.credentials/\"; rename it to at most {max} bytes, or use a machine type with SMBIOS (-M q35) or --carrier smbios")]
    FwCfgNameTooLong {
        vm: String,
        name: String,
        len: usize,
        max: usize,
    },
    #[error("{hypervisor}: the kernel command line would be {len} bytes with vmcred's additions; the kernel keeps only {max} and would silently cut the rest: shorten the kernel parameters or move boot credentials to vsock (boot = false)")]
    CommandLineTooLong {
        hypervisor: Hypervisor,
        len: usize,
        max: usize,
    },
    #[error("firecracker config file {}: {problem}", .path.display())]
    FirecrackerConfig { path: PathBuf, problem: String },
    #[error("VM {vm:?}: no runtime directory for the files {hypervisor} reads: running as uid {uid}, not root, so /run/vmcred/launch is not writable; give the VM's unit RuntimeDirectory=vmcred-launch/{vm} with RuntimeDirectoryMode=0700 (systemd then sets $RUNTIME_DIRECTORY), or pass --runtime-dir DIR or $VMCRED_LAUNCH_RUNTIME_DIR (the files go in DIR/{vm}, so one DIR may serve several VMs)")]
    NoRuntimeDir {
        vm: String,
        hypervisor: Hypervisor,
        uid: u32,
    },
    #[error("runtime directory {}: {problem}", .path.display())]
    RuntimeDir { path: PathBuf, problem: String },
    #[error("runtime directory {}: {source}", .path.display())]
    RuntimeDirIo { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", .path.display())]
    WriteFile { path: PathBuf, source: io::Error },
    #[error("cannot execute {}: {source}", .program.display())]
    Exec { program: PathBuf, source: io::Error },
}

/// One credential to pass at launch. The value is wiped on drop.
pub(crate) struct Payload {
    pub name: String,
    pub value: Zeroizing<Vec<u8>>,
    /// A credential value, as opposed to the public bootstrap.
    pub secret: bool,
}

/// What an adapter builds: the argv twice (real, and with secrets
/// redacted for display), the files written, and warnings.
pub(crate) struct Build<'a> {
    pub input: &'a LaunchInput,
    pub argv: Vec<OsString>,
    pub shown: Vec<OsString>,
    pub files: Vec<PrivateFile>,
    pub redacted: Vec<String>,
    pub warnings: Vec<String>,
    /// The runtime directory, once prepared.
    dir: Option<PathBuf>,
}

impl<'a> Build<'a> {
    fn new(input: &'a LaunchInput) -> Self {
        Build {
            input,
            argv: input.argv.clone(),
            shown: input.argv.clone(),
            files: Vec::new(),
            redacted: Vec::new(),
            warnings: Vec::new(),
            dir: None,
        }
    }

    /// The VM's private directory, `<runtime dir>/<vm>`, prepared
    /// (checked, created, stale files removed) on first use.
    pub fn runtime_dir(&mut self) -> Result<PathBuf, LaunchError> {
        if let Some(d) = &self.dir {
            return Ok(d.clone());
        }
        let Some(base) = self.input.runtime_dir.as_deref() else {
            return Err(LaunchError::NoRuntimeDir {
                vm: self.input.vm.clone(),
                hypervisor: self.input.hypervisor,
                uid: nix::unistd::geteuid().as_raw(),
            });
        };
        let dir = runtime_dir::prepare(base, &self.input.vm)?;
        self.dir = Some(dir.clone());
        Ok(dir)
    }

    /// Writes a 0400 file into the runtime directory and records it.
    pub fn write_file(
        &mut self,
        file_name: &str,
        content: &[u8],
        carrier: Carrier,
        name: &str,
    ) -> Result<PathBuf, LaunchError> {
        let path = self.runtime_dir()?.join(file_name);
        runtime_dir::write_private_file(&path, content)?;
        self.files.push(PrivateFile {
            path: path.clone(),
            mode: 0o400,
            carrier,
            name: name.to_string(),
        });
        Ok(path)
    }

    /// Sets argument `i` (real and shown).
    pub fn set(&mut self, i: usize, real: OsString, shown: OsString) {
        self.argv[i] = real;
        self.shown[i] = shown;
    }

    /// Inserts arguments at `at` (real and shown).
    pub fn insert(&mut self, at: usize, real: Vec<OsString>, shown: Vec<OsString>) {
        self.argv.splice(at..at, real);
        self.shown.splice(at..at, shown);
    }

    /// Appends public arguments.
    pub fn push_public(&mut self, args: &[OsString]) {
        self.argv.extend_from_slice(args);
        self.shown.extend_from_slice(args);
    }

    pub fn bad_argv(&self, problem: impl Into<String>) -> LaunchError {
        LaunchError::BadArgv {
            hypervisor: self.input.hypervisor,
            problem: problem.into(),
        }
    }
}

/// Reads the boot credentials, passes them and the bootstrap through the
/// hypervisor's carrier (writing files where it reads files), and returns
/// the new argv with warnings. What cannot work is refused before any
/// secret is read; errors name credentials and paths, never values.
pub fn prepare(input: &LaunchInput) -> Result<Prepared, LaunchError> {
    if input.argv.is_empty() {
        return Err(LaunchError::NoCommand);
    }
    credentials::check_names(&input.vm, &input.boot_credentials)?;
    launch_key::check(input)?;
    hypervisor::check(input)?;
    let payloads = credentials::payloads(input)?;
    let mut build = Build::new(input);
    hypervisor::apply(&mut build, &payloads)?;
    let argv0 = input.argv0.clone().unwrap_or_else(|| input.argv[0].clone());
    Ok(Prepared {
        argv0,
        argv: build.argv,
        shown_argv: build.shown,
        files: build.files,
        redacted: build.redacted,
        warnings: build.warnings,
    })
}

/// Replaces this process with the hypervisor, named `argv0`. Returns only
/// on failure.
pub fn exec(argv0: &OsStr, argv: &[OsString]) -> LaunchError {
    let Some((program, args)) = argv.split_first() else {
        return LaunchError::NoCommand;
    };
    let source = Command::new(program).arg0(argv0).args(args).exec();
    LaunchError::Exec {
        program: PathBuf::from(program),
        source,
    }
}
