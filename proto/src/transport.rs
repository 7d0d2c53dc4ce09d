//! Byte streams between the agents, before TLS.
//!
//! Three real transports:
//! - AF_VSOCK (qemu with vhost-vsock): the host dials `CID:PORT` from a
//!   privileged source port (below 1024, so only root on the host can dial
//!   from it; see `source_port`); the guest listens on `PORT` and accepts
//!   only the host, CID 2.
//! - Hybrid vsock (cloud-hypervisor, Firecracker, vhost-device-vsock): the
//!   VMM exposes one Unix socket per VM; the host connects to it, writes
//!   `CONNECT <port>\n` and reads `OK <n>\n`, after which the stream is
//!   the guest's port. The VMM closes without `OK` when nothing listens
//!   in the guest yet, which the host treats as "not up yet".
//! - Plain Unix sockets, for the guest agent in on-machine tests; the peer
//!   is admitted by its `SO_PEERCRED` uid.

use std::io;
#[cfg(feature = "guest")]
use std::os::unix::fs::PermissionsExt;
#[cfg(feature = "guest")]
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
#[cfg(feature = "host")]
use tokio::io::{AsyncReadExt, AsyncWriteExt};
#[cfg(feature = "guest")]
use tokio::net::UnixListener;
use tokio::net::UnixStream;

mod held;
pub use held::{Held, MAX_HELD};

#[cfg(feature = "host")]
mod corked;
#[cfg(feature = "host")]
mod source_port;
#[cfg(feature = "host")]
pub use corked::{Cork, Corked};
#[cfg(feature = "host")]
pub use source_port::{pick_source_port, SourcePortError, PRIVILEGED_SOURCE_PORTS};

/// The host's CID as a guest sees it (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// Longest reply line we read from a hybrid-vsock muxer (`OK 4294967295\n`
/// is 14 bytes).
#[cfg(feature = "host")]
const MAX_HYBRID_REPLY: usize = 32;

/// Where the host finds one VM's guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Vsock { cid: u32, port: u32 },
    Hybrid { socket: PathBuf, port: u32 },
    Unix { path: PathBuf },
}

impl Target {
    /// The admission rule the guest must apply to connections on this
    /// transport (carried to it in the bootstrap). A Unix socket is only
    /// used by tests and demos, where the host side is a stand-in for a
    /// VMM's hybrid socket.
    pub fn host_transport(&self) -> crate::bootstrap::HostTransport {
        match self {
            Target::Vsock { .. } => crate::bootstrap::HostTransport::Vsock,
            Target::Hybrid { .. } | Target::Unix { .. } => crate::bootstrap::HostTransport::Hybrid,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Target::Hybrid { socket, port } => {
                write!(f, "hybrid vsock {} port {port}", socket.display())
            }
            Target::Unix { path } => write!(f, "unix {}", path.display()),
        }
    }
}

/// Each message carries its I/O cause itself (fields named `error`, not
/// `source`), so printing the chain never repeats it.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot connect to {target}: {error}")]
    Connect { target: String, error: io::Error },
    #[error("{target}: the VMM closed the connection before answering CONNECT (guest agent not listening yet?)")]
    HybridClosed { target: String },
    #[error("{target}: unexpected answer to CONNECT: {answer:?}")]
    HybridRefused { target: String, answer: String },
    #[error("{target}: timed out after {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("cannot listen on {what}: {error}")]
    Listen { what: String, error: io::Error },
    #[error("refused a connection from {peer}: {why}")]
    Refused { peer: String, why: String },
    #[error("accept failed: {0}")]
    Accept(io::Error),
    #[cfg(feature = "host")]
    #[error("cannot dial {target} from a privileged source port: {why}")]
    SourcePort {
        target: String,
        why: SourcePortError,
    },
}

