//! Writes held back so that several leave in one: each write on a
//! connection is a relay through the VMM's muxer and a wake-up of the
//! peer. Used by the host's [`super::Corked`] (a connect's first flights)
//! and the guest's session (HTTP/2's flushes at connect).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Beyond this, held bytes are sent and larger writes pass straight
/// through (a large write is several TLS records anyway).
pub const MAX_HELD: usize = 64 * 1024;

/// What an emptied buffer may keep: enough for a connect's flights and a
/// small reply, so those are not allocated anew each time, while a
/// session that once held a large reply does not keep up to
/// [`MAX_HELD`] for the rest of its life (a guest's session lives as long
/// as the host is connected).
pub const KEEP_HELD: usize = 4 * 1024;

/// Bytes written and not yet passed on.
#[derive(Debug, Default)]
pub struct Held(Vec<u8>);

impl Held {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes `bufs` if they fit, first sending what is held to `w` if they
    /// would not. `false`: larger than [`MAX_HELD`]; the caller writes them
    /// through itself (what was held has gone before them).
    pub fn poll_take<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<bool>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.0.len() + len > MAX_HELD {
            ready!(self.poll_send(w, cx))?;
        }
        if len > MAX_HELD {
            return Poll::Ready(Ok(false));
        }
        for b in bufs {
            self.0.extend_from_slice(b);
        }
        Poll::Ready(Ok(true))
    }

    /// Writes all that is held to `w`, in order, then gives back any
    /// capacity beyond [`KEEP_HELD`].
    pub fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.0.is_empty() {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.0))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.0.drain(..n);
        }
        if self.0.capacity() > KEEP_HELD {
            self.0.shrink_to(KEEP_HELD);
        }
        Poll::Ready(Ok(()))
    }

    /// Gives the buffer back once nothing more will be held.
    pub fn release(&mut self) {
        self.0 = Vec::new();
    }

    /// The buffer's capacity (tests: what a session keeps).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    use super::*;

    async fn take(held: &mut Held, w: &mut UnixStream, bytes: &[u8]) -> bool {
        poll_fn(|cx| held.poll_take(w, cx, &[IoSlice::new(bytes)]))
            .await
            .unwrap()
    }

    async fn send(held: &mut Held, w: &mut UnixStream) {
        poll_fn(|cx| held.poll_send(w, cx)).await.unwrap()
    }

    /// A large hold, once sent, leaves at most [`KEEP_HELD`] behind: an
    /// idle session does not keep what its largest reply needed.
    #[tokio::test]
    async fn a_sent_large_hold_gives_its_capacity_back() {
        let (mut a, mut peer) = UnixStream::pair().unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut held = Held::default();
        let big = vec![7u8; MAX_HELD - 10];
        assert!(take(&mut held, &mut a, &big).await);
        assert!(held.capacity() >= big.len());
        send(&mut held, &mut a).await;
        assert!(held.is_empty());
        assert!(
            held.capacity() <= KEEP_HELD,
            "kept {} bytes of capacity after the send",
            held.capacity()
        );

        // A small hold keeps its buffer for the next one.
        assert!(take(&mut held, &mut a, b"small").await);
        send(&mut held, &mut a).await;
        assert!(held.capacity() > 0 && held.capacity() <= KEEP_HELD);

        drop(a);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), big.len() + 5);
        assert!(got.ends_with(b"small"));
    }
}
