//! gRPC over a stream that is already connected and TLS-wrapped.
//!
//! The host dials (see `transport`), so neither side uses tonic's own
//! listener or connector: the server is fed accepted streams, and the
//! client's channel is built on the one stream the host just dialled. When
//! that stream dies the channel does not redial on its own; the host's VM
//! loop sees the error and dials again with its back-off.

#[cfg(feature = "host")]
use bytes::Bytes;
#[cfg(feature = "host")]
use hyper_util::rt::TokioIo;
use std::io;
#[cfg(feature = "host")]
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};

#[cfg(feature = "host")]
use tonic::codegen::http::{self, Uri};
#[cfg(feature = "host")]
use tonic::transport::{Channel, Endpoint};

#[cfg(feature = "host")]
use crate::rules::MAX_MESSAGE_BYTES;

/// Generated messages and service stubs from `proto/vmcred.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("vmcred.v1");
}

#[cfg(feature = "host")]
pub use pb::guest_client::GuestClient;
#[cfg(feature = "guest")]
pub use pb::guest_server::{Guest, GuestServer};

/// The origin the host's requests name (`:scheme` and `:authority`). The
/// guest checks neither: the stream already is the connection to its VM.
#[cfg(feature = "host")]
const ORIGIN: &str = "http://vmcred-guest";

/// A gRPC client on an established stream: one HTTP/2 connection (h2)
/// driven by one task, and [`GuestChannel`] handing it requests directly.
///
/// Not tonic's `Channel`: that puts a `tower::Buffer` (a worker task and
/// a channel whose first block holds 32 requests, about 9 KiB) and a
/// reconnecting wrapper in front of the connection, for every VM, to
/// share a client between tasks and redial it. Only the VM's own task
/// uses the client and the VM loop redials, so neither is needed (see
/// ARCHITECTURE.md, "Host cost per VM").
///
/// Nor hyper's HTTP/2 client: it hands each request to its connection
/// task through a channel, opens the stream there, and only then sends
/// the body from a task of its own, so every unary call left as two
/// writes (HEADERS, then DATA), each a TLS record, a syscall and a
/// wake-up of the muxer and the guest, and cost the host two task
/// spawns (body and response) per call. Here the caller's task queues
/// HEADERS and the whole message together, and the connection task
/// writes them as one record (ARCHITECTURE.md, "Keepalive"). The HTTP/2
/// settings are hyper's defaults, which the host used before.
#[cfg(feature = "host")]
pub async fn host_client_over<S>(stream: S) -> Result<HostClient, h2::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .initial_max_send_streams(100)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await?;
    let pings = connection.ping_pong();
    // Ends when the connection fails, or once every sender and stream is
    // dropped (the session ended); the VM loop sees the former as a
    // failed call.
    tokio::spawn(Drive(connection));
    Ok(HostClient {
        grpc: GuestClient::with_origin(GuestChannel { sender }, Uri::from_static(ORIGIN))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        pings,
    })
}

/// Drives one HTTP/2 connection to its end, then logs how it ended.
///
/// A named future, not `async move { connection.await }`: an async block
/// keeps what it captured and what it awaits in two slots
/// (rust-lang/rust#62958, #108906), and this task lives as long as the
/// session, once per connected VM (ARCHITECTURE.md, "Host cost per VM").
#[cfg(feature = "host")]
struct Drive<S>(h2::client::Connection<S, Bytes>);

#[cfg(feature = "host")]
impl<S> std::future::Future for Drive<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.get_mut().0)
            .poll(cx)
            .map(|ended| {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "HTTP/2 connection to the guest ended");
                }
            })
    }
}

/// The host's client of one guest session: its gRPC calls (through
/// `Deref` to the generated client) and an HTTP/2 PING.
#[cfg(feature = "host")]
pub struct HostClient {
    grpc: GuestClient<GuestChannel>,
    /// h2 hands it out once per connection; taken at the handshake.
    pings: Option<h2::PingPong>,
}