/// A connected byte stream of any transport.
pub enum Stream {
    Unix(UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    /// TLS hands over a whole flight (ServerHello, ChangeCipherSpec and
    /// the encrypted rest; or several records) as one vectored write.
    /// Without this, tokio's default wrote only the first buffer per call:
    /// one syscall per record, and through a hybrid-vsock muxer one relay
    /// and one wake-up of each party per record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            // tokio-vsock has no writev: gather into one write instead.
            Stream::Vsock(s) => gathered(bufs, |b| Pin::new(&mut *s).poll_write(cx, b)),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Bytes [`gathered`] copies into one write: a TLS flight or an HTTP/2
/// reply here is well under it; a larger write goes out in several, and a
/// first buffer at least this long (a full TLS record of a large push)
/// goes out alone, uncopied. Half the host allocator's page-backed
/// threshold (`heap::LARGE` in the host agent, 16 KiB): a copy buffer of
/// 16 KiB cost an `mmap`, four page faults and a `munmap` per write there
/// (found in review).
const GATHER_BYTES: usize = 8 * 1024;

/// Writes `bufs` with one call of `write` (a plain write of a stream with
/// no writev): one buffer as it is, several copied into one of at most
/// [`GATHER_BYTES`] unless the first is that long already. Returns what
/// `write` returns, which counts bytes of the buffers in order, as a
/// vectored write does.
fn gathered(
    bufs: &[io::IoSlice<'_>],
    write: impl FnOnce(&[u8]) -> Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        (None, _) => write(&[]),
        (Some(only), None) => write(only),
        (Some(first), Some(_)) if first.len() >= GATHER_BYTES => write(first),
        _ => {
            let total = bufs.iter().map(|b| b.len()).sum::<usize>();
            let mut joined = Vec::with_capacity(total.min(GATHER_BYTES));
            for b in bufs {
                let room = GATHER_BYTES - joined.len();
                joined.extend_from_slice(&b[..b.len().min(room)]);
            }
            write(&joined)
        }
    }
}

/// Dials `target`, including the hybrid-vsock handshake, within `timeout`.
#[cfg(feature = "host")]
pub async fn dial(target: &Target, timeout: Duration) -> Result<Stream, TransportError> {
    match tokio::time::timeout(timeout, dial_inner(target)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            target: target.to_string(),
            after: timeout,
        }),
    }
}

#[cfg(feature = "host")]
async fn dial_inner(target: &Target) -> Result<Stream, TransportError> {
    let connect_err = |error| TransportError::Connect {
        target: target.to_string(),
        error,
    };
    match target {
        Target::Vsock { cid, port } => Ok(Stream::Vsock(
            source_port::dial_vsock(*cid, *port, target).await?,
        )),
        Target::Unix { path } => Ok(Stream::Unix(
            UnixStream::connect(path).await.map_err(connect_err)?,
        )),
        Target::Hybrid { socket, port } => {
            let mut s = UnixStream::connect(socket).await.map_err(connect_err)?;
            hybrid_handshake(&mut s, *port, target).await?;
            Ok(Stream::Unix(s))
        }
    }
}

/// `CONNECT <port>\n` → `OK <n>\n`, without consuming one byte of the
/// guest's stream (the TLS ServerHello) after the line: the reply is
/// peeked (`MSG_PEEK`) and exactly the line is then read, two `recv`s per
/// connect where reading byte by byte took one per byte (`OK 700\n`: 7,
/// and as many wake-ups of the read loop; see ARCHITECTURE.md, "Host cost
/// per VM"). A line that arrives in pieces is consumed piece by piece
/// (none of them holds a newline, so nothing after the line is taken).
/// Public only for the fuzz target, which drives it over a socket pair.
#[cfg(feature = "host")]
#[doc(hidden)]
pub async fn hybrid_handshake(
    s: &mut UnixStream,
    port: u32,
    target: &Target,
) -> Result<(), TransportError> {
    let io_err = |error| TransportError::Connect {
        target: target.to_string(),
        error,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err)?;
    let mut line = Vec::with_capacity(MAX_HYBRID_REPLY);
    let mut buf = [0u8; MAX_HYBRID_REPLY];
    loop {
        let room = MAX_HYBRID_REPLY - line.len();
        let n = peek(s, &mut buf[..room]).await.map_err(io_err)?;
        if n == 0 {
            return Err(TransportError::HybridClosed {
                target: target.to_string(),
            });
        }
        // Take the line and its newline, or all that came (no newline in
        // it yet), and nothing beyond.
        let (take, done) = match buf[..n].iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (n, line.len() + n >= MAX_HYBRID_REPLY),
        };
        s.read_exact(&mut buf[..take]).await.map_err(io_err)?;
        line.extend_from_slice(&buf[..take]);
        if done {
            break;
        }
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    match answer.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(TransportError::HybridRefused {
            target: target.to_string(),
            answer: crate::rules::display_name(&answer),
        }),
    }
}

