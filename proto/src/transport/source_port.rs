//! The host's AF_VSOCK dial from a privileged source port.
//!
//! On AF_VSOCK any host user can connect to a guest's port, so the guest
//! admits (bootstrap `host=vsock`) only connections from CID 2 whose source
//! port is below 1024: binding one needs `CAP_NET_BIND_SERVICE`, which only
//! the host's root (the real host agent) has. The host therefore binds its
//! socket to a free port in that range before connecting. Hybrid vsock
//! (a Unix socket to the VMM) does not come through here: there the VMM
//! picks the source port and the socket file's permissions are the gate.
//!
//! This code only runs inside a VM's host side with `/dev/vhost-vsock`;
//! the port choice is a pure function tested on its own.

use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, VsockAddr,
};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use super::TransportError;

/// The source ports tried, from the highest down: below 1024 (privileged),
/// above 0.
pub const PRIVILEGED_SOURCE_PORTS: RangeInclusive<u32> = 1..=1023;

#[derive(Debug, Error)]
pub enum SourcePortError {
    #[error("binding a port below 1024 needs CAP_NET_BIND_SERVICE (run the host agent as root, or grant it AmbientCapabilities=CAP_NET_BIND_SERVICE): {0}")]
    NeedsCapability(io::Error),
    #[error("every privileged source port (1-1023) is in use")]
    Exhausted,
    #[error("cannot bind source port {port}: {error}")]
    Bind { port: u32, error: io::Error },
}

/// Tries `bind` on each privileged port from 1023 downward and returns the
/// first that binds. A port in use is skipped; a permission error stops at
/// once (no other port would do better); any other error stops too.
pub fn pick_source_port(
    mut bind: impl FnMut(u32) -> io::Result<()>,
) -> Result<u32, SourcePortError> {
    for port in PRIVILEGED_SOURCE_PORTS.rev() {
        match bind(port) {
            Ok(()) => return Ok(port),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                return Err(SourcePortError::NeedsCapability(e))
            }
            Err(error) => return Err(SourcePortError::Bind { port, error }),
        }
    }
    Err(SourcePortError::Exhausted)
}

/// Connects to `cid:port` from a privileged source port. The caller bounds
/// the whole dial with its deadline (`transport::dial`).
pub(super) async fn dial_vsock(
    cid: u32,
    port: u32,
    target: &super::Target,
) -> Result<tokio_vsock::VsockStream, TransportError> {
    let connect_err = |error: io::Error| TransportError::Connect {
        target: target.to_string(),
        error,
    };
    let fd: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| connect_err(e.into()))?;
    pick_source_port(|p| {
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, p)).map_err(io::Error::from)
    })
    .map_err(|why| TransportError::SourcePort {
        target: target.to_string(),
        why,
    })?;
    match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(connect_err(e.into())),
    }
    // Non-blocking connect: writable means finished; SO_ERROR says how.
    // SAFETY: an OwnedFd is a valid open descriptor, owned by the AsyncFd
    // until `into_inner`, and its raw fd never changes.
    let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| connect_err(e.into()))?;
    loop {
        let mut guard = afd.writable().await.map_err(connect_err)?;
        match getsockopt(&afd.get_ref().as_fd(), sockopt::SocketError) {
            Ok(0) => break,
            Ok(e) if e == libc::EINPROGRESS || e == libc::EAGAIN => guard.clear_ready(),
            Ok(e) => return Err(connect_err(io::Error::from_raw_os_error(e))),
            Err(e) => return Err(connect_err(e.into())),
        }
    }
    let fd = afd.into_inner();
    tokio_vsock::VsockStream::new(vsock::VsockStream::from(fd)).map_err(connect_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn takes_the_highest_free_privileged_port() {
        let mut tried = Vec::new();
        let got = pick_source_port(|p| {
            tried.push(p);
            if p > 1020 {
                Err(err(libc::EADDRINUSE))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(got, 1020);
        assert_eq!(tried, vec![1023, 1022, 1021, 1020]);
    }

    #[test]
    fn without_the_capability_it_stops_at_once_and_says_why() {
        let mut calls = 0;
        let e = pick_source_port(|_| {
            calls += 1;
            Err(err(libc::EACCES))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(e.to_string().contains("CAP_NET_BIND_SERVICE"), "{e}");
    }

    #[test]
    fn all_ports_busy_is_a_clear_error_and_never_an_unprivileged_port() {
        let mut tried = Vec::new();
        let e = pick_source_port(|p| {
            tried.push(p);
            Err(err(libc::EADDRINUSE))
        })
        .unwrap_err();
        assert!(matches!(e, SourcePortError::Exhausted), "{e}");
        assert_eq!(tried.len(), 1023);
        assert!(tried.iter().all(|p| (1..1024).contains(p)));
    }

    #[test]
    fn other_bind_errors_name_the_port() {
        let e = pick_source_port(|_| Err(err(libc::EINVAL))).unwrap_err();
        assert!(e.to_string().contains("1023"), "{e}");
    }
}
