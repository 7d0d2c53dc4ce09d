//! gRPC over a stream that is already connected and TLS-wrapped.
//!
//! The host dials (see `transport`), so neither side uses tonic's own
//! listener or connector: the server is fed accepted streams, and the
//! client's channel is built on the one stream the host just dialled. When
//! that stream dies the channel does not redial on its own; the host's VM
//! loop sees the error and dials again with its back-off.

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

/// A gRPC client on an established stream: one HTTP/2 connection driven
/// by one task, and [`GuestChannel`] handing it requests directly.
///
/// Not tonic's `Channel`: that puts a `tower::Buffer` (a worker task and
/// a channel whose first block holds 32 requests, about 9 KiB) and a
/// reconnecting wrapper in front of the connection, for every VM, to
/// share a client between tasks and redial it. Only the VM's own task
/// uses the client and the VM loop redials, so neither is needed (see
/// ARCHITECTURE.md, "Host cost per VM"). The HTTP/2 settings are hyper's
/// defaults, as tonic's `Endpoint` left them.
#[cfg(feature = "host")]
pub async fn host_client_over<S>(stream: S) -> Result<GuestClient<GuestChannel>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let tasks = ConnTasks::default();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(tasks.clone())
        .handshake(TokioIo::new(stream))
        .await?;
    // Ends when the connection fails or every sender is dropped (the
    // session ended), and hyper's futures for it are done; the VM loop
    // sees a failed connection as a failed call.
    tokio::spawn(tasks.drive(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP/2 connection to the guest ended");
        }
    }));
    Ok(
        GuestClient::with_origin(GuestChannel { sender }, Uri::from_static(ORIGIN))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// The executor hyper is given for one connection: the futures it spawns
/// (the HTTP/2 I/O driver, and per call a response waiter and, when the
/// request body cannot go at once, a body pipe) all run inside that
/// connection's one task ([`ConnTasks::drive`]), not as tokio tasks of
/// their own.
///
/// Why: with `TokioExecutor` one call was five tasks (the VM task, the
/// dispatch task, the I/O driver, the waiter, the pipe) on the two workers;
/// every spawn and cross-task wake-up woke the other worker, which then
/// fought the first for h2's stream lock and the scheduler (futex storms
/// in `perf trace`), and the request's HEADERS and DATA left in two TLS
/// records a wake-up apart. Here a call is two tasks: the caller and the
/// connection. The futures still run concurrently with each other (a
/// `FuturesUnordered`), and many connections still spread over the
/// workers.
#[cfg(feature = "host")]
#[derive(Clone, Default)]
pub struct ConnTasks {
    inner: Arc<ConnTasksInner>,
}

#[cfg(feature = "host")]
type Spawned = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[cfg(feature = "host")]
#[derive(Default)]
struct ConnTasksInner {
    /// Spawned and not yet taken into the driver's set.
    new: Mutex<Vec<Spawned>>,
    /// The driver's task, woken by a spawn from outside its own poll.
    driver: futures_util::task::AtomicWaker,
}

#[cfg(feature = "host")]
impl<F> hyper::rt::Executor<F> for ConnTasks
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        if let Ok(mut new) = self.inner.new.lock() {
            new.push(Box::pin(fut));
        }
        self.inner.driver.wake();
    }
}

#[cfg(feature = "host")]
impl ConnTasks {
    /// One task's worth of work: `main` (hyper's dispatch) and everything
    /// spawned on this executor, until all of it has finished.
    pub fn drive<M>(self, main: M) -> impl std::future::Future<Output = ()> + Send
    where
        M: std::future::Future<Output = ()> + Send + 'static,
    {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut main: Option<Spawned> = Some(Box::pin(main));
        let mut running: FuturesUnordered<Spawned> = FuturesUnordered::new();
        std::future::poll_fn(move |cx| {
            self.inner.driver.register(cx.waker());
            loop {
                if let Ok(mut new) = self.inner.new.lock() {
                    running.extend(new.drain(..));
                }
                if let Some(m) = main.as_mut() {
                    if m.as_mut().poll(cx).is_ready() {
                        main = None;
                    }
                }
                while let std::task::Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
                // Polling may have spawned more (a call's waiter and pipe):
                // take them now rather than after another wake-up.
                let more = self
                    .inner
                    .new
                    .lock()
                    .map(|n| !n.is_empty())
                    .unwrap_or(false);
                if !more {
                    break;
                }
            }
            if main.is_none() && running.is_empty() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

/// Sends each gRPC request straight onto the VM's HTTP/2 connection.
/// `poll_ready` fails once the connection is gone, so a call on a dead
/// connection fails at once instead of waiting.
#[cfg(feature = "host")]
#[derive(Clone)]
pub struct GuestChannel {
    sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

#[cfg(feature = "host")]
type ResponseFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>,
            > + Send,
    >,
>;

#[cfg(feature = "host")]
impl tower::Service<http::Request<tonic::body::Body>> for GuestChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.sender.send_request(req))
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
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
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
