//! Accepting the host: admission at accept time, TLS with the pinned host
//! key under a deadline, then gRPC on the one authenticated session.
//!
//! Anyone who can reach the port may try, so nothing a peer does can keep
//! the real host out:
//! - peers are admitted on their address before any byte is read
//!   ([`crate::admission`]; on a Unix socket, by uid);
//! - a handshake has a deadline, and the number in progress is bounded;
//!   when the bound is reached, a newly admitted connection evicts the
//!   oldest handshake still in progress instead of being refused, so
//!   stalled clients cannot fill the slots and lock the host out (the host
//!   completes its handshake in milliseconds; a staller never does);
//! - there is one authenticated session: a new one supersedes and closes
//!   the previous (a host agent that restarted, or a connection that died
//!   without a close the VMM passed on);
//! - a session's authority is its host key's pin, and lasts only while
//!   that pin is in the pin set: every RPC is refused once it is dropped (a
//!   key rollover's switch or revoke), and the session's reads end and
//!   writes fail, which closes it.
//!
//! Nothing here ends because a host went away: the loop serves across
//! outages for as long as the agent runs.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use vmcred_proto::loglimit::LogLimiter;
use vmcred_proto::rpc::GuestServer;
use vmcred_proto::rules::MAX_MESSAGE_BYTES;
use vmcred_proto::tls::{guest_server_config_with, Pin as HostPin, TlsError};
use vmcred_proto::transport::{Held, Stream};

use crate::listener::{Accepted, GuestListener};
use crate::pins::PinStore;
use crate::service::GuestService;

/// Limits on what a peer can hold of the agent.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// How long a peer may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; beyond it the oldest is evicted.
    pub max_handshakes: usize,
    /// HTTP/2 pings that find a dead host (a VMM does not always pass a
    /// close on), so that its session ends: sent once nothing was read
    /// for `keepalive_interval`, and the session closed if no answer came
    /// within `keepalive_timeout`. A dead host's session thus ends at most
    /// their sum after its last frame.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// See [`ServerOptions::default`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(120);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 16,
            // Longer than the host's probe (a Hello every 45-60 s at its
            // default `keepalive_interval`), so that a live host's probes
            // keep the ping from ever being sent: hyper's keepalive timer
            // still wakes once per interval to see that frames came, so a
            // longer interval is fewer idle wake-ups. A dead host's
            // session ends within 140 s of its last frame; a host that
            // restarted supersedes it at once anyway.
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    /// Causes are in the messages, never a `source()`: `main` prints
    /// `{e:#}`, which would repeat a source already in the text.
    #[error("{0}")]
    Tls(TlsError),
    /// The transport error with its whole chain: its own text is only
    /// "transport error".
    #[error("gRPC server stopped: {0}")]
    Grpc(String),
    #[error("gRPC server stopped")]
    Stopped,
}

/// An authenticated host session. Reads end (EOF) and writes fail once a
/// newer session superseded it, which makes the HTTP/2 server close it.
///
/// Writes are held here until a flush, and a flush sends them as one
/// TLS write only once the host's pending bytes are read and the tasks
/// that may answer them have run: every write is a relay through the
/// VMM's muxer and a wake-up of the host, and HTTP/2 alone flushed three
/// times in a connect (its SETTINGS, then the SETTINGS ack and window
/// update, then the `Hello` reply; ARCHITECTURE.md, "Host cost per VM").
/// Nothing is held for long: a flush is put off only while the host's
/// bytes are already buffered here (HTTP/2 reads them at once and flushes
/// again when it runs out), and otherwise by two turns of the runtime.
pub struct Session {
    stream: TlsStream<Stream>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    token: CancellationToken,
    pin: HostPin,
    pins: Arc<PinStore>,
    /// Plaintext written and not yet handed to TLS.
    held: Held,
    /// Turns of the runtime this flush has let other tasks run.
    yields: u8,
}

/// Turns of the runtime a flush waits before it sends. A unary reply
/// takes two: in the first the RPC's task answers and queues its
/// headers, in the second, once the connection task has given it send
/// capacity, its message and trailers.
const FLUSH_YIELDS: u8 = 2;

