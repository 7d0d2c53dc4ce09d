//! A hostile guest, as the host agent's per-VM task meets it: a real
//! `vm::spawn` task dials a fake guest over a Unix socket, real TLS and
//! real gRPC, and the fake answers `Hello` and `Apply` with what the fuzzer
//! chose. Input: a big-endian u16 length, that many bytes of `HelloReply`,
//! one byte (0: answer `Apply` with the `ApplyReply` that follows; else: a
//! refusal, its code picked by that byte, with the rest as its message).
//!
//! Each execution wakes the task (a `Hello`) and asks it to rotate (an
//! `Apply` when anything differs). Invariants: no panic; the task survives
//! any reply; the rotation is answered, or still waits for a session that
//! can carry it after [`ANSWER_WAIT`] (a guest whose replies break every
//! session), but is never dropped unanswered; no guest string reaches the
//! report or `status` with a control, bidi, separator or zero-width
//! character; the `rotate` and `status` control replies fit in one control
//! line; no guest claim pushes the host's generation counter out of the
//! wall-clock range (issue 9 points 1, 5, 6).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use vmcred_fuzz::{is_dangerous_char, rt, scratch_dir};
use vmcred_host::config::{Credential, Source, Vm};
use vmcred_host::control::{Reply, MAX_LINE};
use vmcred_host::generations::Generations;
use vmcred_host::keyring::KeyRing;
use vmcred_host::vm::{self, Command, Timing, VmHandle};
use vmcred_proto::rpc::pb::{
    ApplyReply, ApplyRequest, HelloReply, HelloRequest, TrustReply, TrustRequest,
};
use vmcred_proto::rpc::{Accepted, Guest, GuestServer};
use vmcred_proto::tls;
use vmcred_proto::transport::Target;

/// How long one execution waits for its rotation to be answered: well
/// above a good session's few milliseconds, below AFL's `-t 2000`.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The error codes with which a guest refuses a push and keeps the
/// connection. Any other code means "connection lost": the host keeps the
/// rotation pending and redials, so a guest that always answers with one
/// keeps `rotate` waiting until the daemon's own deadline; that path is
/// the hostile-guest tests' job, not a fast fuzz loop's. (A refusal can
/// still end the connection: a message too long for the host's HTTP/2
/// header limit does, and the rotation then waits as above.)
const REFUSALS: [Code; 4] = [
    Code::InvalidArgument,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::OutOfRange,
];

/// What the fake guest answers next.
#[derive(Default)]
struct Script {
    hello: HelloReply,
    apply: Option<Result<ApplyReply, (Code, String)>>,
}

#[derive(Clone)]
struct FakeGuest {
    script: Arc<Mutex<Script>>,
}

#[tonic::async_trait]
impl Guest for FakeGuest {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let reply = self.script.lock().expect("script").hello.clone();
        Ok(Response::new(reply))
    }
    /// Like a guest agent from before key rollovers.
    async fn trust(&self, _: Request<TrustRequest>) -> Result<Response<TrustReply>, Status> {
        Err(Status::unimplemented("no pins"))
    }
    async fn apply(&self, _: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        match self.script.lock().expect("script").apply.clone() {
            Some(Ok(r)) => Ok(Response::new(r)),
            Some(Err((code, msg))) => Err(Status::new(code, msg)),
            None => Ok(Response::new(ApplyReply::default())),
        }
    }
}