/// Waits until `s` is readable and copies what it holds into `buf`
/// without consuming it. `Ok(0)`: the peer closed.
#[cfg(feature = "host")]
async fn peek(s: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    loop {
        s.readable().await?;
        match s.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(s.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                .map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Whether a vsock peer may talk to the guest agent: only the host. Other
/// guests (on hosts that allow guest-to-guest vsock) and the hypervisor
/// (CID 0) are refused.
pub fn vsock_peer_allowed(cid: u32) -> bool {
    cid == HOST_CID
}

/// The guest agent's listening socket.
#[cfg(feature = "guest")]
pub enum Listener {
    Vsock(tokio_vsock::VsockListener),
    Unix {
        listener: UnixListener,
        allowed_uids: Vec<u32>,
    },
}

#[cfg(feature = "guest")]
impl Listener {
    /// Listens on every CID at `port`. Binding a port below 1024 needs
    /// root (`CAP_NET_BIND_SERVICE`) in the guest, which is what lets the
    /// host trust that it reached the guest's root.
    pub fn vsock(port: u32) -> Result<Listener, TransportError> {
        let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
        tokio_vsock::VsockListener::bind(addr)
            .map(Listener::Vsock)
            .map_err(|error| TransportError::Listen {
                what: format!("vsock port {port}"),
                error,
            })
    }

    /// Listens on a Unix socket (mode 0600), admitting peers whose uid is in
    /// `allowed_uids`.
    pub fn unix(path: &Path, allowed_uids: Vec<u32>) -> Result<Listener, TransportError> {
        let listen_err = |error| TransportError::Listen {
            what: path.display().to_string(),
            error,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        Ok(Listener::Unix {
            listener,
            allowed_uids,
        })
    }

    /// Accepts one connection. A peer that is not allowed gets
    /// `TransportError::Refused` (its stream is dropped, closing it); the
    /// caller logs it and accepts again.
    pub async fn accept(&self) -> Result<(Stream, String), TransportError> {
        match self {
            Listener::Vsock(l) => {
                let (s, addr) = l.accept().await.map_err(TransportError::Accept)?;
                let peer = format!("vsock CID {} port {}", addr.cid(), addr.port());
                if !vsock_peer_allowed(addr.cid()) {
                    return Err(TransportError::Refused {
                        peer,
                        why: format!("only the host (CID {HOST_CID}) may connect"),
                    });
                }
                Ok((Stream::Vsock(s), peer))
            }
            Listener::Unix {
                listener,
                allowed_uids,
            } => {
                let (s, _) = listener.accept().await.map_err(TransportError::Accept)?;
                let cred = s.peer_cred().map_err(TransportError::Accept)?;
                let peer = format!(
                    "unix peer pid {} uid {}",
                    cred.pid().unwrap_or(0),
                    cred.uid()
                );
                if !allowed_uids.contains(&cred.uid()) {
                    return Err(TransportError::Refused {
                        peer,
                        why: format!(
                            "uid {} is not among the allowed {allowed_uids:?}",
                            cred.uid()
                        ),
                    });
                }
                Ok((Stream::Unix(s), peer))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathering_writes_the_buffers_in_order_in_one_call() {
        let mut calls = Vec::new();
        let bufs = [
            io::IoSlice::new(b"ab"),
            io::IoSlice::new(b""),
            io::IoSlice::new(b"cde"),
        ];
        let n = gathered(&bufs, |b| {
            calls.push(b.to_vec());
            Poll::Ready(Ok(b.len()))
        });
        assert!(matches!(n, Poll::Ready(Ok(5))));
        assert_eq!(calls, vec![b"abcde".to_vec()]);
        // One buffer goes as it is; more than the cap is cut at the cap.
        let big = vec![7u8; GATHER_BYTES];
        let mut lens = Vec::new();
        let _ = gathered(&[io::IoSlice::new(b""), io::IoSlice::new(&big)], |b| {
            lens.push(b.len());
            Poll::Ready(Ok(b.len()))
        });
        let _ = gathered(&[io::IoSlice::new(b"x"), io::IoSlice::new(&big)], |b| {
            lens.push(b.len());
            Poll::Ready(Ok(b.len()))
        });
        assert_eq!(lens, vec![GATHER_BYTES, GATHER_BYTES]);
        // A first buffer of a full record goes out alone and uncopied; a
        // copy is never larger than the cap.
        let record = vec![9u8; 16 * 1024 + 22];
        let mut seen = Vec::new();
        let _ = gathered(
            &[io::IoSlice::new(&record), io::IoSlice::new(b"next")],
            |b| {
                seen.push((b.as_ptr(), b.len()));
                Poll::Ready(Ok(b.len()))
            },
        );
        assert_eq!(seen, vec![(record.as_ptr(), record.len())]);
        let mut cap = 0;
        let _ = gathered(
            &[io::IoSlice::new(b"hdr"), io::IoSlice::new(&record)],
            |b| {
                cap = b.len();
                Poll::Ready(Ok(b.len()))
            },
        );
        assert_eq!(cap, GATHER_BYTES);
    }

    /// A TLS flight is several records handed over at once: all of them
    /// must leave in one write, not one write per record.
    #[tokio::test]
    async fn a_vectored_write_sends_every_buffer_at_once() {
        use tokio::io::AsyncWriteExt;
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        assert!(s.is_write_vectored());
        let bufs = [
            io::IoSlice::new(b"server hello"),
            io::IoSlice::new(b"ccs"),
            io::IoSlice::new(b"the rest"),
        ];
        let n = s.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 23);
        let mut got = [0u8; 23];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"server helloccsthe rest");
    }

    #[test]
    fn only_the_host_cid_is_allowed() {
        assert!(vsock_peer_allowed(2));
        for cid in [0, 1, 3, 4, 42, u32::MAX] {
            assert!(!vsock_peer_allowed(cid), "{cid}");
        }
    }

    #[cfg(feature = "host")]
    async fn fake_muxer(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1234\n");
            s.write_all(answer).await.unwrap();
            if !answer.starts_with(b"OK") {
                return; // hang up, as a VMM does when nothing listens
            }
            // Echo whatever follows so the test can see no byte was eaten.
            let mut rest = [0u8; 4];
            if s.read_exact(&mut rest).await.is_ok() {
                s.write_all(&rest).await.unwrap();
            }
        });
        (dir, path)
    }

    #[cfg(feature = "host")]
    #[tokio::test]
    async fn a_connect_error_names_its_cause_once() {
        let t = Target::Unix {
            path: "/nonexistent/vmcred/g.sock".into(),
        };
        let e = dial(&t, Duration::from_secs(5)).await.err().unwrap();
        // The cause is in the message and is not a source() to print again.
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string().matches("No such file").count(), 1, "{e}");
    }

    #[tokio::test]
    async fn hybrid_ok_leaves_stream_intact() {
        let (_d, socket) = fake_muxer(b"OK 1234\nPONG").await;
        let t = Target::Hybrid { socket, port: 1234 };
        let mut s = dial(&t, Duration::from_secs(5)).await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PONG");
    }

    /// A VMM may write its reply in pieces: the line is read whole, and
    /// the guest's first bytes after it are left for TLS.
    #[cfg(feature = "host")]
    #[tokio::test]
    async fn hybrid_reply_in_pieces_leaves_stream_intact() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let muxer = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            b.read_exact(&mut buf).await.unwrap();
            for piece in [&b"O"[..], b"K 12", b"34\nPO", b"NG"] {
                b.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            b
        });
        let mut a = a;
        let t = Target::Hybrid {
            socket: "/unused".into(),
            port: 1234,
        };
        hybrid_handshake(&mut a, 1234, &t).await.unwrap();
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PONG");
        drop(muxer.await.unwrap());
    }

    /// A reply that never ends its line is refused once it is too long,
    /// without reading past the limit.
    #[cfg(feature = "host")]
    #[tokio::test]
    async fn hybrid_overlong_reply_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'O'; 100]).await.unwrap();
        let t = Target::Hybrid {
            socket: "/unused".into(),
            port: 1234,
        };
        let e = hybrid_handshake(&mut a, 1234, &t).await.err().unwrap();
        assert!(matches!(e, TransportError::HybridRefused { .. }), "{e}");
        let mut rest = [0u8; 100];
        let n = a.try_read(&mut rest).unwrap();
        assert_eq!(n, 100 - MAX_HYBRID_REPLY);
    }

    #[cfg(feature = "host")]
    #[tokio::test]
    async fn hybrid_close_and_garbage_are_errors() {
        let (_d, socket) = fake_muxer(b"").await;
        let t = Target::Hybrid {
            socket: socket.clone(),
            port: 1234,
        };
        let e = dial(&t, Duration::from_secs(5)).await.err().unwrap();
        assert!(matches!(e, TransportError::HybridClosed { .. }), "{e}");
        let (_d2, socket) = fake_muxer(b"NO\n").await;
        let t = Target::Hybrid { socket, port: 1234 };
        let e = dial(&t, Duration::from_secs(5)).await.err().unwrap();
        assert!(e.to_string().contains("unexpected answer"), "{e}");
    }

    #[cfg(feature = "guest")]
    #[tokio::test]
    async fn unix_listener_checks_uid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let me = nix::unistd::geteuid().as_raw();
        let l = Listener::unix(&path, vec![me.wrapping_add(1)]).unwrap();
        let t = Target::Unix { path: path.clone() };
        let (_c, accepted) = tokio::join!(dial(&t, Duration::from_secs(5)), l.accept());
        assert!(matches!(accepted, Err(TransportError::Refused { .. })));
        let l = Listener::unix(&path, vec![me]).unwrap();
        let (_c, accepted) = tokio::join!(dial(&t, Duration::from_secs(5)), l.accept());
        assert!(accepted.is_ok());
    }
}
