//! The CLI's side of the control socket, blocking: `rotate` and `status`
//! are one request and a few reply lines, so they need no async runtime
//! (starting one, with its I/O and timer drivers, was a measurable part of
//! a single-VM `rotate`). Same protocol, bounds and errors as
//! [`control::call`](crate::control::call), which the daemon's own tests keep using.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::control::{
    decode_line, encode_line, CallError, LineError, Reply, Request, CONNECT_TIMEOUT, MAX_LINE,
};

/// The longest wait per reply line `call` takes (about a century).
const LONGEST_WAIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Sends one request and reads reply lines until the terminal one, handing
/// each item line to `item` as it arrives. `timeout` bounds the wait for
/// each line (the daemon may take that long between items).
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    mut item: impl FnMut(Reply),
) -> Result<Reply, CallError> {
    // `--timeout 100000000000s` is a valid duration; a deadline that far
    // out would overflow `Instant`. A century is "no timeout" here.
    let timeout = timeout.min(LONGEST_WAIT);
    let shown = socket.display().to_string();
    let s = connect(socket).map_err(|error| {
        if is_timeout(&error) {
            CallError::ConnectTimeout {
                socket: shown.clone(),
            }
        } else {
            CallError::Unreachable {
                socket: shown.clone(),
                error,
            }
        }
    })?;
    let protocol = |error| CallError::Protocol {
        socket: shown.clone(),
        error,
    };
    let line = encode_line(req).map_err(protocol)?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| protocol(e.into()))?;
    (&s).write_all(&line)
        .map_err(|e| protocol(timed(e, timeout)))?;
    let mut reader = BufReader::new(Deadline {
        stream: &s,
        until: Instant::now(),
    });
    let mut buf = Vec::new();
    loop {
        reader.get_mut().until = Instant::now() + timeout;
        let reply: Reply =
            next_line(&mut reader, &mut buf).map_err(|e| protocol(timed_line(e, timeout)))?;
        if reply.is_terminal() {
            return Ok(reply);
        }
        item(reply);
    }
}

/// One bounded JSON line.
fn next_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> Result<Reply, LineError> {
    buf.clear();
    r.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    decode_line(buf)
}

/// A blocking connect bounded by `CONNECT_TIMEOUT`: on a Unix socket the
/// send timeout also bounds a connect that waits for backlog room.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = nix::sys::time::TimeVal::new(CONNECT_TIMEOUT.as_secs() as _, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) || e.raw_os_error() == Some(libc_einprogress())
}

/// `EINPROGRESS`: what a Unix connect returns when its send timeout ran out.
fn libc_einprogress() -> i32 {
    nix::errno::Errno::EINPROGRESS as i32
}

fn timed(e: std::io::Error, timeout: Duration) -> LineError {
    if is_timeout(&e) {
        LineError::Timeout(timeout)
    } else {
        e.into()
    }
}

fn timed_line(e: LineError, timeout: Duration) -> LineError {
    match e {
        LineError::Io(io) => timed(io, timeout),
        other => other,
    }
}

/// Reads that give up at `until`: a deadline per line, however many reads
/// the line takes.
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn server(
        f: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                f(s);
            }
        });
        (dir, path)
    }

    /// A `status` call with `timeout` per line, nothing done with items.
    fn status(path: &Path, timeout: Duration) -> Result<Reply, CallError> {
        call(path, &Request::Status { vms: Vec::new() }, timeout, |_| {})
    }

    /// The line error of a failed call, if it failed on the protocol.
    fn line_error(e: &CallError) -> Option<&LineError> {
        match e {
            CallError::Protocol { error, .. } => Some(error),
            _ => None,
        }
    }

    #[test]
    fn items_then_the_terminal_reply() {
        let (_d, path) = server(|s| {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("\"status\""), "{line}");
            (&s).write_all(b"{\"busy\":\"x\"}\n").unwrap();
        });
        let mut items = 0;
        let end = call(
            &path,
            &Request::Status { vms: Vec::new() },
            Duration::from_secs(10),
            |_| items += 1,
        )
        .unwrap();
        assert!(matches!(end, Reply::Busy(_)), "{end:?}");
        assert_eq!(items, 0);
    }

    #[test]
    fn a_silent_daemon_times_out_and_a_hangup_is_closed() {
        let (_d, path) = server(|s| {
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let e = status(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(line_error(&e), Some(LineError::Timeout(_))), "{e}");
        let (_d, path) = server(|s| {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(b"{\"partial").unwrap();
        });
        let e = status(&path, Duration::from_secs(10)).unwrap_err();
        assert!(matches!(line_error(&e), Some(LineError::Closed)), "{e}");
    }

    #[test]
    fn an_over_long_reply_line_is_refused() {
        let (_d, path) = server(|s| {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let _ = (&s).write_all(&vec![b' '; MAX_LINE + 1]);
        });
        let e = status(&path, Duration::from_secs(10)).unwrap_err();
        assert!(matches!(line_error(&e), Some(LineError::TooLong)), "{e}");
    }

    #[test]
    fn a_timeout_too_large_for_a_deadline_is_a_long_wait_not_a_panic() {
        let (_d, path) = server(|s| {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(b"{\"busy\":\"x\"}\n").unwrap();
        });
        let end = status(&path, Duration::MAX).unwrap();
        assert!(matches!(end, Reply::Busy(_)), "{end:?}");
    }

    #[test]
    fn nothing_listening_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let e = status(&dir.path().join("none.sock"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CallError::Unreachable { .. }), "{e}");
    }
}
