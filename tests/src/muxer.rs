//! A stand-in for the hypervisor's hybrid-vsock muxer (cloud-hypervisor,
//! Firecracker, vhost-device-vsock), written from the protocol: the host
//! connects to the VM's Unix socket, writes `CONNECT <port>\n`, and gets
//! `OK <port>\n` followed by a byte stream to the guest's vsock port. When
//! nothing listens on that port in the guest, the muxer hangs up without
//! answering, as the real ones do. Here a guest "port" is a Unix socket of
//! the guest agent started with `--listen-unix`.
//!
//! Like the real muxers, each one is a single event loop (one thread per
//! VMM, a `current_thread` tokio runtime on it) rather than threads per
//! connection: the benchmark counts this process's CPU next to the agents',
//! so the stand-in must cost about what a VMM's epoll loop costs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

/// The name of every muxer thread, so that a benchmark can tell their CPU
/// time from its own (`/proc/self/task/*/comm`).
pub const THREAD_NAME: &str = "vmcred-muxer";

/// The longest `CONNECT <port>\n` line accepted; longer ones are hung up on.
const MAX_LINE: u64 = 64;

/// A running muxer. Dropping it stops the loop: the socket is removed and
/// every connection it spliced is closed, as when the VMM exits.
pub struct Muxer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

impl Muxer {
    /// Binds `socket` (replacing a stale file) and serves it on a thread
    /// of its own; `ports` maps a guest vsock port to the Unix socket that
    /// stands for it.
    pub fn start(socket: &Path, ports: BTreeMap<u32, PathBuf>) -> Result<Muxer> {
        let _ = std::fs::remove_file(socket);
        // Bound here, so that the socket exists when `start` returns and a
        // bind error reaches the caller.
        let listener = std::os::unix::net::UnixListener::bind(socket)
            .with_context(|| format!("cannot bind the muxer socket {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("cannot build the muxer's runtime")?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            // The loop and its tasks live on the heap; a small stack keeps
            // 1000 muxers cheap.
            .stack_size(256 * 1024)
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("muxer: cannot register the listener: {e}");
                            return;
                        }
                    };
                    serve(listener, ports, stopped).await;
                });
                // Dropping the runtime here cancels the splice tasks and
                // closes their sockets.
            })
            .context("cannot start the muxer thread")?;
        Ok(Muxer {
            stop: Some(stop),
            thread: Some(thread),
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve(
    listener: UnixListener,
    ports: BTreeMap<u32, PathBuf>,
    mut stopped: oneshot::Receiver<()>,
) {
    let ports = std::sync::Arc::new(ports);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            conn = listener.accept() => {
                // Accept errors (EMFILE at scale) drop that one connection,
                // as a VMM would; the loop goes on.
                if let Ok((host, _)) = conn {
                    let ports = ports.clone();
                    tokio::spawn(async move { handle(host, &ports).await });
                }
            }
        }
    }
}

/// The port asked for on a `CONNECT <port>` line, or `None` for anything
/// else (the muxer then hangs up).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\n')?;
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

async fn handle(host: UnixStream, ports: &BTreeMap<u32, PathBuf>) {
    // Buffered so that bytes the host sends right after its line are not
    // lost: the splice below starts with whatever the buffer holds.
    let mut host = BufReader::new(host);
    let mut line = Vec::new();
    if (&mut host)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .is_err()
    {
        return;
    }
    let Some(port) = parse_connect(&line) else {
        return;
    };
    let Some(path) = ports.get(&port) else {
        return; // nothing listens on that port: hang up without OK
    };
    let Ok(mut guest) = UnixStream::connect(path).await else {
        return;
    };
    if host
        .get_mut()
        .write_all(format!("OK {port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 700\n"), Some(700));
        assert_eq!(parse_connect(b"CONNECT 700"), None);
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"HELLO 700\n"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
    }

    /// A guest port that echoes, a port with nothing behind it, and a
    /// malformed line, through real sockets; then the drop closes a live
    /// splice and removes the socket.
    #[test]
    fn splices_refuses_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let echo = dir.path().join("echo.sock");
        let l = std::os::unix::net::UnixListener::bind(&echo).unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = c.read(&mut b) {
                        if n == 0 || c.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let sock = dir.path().join("mux.sock");
        let mux = Muxer::start(&sock, [(5, echo)].into_iter().collect()).unwrap();

        // Data sent with the CONNECT line reaches the guest too.
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(b"CONNECT 5\nearly").unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut ok = String::new();
        r.read_line(&mut ok).unwrap();
        assert_eq!(ok, "OK 5\n");
        let mut got = [0u8; 5];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early");
        s.write_all(b"x").unwrap();
        r.read_exact(&mut got[..1]).unwrap();
        assert_eq!(got[0], b'x');

        for bad in [&b"CONNECT 6\n"[..], b"GARBAGE\n"] {
            let mut t = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            t.write_all(bad).unwrap();
            let mut rest = Vec::new();
            t.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "answered {rest:?} to {bad:?}");
        }

        drop(mux);
        assert!(!sock.exists());
        let mut rest = Vec::new();
        // The spliced connection is closed with the muxer.
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
