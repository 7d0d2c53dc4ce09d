//! The command line of `vmcred-host`, as clap parses it in the full agent
//! (`vmcred-host-agent`). The front binary (`vmcred-host`) parses only the
//! forms of `rotate`, `status` and `--version` that [`super::front`]
//! accepts and hands everything else to the agent, whose parse (and so its
//! help, errors and exit codes) is this one.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG;
use crate::launch;

#[derive(Parser)]
#[command(
    name = "vmcred-host",
    version,
    about = "Deliver systemd credentials into microVMs over vsock, and rotate them without a restart",
    long_about = "vmcred-host serves credentials to the guest agents of many VMs (serve), wraps a \
                  hypervisor launch so the guest gets its bootstrap and boot-time credentials at boot \
                  (SMBIOS, fw_cfg or the kernel command line: launch), and triggers and reports rotations (rotate, status). \
                  Secret values are never printed.",
    after_help = "Exit status (stable):\n  \
                  0  success\n  \
                  1  a VM did not apply or is out of sync, or the command failed\n  \
                  2  usage error (bad arguments, or a VM or credential not in the config)\n  \
                  3  the agent is not running or not reachable (control socket)\n  \
                  4  config error (unreadable or invalid config file)"
)]
pub struct Cli {
    /// The host config file (TOML); every command reads it.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the agent: dial every configured VM, keep its credentials in sync.
    ///
    /// Sends sd_notify READY=1 once its sockets listen. SIGTERM stops it
    /// (within 5 s even if a VM task is stuck); SIGHUP re-reads the config
    /// (a bad config is logged and the old one kept). Only one agent may use
    /// a state_dir at a time.
    Serve,
    /// Re-read the sources of VMs' credentials (all, or those named), push
    /// them and wait for the guests' acknowledgements.
    ///
    /// `rotate VM [CRED...]` rotates one VM. With `--vm A --vm B` or `--all`,
    /// every positional argument is a credential name, all VMs rotate at once
    /// over one connection, and a per-VM table is printed at the end.
    /// Exit status 0 only if every VM applied the new generation and every
    /// mapped unit action succeeded; 1 otherwise, with the reason. A guest
    /// that is down applies when it is back.
    Rotate(RotateArgs),
    /// Show each VM: connected or not, in sync or not, generation applied,
    /// last error. One line per VM and a summary.
    ///
    /// Exit status 1 when any shown VM is out of sync (not connected, a
    /// generation not applied, a credential not applied, or an error).
    Status(StatusArgs),
    /// Wrap a hypervisor: pass the guest its bootstrap and boot-time
    /// credentials at launch, tell the serving agent the VM launched, exec.
    ///
    /// Boot credentials are read from $CREDENTIALS_DIRECTORY (LoadCredential=
    /// on the VM's unit). qemu gets them through private files (-smbios
    /// type=11,path= or -fw_cfg, by machine type); other hypervisors only
    /// have a command line, so a boot secret goes there only if marked
    /// allow_on_command_line. The bootstrap is public. A VM with
    /// launch_key = "required" also gets its launch key
    /// ($CREDENTIALS_DIRECTORY/vmcred.launch-key), under qemu only and
    /// never on a command line.
    Launch(LaunchArgs),
    /// Validate a config file and print what it configures (no values are read).
    CheckConfig,
    /// Print the host key pin that guests are given (from state_dir/host.pin).
    Pin,
    /// Write man pages (DIR/man1) and bash, zsh and fish completions
    /// (DIR/completions); for packaging.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Roll the host key over without relaunching VMs: `prepare` (make the
    /// next key; connected guests store its pin), `switch` (dial with it;
    /// the old key is kept for guests that were down), `retire` (delete
    /// the old key), or `revoke-old` (switch and retire at once, for a
    /// leaked key). `show` changes nothing.
    ///
    /// Prints one line per VM with the pins its guest holds. Exit status 0
    /// when every VM is where the step leads (after prepare: holds the next
    /// pin; otherwise: trusts the current key); 1 otherwise.
    RotateKey {
        #[arg(value_enum)]
        step: KeyStepArg,
        /// With switch: switch even though some guests lack the next pin.
        #[arg(long)]
        force: bool,
        /// With switch: retire the old key at once (= revoke-old).
        #[arg(long)]
        revoke: bool,
        /// How long to wait for the VMs to redial after the step.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
}

impl Cmd {
    /// Whether the command logs through `tracing`. The control-socket
    /// clients (`rotate`, `status`, `rotate-key`) and `pin` report only
    /// on stdout/stderr; they skip setting up the subscriber, which is
    /// part of every call's start (`rotate` may run once per VM).
    pub fn logs(&self) -> bool {
        !matches!(
            self,
            Cmd::Rotate(_) | Cmd::Status(_) | Cmd::RotateKey { .. } | Cmd::Pin
        )
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KeyStepArg {
    Show,
    Prepare,
    Switch,
    Retire,
    RevokeOld,
}

// `vmcred-host rotate`'s arguments (the subcommand's help is the variant's
// doc comment, so this struct has a plain comment).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RotateArgs {
    /// How long to wait for the acknowledgements (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print the result as JSON (schema 1, see README).
    #[arg(long)]
    pub json: bool,
    /// Rotate this VM (repeatable).
    #[arg(long = "vm", value_name = "VM")]
    pub vms: Vec<String>,
    /// Rotate every configured VM.
    #[arg(long, conflicts_with = "vms")]
    pub all: bool,
    /// `VM [CRED...]`, or only `CRED...` with --vm/--all. No credential
    /// named: all of each VM's credentials.
    #[arg(value_name = "VM|CRED")]
    pub args: Vec<String>,
}

// `vmcred-host status`'s arguments (plain comment: see RotateArgs).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct StatusArgs {
    /// Print JSON (schema 1, see README) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Show only this VM (repeatable).
    #[arg(long = "vm", value_name = "VM")]
    pub vms: Vec<String>,
}

// `vmcred-host launch`'s arguments (the subcommand's help is the variant's
// doc comment, so this struct has a plain comment).
#[derive(clap::Args)]
pub struct LaunchArgs {
    /// The VM, as named in the config.
    #[arg(long)]
    pub vm: String,
    /// Guessed from the program name when not given.
    #[arg(long, value_enum)]
    pub hypervisor: Option<launch::Hypervisor>,
    /// Where the bootstrap goes; auto: the hypervisor's (for qemu, the
    /// machine type's) best carrier.
    #[arg(long, value_enum, default_value = "auto")]
    pub carrier: launch::CarrierChoice,
    /// The process name (argv[0]) the hypervisor gets, e.g. microvm@VM
    /// [default: the program as given].
    #[arg(long)]
    pub argv0: Option<std::ffi::OsString>,
    /// Directory for the files the hypervisor reads, which go in its
    /// private subdirectory DIR/VM [default: $VMCRED_LAUNCH_RUNTIME_DIR,
    /// else the first entry of $RUNTIME_DIRECTORY, else /run/vmcred/launch
    /// as root].
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Print the resulting argv (secrets redacted) instead of exec'ing it.
    /// The carrier files are still written (0400, in the runtime directory,
    /// as a launch would) so that they can be checked; the next launch of
    /// the VM replaces them.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print {"argv0","argv","files"} as JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// The hypervisor command line.
    #[arg(last = true, required = true)]
    pub argv: Vec<std::ffi::OsString>,
}
