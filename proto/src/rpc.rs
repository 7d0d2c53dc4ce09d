//! gRPC over a stream that is already connected and TLS-wrapped.
//!
//! The host dials (see `transport`), so neither side uses tonic's own
//! listener or connector: the server is fed accepted streams, and the
//! client's channel is built on the one stream the host just dialled. When
//! that stream dies the channel does not redial on its own; the host's VM
//! loop sees the error and dials again with its back-off.

use std::io;
#[cfg(feature = "host")]
use std::sync::{Arc, Mutex};

#[cfg(feature = "host")]
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
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

/// A gRPC client on an established stream, through tonic's `Channel`
/// (used by tests that drive a guest; the host uses [`host_client_over`]).
#[cfg(feature = "host")]
pub async fn client_over<S>(stream: S) -> Result<GuestClient<Channel>, tonic::transport::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::from_static("http://vmcred-guest")
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

/// The host's gRPC client: tonic's generated stub straight on one HTTP/2
/// connection, without the `Channel` (whose tower `Buffer` adds a worker
/// task, a request queue and reconnect state per VM that a host with
/// thousands of VMs pays for while every connection sits idle).
#[cfg(feature = "host")]
pub type HostClient = GuestClient<Http2>;

/// Per-connection HTTP/2 settings for the host's client. The messages are
/// small and one call is in flight at a time, so the windows only need to
/// hold one maximal message; nothing here is allocated up front, these
/// bound what a connection may hold.
#[cfg(feature = "host")]
mod h2_limits {
    /// One whole message fits the stream window: no WINDOW_UPDATE round
    /// trip in the middle of a reply.
    pub const STREAM_WINDOW: u32 = super::MAX_MESSAGE_BYTES as u32 + 1024;
    pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW;
    /// Bytes h2 may queue per stream for sending before it waits.
    pub const SEND_BUFFER: usize = 64 * 1024;
    /// The guest sends a handful of headers.
    pub const HEADER_LIST: u32 = 16 * 1024;
    /// One call at a time: a few concurrent streams are plenty.
    pub const SEND_STREAMS: usize = 8;
}

/// One HTTP/2 connection as a tower service for the generated client.
/// Dropping the last clone ends the connection's task.
#[cfg(feature = "host")]
#[derive(Clone)]
pub struct Http2 {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    _conn: Arc<AbortOnDrop>,
}

#[cfg(feature = "host")]
struct AbortOnDrop(tokio::task::AbortHandle);

#[cfg(feature = "host")]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(feature = "host")]
impl tower::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// The host's client on an established (TLS) stream: one HTTP/2
/// connection task, no reconnects (the VM loop redials), the same message
/// size limits as [`client_over`].
#[cfg(feature = "host")]
pub async fn host_client_over<S>(stream: S) -> Result<HostClient, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(h2_limits::STREAM_WINDOW)
            .initial_connection_window_size(h2_limits::CONNECTION_WINDOW)
            .max_send_buf_size(h2_limits::SEND_BUFFER)
            .max_header_list_size(h2_limits::HEADER_LIST)
            .initial_max_send_streams(h2_limits::SEND_STREAMS)
            .handshake(TokioIo::new(stream))
            .await?;
    let task = tokio::spawn(async move {
        // Ends when the guest hangs up or the client is dropped; the VM
        // loop learns of a failure from its next call.
        let _ = conn.await;
    });
    let http2 = Http2 {
        send,
        _conn: Arc::new(AbortOnDrop(task.abort_handle())),
    };
    Ok(
        GuestClient::with_origin(http2, http::Uri::from_static("http://vmcred-guest"))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
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
