//! A guest agent that lies: a TLS server with a certificate of its own
//! (the host does not authenticate guests by certificate; it proves itself
//! to them) that answers the host's gRPC calls with whatever the test
//! scripts, including what a real guest agent never sends: absurd
//! generations, floods of entries, escape-laden and invalid names, stalls,
//! busy and refusal statuses, and connections closed right after TLS.
//!
//! It listens on a Unix socket where the harness's muxer expects the guest
//! agent, so the real `vmcred-host` reaches it exactly as it reaches a real
//! guest. It records every call, so a test can check what the host sent.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use vmcred_proto::rpc::pb::{
    ApplyReply, ApplyRequest, CredentialResult, Held, HelloReply, HelloRequest, Outcome,
    TrustReply, TrustRequest, UnitResult,
};
use vmcred_proto::rpc::{Accepted, Guest, GuestServer};
use vmcred_proto::rules;

/// How the double behaves; tests switch it while the host is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Like a real guest: applies newer generations, refuses others.
    Honest,
    /// Claims generation `u64::MAX` and so refuses every push with
    /// FAILED_PRECONDITION (what a real guest holding that would do).
    ClaimMax,
    /// Answers Apply with ABORTED (store busy) this many times, then
    /// behaves honestly.
    Busy(u32),
    /// Floods: thousands of held entries, results, unit results and owed
    /// actions, with huge, invalid, duplicate and escape-laden strings.
    Flood,
    /// Honest, but reports these unit actions as owed until cleared.
    Owes(Vec<String>),
    /// Never answers Apply.
    HangApply,
    /// Claims in Apply to have applied another generation than was sent.
    WrongAck,
    /// Completes TLS, then closes the connection at once.
    CloseAfterTls,
    /// Resets the connection in the middle of an Apply, after applying it
    /// (the acknowledgement is lost).
    ResetMidApply,
    /// Answers Hello with a message over the host's decode limit.
    Oversized,
    /// On each connection, refuses the first Apply (INVALID_ARGUMENT,
    /// nothing applied) and resets the connection at the second: a session
    /// whose connect sync succeeds and whose next push is lost.
    RefuseThenReset,
}

/// What the double holds and what it saw.
#[derive(Debug)]
pub struct State {
    pub mode: Mode,
    pub applied: u64,
    pub held: BTreeMap<String, Vec<u8>>,
    /// Every Apply: (generation, upsert names, removals, the status code
    /// answered).
    pub applies: Vec<(u64, Vec<String>, Vec<String>, Code)>,
    pub hellos: usize,
    /// Trust calls: each is a round trip of the host's connect.
    pub trusts: usize,
    /// What it returns as the VM's launch key (`Flood`: 4096 bytes).
    pub launch_key: Vec<u8>,
}

pub struct HostileGuest {
    pub state: Arc<Mutex<State>>,
    pub accepts: Arc<AtomicUsize>,
    /// Connections reset by `ResetMidApply` and `RefuseThenReset`.
    pub resets: Arc<AtomicUsize>,
    current: Arc<Mutex<Arc<Cutter>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for HostileGuest {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl HostileGuest {
    /// Listens on `socket` (replacing a stale file) in `mode`.
    pub fn start(socket: &Path, mode: Mode) -> Result<HostileGuest> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _g = rt.enter();
            UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?
        };
        let state = Arc::new(Mutex::new(State {
            mode,
            applied: 0,
            held: BTreeMap::new(),
            applies: Vec::new(),
            hellos: 0,
            trusts: 0,
            launch_key: Vec::new(),
        }));
        let accepts = Arc::new(AtomicUsize::new(0));
        let acceptor = TlsAcceptor::from(server_config()?);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Accepted<_>>>(8);
        // The cutter of the newest connection, which Apply may cut.
        let current: Arc<Mutex<Arc<Cutter>>> = Arc::new(Mutex::new(Arc::new(Cutter::default())));
        let resets = Arc::new(AtomicUsize::new(0));
        let svc = Double {
            state: state.clone(),
            current: current.clone(),
            resets: resets.clone(),
        };
        let newest = current.clone();
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(
                    GuestServer::new(svc)
                        .max_decoding_message_size(rules::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(rules::MAX_MESSAGE_BYTES * 4),
                )
                .serve_with_incoming(ReceiverStream::new(rx)),
        );
        let (st, acc) = (state.clone(), accepts.clone());
        rt.spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (acceptor, tx, st) = (acceptor.clone(), tx.clone(), st.clone());
                let current = current.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let close = st
                        .lock()
                        .map(|s| s.mode == Mode::CloseAfterTls)
                        .unwrap_or(true);
                    if close {
                        drop(tls);
                        return;
                    }
                    let cutter = Arc::new(Cutter::default());
                    if let Ok(mut c) = current.lock() {
                        *c = cutter.clone();
                    }
                    let _ = tx
                        .send(Ok(Accepted::new(Cuttable { inner: tls, cutter })))
                        .await;
                });
            }
        });
        Ok(HostileGuest {
            state,
            accepts,
            resets,
            current: newest,
            rt: Some(rt),
        })
    }

    /// Resets the newest connection, as a guest that went away would.
    pub fn cut(&self) {
        if let Ok(c) = self.current.lock() {
            c.cut_all();
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        if let Ok(mut s) = self.state.lock() {
            s.mode = mode;
        }
    }

    /// Forget everything, as a guest agent restarted with fresh state.
    pub fn reset(&self, mode: Mode) {
        if let Ok(mut s) = self.state.lock() {
            s.mode = mode;
            s.applied = 0;
            s.held.clear();
        }
    }

    pub fn applies(&self) -> Vec<(u64, Vec<String>, Vec<String>, Code)> {
        self.state
            .lock()
            .map(|s| s.applies.clone())
            .unwrap_or_default()
    }

    pub fn held(&self, name: &str) -> Option<Vec<u8>> {
        self.state.lock().ok()?.held.get(name).cloned()
    }
}