/// Why a PING found no live session.
#[cfg(feature = "host")]
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("HTTP/2 PING failed: {0}")]
    Failed(#[from] h2::Error),
    #[error("this connection has no PING handle")]
    Unavailable,
}

#[cfg(feature = "host")]
impl HostClient {
    /// Sends an HTTP/2 PING and waits for the guest's acknowledgement:
    /// the guest's HTTP/2 layer answers it without running any RPC, so it
    /// proves the session is alive for a fraction of a call's cost on
    /// both sides (ARCHITECTURE.md, "Keepalive"). Fails at once on a
    /// closed connection; a silent one never answers, so callers bound
    /// the wait. One PING at a time: a PING whose wait was abandoned
    /// leaves the handle busy, and the next one fails.
    pub async fn ping(&mut self) -> Result<(), PingError> {
        let pings = self.pings.as_mut().ok_or(PingError::Unavailable)?;
        pings.ping(h2::Ping::opaque()).await?;
        Ok(())
    }
}

#[cfg(feature = "host")]
impl std::ops::Deref for HostClient {
    type Target = GuestClient<GuestChannel>;
    fn deref(&self) -> &Self::Target {
        &self.grpc
    }
}

#[cfg(feature = "host")]
impl std::ops::DerefMut for HostClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.grpc
    }
}

/// Sends each gRPC request straight onto the VM's HTTP/2 connection.
/// `poll_ready` fails once the connection is gone, so a call on a dead
/// connection fails at once instead of waiting.
#[cfg(feature = "host")]
#[derive(Clone)]
pub struct GuestChannel {
    sender: h2::client::SendRequest<Bytes>,
}

/// A failed call: the request's body could not be read, or HTTP/2 failed.
#[cfg(feature = "host")]
pub type CallError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(feature = "host")]
type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<ReplyBody>, CallError>> + Send>,
>;

#[cfg(feature = "host")]
impl tower::Service<http::Request<tonic::body::Body>> for GuestChannel {
    type Response = http::Response<ReplyBody>;
    type Error = CallError;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.sender.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let sender = self.sender.clone();
        Box::pin(async move {
            let (head, body) = req.into_parts();
            // A unary call's body is one encoded message, ready at once:
            // read it whole first, so that HEADERS and DATA are queued in
            // one go and leave in one write.
            let message = http_body_util::BodyExt::collect(body).await?.to_bytes();
            let mut sender = sender.ready().await?;
            let request = http::Request::from_parts(head, ());
            let (response, mut send) = sender.send_request(request, message.is_empty())?;
            if !message.is_empty() {
                send.send_data(message, true)?;
            }
            let (head, recv) = response.await?.into_parts();
            Ok(http::Response::from_parts(
                head,
                ReplyBody {
                    recv,
                    data_done: false,
                },
            ))
        })
    }
}

/// A reply's body: the h2 stream's DATA, then its trailers (the gRPC
/// status). What is read is released back to the flow-control window.
#[cfg(feature = "host")]
pub struct ReplyBody {
    recv: h2::RecvStream,
    data_done: bool,
}