/// How often a refused connection is logged at most; the line that gets
/// through says how many were refused since the last one.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Session {
    fn new(
        stream: TlsStream<Stream>,
        token: CancellationToken,
        pin: HostPin,
        pins: Arc<PinStore>,
    ) -> Session {
        Session {
            stream,
            closed: Box::pin(token.clone().cancelled_owned()),
            token,
            pin,
            pins,
            held: Held::default(),
            yields: 0,
        }
    }

    /// Superseded, or its pin was dropped since it was admitted.
    fn ended(&self) -> bool {
        self.token.is_cancelled() || !vmcred_proto::tls::PinPolicy::accepts(&*self.pins, &self.pin)
    }

    /// Decrypted bytes from the host wait to be read: HTTP/2 will read
    /// them before it waits again, and flush after them.
    fn host_bytes_buffered(&self) -> bool {
        let tls = self.stream.get_ref().1;
        !tls.is_handshaking() && !tls.wants_read()
    }

    /// Hands every held byte to TLS (which writes it to the socket).
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.held.poll_send(&mut self.stream, cx)
    }
}

/// What the service learns about the session a request came on.
#[derive(Debug, Clone, Copy)]
pub struct SessionInfo {
    /// The pin of the host key this session was authenticated with.
    pub pin: HostPin,
}

impl tonic::transport::server::Connected for Session {
    type ConnectInfo = SessionInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        SessionInfo { pin: self.pin }
    }
}

impl AsyncRead for Session {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // Polling `closed` registers the waker that ends a pending read.
        if me.ended() || me.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.ended() {
            return Poll::Ready(Err(superseded()));
        }
        if ready!(me
            .held
            .poll_take(&mut me.stream, cx, &[io::IoSlice::new(buf)]))?
        {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut me.stream).poll_write(cx, buf)
    }
    /// HTTP/2 hands a reply's frames over as one vectored write (its
    /// buffered frames and the message body): held whole, or passed on
    /// whole, they go out as one TLS write instead of one per buffer.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.ended() {
            return Poll::Ready(Err(superseded()));
        }
        if ready!(me.held.poll_take(&mut me.stream, cx, bufs))? {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut me.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    /// Sends what is held, unless more is about to be written (see
    /// [`Session`]): while the host's bytes are buffered, HTTP/2 flushes
    /// again after reading them; otherwise the first calls yield
    /// ([`FLUSH_YIELDS`] turns: other tasks, such as the RPC answering
    /// the request just read, run and add their frames) and then one
    /// sends.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.ended() {
            return Poll::Ready(Err(superseded()));
        }
        if !me.held.is_empty() {
            if me.host_bytes_buffered() {
                return Poll::Ready(Ok(()));
            }
            if me.yields < FLUSH_YIELDS {
                me.yields += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(me.poll_send_held(cx))?;
        }
        me.yields = 0;
        Pin::new(&mut me.stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.ended() {
            ready!(me.poll_send_held(cx))?;
        }
        Pin::new(&mut me.stream).poll_shutdown(cx)
    }
}

fn superseded() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "superseded by a newer host session, or its host key is no longer pinned",
    )
}

/// Serves `service` to hosts holding the key `pin` on `listener`. Returns
/// only on a fatal error.
pub async fn serve(
    listener: GuestListener,
    pin: HostPin,
    service: GuestService,
    opts: ServerOptions,
) -> Result<(), ServerError> {
    serve_pinned(listener, Arc::new(PinStore::fixed(pin)), service, opts).await
}

/// Serves `service` to hosts holding a key in `pins`, which a key
/// rollover may change between handshakes. Returns only on a fatal error.
pub async fn serve_pinned(
    listener: GuestListener,
    pins: Arc<PinStore>,
    service: GuestService,
    opts: ServerOptions,
) -> Result<(), ServerError> {
    let acceptor =
        TlsAcceptor::from(guest_server_config_with(pins.clone()).map_err(ServerError::Tls)?);
    let (tx, rx) = mpsc::channel::<io::Result<Session>>(4);
    let accept = accept_loop(listener, acceptor, tx, opts, pins.clone());
    let grpc = tonic::transport::Server::builder()
        .layer(tonic::service::InterceptorLayer::new(still_pinned(pins)))
        .accept_http1(false)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .max_concurrent_streams(Some(8))
        .add_service(
            GuestServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(ReceiverStream::new(rx));
    tokio::select! {
        () = accept => Err(ServerError::Stopped),
        r = grpc => match r {
            Ok(()) => Err(ServerError::Stopped),
            Err(e) => Err(ServerError::Grpc(error_chain(&e))),
        }
    }
}

/// Refuses every RPC on a session whose host key is no longer pinned: a
/// session authorised by a key that a rollover dropped since it connected
/// has no authority left, even on a connection that is still open.
fn still_pinned(
    pins: Arc<PinStore>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let Some(session) = req.extensions().get::<SessionInfo>() else {
            return Err(tonic::Status::unauthenticated(
                "no authenticated host key on this session",
            ));
        };
        if !vmcred_proto::tls::PinPolicy::accepts(&*pins, &session.pin) {
            tracing::warn!(pin = %session.pin, "refused an RPC on a session whose host key is no longer pinned");
            return Err(tonic::Status::unauthenticated(
                "this session's host key is no longer pinned (a key rollover dropped it); \
                 reconnect with the current key",
            ));
        }
        Ok(req)
    }
}

