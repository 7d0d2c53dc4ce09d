//! Which vsock peers may even start a TLS handshake with the guest agent.
//!
//! Any host user can open an AF_VSOCK connection to a guest, and a TLS
//! handshake costs the guest memory and a slot. So the guest decides on the
//! peer's address alone, at accept time, before any byte is read: only the
//! host (CID 2), and, when the host dials with AF_VSOCK, only from a
//! privileged source port, which the host agent binds and which only root
//! (`CAP_NET_BIND_SERVICE`) on the host can. On hybrid vsock the VMM picks
//! the source port, so the port says nothing there; the VMM's Unix socket
//! permissions on the host are the gate instead.

use vmcred_proto::bootstrap::HostTransport;
use vmcred_proto::transport::HOST_CID;

/// Source ports below this can only be bound by a privileged process.
pub const FIRST_UNPRIVILEGED_PORT: u32 = 1024;

/// The verdict on one connecting peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Not the host: another guest, or the hypervisor.
    NotHost,
    /// The host, but from a port any host user can bind.
    UnprivilegedPort,
}

impl Admission {
    /// Why a refused peer was refused, for the log.
    pub fn reason(self) -> &'static str {
        match self {
            Admission::Admit => "admitted",
            Admission::NotHost => "only the host (CID 2) may connect",
            Admission::UnprivilegedPort => {
                "the host agent connects from a privileged source port (below 1024); \
                 this one can be bound by any host user"
            }
        }
    }
}

/// Decides on a vsock peer from its address and the bootstrap's rule.
pub fn admit(peer_cid: u32, peer_port: u32, rule: HostTransport) -> Admission {
    admit_as_host(HOST_CID, peer_cid, peer_port, rule)
}

/// [`admit`] with the host's CID as a parameter, so that the VM stage can
/// run this very decision on real AF_VSOCK peers over the guest's loopback
/// transport, where CID 1 stands in for the host (`tests/vm`,
/// `vmcred-vsock-probe`). The agent itself only ever calls [`admit`]: no
/// configuration reaches `host_cid`.
pub fn admit_as_host(
    host_cid: u32,
    peer_cid: u32,
    peer_port: u32,
    rule: HostTransport,
) -> Admission {
    if peer_cid != host_cid {
        return Admission::NotHost;
    }
    match rule {
        HostTransport::Vsock if peer_port >= FIRST_UNPRIVILEGED_PORT => Admission::UnprivilegedPort,
        HostTransport::Vsock | HostTransport::Hybrid => Admission::Admit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every CID class and every port boundary, under both rules.
    #[test]
    fn exhaustive_over_cids_ports_and_rules() {
        let cids = [0, 1, 2, 3, 4, 42, 1023, 1024, u32::MAX - 1, u32::MAX];
        let mut ports: Vec<u32> = (0..=2048).collect();
        ports.extend([65535, 65536, u32::MAX - 1, u32::MAX]);
        for rule in [HostTransport::Vsock, HostTransport::Hybrid] {
            for &cid in &cids {
                for &port in &ports {
                    let got = admit(cid, port, rule);
                    let want = if cid != 2 {
                        Admission::NotHost
                    } else if rule == HostTransport::Vsock && port >= 1024 {
                        Admission::UnprivilegedPort
                    } else {
                        Admission::Admit
                    };
                    assert_eq!(got, want, "cid {cid} port {port} rule {rule:?}");
                }
            }
        }
    }

    /// The parameterised form is the same decision: with CID 2 it is
    /// `admit`, and with another CID only that CID passes the CID check.
    #[test]
    fn admit_as_host_is_admit_with_the_cid_as_a_parameter() {
        for rule in [HostTransport::Vsock, HostTransport::Hybrid] {
            for cid in [0, 1, 2, 3, u32::MAX] {
                for port in [0, 1, 1023, 1024, 5000, u32::MAX] {
                    assert_eq!(
                        admit_as_host(HOST_CID, cid, port, rule),
                        admit(cid, port, rule)
                    );
                    let other = admit_as_host(1, cid, port, rule);
                    if cid != 1 {
                        assert_eq!(other, Admission::NotHost);
                    } else {
                        assert_eq!(other, admit(HOST_CID, port, rule));
                    }
                }
            }
        }
    }

    #[test]
    fn the_boundary_is_1023_and_absent_rule_is_strict() {
        assert_eq!(admit(2, 1023, HostTransport::Vsock), Admission::Admit);
        assert_eq!(
            admit(2, 1024, HostTransport::Vsock),
            Admission::UnprivilegedPort
        );
        assert_eq!(admit(2, 1024, HostTransport::Hybrid), Admission::Admit);
        // A bootstrap without `host=` is read as the strict rule.
        assert_eq!(HostTransport::default(), HostTransport::Vsock);
        assert!(Admission::UnprivilegedPort.reason().contains("privileged"));
        assert!(Admission::NotHost.reason().contains("CID 2"));
    }
}