#[cfg(feature = "host")]
impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        use std::task::Poll;
        let me = self.get_mut();
        if !me.data_done {
            match me.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Only fails once the stream is gone, which the next
                    // poll reports.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => me.data_done = true,
            }
        }
        match me.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => {
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// A gRPC client on an established stream through tonic's `Channel`: what
/// the host used before [`host_client_over`]; the guest agent's tests
/// still dial with it.
#[cfg(feature = "host")]
pub async fn client_over<S>(stream: S) -> Result<GuestClient<Channel>, tonic::transport::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::from_static(ORIGIN)
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            async move {
                taken.map(TokioIo::new).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotConnected,
                        "connection to the guest is gone",
                    )
                })
            }
        }))
        .await?;
    Ok(GuestClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Wraps an accepted server-side stream so tonic can serve it. `guard`
/// lives exactly as long as the connection (a connection-slot permit, say).
pub struct Accepted<S, G = ()> {
    pub stream: S,
    pub guard: G,
}

impl<S> Accepted<S> {
    pub fn new(stream: S) -> Self {
        Accepted { stream, guard: () }
    }
}

#[cfg(feature = "guest")]
impl<S, G> tonic::transport::server::Connected for Accepted<S, G> {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl<S: AsyncRead + Unpin, G: Unpin> AsyncRead for Accepted<S, G> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Accepted<S, G> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(all(test, feature = "host", feature = "guest"))]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{DuplexStream, ReadBuf};
    use tokio::sync::oneshot;
    use tonic::{Request, Response, Status};

    use super::*;

    /// Answers `Hello` with the VM name it was sent; nothing else.
    struct Echo;

    #[tonic::async_trait]
    impl Guest for Echo {
        async fn hello(
            &self,
            request: Request<pb::HelloRequest>,
        ) -> Result<Response<pb::HelloReply>, Status> {
            Ok(Response::new(pb::HelloReply {
                guest_version: request.into_inner().vm,
                ..Default::default()
            }))
        }
        async fn apply(
            &self,
            _: Request<pb::ApplyRequest>,
        ) -> Result<Response<pb::ApplyReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn trust(
            &self,
            _: Request<pb::TrustRequest>,
        ) -> Result<Response<pb::TrustReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// The host's end of the stream; says when it is dropped, which is
    /// when the connection task that owns it has ended.
    struct Tracked {
        io: DuplexStream,
        dropped: Option<oneshot::Sender<()>>,
        /// Writes that carried bytes: each is a TLS record and a syscall
        /// on a real connection.
        writes: Arc<AtomicUsize>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            if let Some(tx) = self.dropped.take() {
                let _ = tx.send(());
            }
        }
    }

    impl AsyncRead for Tracked {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Tracked {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let me = self.get_mut();
            let r = Pin::new(&mut me.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                me.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// The guest's end of the stream, which the test can drop (the guest
    /// hangs up) while the server still holds the wrapper.
    struct Severable(Arc<Mutex<Option<DuplexStream>>>);

    impl Severable {
        fn with<T>(&self, gone: T, f: impl FnOnce(Pin<&mut DuplexStream>) -> Poll<T>) -> Poll<T> {
            match self.0.lock() {
                Ok(mut io) => match io.as_mut() {
                    Some(io) => f(Pin::new(io)),
                    None => Poll::Ready(gone),
                },
                Err(_) => Poll::Ready(gone),
            }
        }
    }

    fn broken() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "severed")
    }

    impl AsyncRead for Severable {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.with(Ok(()), |io| io.poll_read(cx, buf))
        }
    }

    impl AsyncWrite for Severable {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.with(Err(broken()), |io| io.poll_write(cx, buf))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.with(Err(broken()), |io| io.poll_flush(cx))
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.with(Err(broken()), |io| io.poll_shutdown(cx))
        }
    }

    /// A guest server on one in-memory connection: the host's end of it, a
    /// signal for when that end is dropped, and a handle that drops the
    /// guest's end.
    fn pair() -> (
        Tracked,
        oneshot::Receiver<()>,
        Arc<Mutex<Option<DuplexStream>>>,
    ) {
        let (host, guest) = tokio::io::duplex(64 * 1024);
        let guest = Arc::new(Mutex::new(Some(guest)));
        let served = Severable(guest.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::once(Ok::<_, io::Error>(Accepted::new(served)));
            let _ = tonic::transport::Server::builder()
                .add_service(GuestServer::new(Echo))
                .serve_with_incoming(incoming)
                .await;
        });
        let (tx, rx) = oneshot::channel();
        let host = Tracked {
            io: host,
            dropped: Some(tx),
            writes: Arc::new(AtomicUsize::new(0)),
        };
        (host, rx, guest)
    }

    /// Bounds a wait for an event, so a regression fails instead of hanging.
    const EVENT: Duration = Duration::from_secs(30);

    fn hello(vm: &str) -> pb::HelloRequest {
        pb::HelloRequest {
            host_version: "test".into(),
            vm: vm.into(),
        }
    }

    #[tokio::test]
    async fn calls_go_through_and_the_connection_ends_with_the_client() {
        let (host, dropped, _server) = pair();
        let mut client = host_client_over(host).await.expect("HTTP/2 handshake");
        for vm in ["vm1", "vm2"] {
            let reply = client.hello(hello(vm)).await.expect("Hello").into_inner();
            assert_eq!(reply.guest_version, vm);
        }
        let code = client
            .apply(pb::ApplyRequest::default())
            .await
            .expect_err("Apply is unimplemented here")
            .code();
        assert_eq!(code, tonic::Code::Unimplemented);
        // A session's end drops its client: the connection task must end
        // and release the stream with it, not linger per redial.
        drop(client);
        tokio::time::timeout(EVENT, dropped)
            .await
            .expect("the connection task ended after the client was dropped")
            .expect("signal sent");
    }

    /// A unary call leaves as one write: HEADERS and the message's DATA
    /// together, so one TLS record, one syscall, and one wake-up of the
    /// muxer and the guest per call (it was two: hyper's client sent the
    /// body from a task of its own once the stream had opened).
    #[tokio::test]
    async fn a_call_is_one_write() {
        let (host, _dropped, _server) = pair();
        let writes = host.writes.clone();
        let mut client = host_client_over(host).await.expect("HTTP/2 handshake");
        // The first call also acknowledges the guest's SETTINGS.
        client.hello(hello("vm1")).await.expect("Hello");
        for vm in ["vm2", "vm3"] {
            let before = writes.load(Ordering::SeqCst);
            let reply = client.hello(hello(vm)).await.expect("Hello").into_inner();
            assert_eq!(reply.guest_version, vm);
            assert_eq!(
                writes.load(Ordering::SeqCst) - before,
                1,
                "writes for one call"
            );
        }
    }

    /// The keepalive's PING: answered by the guest's HTTP/2 layer, again
    /// and again, and failing at once instead of waiting once the guest
    /// hung up.
    #[tokio::test]
    async fn a_ping_is_answered_and_fails_once_the_guest_hung_up() {
        let (host, dropped, guest) = pair();
        let mut client = host_client_over(host).await.expect("HTTP/2 handshake");
        for _ in 0..3 {
            tokio::time::timeout(EVENT, client.ping())
                .await
                .expect("the PING was answered")
                .expect("PING");
        }
        drop(guest.lock().expect("not poisoned").take());
        tokio::time::timeout(EVENT, dropped)
            .await
            .expect("the connection task ended when the guest hung up")
            .expect("signal sent");
        let failed = tokio::time::timeout(EVENT, client.ping())
            .await
            .expect("a PING on a closed connection fails instead of waiting");
        assert!(failed.is_err(), "a PING on a closed connection failed");
    }

    #[tokio::test]
    async fn a_call_on_a_connection_the_guest_closed_fails() {
        let (host, dropped, guest) = pair();
        let mut client = host_client_over(host).await.expect("HTTP/2 handshake");
        client.hello(hello("vm1")).await.expect("Hello");
        // The guest hangs up: its end of the connection is dropped.
        drop(guest.lock().expect("not poisoned").take());
        tokio::time::timeout(EVENT, dropped)
            .await
            .expect("the connection task ended when the guest hung up")
            .expect("signal sent");
        let failed = tokio::time::timeout(EVENT, client.hello(hello("vm1")))
            .await
            .expect("a call on a closed connection fails instead of waiting");
        assert!(failed.is_err(), "a call on a closed connection failed");
    }
}
