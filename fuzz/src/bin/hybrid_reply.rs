//! The hybrid-vsock handshake as the host dials a VMM's Unix socket
//! (`proto::transport::hybrid_handshake`): the input is everything the VMM
//! side sends after reading `CONNECT <port>\n`, over a real socket pair.
//! Invariants: no panic; the handshake reads nothing past its reply line
//! (the guest's TLS bytes that follow must reach TLS intact) and never
//! more than the 32-byte limit; it succeeds only on a line that starts
//! with `OK `; a VMM that hangs up is an error, never a hang.

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmcred_fuzz::rt;
use vmcred_proto::transport::{hybrid_handshake, Target};

const PORT: u32 = 700;

fn main() {
    let target = Target::Hybrid {
        socket: PathBuf::from("/fuzz/notify.vsock"),
        port: PORT,
    };
    afl::fuzz!(|data: &[u8]| {
        let data = data.to_vec();
        let target = target.clone();
        rt().block_on(async move {
            let (mut host, mut vmm) = UnixStream::pair().expect("a socket pair");
            let sent = data.clone();
            let vmm_side = tokio::spawn(async move {
                let mut connect = [0u8; 12];
                vmm.read_exact(&mut connect)
                    .await
                    .expect("the CONNECT line");
                assert_eq!(&connect, b"CONNECT 700\n");
                // The host may stop reading at any point; a failed write
                // then is expected.
                let _ = vmm.write_all(&sent).await;
                let _ = vmm.shutdown().await;
            });
            let result = hybrid_handshake(&mut host, PORT, &target).await;
            let mut rest = Vec::new();
            let read_rest = host.read_to_end(&mut rest).await;
            vmm_side.await.expect("the VMM side");
            let consumed = data.len() - rest.len().min(data.len());
            if read_rest.is_ok() {
                assert!(
                    data.ends_with(&rest),
                    "bytes after the reply were lost or reordered"
                );
            }
            match result {
                Ok(()) => {
                    assert!(read_rest.is_ok());
                    assert!(data.starts_with(b"OK "), "accepted {:?}", &data[..consumed]);
                    let line = &data[..consumed];
                    assert!(
                        consumed <= 32 || (line.ends_with(b"\n") && consumed <= 33),
                        "read {consumed} bytes of the guest's stream"
                    );
                    assert!(
                        !line[..line.len().saturating_sub(1)].contains(&b'\n'),
                        "read past the reply line"
                    );
                }
                Err(e) => assert!(e.to_string().len() < 1024),
            }
        });
    });
}