/// Cuts every live connection when `ResetMidApply` asks: reads and writes
/// then fail, and the parked read is woken so the failure is seen at once.
#[derive(Default)]
struct Cutter {
    cut: std::sync::atomic::AtomicBool,
    wakers: Mutex<Vec<Waker>>,
    /// Apply calls seen on this connection (the host runs one at a time).
    applies: AtomicUsize,
}

impl Cutter {
    fn cut_all(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.wakers.lock() {
            for w in w.drain(..) {
                w.wake();
            }
        }
    }
    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

struct Cuttable<S> {
    inner: S,
    cutter: Arc<Cutter>,
}

fn reset() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset by the hostile guest",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.cutter.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        if let Ok(mut w) = me.cutter.wakers.lock() {
            w.retain(|w| !w.will_wake(cx.waker()));
            w.push(cx.waker().clone());
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if me.cutter.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.cutter.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A certificate of its own; the host accepts any.
fn server_config() -> Result<Arc<rustls::ServerConfig>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert =
        rcgen::CertificateParams::new(vec!["hostile-guest".to_string()])?.self_signed(&key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

struct Double {
    state: Arc<Mutex<State>>,
    current: Arc<Mutex<Arc<Cutter>>>,
    resets: Arc<AtomicUsize>,
}

fn junk_names() -> Vec<String> {
    let mut v = vec![
        "../../etc/shadow".to_string(),
        ".API_KEY.vmcred-tmp".into(),
        "evil\u{202e}txt".into(),
        "line\u{2028}break".into(),
        "\x1b[2J\x1b]0;pwned\x07".into(),
        String::new(),
        "x".repeat(10_000),
    ];
    for i in 0..3000 {
        v.push(format!("NOT_CONFIGURED_{}", i % 1500));
    }
    v
}

fn flood_units(n: usize) -> Vec<UnitResult> {
    (0..n)
        .map(|i| UnitResult {
            unit: format!("unit{i}\u{202e}.service\x1b[31m{}", "u".repeat(100)),
            action: "restart\u{200b}".repeat(20),
            ok: false,
            error: format!("failed\u{2028}{}", "e".repeat(150)),
        })
        .collect()
}

/// What an owing guest reports: a failed restart of each of `units`.
fn failed_restarts(units: &[String]) -> Vec<UnitResult> {
    units
        .iter()
        .map(|u| UnitResult {
            unit: u.clone(),
            action: "restart".into(),
            ok: false,
            error: "exit status 1".into(),
        })
        .collect()
}

#[tonic::async_trait]
impl Guest for Double {
    async fn hello(&self, _req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        st.hellos += 1;
        let held = |st: &State| -> Vec<Held> {
            st.held
                .iter()
                .map(|(n, v)| Held {
                    name: n.clone(),
                    sha256: rules::digest(v).to_vec(),
                })
                .collect()
        };
        let reply = match st.mode.clone() {
            Mode::ClaimMax => HelloReply {
                applied_generation: u64::MAX,
                held: held(&st),
                guest_version: "liar\u{202e}1.0".into(),
                owed_units: Vec::new(),
                pins: Vec::new(),
                launch_key: st.launch_key.clone(),
            },
            Mode::Flood => {
                let mut h = held(&st);
                for n in junk_names() {
                    h.push(Held {
                        name: n,
                        sha256: vec![0xAA; 32],
                    });
                }
                HelloReply {
                    applied_generation: st.applied,
                    held: h,
                    guest_version: format!("v\x1b[2J{}", "9".repeat(100_000)),
                    owed_units: flood_units(2000),
                    // Pins: too many, wrong lengths; the host keeps a few.
                    pins: (0..500).map(|i| vec![i as u8; 33 + i % 3]).collect(),
                    // A launch key over the bound (the reply as a whole
                    // stays under the host's decode limit).
                    launch_key: vec![b'k'; 4096],
                }
            }
            Mode::Oversized => HelloReply {
                applied_generation: st.applied,
                held: (0..40_000)
                    .map(|i| Held {
                        name: format!("N{i:063}"),
                        sha256: vec![0; 32],
                    })
                    .collect(),
                guest_version: "oversized".into(),
                owed_units: Vec::new(),
                pins: Vec::new(),
                launch_key: st.launch_key.clone(),
            },
            Mode::Owes(units) => HelloReply {
                applied_generation: st.applied,
                held: held(&st),
                guest_version: "owes".into(),
                pins: Vec::new(),
                launch_key: st.launch_key.clone(),
                owed_units: failed_restarts(&units),
            },
            _ => HelloReply {
                applied_generation: st.applied,
                held: held(&st),
                guest_version: "hostile-double".into(),
                owed_units: Vec::new(),
                pins: Vec::new(),
                launch_key: st.launch_key.clone(),
            },
        };
        Ok(Response::new(reply))
    }

    /// Like a guest agent from before key rollovers.
    async fn trust(&self, _req: Request<TrustRequest>) -> Result<Response<TrustReply>, Status> {
        if let Ok(mut st) = self.state.lock() {
            st.trusts += 1;
        }
        Err(Status::unimplemented("hostile double keeps no pins"))
    }

    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        let req = req.into_inner();
        let names: Vec<String> = req.upserts.iter().map(|c| c.name.clone()).collect();
        let mode = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .mode
            .clone();
        if mode == Mode::HangApply {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let mut st = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        let record = |st: &mut State, code| {
            st.applies
                .push((req.generation, names.clone(), req.removals.clone(), code))
        };
        match st.mode.clone() {
            Mode::ClaimMax => {
                record(&mut st, Code::FailedPrecondition);
                return Err(Status::failed_precondition(format!(
                    "generation {} is not newer than {}\u{202e} (applied)",
                    req.generation,
                    u64::MAX
                )));
            }
            Mode::Busy(n) if n > 0 => {
                st.mode = Mode::Busy(n - 1);
                record(&mut st, Code::Aborted);
                return Err(Status::aborted("store busy: lock held"));
            }
            Mode::RefuseThenReset => {
                let cutter = self
                    .current
                    .lock()
                    .map_err(|_| Status::internal("poisoned"))?
                    .clone();
                if cutter.applies.fetch_add(1, Ordering::SeqCst) == 0 {
                    record(&mut st, Code::InvalidArgument);
                    return Err(Status::invalid_argument(
                        "refused: first push of this connection",
                    ));
                }
                record(&mut st, Code::Unavailable);
                self.resets.fetch_add(1, Ordering::SeqCst);
                cutter.cut_all();
                return Err(Status::unavailable("reset"));
            }
            _ => {}
        }
        if req.generation <= st.applied {
            record(&mut st, Code::FailedPrecondition);
            return Err(Status::failed_precondition("generation not newer"));
        }
        for c in &req.upserts {
            st.held.insert(c.name.clone(), c.value.clone());
        }
        for r in &req.removals {
            st.held.remove(r);
        }
        st.applied = req.generation;
        record(&mut st, Code::Ok);
        let mut results: Vec<CredentialResult> = names
            .iter()
            .map(|n| CredentialResult {
                name: n.clone(),
                outcome: Outcome::Written as i32,
                error: String::new(),
            })
            .chain(req.removals.iter().map(|n| CredentialResult {
                name: n.clone(),
                outcome: Outcome::Removed as i32,
                error: String::new(),
            }))
            .collect();
        let mut reply = ApplyReply {
            applied_generation: req.generation,
            results: Vec::new(),
            units: Vec::new(),
            owed_units: Vec::new(),
        };
        match st.mode.clone() {
            Mode::Flood => {
                // Claims about names it was never sent, then the truth.
                for n in junk_names() {
                    results.insert(
                        0,
                        CredentialResult {
                            name: n,
                            outcome: Outcome::Removed as i32,
                            error: "\x1b[2J".repeat(2),
                        },
                    );
                }
                reply.units = flood_units(800);
                reply.owed_units = flood_units(800);
            }
            Mode::WrongAck => reply.applied_generation = u64::MAX,
            Mode::ResetMidApply => {
                self.resets.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = self.current.lock() {
                    c.cut_all();
                }
                // The answer never leaves: the connection is gone.
                return Err(Status::unavailable("reset"));
            }
            Mode::Owes(units) => {
                reply.owed_units = failed_restarts(&units);
            }
            _ => {}
        }
        reply.results = results;
        Ok(Response::new(reply))
    }
}
