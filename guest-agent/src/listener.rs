//! The guest agent's listening socket and the admission of peers at accept
//! time (see [`crate::admission`]). Binding happens here, once, and only a
//! bound listener is ever reported as listening.

use std::io;
use std::path::Path;

use thiserror::Error;
use vmcred_proto::bootstrap::HostTransport;
use vmcred_proto::transport::{Listener as UnixListener, Stream, TransportError};

use crate::admission::{admit, Admission, FIRST_UNPRIVILEGED_PORT};

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("cannot listen on {what}: {cause}{hint}")]
    Bind {
        what: String,
        /// Not `source`: the message already includes it, and a chained
        /// source would print it twice.
        cause: io::Error,
        hint: String,
    },
}

/// What an accept produced.
pub enum Accepted {
    /// A peer that passed admission, and how it is shown in logs.
    Peer(Stream, String),
    /// A peer refused before any byte was read (its stream is closed).
    Refused { peer: String, why: String },
}

/// Where the host's connections arrive.
pub enum GuestListener {
    /// AF_VSOCK, admitted by [`admit`] under the bootstrap's rule.
    Vsock {
        listener: tokio_vsock::VsockListener,
        rule: HostTransport,
    },
    /// A Unix socket (tests, local use), admitted by the peer's uid.
    Unix(UnixListener),
}

/// The likely cause of a bind failure, as a sentence to append.
pub fn bind_hint(port: Option<u32>, e: &io::Error) -> &'static str {
    match (e.kind(), port) {
        (io::ErrorKind::PermissionDenied, Some(p)) if p < FIRST_UNPRIVILEGED_PORT => {
            ". Binding a port below 1024 needs CAP_NET_BIND_SERVICE (root in the guest): \
             run vmcred-guest as root and keep CAP_NET_BIND_SERVICE in the unit's \
             CapabilityBoundingSet"
        }
        (io::ErrorKind::AddrInUse, _) => {
            ". Another process listens there already (a second vmcred-guest?)"
        }
        _ if matches!(
            e.raw_os_error(),
            Some(libc::EAFNOSUPPORT) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
        ) =>
        {
            ". This VM has no usable vsock device: give it one (qemu vhost-vsock-pci, \
             cloud-hypervisor --vsock, ...) and load the guest's virtio vsock transport"
        }
        _ => "",
    }
}

impl GuestListener {
    /// Binds vsock `port` on every CID. Only call this inside a guest.
    pub fn vsock(port: u32, rule: HostTransport) -> Result<GuestListener, ListenError> {
        let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
        tokio_vsock::VsockListener::bind(addr)
            .map(|listener| GuestListener::Vsock { listener, rule })
            .map_err(|cause| ListenError::Bind {
                what: format!("vsock port {port}"),
                hint: bind_hint(Some(port), &cause).to_string(),
                cause,
            })
    }

    /// Binds a Unix socket (mode 0600) admitting peers with these uids.
    pub fn unix(path: &Path, allowed_uids: Vec<u32>) -> Result<GuestListener, ListenError> {
        UnixListener::unix(path, allowed_uids)
            .map(GuestListener::Unix)
            .map_err(|e| match e {
                TransportError::Listen { what, error } => ListenError::Bind {
                    what,
                    hint: bind_hint(None, &error).to_string(),
                    cause: error,
                },
                other => ListenError::Bind {
                    what: path.display().to_string(),
                    cause: io::Error::other(other.to_string()),
                    hint: String::new(),
                },
            })
    }

    /// Accepts one connection and applies admission to it. `Err` only for
    /// failures of the listener itself (e.g. out of file descriptors).
    pub async fn accept(&self) -> io::Result<Accepted> {
        match self {
            GuestListener::Vsock { listener, rule } => {
                let (s, addr) = listener.accept().await?;
                let peer = format!("vsock CID {} port {}", addr.cid(), addr.port());
                match admit(addr.cid(), addr.port(), *rule) {
                    Admission::Admit => Ok(Accepted::Peer(Stream::Vsock(s), peer)),
                    refused => Ok(Accepted::Refused {
                        peer,
                        why: refused.reason().to_string(),
                    }),
                }
            }
            GuestListener::Unix(l) => match l.accept().await {
                Ok((s, peer)) => Ok(Accepted::Peer(s, peer)),
                Err(TransportError::Refused { peer, why }) => Ok(Accepted::Refused { peer, why }),
                Err(TransportError::Accept(e)) => Err(e),
                Err(other) => Err(io::Error::other(other.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_cause() {
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(bind_hint(Some(700), &denied).contains("CAP_NET_BIND_SERVICE"));
        assert!(bind_hint(Some(700), &denied).contains("root in the guest"));
        assert_eq!(bind_hint(Some(5000), &denied), "");
        let busy = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(bind_hint(Some(700), &busy).contains("Another process"));
        let nodev = io::Error::from_raw_os_error(libc::ENODEV);
        assert!(bind_hint(Some(700), &nodev).contains("vsock device"));
        let e = ListenError::Bind {
            what: "vsock port 700".into(),
            hint: bind_hint(Some(700), &denied).into(),
            cause: denied,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot listen on vsock port 700: Permission denied"),
            "{text}"
        );
    }
}
