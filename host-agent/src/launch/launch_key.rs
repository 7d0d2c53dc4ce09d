//! The VM's launch key (`launch_key = "required"`): the secret by which
//! the host agent tells the VM that `launch` started from a VM someone
//! else started on the same CID (ARCHITECTURE.md, "Launch key").
//!
//! The agent makes the key (`state_dir/launch-keys/<vm>`) and the VM's unit
//! hands it to `launch` with `LoadCredential=vmcred.launch-key:...`.
//! `launch` passes it on only through a private file (qemu's SMBIOS or
//! fw_cfg): on any command line every local user could read it and answer
//! as this VM, so a hypervisor without such a file is refused, whatever
//! `allow_on_command_line` says.

use std::path::PathBuf;

use vmcred_proto::bootstrap::HostTransport;
use vmcred_proto::rules::{LAUNCH_KEY_CREDENTIAL, MAX_LAUNCH_KEY_BYTES};

use super::credentials::{read_credential, ReadError};
use super::{Hypervisor, LaunchError, LaunchInput, Payload};

/// Whether the VM's launch passes it a launch key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LaunchKey {
    /// `launch_key = "off"`: nothing is passed.
    #[default]
    Off,
    /// `launch_key = "required"`: the key is read from
    /// `$CREDENTIALS_DIRECTORY/vmcred.launch-key`.
    Required {
        /// The file the host agent keeps the key in, named in errors as the
        /// `LoadCredential=` source the VM's unit needs.
        agent_file: PathBuf,
    },
}

impl LaunchKey {
    pub fn is_required(&self) -> bool {
        matches!(self, LaunchKey::Required { .. })
    }
}

/// Refuses, before anything is read, a hypervisor with no private carrier.
pub(crate) fn check(input: &LaunchInput) -> Result<(), LaunchError> {
    if !input.launch_key.is_required() || input.hypervisor == Hypervisor::Qemu {
        return Ok(());
    }
    let (place, off_is) = match (input.hypervisor, input.bootstrap.host) {
        (Hypervisor::Firecracker, _) => (
            "the guest's kernel command line (boot-source.boot_args), which every process in the guest can read and the guest kernel logs at boot",
            HYBRID_OFF,
        ),
        (Hypervisor::CloudHypervisor, _) => (
            "its own command line (--platform oem_strings or --cmdline), which every local user can read through /proc/PID/cmdline",
            HYBRID_OFF,
        ),
        (_, HostTransport::Hybrid) => (
            "a command line, which every local user can read through /proc/PID/cmdline",
            HYBRID_OFF,
        ),
        (_, HostTransport::Vsock) => (
            "a command line, which every local user can read through /proc/PID/cmdline",
            VSOCK_OFF,
        ),
    };
    Err(LaunchError::LaunchKeyNoPrivateCarrier {
        vm: input.vm.clone(),
        hypervisor: input.hypervisor,
        place,
        off_is,
    })
}

/// What `launch_key = "off"` means for a hybrid-vsock VM.
const HYBRID_OFF: &str = "which is safe for this VM: it is reached through hybrid vsock, the VMM's own Unix socket, which only the VMM's user can create, so the socket path already tells the host agent which VM answers";
/// What it means for an AF_VSOCK VM.
const VSOCK_OFF: &str = "which leaves this VM open to what the key closes: while it is stopped, anyone who can open /dev/vhost-vsock (a kvm group member, say) can start a VM on its CID and receive its credentials";

/// The key, read as a boot credential is (regular file, no symlink, no
/// FIFO wait) and bounded by `MAX_LAUNCH_KEY_BYTES`; `None` when the VM
/// has none.
pub(crate) fn payload(input: &LaunchInput) -> Result<Option<Payload>, LaunchError> {
    let LaunchKey::Required { agent_file } = &input.launch_key else {
        return Ok(None);
    };
    let missing = |what: String| LaunchError::LaunchKeyMissing {
        vm: input.vm.clone(),
        what,
        agent_file: agent_file.clone(),
    };
    let Some(dir) = &input.credentials_dir else {
        return Err(missing("$CREDENTIALS_DIRECTORY is not set".to_string()));
    };
    let value = read_credential(&input.vm, dir, LAUNCH_KEY_CREDENTIAL, |len| {
        (len <= MAX_LAUNCH_KEY_BYTES).then_some(()).ok_or(len)
    })
    .map_err(|e| match e {
        ReadError::Missing(path) => missing(format!(
            "{LAUNCH_KEY_CREDENTIAL} is not in $CREDENTIALS_DIRECTORY ({} not found)",
            path.display()
        )),
        ReadError::TooLarge(len) => LaunchError::LaunchKeySize {
            vm: input.vm.clone(),
            len,
        },
        ReadError::Other(e) => e,
    })?;
    if value.is_empty() {
        return Err(LaunchError::LaunchKeySize {
            vm: input.vm.clone(),
            len: 0,
        });
    }
    Ok(Some(Payload {
        name: LAUNCH_KEY_CREDENTIAL.to_string(),
        value,
        secret: true,
    }))
}
