//! Whether `/dev/vhost-vsock` lets any local user claim a guest CID.
//!
//! The host dials an AF_VSOCK VM by its CID alone and accepts any guest
//! certificate. Whoever can open `/dev/vhost-vsock` can start a VM with any
//! CID that is not in use, so while a configured VM is down, its CID can be
//! taken by a VM of any user who may open the device, and unless the VM
//! requires its launch key (see ARCHITECTURE.md, "Launch key") the agent
//! would push that VM's credentials to it. systemd's default udev rule
//! makes the device 0666; the NixOS host module makes it 0660 root:kvm.
//! This module only looks at the node's mode (it never opens the device)
//! and says so loudly for the VMs without a launch key; it never stops
//! the agent.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::{debug, warn};

use crate::config::{Config, LaunchKeyMode};
use vmcred_proto::transport::Target;

/// Where VMMs open vhost-vsock.
pub const VHOST_VSOCK: &str = "/dev/vhost-vsock";

/// What the device node's mode means for the CIDs of stopped VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only its owner and group may open it (the group, `kvm`, is trusted
    /// like the VMM).
    Restricted { mode: u32 },
    /// "Other" has read or write permission: any local user may run a VM
    /// with a stopped VM's CID.
    OpenToAll { mode: u32 },
    /// No such node here: the `vhost_vsock` module is not loaded (it makes
    /// the node when it is) or this process has a private /dev
    /// (`PrivateDevices=`), so nothing can be told.
    Absent,
    /// It could not be examined (a permission error on /dev, say).
    Unknown(ErrorKind),
}

/// The permission bits of "other" that let anyone open the node.
const OTHER_RW: u32 = 0o006;

/// Classifies a node by its permission bits.
pub fn classify(mode: u32) -> Access {
    let mode = mode & 0o7777;
    if mode & OTHER_RW != 0 {
        Access::OpenToAll { mode }
    } else {
        Access::Restricted { mode }
    }
}

/// Looks at `path` with stat(2) only, following a symbolic link as a VMM's
/// open would: nothing is opened.
pub fn access(path: &Path) -> Access {
    match std::fs::metadata(path) {
        Ok(m) => classify(m.permissions().mode()),
        Err(e) if e.kind() == ErrorKind::NotFound => Access::Absent,
        Err(e) => Access::Unknown(e.kind()),
    }
}

/// At start and on each reload: when a VM dialled over AF_VSOCK does not
/// require its launch key and the device is open to every user, one
/// warning saying what that means and how to close it.
pub fn warn_if_open(cfg: &Config) {
    check(cfg, Path::new(VHOST_VSOCK));
}

/// [`warn_if_open`] with the device at `path`; `None` when every VM is
/// either not dialled over AF_VSOCK or requires its launch key (the node
/// is then not even looked at).
fn check(cfg: &Config, path: &Path) -> Option<Access> {
    let exposed: Vec<&str> = cfg
        .vms
        .values()
        .filter(|vm| {
            matches!(vm.target, Target::Vsock { .. }) && vm.launch_key == LaunchKeyMode::Off
        })
        .map(|vm| vm.name.as_str())
        .collect();
    let first = exposed.first()?;
    let a = access(path);
    report(path, a, first, exposed.len());
    Some(a)
}

