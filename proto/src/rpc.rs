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

/// A gRPC client on an established stream.
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
