//! The guest agent's command line. In the library rather than the binary
//! so that `vmcred-guest-docs` renders man pages and completions from this
//! same definition (they cannot drift from `--help`) while the agent itself
//! links no man-page or completion generator.

use std::path::PathBuf;

use clap::Parser;
use vmcred_proto::rules::{MAX_FILES, MAX_TOTAL_BYTES};

/// vmcred guest agent: accepts credentials from the pinned vmcred host agent
/// over vsock and writes them atomically into the system credentials
/// directory, then restarts or reloads the units that use them.
#[derive(Debug, Parser)]
#[command(name = "vmcred-guest", version)]
pub struct Cli {
    /// Guest configuration (TOML): initial_sync_timeout and, per credential,
    /// restart_units, reload_units, mode, socket_units and deliver. Without
    /// it, credentials are written 0400 and no unit is touched. With any
    /// socket_units, <state-dir>/creds.sock serves them to those units.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The bootstrap credential (host key pin and vsock port) that systemd
    /// imported from SMBIOS at boot.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/credentials/@system/vmcred.bootstrap"
    )]
    pub bootstrap: PathBuf,

    /// The VM's launch key, which `vmcred-host launch` passes through a
    /// private carrier when the host requires it (launch_key = "required");
    /// returned to the pinned host only. Absent: the guest has none.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/credentials/@system/vmcred.launch-key"
    )]
    pub launch_key: PathBuf,

    /// Where credentials are written: systemd's system credentials
    /// directory, which `LoadCredential=NAME` in any guest service reads.
    #[arg(long, value_name = "DIR", default_value = "/run/credentials/@system")]
    pub credentials_dir: PathBuf,

    /// Where the applied generation and the names vmcred manages are kept
    /// (state.json), and the write lock.
    #[arg(long, value_name = "DIR", default_value = "/run/vmcred")]
    pub state_dir: PathBuf,

    /// Listen on this Unix socket instead of AF_VSOCK (for tests and local
    /// use). Peers are admitted by uid, see --allow-uid.
    #[arg(long, value_name = "PATH")]
    pub listen_unix: Option<PathBuf>,

    /// With --listen-unix: a peer uid that may connect (repeatable;
    /// default 0, root only).
    #[arg(long = "allow-uid", value_name = "UID", requires = "listen_unix")]
    pub allow_uid: Vec<u32>,

    /// Report ready (sd_notify READY=1) after this long even if the host
    /// has not synced yet, so that boot goes on without it. Overrides the
    /// config file's initial_sync_timeout. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub initial_sync_timeout: Option<humantime::Duration>,

    /// The systemctl used for unit restarts and reloads (a recording
    /// script in tests).
    #[arg(long, value_name = "PATH", default_value = "systemctl")]
    pub systemctl: PathBuf,

    /// Byte budget of the credentials directory: the set after a push must
    /// fit (old values being replaced do not count; a tmpfs is enlarged for
    /// the push). The default is systemd's credentials mount; change it
    /// only for tests or a differently sized mount.
    #[arg(long, value_name = "BYTES", default_value_t = MAX_TOTAL_BYTES as u64)]
    pub max_total_bytes: u64,

    /// Inode budget of the credentials directory (the directory included),
    /// checked before each push with one staging file per new value. The
    /// default is systemd's nr_inodes.
    #[arg(long, value_name = "N", default_value_t = MAX_FILES as u64)]
    pub max_files: u64,

    /// Validate --config with every rule the agent applies at start, print
    /// what it configures, and exit: 0 if valid, 4 if not (the NixOS module
    /// runs this at build time).
    #[arg(long, requires = "config")]
    pub check_config: bool,

    /// Log filter, e.g. "info" or "vmcred_guest=debug"; overrides RUST_LOG.
    /// Logs go to stderr and never contain credential values.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}