fn report(path: &Path, access: Access, first: &str, exposed: usize) {
    match access {
        Access::OpenToAll { mode } => warn!(
            device = %path.display(),
            mode = %format!("{mode:04o}"),
            vms = exposed,
            "{} is mode {mode:04o}: any local user can start a VM with the CID of a stopped AF_VSOCK VM that does not require its launch key ({exposed} here, e.g. {first:?}) and receive that VM's credentials from this agent. Set launch_key = \"required\" on those VMs (qemu VMs started through `vmcred-host launch`; the NixOS host module's default there), and make the device 0660 root:kvm: on NixOS, services.vmcred.host.restrictVhostVsock (on by default); elsewhere, a udev rule KERNEL==\"vhost-vsock\", GROUP=\"kvm\", MODE=\"0660\", OPTIONS+=\"static_node=vhost-vsock\" (and only trusted users in kvm)",
            path.display()
        ),
        Access::Restricted { mode } => {
            debug!(device = %path.display(), mode = %format!("{mode:04o}"), "vhost-vsock is not open to other users")
        }
        Access::Absent => debug!(
            device = %path.display(),
            "no vhost-vsock device here (module not loaded, or a private /dev): its mode is not checked"
        ),
        Access::Unknown(kind) => debug!(
            device = %path.display(),
            error = %kind,
            "cannot examine the vhost-vsock device: its mode is not checked"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mode(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vhost-vsock");
        std::fs::write(&p, b"").expect("node stand-in");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, p)
    }

    #[test]
    fn systemds_default_0666_is_open_to_all() {
        let (_d, p) = with_mode(0o666);
        assert_eq!(access(&p), Access::OpenToAll { mode: 0o666 });
    }

    #[test]
    fn any_other_bit_counts() {
        for mode in [0o664, 0o662, 0o604] {
            let (_d, p) = with_mode(mode);
            assert_eq!(access(&p), Access::OpenToAll { mode }, "{mode:o}");
        }
    }

    #[test]
    fn group_only_is_restricted() {
        for mode in [0o660, 0o600, 0o640] {
            let (_d, p) = with_mode(mode);
            assert_eq!(access(&p), Access::Restricted { mode }, "{mode:o}");
        }
    }

    #[test]
    fn a_symlink_is_judged_by_its_target() {
        let (d, p) = with_mode(0o666);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).expect("symlink");
        assert_eq!(access(&link), Access::OpenToAll { mode: 0o666 });
    }

    #[test]
    fn a_missing_node_is_absent_not_an_error() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(access(&d.path().join("vhost-vsock")), Access::Absent);
    }

    #[test]
    fn looked_at_only_when_a_vm_dials_af_vsock() {
        let (_d, p) = with_mode(0o666);
        let cfg = |vms: &str| Config::parse(Path::new("/t/host.toml"), vms).expect("config");
        let hybrid =
            cfg("[vms.h]\nhybrid_socket = \"/v/h.vsock\"\n[vms.u]\nunix_socket = \"/v/u.sock\"");
        assert_eq!(check(&hybrid, &p), None);
        let vsock = cfg("[vms.h]\nhybrid_socket = \"/v/h.vsock\"\n[vms.q]\ncid = 3");
        assert_eq!(check(&vsock, &p), Some(Access::OpenToAll { mode: 0o666 }));
        let keyed = cfg("[vms.q]\ncid = 3\nlaunch_key = \"required\"");
        assert_eq!(
            check(&keyed, &p),
            None,
            "a VM with a launch key is not exposed"
        );
    }

    /// What the operator reads: at WARN only when open to all, saying
    /// what it means and both ways to fix it.
    #[test]
    fn the_warning_says_what_it_means_and_how_to_fix_it() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logged = |mode: u32| {
            let (_d, p) = with_mode(mode);
            let cfg = Config::parse(Path::new("/t/host.toml"), "[vms.q]\ncid = 3").expect("config");
            let buf = Buf::default();
            let out = buf.clone();
            let sub = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_writer(move || out.clone())
                .finish();
            tracing::subscriber::with_default(sub, || check(&cfg, &p));
            let text = buf.0.lock().expect("log buffer").clone();
            String::from_utf8(text).expect("utf-8 log")
        };
        let open = logged(0o666);
        assert_eq!(open.lines().count(), 1, "{open}");
        for want in [
            "WARN",
            "is mode 0666",
            "any local user can start a VM with the CID of a stopped AF_VSOCK VM",
            "receive that VM's credentials",
            "does not require its launch key (1 here, e.g. \"q\")",
            "launch_key = \"required\"",
            "services.vmcred.host.restrictVhostVsock",
            "MODE=\"0660\"",
            "static_node=vhost-vsock",
        ] {
            assert!(open.contains(want), "{want:?} not in {open}");
        }
        assert_eq!(logged(0o660), "", "no warning for 0660");
    }

    #[test]
    fn the_type_bits_are_ignored() {
        // st_mode of a character device: S_IFCHR | 0660.
        assert_eq!(classify(0o020660), Access::Restricted { mode: 0o660 });
        assert_eq!(classify(0o020666), Access::OpenToAll { mode: 0o666 });
    }
}
