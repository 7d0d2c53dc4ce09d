//! Accepting the host: transport peer check, TLS with the pinned host key,
//! then gRPC on the authenticated stream.
//!
//! Anyone who can reach the port (any host user can open vsock connections
//! to a guest) may start a handshake, so handshakes are bounded in number
//! and time; only a host that proved the pinned key takes one of the
//! connection slots that gRPC is served on. Nothing here ends because a
//! host went away: the loop serves across outages for as long as the agent
//! runs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use vmcred_proto::rpc::{Accepted, GuestServer};
use vmcred_proto::rules::MAX_MESSAGE_BYTES;
use vmcred_proto::tls::{guest_server_config, Pin as HostPin, TlsError};
use vmcred_proto::transport::{Listener, Stream, TransportError};

use crate::service::GuestService;

/// Limits on what a peer can hold of the agent.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// How long a peer may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections wait in the
    /// listen backlog. Any host user can open connections, so this is
    /// generous (a pending handshake costs a few KiB) and the timeout is
    /// what frees the slots of one who never completes.
    pub max_handshakes: usize,
    /// Authenticated host connections served at once.
    pub max_connections: usize,
    /// HTTP/2 pings that find a dead host (a VMM does not always pass a
    /// close on), so that its connection slot is freed.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 32,
            max_connections: 8,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsError),
    #[error("gRPC server stopped: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC server stopped")]
    Stopped,
}

/// An authenticated host connection; holds its slot until tonic drops it.
type HostConn = Accepted<TlsStream<Stream>, OwnedSemaphorePermit>;

/// Serves `service` to hosts holding the key `pin` on `listener`. Returns
/// only on a fatal error.
pub async fn serve(
    listener: Listener,
    pin: HostPin,
    service: GuestService,
    opts: ServerOptions,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(guest_server_config(pin)?);
    let (tx, rx) = mpsc::channel::<io::Result<HostConn>>(opts.max_connections.max(1));
    let accept = accept_loop(listener, acceptor, tx, opts);
    let grpc = tonic::transport::Server::builder()
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
        r = grpc => { r?; Err(ServerError::Stopped) }
    }
}

async fn accept_loop(
    listener: Listener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<io::Result<HostConn>>,
    opts: ServerOptions,
) {
    let handshakes = Arc::new(Semaphore::new(opts.max_handshakes.max(1)));
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    loop {
        let Ok(handshake) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e @ TransportError::Refused { .. }) => {
                tracing::warn!("{e}");
                continue;
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!("{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, tx, slots) = (acceptor.clone(), tx.clone(), slots.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(stream))
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
            drop(handshake);
            let Ok(slot) = slots.try_acquire_owned() else {
                tracing::warn!(%peer, max = opts.max_connections, "too many host connections; dropping the new one");
                return;
            };
            tracing::info!(%peer, "host connected");
            let conn = HostConn {
                stream: tls,
                guard: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                tracing::warn!(%peer, "gRPC server is gone; connection dropped");
            }
        });
    }
}