struct World {
    _dir: tempfile::TempDir,
    source: PathBuf,
    script: Arc<Mutex<Script>>,
    handle: VmHandle,
    round: Mutex<u64>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = scratch_dir("vmcred-fuzz-session-");
        let socket = dir.path().join("guest.sock");
        let source = dir.path().join("api-key");
        std::fs::write(&source, b"first").expect("the source file");
        let keys = Arc::new(KeyRing::load(dir.path()).expect("the host key"));
        let pin = keys.current().pin;
        let script = Arc::new(Mutex::new(Script::default()));
        let fake = FakeGuest {
            script: script.clone(),
        };
        let handle = rt().block_on(async {
            let listener = tokio::net::UnixListener::bind(&socket).expect("bind the fake guest");
            let acceptor = TlsAcceptor::from(tls::guest_server_config(pin).expect("guest TLS"));
            let (tx, rx) = mpsc::channel::<std::io::Result<_>>(4);
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        continue;
                    };
                    if let Ok(t) = acceptor.accept(s).await {
                        if tx.send(Ok(Accepted::new(t))).await.is_err() {
                            return;
                        }
                    }
                }
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(GuestServer::new(fake))
                    .serve_with_incoming(ReceiverStream::new(rx)),
            );
            let mut credentials = BTreeMap::new();
            credentials.insert(
                "API_KEY".to_string(),
                Credential {
                    name: "API_KEY".into(),
                    source: Source::Path(source.clone()),
                    boot: false,
                    allow_on_command_line: false,
                },
            );
            let vm = Vm {
                name: "fuzz-vm".into(),
                target: Target::Unix { path: socket },
                port: 700,
                // Off: with a key required, almost every input would stop
                // at the Hello check and never reach the pushes fuzzed here.
                launch_key: vmcred_host::config::LaunchKeyMode::Off,
                credentials,
            };
            let timing = Timing {
                poll: Duration::ZERO,
                backoff_max: Duration::from_millis(100),
                rpc_timeout: Duration::from_secs(2),
                keepalive: Duration::from_secs(60),
            };
            let generations =
                Generations::open(dir.path().join("generations")).expect("generations");
            vm::spawn(
                Arc::new(vm),
                timing,
                keys,
                Default::default(),
                generations,
                None,
            )
        });
        World {
            _dir: dir,
            source,
            script,
            handle,
            round: Mutex::new(0),
        }
    })
}

fn check_text(what: &str, s: &str) {
    if let Some(c) = s.chars().find(|c| is_dangerous_char(*c, true)) {
        panic!("{what}: guest text let {c:?} through");
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((len, rest)) = data.split_first_chunk::<2>() else {
            return;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (hello, rest) = rest.split_at(len);
        let Ok(hello) = HelloReply::decode(hello) else {
            return;
        };
        let apply = match rest.split_first() {
            None => None,
            Some((0, body)) => match ApplyReply::decode(body) {
                Ok(r) => Some(Ok(r)),
                Err(_) => return,
            },
            Some((code, body)) => Some(Err((
                REFUSALS[usize::from(*code - 1) % REFUSALS.len()],
                String::from_utf8_lossy(body).into_owned(),
            ))),
        };
        let w = world();
        *w.script.lock().expect("script") = Script { hello, apply };
        let round = {
            let mut r = w.round.lock().expect("round");
            *r += 1;
            *r
        };
        std::fs::write(&w.source, format!("value-{round}")).expect("rotate the source");

        let report = rt().block_on(async {
            w.handle
                .tx
                .send(Command::Wake)
                .await
                .expect("the VM task is alive");
            let (tx, rx) = oneshot::channel();
            w.handle
                .tx
                .send(Command::Rotate {
                    credentials: Vec::new(),
                    reply: tx,
                })
                .await
                .expect("the VM task is alive");
            match tokio::time::timeout(ANSWER_WAIT, rx).await {
                Ok(answer) => Some(
                    answer.expect("the VM task dropped a waiting rotation instead of answering it"),
                ),
                // A guest that breaks every session keeps the rotation
                // waiting for a session that can carry it, as it must:
                // `rotate` then reports its own timeout. Leaving here
                // drops the receiver, which the task sees and forgets.
                Err(_) => None,
            }
        });
        assert!(
            !w.handle.tx.is_closed(),
            "the VM task ended on a guest's reply"
        );
        let Some(report) = report else {
            return;
        };
        let status = w.handle.status.lock().expect("status").clone();

        assert_eq!(report.vm, "fuzz-vm");
        if let Some(e) = &report.error {
            check_text("report error", e);
        }
        for c in &report.credentials {
            check_text("credential name", &c.name);
            if let Some(e) = &c.error {
                check_text("credential error", e);
            }
        }
        for u in &report.units {
            check_text("unit", &u.unit);
            check_text("unit action", &u.action);
            if let Some(e) = &u.error {
                check_text("unit error", e);
            }
        }
        if let Some(e) = &status.last_error {
            check_text("status last_error", e);
        }
        let line = serde_json::to_vec(&Reply::Rotate(report)).expect("json");
        assert!(
            line.len() < MAX_LINE,
            "rotate reply of {} bytes",
            line.len()
        );
        let line = serde_json::to_vec(&Reply::Status(status.clone())).expect("json");
        assert!(
            line.len() < MAX_LINE,
            "status reply of {} bytes",
            line.len()
        );
        // Wall-clock microseconds stay below 2^53 for millennia; a
        // counter beyond that came from a guest's claim.
        assert!(
            status.generation_sent < 1 << 53,
            "generation counter at {} after the guest claimed {}",
            status.generation_sent,
            status.generation_applied
        );
    });
}
