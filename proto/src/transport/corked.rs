//! The host's side of a connect in as few writes as the protocol allows.
//!
//! A connect's first flights each leave in a write of their own when
//! nothing joins them: the TLS client's Finished (with its certificate),
//! HTTP/2's preface (h2 writes it straight through, unflushed), then
//! HTTP/2's SETTINGS and the first request. Each write is a relay through
//! the VMM's muxer and a wake-up of the guest. None of them has to leave
//! before the first request: the guest answers nothing until it has it.
//! [`Corked`] holds them and sends them in one write (see ARCHITECTURE.md,
//! "Host cost per VM").
//!
//! While corked, flushes are held back. During the TLS handshake
//! whatever is held goes out before a read that would wait (the
//! ClientHello must reach the guest before its ServerHello can come
//! back); after [`Cork::handshake_done`] nothing does, so that HTTP/2's
//! connection task, which may start reading on another worker at once,
//! does not send the Finished and the preface on their own. Once
//! [`Cork::release`] is called the next flush sends everything: HTTP/2
//! flushes after it writes the first request, which the caller makes
//! right after the release (nothing is held across a wait for the guest:
//! the guest says nothing before it has the client's Finished).
//! After that flush, writes go straight through: a session's later
//! writes are neither copied nor kept in a buffer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Held;

/// Where a [`Corked`] stream is, in order; kept in an `AtomicU8` shared
/// with its [`Cork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// TLS handshake: a read that would wait sends what is held.
    Handshake = 0,
    /// Holding everything until the release.
    Holding = 1,
    /// A flush sends what is held.
    Released = 2,
}

impl Phase {
    fn of(v: u8) -> Phase {
        match v {
            0 => Phase::Handshake,
            1 => Phase::Holding,
            _ => Phase::Released,
        }
    }
}

/// A stream whose writes are held until a flush after [`Cork::release`].
pub struct Corked<S> {
    inner: S,
    held: Held,
    state: Arc<AtomicU8>,
    /// The first flush after the release has sent everything: from then
    /// on writes go straight to `inner` (no copy, and no buffer kept for
    /// the session's life).
    through: bool,
}

/// Moves a [`Corked`] stream on, from the task that knows where the
/// connect is.
#[derive(Clone)]
pub struct Cork(Arc<AtomicU8>);

impl Cork {
    /// The TLS handshake is complete: a read no longer sends what is
    /// held.
    pub fn handshake_done(&self) {
        let _ = self.0.compare_exchange(
            Phase::Handshake as u8,
            Phase::Holding as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// From now on a flush sends what is held. Make the first call (its
    /// write and flush) right after.
    pub fn release(&self) {
        self.0.store(Phase::Released as u8, Ordering::Release);
    }
}

impl<S> Corked<S> {
    /// Corked from the start.
    pub fn new(inner: S) -> (Corked<S>, Cork) {
        let state = Arc::new(AtomicU8::new(Phase::Handshake as u8));
        (
            Corked {
                inner,
                held: Held::default(),
                state: state.clone(),
                through: false,
            },
            Cork(state),
        )
    }

    fn phase(&self) -> Phase {
        Phase::of(self.state.load(Ordering::Acquire))
    }
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.held.poll_send(&mut self.inner, cx)
    }

    fn poll_hold(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if ready!(self.held.poll_take(&mut self.inner, cx, bufs))? {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let filled = buf.filled().len();
        let read = Pin::new(&mut me.inner).poll_read(cx, buf);
        // About to wait for the guest while holding bytes it may need
        // first: send them, then wait (the read registered the waker).
        if read.is_pending() && me.phase() == Phase::Handshake && !me.held.is_empty() {
            debug_assert_eq!(buf.filled().len(), filled);
            ready!(me.poll_send_held(cx))?;
            ready!(Pin::new(&mut me.inner).poll_flush(cx))?;
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.through {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        me.poll_hold(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.through {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        me.poll_hold(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.phase() != Phase::Released {
            return Poll::Ready(Ok(()));
        }
        ready!(me.poll_send_held(cx))?;
        if !me.through {
            me.through = true;
            me.held.release();
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send_held(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{recv, MsgFlags};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    /// What the peer's socket holds now (without waiting).
    fn pending(s: &UnixStream) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        match recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => buf[..n].to_vec(),
            Err(nix::errno::Errno::EAGAIN) => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    /// Flushes while corked send nothing; the flush after the release
    /// sends all that was written, in order, in one write.
    #[tokio::test]
    async fn corked_writes_leave_together_after_the_release() {
        let (a, guest) = UnixStream::pair().unwrap();
        let (mut s, cork) = Corked::new(a);
        s.write_all(b"finished ").await.unwrap();
        s.flush().await.unwrap();
        s.write_all(b"preface ").await.unwrap();
        assert!(pending(&guest).is_empty(), "sent while corked");
        cork.release();
        s.write_all(b"request").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(pending(&guest), b"finished preface request");
        // Uncorked: writes go straight through, and no buffer is kept for
        // the rest of the session.
        assert_eq!(s.held.capacity(), 0);
        s.write_all(b"more").await.unwrap();
        assert_eq!(pending(&guest), b"more");
        s.write_all(&[7u8; 20_000]).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            s.held.capacity(),
            0,
            "a large write after the release was held"
        );
    }

    /// A read that would wait sends what is held first: the peer may need
    /// it to answer (a ClientHello before the ServerHello).
    #[tokio::test]
    async fn a_read_that_would_wait_sends_what_is_held() {
        let (a, mut guest) = UnixStream::pair().unwrap();
        let (mut s, _cork) = Corked::new(a);
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let answer = tokio::spawn(async move {
            let mut got = [0u8; 5];
            guest.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
            guest.write_all(b"server").await.unwrap();
            guest
        });
        let mut got = [0u8; 6];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"server");
        drop(answer.await.unwrap());
    }

    /// After the handshake a read no longer sends what is held: HTTP/2's
    /// connection task reads before the first call is written.
    #[tokio::test]
    async fn after_the_handshake_a_read_sends_nothing() {
        let (a, guest) = UnixStream::pair().unwrap();
        let (mut s, cork) = Corked::new(a);
        s.write_all(b"finished ").await.unwrap();
        cork.handshake_done();
        let mut buf = [0u8; 1];
        let read = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut s).poll_read(cx, &mut rb))
        })
        .await;
        assert!(read.is_pending());
        assert!(
            pending(&guest).is_empty(),
            "sent on a read after the handshake"
        );
        cork.release();
        s.write_all(b"request").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(pending(&guest), b"finished request");
    }

    /// A shutdown sends what is held, corked or not.
    #[tokio::test]
    async fn shutdown_sends_what_is_held() {
        let (a, mut guest) = UnixStream::pair().unwrap();
        let (mut s, _cork) = Corked::new(a);
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }
}
