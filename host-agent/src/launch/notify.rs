//! The launch notification: tells the serving agent, over its launch
//! socket, that a VM is starting, so that it dials at once. Best-effort.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `notify_launched` waits for the agent, in all.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest reply line `notify_launched` reads.
const NOTIFY_REPLY_MAX: usize = 1024;

/// Tells the serving agent, through its launch socket, that `vm` is about
/// to start, so that it dials the guest at once: writes one line
/// `control::Request::Launched` and waits for the reply line; an error reply
/// (an unknown VM, say) is returned. Everything is bounded by one second. A failure is only
/// worth a warning: the agent dials with back-off anyway.
pub fn notify_launched(socket: &Path, vm: &str) -> Result<(), String> {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType};
    let shown = socket.display();
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    // Non-blocking connect: a full backlog gives EAGAIN instead of waiting.
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("launch socket {shown}: cannot create a socket: {e}"))?;
    let addr = nix::sys::socket::UnixAddr::new(socket)
        .map_err(|e| format!("launch socket {shown}: {e}"))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(format!(
                "launch socket {shown}: the agent is not accepting connections (backlog full)"
            ))
        }
        Err(e) => return Err(format!("cannot connect to launch socket {shown}: {e}")),
    }
    let mut stream = UnixStream::from(fd);
    let io_err = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!("launch socket {shown}: no reply within {NOTIFY_TIMEOUT:?}")
        } else {
            format!("launch socket {shown}: {e}")
        }
    };
    stream.set_nonblocking(false).map_err(io_err)?;
    stream
        .set_write_timeout(Some(NOTIFY_TIMEOUT))
        .map_err(io_err)?;
    let request = crate::control::Request::Launched { vm: vm.to_string() };
    let mut line = serde_json::to_vec(&request)
        .map_err(|e| format!("launch socket {shown}: cannot encode the request: {e}"))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;

    let mut reply = [0u8; NOTIFY_REPLY_MAX];
    let mut filled = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "launch socket {shown}: no reply within {NOTIFY_TIMEOUT:?}"
            ));
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        match stream.read(&mut reply[filled..]) {
            Ok(0) => {
                return Err(format!(
                    "launch socket {shown}: the agent closed the connection without a reply"
                ))
            }
            Ok(n) => {
                filled += n;
                if let Some(end) = reply[..filled].iter().position(|b| *b == b'\n') {
                    return match serde_json::from_slice::<crate::control::Reply>(&reply[..end]) {
                        Ok(crate::control::Reply::Error(e)) => Err(format!(
                            "launch socket {shown}: the agent answered: {}",
                            crate::vm::guest_text(&e)
                        )),
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("launch socket {shown}: unreadable reply: {e}")),
                    };
                }
                if filled == reply.len() {
                    return Err(format!(
                        "launch socket {shown}: reply line longer than {NOTIFY_REPLY_MAX} bytes"
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
}
