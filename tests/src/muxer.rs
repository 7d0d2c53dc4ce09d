//! A stand-in for the hypervisor's hybrid-vsock muxer (cloud-hypervisor,
//! Firecracker, vhost-device-vsock), written from the protocol: the host
//! connects to the VM's Unix socket, writes `CONNECT <port>\n`, and gets
//! `OK <port>\n` followed by a byte stream to the guest's vsock port. When
//! nothing listens on that port in the guest, the muxer hangs up without
//! answering, as the real ones do. Here a guest "port" is a Unix socket of
//! the guest agent started with `--listen-unix`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

/// A running muxer; stops accepting when dropped.
pub struct Muxer {
    stop: Arc<AtomicBool>,
    socket: PathBuf,
}

impl Muxer {
    pub fn start(socket: &Path, ports: BTreeMap<u32, PathBuf>) -> Result<Muxer> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    let ports = ports.clone();
                    std::thread::spawn(move || handle(c, &ports));
                }
            }
        });
        Ok(Muxer {
            stop,
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn handle(mut host: UnixStream, ports: &BTreeMap<u32, PathBuf>) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match host.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&line);
    let Some(port) = text
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let Some(Ok(guest)) = ports.get(&port).map(UnixStream::connect) else {
        return; // nothing listens on that port: hang up without OK
    };
    if host.write_all(format!("OK {port}\n").as_bytes()).is_err() {
        return;
    }
    splice(host, guest);
}

fn splice(a: UnixStream, b: UnixStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || pump(a2, b2));
    pump(b, a);
    let _ = t.join();
}

fn pump(mut from: UnixStream, mut to: UnixStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
