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

    /// Writes all that is held to `w`, in order.
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