/// An error and its sources as one line, each cause once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let shown = cause.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        next = cause.source();
    }
    text
}

/// Handshakes in progress, oldest first.
#[derive(Default)]
struct Pending {
    next_id: u64,
    queue: VecDeque<(u64, String, AbortHandle)>,
}

/// Removes a finished (or evicted) handshake from [`Pending`].
struct PendingSlot {
    id: u64,
    pending: Arc<Mutex<Pending>>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut p = lock(&self.pending);
        p.queue.retain(|(id, _, _)| *id != self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(
    listener: GuestListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<io::Result<Session>>,
    opts: ServerOptions,
    pins: Arc<PinStore>,
) {
    let pending = Arc::new(Mutex::new(Pending::default()));
    let current: Arc<Mutex<Option<CancellationToken>>> = Arc::new(Mutex::new(None));
    let max = opts.max_handshakes.max(1);
    // Any host user can connect in a loop and be refused (an unprivileged
    // source port): one line per period, not one per attempt, so the
    // journal and journald's per-unit rate limit keep room for the rest.
    let refusals = LogLimiter::new(REFUSAL_LOG_EVERY);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(Accepted::Peer(s, peer)) => (s, peer),
            Ok(Accepted::Refused { peer, why }) => {
                if let Some(suppressed) = refusals.allow(()) {
                    tracing::warn!(%peer, suppressed, "refused a connection before TLS: {why}");
                }
                continue;
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, tx, current, pins) =
            (acceptor.clone(), tx.clone(), current.clone(), pins.clone());
        let evicted = {
            let mut p = lock(&pending);
            let evicted = if p.queue.len() >= max {
                p.queue.pop_front()
            } else {
                None
            };
            let id = p.next_id;
            p.next_id += 1;
            let slot = PendingSlot {
                id,
                pending: pending.clone(),
            };
            let shown = peer.clone();
            // Spawned under the lock so the slot is queued before the task
            // can finish and remove it.
            let task = tokio::spawn(async move {
                let tls = match tokio::time::timeout(
                    opts.handshake_timeout,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "TLS handshake failed; connection dropped");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, timeout = ?opts.handshake_timeout, "TLS handshake timed out; connection dropped");
                        return;
                    }
                };
                // Authenticated: no longer evictable.
                drop(slot);
                // The verifier accepted exactly one certificate; its pin
                // is the session's authority in a key rollover.
                let Some(pin) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| HostPin::of_certificate(c.as_ref()).ok())
                else {
                    tracing::warn!(%peer, "authenticated session without a host certificate; dropped");
                    return;
                };
                pins.seen(pin);
                // Another session may have dropped this pin between our
                // handshake and `seen` (a rollover's retire): a key no
                // longer pinned gets no session, not even a short one.
                if !vmcred_proto::tls::PinPolicy::accepts(&*pins, &pin) {
                    tracing::warn!(%peer, "host key was dropped from the pin set during the handshake; session refused");
                    return;
                }
                let token = CancellationToken::new();
                let previous = lock(&current).replace(token.clone());
                if let Some(previous) = previous {
                    if !previous.is_cancelled() {
                        tracing::info!(%peer, "a new host session supersedes the previous one; closing that");
                        previous.cancel();
                    }
                }
                tracing::info!(%peer, "host connected");
                let session = Session::new(tls, token, pin, pins);
                if tx.send(Ok(session)).await.is_err() {
                    tracing::warn!(%peer, "gRPC server is gone; connection dropped");
                }
            });
            p.queue.push_back((id, shown, task.abort_handle()));
            evicted
        };
        if let Some((_, peer, handle)) = evicted {
            tracing::warn!(%peer, max, "too many handshakes in progress; evicted the oldest");
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vmcred_proto::tls::{host_client_config, server_name, Identity};

    use super::*;

    /// A session and the raw socket of the host's end, after a real
    /// handshake: what the host receives can be read off that socket.
    async fn session_pair() -> (
        Session,
        tokio_rustls::client::TlsStream<tokio::net::UnixStream>,
    ) {
        let host = Identity::generate("vmcred-host").unwrap();
        let pin = host.pin().unwrap();
        let pins = Arc::new(PinStore::fixed(pin));
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let acceptor = TlsAcceptor::from(guest_server_config_with(pins.clone()).unwrap());
        let connector = tokio_rustls::TlsConnector::from(host_client_config(&host).unwrap());
        let (server, client) = tokio::join!(
            acceptor.accept(Stream::Unix(b)),
            connector.connect(server_name(), a)
        );
        let session = Session::new(server.unwrap(), CancellationToken::new(), pin, pins);
        (session, client.unwrap())
    }

    /// The TLS records waiting on the host's socket, by length; empty when
    /// nothing was sent. Reads them off the socket (the test's end).
    fn records_sent(host: &tokio::net::UnixStream) -> Vec<usize> {
        let mut buf = vec![0u8; 64 * 1024];
        // Not `try_read`: that answers from tokio's cached readiness.
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let n = match recv(host.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => 0,
            Err(e) => panic!("{e}"),
        };
        let mut records = Vec::new();
        let mut at = 0;
        while at + 5 <= n {
            let len = u16::from_be_bytes([buf[at + 3], buf[at + 4]]) as usize;
            records.push(len);
            at += 5 + len;
        }
        assert_eq!(at, n, "a partial record");
        records
    }

    /// Polls a flush once, as the HTTP/2 connection task does.
    async fn flush_once(session: &mut Session) -> Poll<io::Result<()>> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *session).poll_flush(cx))).await
    }

    /// What HTTP/2 writes in separate flushes at connect (its SETTINGS,
    /// then the SETTINGS ack and window update, then the reply) leaves in
    /// one TLS record: the first flush, while the host's preface is still
    /// buffered unread, sends nothing; a flush with nothing buffered
    /// yields first, so that the RPC's reply joins it.
    #[tokio::test]
    async fn flushes_at_connect_leave_as_one_write() {
        let (mut session, mut host) = session_pair().await;
        host.write_all(b"preface").await.unwrap();
        host.flush().await.unwrap();
        let mut first = [0u8; 1];
        session.read_exact(&mut first).await.unwrap();

        session.write_all(b"settings").await.unwrap();
        assert!(matches!(
            flush_once(&mut session).await,
            Poll::Ready(Ok(()))
        ));
        assert!(
            records_sent(host.get_ref().0).is_empty(),
            "sent while the host's bytes were unread"
        );

        let mut rest = [0u8; 6];
        session.read_exact(&mut rest).await.unwrap();
        session.write_all(b"ack").await.unwrap();
        for _ in 0..FLUSH_YIELDS {
            assert!(
                flush_once(&mut session).await.is_pending(),
                "no yield before sending"
            );
            assert!(records_sent(host.get_ref().0).is_empty());
        }
        session.write_all(b"reply").await.unwrap();
        session.flush().await.unwrap();
        // One record: 16 bytes, the content type byte and the AEAD tag.
        assert_eq!(records_sent(host.get_ref().0), vec![16 + 1 + 16]);
    }

    /// A shutdown sends what is held first.
    #[tokio::test]
    async fn shutdown_sends_what_is_held() {
        let (mut session, mut host) = session_pair().await;
        session.write_all(b"last words").await.unwrap();
        session.shutdown().await.unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    /// A write larger than what is held goes to TLS at once, after what
    /// was held, in order.
    #[tokio::test]
    async fn large_writes_pass_through_in_order() {
        let (mut session, mut host) = session_pair().await;
        session.write_all(b"small").await.unwrap();
        let big = vec![7u8; vmcred_proto::transport::MAX_HELD + 1];
        session.write_all(&big).await.unwrap();
        session.flush().await.unwrap();
        let mut got = vec![0u8; 5 + big.len()];
        host.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"small");
        assert!(got[5..].iter().all(|&b| b == 7));
    }

    /// HTTP/2 hands a reply's frames over as one vectored write: the
    /// session takes it whole, so it leaves in one write rather than one
    /// per buffer (each a relay through the VMM's muxer).
    #[tokio::test]
    async fn a_session_passes_vectored_writes_on_whole() {
        let (mut session, mut client) = session_pair().await;
        assert!(session.is_write_vectored());
        let bufs = [IoSlice::new(b"headers"), IoSlice::new(b"body")];
        assert_eq!(session.write_vectored(&bufs).await.unwrap(), 11);
        session.flush().await.unwrap();
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headersbody");
    }
}
