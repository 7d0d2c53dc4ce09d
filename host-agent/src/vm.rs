//! One task per VM: dial the guest with back-off, bring it in sync, then
//! push every change and answer rotations with the guest's acknowledgement.
//!
//! The task owns the connection; everything else talks to it through a
//! channel (`Command`) and reads its `VmStatus`. The guest is untrusted:
//! its replies are bounded by the gRPC message limit, every call has a
//! deadline, what it says it applied is a claim that is shown but never
//! becomes the host's counter (see `generations`), every list it sends is
//! cut to a fixed count and every string to a fixed length (see
//! [`bound`]) and escaped ([`guest_text`]) before it reaches a log line,
//! `status` or a `rotate` report.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tracing::{debug, info, warn};
use unicode_general_category::{get_general_category, GeneralCategory};
use vmcred_proto::rpc::pb;
use vmcred_proto::rpc::HostClient;
use vmcred_proto::{rules, tls, transport};
use zeroize::Zeroize;

use crate::config::Vm;
use crate::control::{
    CredState, CredentialOutcome, CredentialStatus, KeyTrust, LaunchKeyState, Outcome,
    RotateReport, UnitOutcome, VmStatus,
};
use crate::generations::Generations;
use crate::heap;
use crate::keyring::{DialKey, KeyRing};
use crate::launch_key::{LaunchKeys, Proof};
use crate::metrics::{self, FailureKind};
use crate::source;

/// First back-off ceiling after a failed dial or a session that ended
/// before the guest was in sync.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Shortest wait between two dials, whatever the jitter draws: a guest
/// that accepts and closes at once must not cost a core.
const BACKOFF_FLOOR: Duration = Duration::from_millis(20);
/// How soon a push the guest refused (busy, or not newer) is tried again.
/// Only while a retry is due; an idle, in-sync connection waits the whole
/// keepalive interval (`Timing::keepalive`).
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(5);
/// Longest source read before that credential is reported `timed out`.
const SOURCE_DEADLINE: Duration = Duration::from_secs(10);
/// How often an Apply the guest answered ABORTED (its store is busy) is
/// sent again, with the same generation and content, on the same
/// connection, before the rotation is reported as not applied.
const APPLY_BUSY_TRIES: u32 = 5;
/// Wait before the first resend after ABORTED; grows linearly.
const APPLY_BUSY_DELAY: Duration = Duration::from_millis(100);

/// Bounds on what is kept from a guest's reply.
pub mod bound {
    /// Characters of one guest-supplied error or message.
    pub const TEXT: usize = 300;
    /// Characters of a unit name as the guest reports it.
    pub const UNIT: usize = 256;
    /// Characters of a unit action ("restart", "reload").
    pub const ACTION: usize = 16;
    /// Characters of the guest's version string.
    pub const VERSION: usize = 64;
    /// Unit results or owed unit actions kept from one reply; the rest
    /// become one "… N more" entry.
    pub const UNITS: usize = 64;
    /// Characters of a VM's `last_error` in `status`.
    pub const LAST_ERROR: usize = 2000;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub poll: Duration,
    pub backoff_max: Duration,
    pub rpc_timeout: Duration,
    /// Silence after which a connected VM is probed with `Hello`: the only
    /// way to notice a dead guest behind a muxer that does not propagate
    /// half-close (cloud-hypervisor <= 52). Every exchange restarts it.
    pub keepalive: Duration,
}

pub enum Command {
    Rotate {
        credentials: Vec<String>,
        reply: oneshot::Sender<RotateReport>,
    },
    /// The VM was just launched: dial now instead of waiting out the back-off.
    Wake,
    /// The host's keys changed (a `rotate-key` step): end the session and
    /// dial again now, with the current key, handing over the next pin.
    /// `reply` is answered after that dial, whatever its outcome.
    Rekey(oneshot::Sender<()>),
    /// Boxed `Timing` (64 bytes): the channel's first block holds 32
    /// commands whatever its capacity, so the largest variant sets what
    /// every VM's channel costs.
    Reconfigure(Arc<Vm>, Box<Timing>),
}

/// The handle the daemon keeps per VM. Dropping every sender stops the task.
#[derive(Clone)]
pub struct VmHandle {
    pub tx: mpsc::Sender<Command>,
    pub status: Arc<Mutex<VmStatus>>,
    pub vm: Arc<Vm>,
}

/// `vm` is shared with the config and the handle: one copy per VM, not
/// three (a credential map is a B-tree whose smallest node holds 11).
pub fn spawn(
    vm: Arc<Vm>,
    timing: Timing,
    keys: Arc<KeyRing>,
    launch_keys: LaunchKeys,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
) -> VmHandle {
    let (tx, rx) = mpsc::channel(64);
    let status = Arc::new(Mutex::new(VmStatus {
        vm: vm.name.clone(),
        target: vm.target.to_string(),
        connected: false,
        generation_sent: generations.last_issued(&vm.name).unwrap_or(0),
        generation_applied: 0,
        last_error: None,
        last_sync: None,
        // Shown as pending until the first sync, so a VM that never comes
        // up still lists what it should hold (in `status` and the metrics).
        credentials: vm
            .credentials
            .values()
            .map(|c| CredentialStatus {
                name: c.name.clone(),
                boot: c.boot,
                state: CredState::Pending,
                error: None,
            })
            .collect(),
        owed_units: Vec::new(),
        guest_version: None,
        guest_pins: Vec::new(),
        key_refused: false,
        key_trust: KeyTrust::Unknown,
        launch_key: LaunchKeyState::configured(vm.launch_key),
    }));
    let handle = VmHandle {
        tx,
        status: status.clone(),
        vm: vm.clone(),
    };
    let task = VmTask {
        vm,
        timing,
        keys,
        launch_keys,
        generations,
        credentials_dir,
        status,
        rx,
        cred_state: BTreeMap::new(),
        reach: Reach::Unknown,
        retry_due: false,
        store_changes: crate::openbao::store().subscribe(),
    };
    tokio::spawn(task.run());
    handle
}

/// What the guest says it holds. All of it is a claim.
struct GuestView {
    applied: u64,
    held: BTreeMap<String, [u8; 32]>,
    owed: Vec<UnitOutcome>,
    /// What its launch key proved (see `launch_key`).
    launch: Proof,
}

/// Why a session ended.
enum SessionEnd {
    /// The handle was dropped: the VM left the config or the daemon stops.
    Stopped,
    /// The connection failed; dial again.
    Lost(String),
    /// The host's keys changed: dial again at once.
    Rekey,
    /// The guest did not prove it is the VM `launch` started: nothing was
    /// pushed; dial again after the back-off.
    NotLaunched(String),
}

/// Why a dial did not give a session.
enum Open {
    /// Nothing answered, or not in time: not a question of keys.
    Unreachable(String),
    /// The guest answered and refused the key (or the session it gave).
    Refused(String),
}

/// A session just dialled, and the answer to its first call, `Hello`
/// (see `VmTask::open`).
struct Opened {
    client: HostClient,
    hello: Result<GuestView, String>,
}

impl Opened {
    /// False when the first `Hello` showed a guest that has not proved its
    /// launch: `session` refuses it before anything else.
    fn admissible(&self) -> bool {
        !matches!(&self.hello, Ok(g) if !matches!(g.launch, Proof::NotRequired | Proof::Matches))
    }
}

/// Pins kept from a guest's report (it holds at most two).
const MAX_GUEST_PINS: usize = 4;

/// What a sync is for: it decides whether owed unit actions are worth an
/// Apply of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Connect,
    Rotate,
    Reload,
    Poll,
    /// A keepalive after a refused push.
    Retry,
    /// The OpenBao store changed a secret or its state.
    StoreChange,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Connect => "initial sync",
            Why::Rotate => "rotate",
            Why::Reload => "config reload",
            Why::Poll => "poll",
            Why::Retry => "retry after a refusal",
            Why::StoreChange => "openbao change",
        }
    }
}

/// Whether the guest could be reached, as last logged.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    Unknown,
    /// Connected and brought in sync.
    Up,
    /// Not reachable, or lost, with this error.
    Down(String),
}

fn outcome(name: &str, o: Outcome, error: Option<String>) -> CredentialOutcome {
    CredentialOutcome {
        name: name.to_string(),
        outcome: o,
        error,
    }
}

struct VmTask {
    vm: Arc<Vm>,
    timing: Timing,
    keys: Arc<KeyRing>,
    launch_keys: LaunchKeys,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
    status: Arc<Mutex<VmStatus>>,
    rx: mpsc::Receiver<Command>,
    cred_state: BTreeMap<String, (CredState, Option<String>)>,
    /// What was last logged about reaching the guest, so that a VM that
    /// stays down is logged once (and again only when its error changes).
    reach: Reach,
    /// The last push was refused as busy (ABORTED) or as not newer
    /// (FAILED_PRECONDITION): the next keepalive syncs instead of only
    /// asking Hello, with a fresh, higher generation.
    retry_due: bool,
    /// Wakes the session when the OpenBao store changed (see `openbao`).
    store_changes: tokio::sync::watch::Receiver<u64>,
}

/// A future that lives on the heap only while it runs (see `VmTask::sync`).
type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Rotations that wait for a session that can carry them, oldest first.
/// Each stays here until it has been answered: a session lost while one is
/// pushed puts it back at the front for the next session.
type Pending = VecDeque<(Vec<String>, oneshot::Sender<RotateReport>)>;

/// The wait before redial number `attempt` (0 = the first after a good
/// session): "full jitter", uniform between [`BACKOFF_FLOOR`] and an
/// exponential ceiling capped at `max`. VMs that went down together (a
/// host restart) spread out instead of redialling in lockstep.
pub fn backoff_delay(attempt: u32, max: Duration, rng: &mut fastrand::Rng) -> Duration {
    let floor = BACKOFF_FLOOR.as_micros() as u64;
    let ceiling = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(16))
        .min(max)
        .as_micros()
        .min(u128::from(u64::MAX)) as u64;
    Duration::from_micros(rng.u64(floor..=ceiling.max(floor)))
}

/// Keepalive probes fall on a grid of this step, shared by every VM task
/// (see `on_probe_grid`).
const PROBE_GRID: Duration = Duration::from_secs(1);

/// The silence before the next keepalive probe: uniform between three
/// quarters of `keepalive` and all of it, drawn afresh for every probe.
/// VMs that connected together (a host start) probe spread over a quarter
/// of the interval instead of in one burst, and drift further apart with
/// every probe.
pub fn probe_interval(keepalive: Duration, rng: &mut fastrand::Rng) -> Duration {
    let max = u64::try_from(keepalive.as_micros()).unwrap_or(u64::MAX);
    let min = max - max / 4;
    Duration::from_micros(rng.u64(min..=max))
}

/// `t` rounded up to the probe grid, so that the probes due within one
/// step share one timer wake-up of the host instead of one each: spread
/// probes cost a wake-up (and the cross-worker hand-offs after it) per
/// VM, which at 1000 VMs was most of the host's idle CPU. A probe then
/// comes at most one grid step later than drawn.
fn on_probe_grid(t: tokio::time::Instant) -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    align_up(t, *EPOCH.get_or_init(tokio::time::Instant::now), PROBE_GRID)
}

fn align_up(
    t: tokio::time::Instant,
    epoch: tokio::time::Instant,
    step: Duration,
) -> tokio::time::Instant {
    let step_ns = step.as_nanos().max(1);
    let steps = t
        .saturating_duration_since(epoch)
        .as_nanos()
        .div_ceil(step_ns);
    let since = u64::try_from(steps.saturating_mul(step_ns)).unwrap_or(u64::MAX);
    epoch + Duration::from_nanos(since)
}

/// Of the keepalive probes of a session, every `HELLO_EVERY`th is a
/// `Hello`, the others HTTP/2 PINGs (see `probe_kind`).
pub const HELLO_EVERY: u32 = 2;

/// What one keepalive probe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A `Hello`: proves the guest's service answers and refreshes what
    /// `status` shows of the guest (held digests, owed unit actions,
    /// applied generation, pins).
    Hello,
    /// An HTTP/2 PING: proves the session is alive, at a fraction of the
    /// cost on both sides, and refreshes nothing.
    Ping,
}

/// A `Hello` while the guest owes unit actions (it retries them on its
/// own, and `status` should show when they clear at the pace of the
/// keepalive), and after `HELLO_EVERY - 1` PINGs in a row; a PING
/// otherwise. What else a guest's `Hello` could tell changes only
/// through this host's own calls (which answer with it) or a guest agent
/// restart (a new session, which starts with a `Hello`), except a
/// credential file changed in the guest by someone other than the agent:
/// `status` and the next sync learn of that up to `HELLO_EVERY` probes
/// later instead of one.
pub fn probe_kind(pings_since_hello: u32, guest_owes: bool) -> Probe {
    if guest_owes || pings_since_hello + 1 >= HELLO_EVERY {
        Probe::Hello
    } else {
        Probe::Ping
    }
}

impl VmTask {
    async fn run(mut self) {
        let mut attempt = 0u32;
        let mut rng = fastrand::Rng::new();
        let mut pending: Pending = VecDeque::new();
        let mut rekeys: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            // Boxed, like `sync`: a dial's state (TLS and HTTP/2 handshakes)
            // is large and short-lived.
            let dialled = Box::pin(self.connect()).await;
            for r in rekeys.drain(..) {
                let _ = r.send(());
            }
            match dialled {
                Ok(opened) => {
                    debug!(vm = %self.vm.name, target = %self.vm.target, "connected to guest agent");
                    let mut synced = false;
                    let end = self
                        .session(opened, &mut pending, &mut rekeys, &mut synced)
                        .await;
                    self.update(|s| s.connected = false);
                    // Only a session that got the guest in sync resets the
                    // back-off: a guest that accepts and hangs up at once
                    // is treated like one that refuses.
                    if synced {
                        attempt = 0;
                    }
                    match end {
                        SessionEnd::Stopped => return,
                        SessionEnd::Rekey => {
                            info!(vm = %self.vm.name, "host keys changed; redialling");
                            continue;
                        }
                        SessionEnd::NotLaunched(e) => {
                            metrics::global().failure(&self.vm.name, FailureKind::LaunchKeyRefused);
                            self.unreachable(&e);
                            self.update(|s| s.last_error = Some(cap(&e, bound::LAST_ERROR)));
                        }
                        SessionEnd::Lost(e) => {
                            metrics::global().failure(&self.vm.name, FailureKind::SessionLost);
                            if self.reach == Reach::Up {
                                warn!(vm = %self.vm.name, error = %e, "lost the guest agent; will redial");
                                self.reach = Reach::Down(e.clone());
                            } else {
                                self.unreachable(&e);
                            }
                            self.update(|s| s.last_error = Some(cap(&e, bound::LAST_ERROR)));
                        }
                    }
                }
                Err(e) => {
                    let refused = self.status.lock().is_ok_and(|s| s.key_refused);
                    metrics::global().failure(
                        &self.vm.name,
                        if refused {
                            FailureKind::KeyRefused
                        } else {
                            FailureKind::Unreachable
                        },
                    );
                    self.unreachable(&e);
                    self.update(|s| s.last_error = Some(cap(&e, bound::LAST_ERROR)));
                }
            }
            // Wait out the back-off, or less if someone needs us now.
            let delay = backoff_delay(attempt, self.timing.backoff_max, &mut rng);
            attempt = attempt.saturating_add(1);
            debug!(vm = %self.vm.name, attempt, delay_ms = delay.as_millis() as u64, "redialling after back-off");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(Command::Wake) => break,
                        Some(Command::Rekey(reply)) => {
                            rekeys.push(reply);
                            break;
                        }
                        Some(Command::Rotate { credentials, reply }) => {
                            pending.push_back((credentials, reply));
                            break;
                        }
                        Some(Command::Reconfigure(vm, timing)) => {
                            self.reconfigure(vm, *timing);
                        }
                    },
                }
            }
            pending.retain(|(_, reply)| !reply.is_closed());
        }
    }

    /// A failed dial (or a session that ended before the guest was in
    /// sync): WARN when the VM goes down or its error changes, DEBUG while
    /// it stays the same.
    fn unreachable(&mut self, e: &str) {
        if matches!(&self.reach, Reach::Down(prev) if prev == e) {
            debug!(vm = %self.vm.name, error = %e, "guest agent still not reachable");
        } else {
            warn!(vm = %self.vm.name, target = %self.vm.target, error = %e, "guest agent not reachable; redialling with back-off (logged again when this changes)");
            self.reach = Reach::Down(e.to_string());
        }
    }

    /// The guest is in sync after a connect: INFO once per recovery.
    fn reachable(&mut self) {
        match &self.reach {
            Reach::Up => {}
            Reach::Unknown => {
                info!(vm = %self.vm.name, target = %self.vm.target, "guest agent reachable and in sync")
            }
            Reach::Down(_) => {
                info!(vm = %self.vm.name, target = %self.vm.target, "guest agent reachable again and in sync")
            }
        }
        self.reach = Reach::Up;
    }

    fn update(&self, f: impl FnOnce(&mut VmStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Dials with the current key. A guest that refuses it while the
    /// previous key is still kept (a rollover it slept through) is dialled
    /// with the previous key, handed the current pin, and dialled again.
    async fn connect(&self) -> Result<Opened, String> {
        let current = self.keys.current();
        let refused = match self.open(&current, self.keys.next_pin()).await {
            Ok(opened) => {
                self.update(|s| s.key_refused = false);
                return Ok(opened);
            }
            Err(Open::Unreachable(e)) => return Err(e),
            Err(Open::Refused(e)) => e,
        };
        let Some(prev) = self.keys.prev() else {
            self.update(|s| s.key_refused = true);
            return Err(format!(
                "{refused}. The guest does not trust the current host key: if it was down during \
                 a key rollover that is now retired, relaunch the VM"
            ));
        };
        info!(vm = %self.vm.name, "guest refused the current host key; trying the previous key, to hand it the current pin");
        match self.open(&prev, Some(current.pin)).await {
            // Not handed the pin: `session` refuses it and says why.
            Ok(opened) if !opened.admissible() => return Ok(opened),
            Ok(_) => {}
            Err(Open::Unreachable(e) | Open::Refused(e)) => {
                self.update(|s| s.key_refused = true);
                return Err(format!(
                    "the guest refuses both the current host key ({refused}) and the previous \
                     one ({e}): relaunch the VM"
                ));
            }
        }
        match self.open(&current, None).await {
            Ok(opened) => {
                self.update(|s| s.key_refused = false);
                Ok(opened)
            }
            Err(Open::Unreachable(e) | Open::Refused(e)) => Err(e),
        }
    }

    /// Dials, authenticates with `key`, and proves the guest accepted it
    /// with the session's first call: TLS 1.3 reports a refused client
    /// certificate only at the first read. That call is the `Hello` the
    /// session needs anyway (its reply carries the guest's pins and launch
    /// key); then, with a `next` pin to hand over and a guest admissible
    /// by its launch key, a `Trust` call hands it over.
    async fn open(&self, key: &DialKey, next: Option<tls::Pin>) -> Result<Opened, Open> {
        let stream = transport::dial(&self.vm.target, self.timing.rpc_timeout)
            .await
            .map_err(|e| Open::Unreachable(e.to_string()))?;
        // A connect is burst work for `heap` only once something answered:
        // dials to VMs that are down fail at once, and would keep the trim
        // from ever finding a quiet second.
        let _burst = heap::busy();
        // The TLS Finished, HTTP/2's preface and SETTINGS and the first
        // call leave in one write (see `transport::Corked`).
        let (stream, cork) = transport::Corked::new(stream);
        let connector = tokio_rustls::TlsConnector::from(key.config.clone());
        let tls = tokio::time::timeout(
            self.timing.rpc_timeout,
            connector.connect(tls::server_name(), stream),
        )
        .await
        .map_err(|_| Open::Unreachable("TLS handshake timed out".to_string()))?
        .map_err(|e| Open::Refused(format!("TLS handshake with the guest failed: {e}")))?;
        cork.handshake_done();
        let client = vmcred_proto::rpc::host_client_over(tls)
            .await
            .map_err(|e| Open::Unreachable(format!("gRPC setup failed: {e}")))?;
        // HTTP/2 flushes once it has written the call below.
        cork.release();
        let mut opened = self.hello_probe(client).await?;
        // Only a guest that proved its launch (or whose VM requires no key)
        // is handed the next pin: whether the VM requires one is decided
        // from the same `Hello`, so a reload between cannot split the two.
        if let Some(next) = next {
            if opened.admissible() {
                self.hand_over(&mut opened.client, next).await?;
            }
        }
        Ok(opened)
    }

    /// Hands the guest the next key's pin (`Trust`) and records the pins
    /// it then holds.
    async fn hand_over(&self, client: &mut HostClient, next: tls::Pin) -> Result<(), Open> {
        let req = pb::TrustRequest {
            next_pin: next.0.to_vec(),
        };
        match tokio::time::timeout(self.timing.rpc_timeout, client.trust(req)).await {
            Err(_) => return Err(Open::Unreachable("Trust timed out".to_string())),
            Ok(Ok(reply)) => {
                self.record_pins(&reply.into_inner().pins);
                info!(vm = %self.vm.name, next = %next, "guest holds the next host key pin");
            }
            // A guest from before key rollovers: the session works, and
            // there is no pin to hand over.
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                debug!(vm = %self.vm.name, "the guest keeps a fixed pin (no Trust)");
            }
            // The session stays usable; status shows the pin missing.
            Ok(Err(s)) => warn!(
                vm = %self.vm.name,
                error = %guest_text(s.message()),
                "the guest did not store the next host key pin"
            ),
        }
        Ok(())
    }

    /// The first call of a session with no pin to hand over: `Hello`.
    /// A failure of the connection under it (a status tonic made from a
    /// transport error, which carries that error as its source) is the
    /// guest refusing the key, as a failed `Trust` probe was. A status the
    /// guest sent (no source) means it accepted the key and its Hello
    /// failed: the session is then lost, not refused.
    async fn hello_probe(&self, mut client: HostClient) -> Result<Opened, Open> {
        let req = self.hello_request();
        let hello = match tokio::time::timeout(self.timing.rpc_timeout, client.hello(req)).await {
            Err(_) => return Err(Open::Unreachable("Hello timed out".to_string())),
            Ok(Ok(reply)) => Ok(self.view_of(reply.into_inner())),
            Ok(Err(s)) if std::error::Error::source(&s).is_none() => {
                Err(format!("Hello failed: {}", guest_text(s.message())))
            }
            Ok(Err(s)) => {
                return Err(Open::Refused(format!(
                    "the guest refused the session (is the host key pinned?): {}",
                    guest_text(s.message())
                )))
            }
        };
        Ok(Opened { client, hello })
    }

    /// Keeps the pins the guest reports: a claim, shown in `status`.
    fn record_pins(&self, pins: &[Vec<u8>]) {
        let pins: Vec<String> = pins
            .iter()
            .take(MAX_GUEST_PINS)
            .map(|p| match <[u8; 32]>::try_from(p.as_slice()) {
                Ok(b) => tls::Pin(b).to_string(),
                Err(_) => "(malformed)".to_string(),
            })
            .collect();
        self.update(|s| s.guest_pins = pins);
    }

    fn hello_request(&self) -> pb::HelloRequest {
        pb::HelloRequest {
            host_version: vmcred_proto::VERSION.into(),
            vm: self.vm.name.clone(),
        }
    }

    /// Boxed, like `sync`: a call's state is large and short-lived.
    fn hello<'a>(&'a self, client: &'a mut HostClient) -> Boxed<'a, Result<GuestView, String>> {
        Box::pin(self.hello_now(client))
    }

    async fn hello_now(&self, client: &mut HostClient) -> Result<GuestView, String> {
        let req = self.hello_request();
        let reply = tokio::time::timeout(self.timing.rpc_timeout, client.hello(req))
            .await
            .map_err(|_| "Hello timed out".to_string())?
            .map_err(|s| format!("Hello failed: {}", guest_text(s.message())))?
            .into_inner();
        Ok(self.view_of(reply))
    }

    /// A keepalive PING, under the same deadline as a call.
    async fn ping(&self, client: &mut HostClient) -> Result<(), String> {
        tokio::time::timeout(self.timing.rpc_timeout, client.ping())
            .await
            .map_err(|_| "keepalive PING timed out".to_string())?
            .map_err(|e| format!("keepalive {e}"))
    }

    /// What a Hello reply says, bounded; the pins and what is shown in
    /// `status` are recorded.
    fn view_of(&self, mut reply: pb::HelloReply) -> GuestView {
        let launch = self.launch_keys.check(&self.vm.name, &reply.launch_key);
        reply.launch_key.zeroize();
        let mut held = BTreeMap::new();
        for h in reply.held.into_iter().take(rules::MAX_FILES) {
            // A malformed entry only means we resend that credential.
            if rules::validate_name(&h.name).is_ok() {
                if let Ok(d) = <[u8; 32]>::try_from(h.sha256.as_slice()) {
                    held.insert(h.name, d);
                }
            }
        }
        let owed = bound_units(reply.owed_units);
        // A guest that has not proved its launch may be another VM: what it
        // claims is not shown as this VM's (`admit` refuses it).
        if matches!(launch, Proof::NotRequired | Proof::Matches) {
            if !reply.pins.is_empty() {
                self.record_pins(&reply.pins);
            }
            let version = cap(&guest_text(&reply.guest_version), bound::VERSION);
            self.update(|s| {
                s.generation_applied = reply.applied_generation;
                s.owed_units = owed.clone();
                s.guest_version = Some(version);
            });
        }
        GuestView {
            applied: reply.applied_generation,
            held,
            owed,
            launch,
        }
    }

    /// Admits a guest to pushes only when its launch key proves it is the
    /// VM (or the VM requires none); records what it proved in `status`.
    /// Called after every `Hello`, before anything is pushed.
    fn admit(&self, guest: &GuestView) -> Result<(), String> {
        self.update(|s| s.launch_key = LaunchKeyState::from(guest.launch));
        let vm = &self.vm.name;
        Err(match guest.launch {
            Proof::NotRequired | Proof::Matches => return Ok(()),
            Proof::Missing => format!(
                "refused: the guest did not return VM {vm}'s launch key (launch_key = \"required\"), \
                 so nothing shows that `vmcred-host launch` started it; nothing was pushed. A VM \
                 started before its key existed, or not through `vmcred-host launch`, or whose \
                 guest agent is from before launch keys, needs a relaunch through it (with a \
                 current guest agent); another VM on this CID gets nothing"
            ),
            Proof::Mismatch => format!(
                "refused: the guest returned a launch key that is not VM {vm}'s; nothing was \
                 pushed. Another VM may be running on this VM's CID; or the VM was launched \
                 with a key since replaced: relaunch it"
            ),
            Proof::NoHostKey => format!(
                "refused: the host agent has no launch key for VM {vm} (its log says why; \
                 {}/{vm}); nothing is pushed until it has one",
                crate::launch_key::DIR
            ),
        })
    }

    /// A new config for this VM (a reload); shows a changed `launch_key`
    /// setting in `status` at once.
    fn reconfigure(&mut self, vm: Arc<Vm>, timing: Timing) {
        if vm.launch_key != self.vm.launch_key {
            self.update(|s| s.launch_key = LaunchKeyState::configured(vm.launch_key));
        }
        self.vm = vm;
        self.timing = timing;
    }

    async fn session(
        &mut self,
        opened: Opened,
        pending: &mut Pending,
        rekeys: &mut Vec<oneshot::Sender<()>>,
        synced: &mut bool,
    ) -> SessionEnd {
        let Opened { mut client, hello } = opened;
        let mut guest = match hello {
            Ok(g) => g,
            Err(e) => return SessionEnd::Lost(e),
        };
        if let Err(e) = self.admit(&guest) {
            return SessionEnd::NotLaunched(e);
        }
        self.update(|s| {
            s.connected = true;
            s.last_error = None;
        });
        match self.sync(&mut client, &mut guest, &[], Why::Connect).await {
            Ok(r) => self.log_report(&r, Why::Connect),
            Err(e) => return SessionEnd::Lost(e),
        }
        self.reachable();
        // Only once the rotations that waited for this session are through
        // does it count as synced (and reset the back-off): a guest that
        // takes the connect sync and then drops every waiting push would
        // otherwise have the host redial it at the back-off's floor, a
        // full handshake and connect sync each time, for as long as the
        // caller waits.
        while let Some((creds, reply)) = pending.pop_front() {
            if reply.is_closed() {
                continue;
            }
            match self
                .sync(&mut client, &mut guest, &creds, Why::Rotate)
                .await
            {
                Ok(r) => {
                    self.log_report(&r, Why::Rotate);
                    let _ = reply.send(r);
                }
                Err(e) => {
                    // Its caller waits for the next session, like every
                    // rotation still behind it.
                    pending.push_front((creds, reply));
                    return SessionEnd::Lost(e);
                }
            }
        }
        *synced = true;
        let mut poll = tokio::time::interval(if self.timing.poll.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            self.timing.poll
        });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        // One timer per connection, re-armed after each probe with a fresh
        // draw (see `probe_interval`). A sync is not counted as one: it may
        // find nothing to send and never talk to the guest.
        let mut rng = fastrand::Rng::new();
        let mut last_probe = tokio::time::Instant::now();
        let mut probe_wait = probe_interval(self.timing.keepalive, &mut rng);
        // The session began with a Hello.
        let mut pings_since_hello = 0u32;
        loop {
            let probe_due = last_probe
                + if self.retry_due {
                    RETRY_AFTER_REFUSAL.min(self.timing.keepalive)
                } else {
                    probe_wait
                };
            let probe_due = if self.retry_due {
                probe_due
            } else {
                on_probe_grid(probe_due)
            };
            let result = tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None => return SessionEnd::Stopped,
                    // A launch during a session means the old connection
                    // belongs to a VM that is gone: find out now, not at the
                    // next keepalive.
                    Some(Command::Wake) => {
                        last_probe = tokio::time::Instant::now();
                        pings_since_hello = 0;
                        self.hello(&mut client).await.and_then(|g| {
                            self.admit(&g)?;
                            guest = g;
                            Ok(())
                        })
                    }
                    Some(Command::Rekey(reply)) => {
                        rekeys.push(reply);
                        return SessionEnd::Rekey;
                    }
                    Some(Command::Rotate { credentials, reply }) => {
                        let r = self.sync(&mut client, &mut guest, &credentials, Why::Rotate).await;
                        if let Ok(report) = &r {
                            self.log_report(report, Why::Rotate);
                            let _ = reply.send(report.clone());
                        } else {
                            // Keep the caller waiting for the redial.
                            pending.push_back((credentials, reply));
                        }
                        r.map(|_| ())
                    }
                    Some(Command::Reconfigure(vm, timing)) => {
                        self.reconfigure(vm, *timing);
                        // A guest admitted while no key was required
                        // proves itself before the reload's push.
                        if self.launch_keys.requires(&self.vm.name)
                            && guest.launch != Proof::Matches
                        {
                            match self.hello(&mut client).await {
                                Ok(g) => guest = g,
                                Err(e) => return SessionEnd::Lost(e),
                            }
                            if let Err(e) = self.admit(&guest) {
                                return SessionEnd::NotLaunched(e);
                            }
                        }
                        self.sync(&mut client, &mut guest, &[], Why::Reload).await.map(|r| self.log_report(&r, Why::Reload))
                    }
                },
                Ok(()) = self.store_changes.changed() => {
                    if crate::openbao::secrets_of(&self.vm, &[]).is_empty() {
                        Ok(())
                    } else {
                        self.sync(&mut client, &mut guest, &[], Why::StoreChange).await.map(|r| self.log_report(&r, Why::StoreChange))
                    }
                }
                _ = poll.tick(), if !self.timing.poll.is_zero() => {
                    self.sync(&mut client, &mut guest, &[], Why::Poll).await.map(|r| self.log_report(&r, Why::Poll))
                }
                _ = tokio::time::sleep_until(probe_due) => {
                    last_probe = tokio::time::Instant::now();
                    probe_wait = probe_interval(self.timing.keepalive, &mut rng);
                    if self.retry_due {
                        self.sync(&mut client, &mut guest, &[], Why::Retry).await.map(|r| self.log_report(&r, Why::Retry))
                    } else {
                        match probe_kind(pings_since_hello, !guest.owed.is_empty()) {
                            Probe::Hello => {
                                pings_since_hello = 0;
                                self.hello(&mut client).await.and_then(|g| {
                                    self.admit(&g)?;
                                    guest = g;
                                    Ok(())
                                })
                            }
                            Probe::Ping => {
                                pings_since_hello += 1;
                                self.ping(&mut client).await
                            }
                        }
                    }
                }
            };
            if let Err(e) = result {
                return SessionEnd::Lost(e);
            }
        }
    }

    /// Reads sources and pushes what differs from the guest. `only` limits
    /// the push to those credentials (and then nothing is removed).
    /// `Err` only when the connection is no longer usable.
    ///
    /// Boxed: a task's future is as large as its largest state, and a
    /// sync's (source reads, the `Apply` call) was most of the VM task's
    /// 7.5 KiB, held by every VM while idle. Boxed, it takes memory only
    /// while it runs (ARCHITECTURE.md, "Host cost per VM").
    fn sync<'a>(
        &'a mut self,
        client: &'a mut HostClient,
        guest: &'a mut GuestView,
        only: &'a [String],
        why: Why,
    ) -> Boxed<'a, Result<RotateReport, String>> {
        Box::pin(self.sync_now(client, guest, only, why))
    }

    async fn sync_now(
        &mut self,
        client: &mut HostClient,
        guest: &mut GuestView,
        only: &[String],
        why: Why,
    ) -> Result<RotateReport, String> {
        // The last word on admission, whatever this task's copy of the
        // config says: a reload that turned the key on reaches `launch_keys`
        // at once, this task's `Reconfigure` perhaps later.
        if self.launch_keys.requires(&self.vm.name) && guest.launch != Proof::Matches {
            return Err(format!(
                "VM {} now requires its launch key, which this session's guest has not shown; \
                 nothing pushed (redialling)",
                self.vm.name
            ));
        }
        // Polls are steady, not bursts (see `heap`).
        let _burst = (why != Why::Poll).then(heap::busy);
        self.retry_due = false;
        let started = std::time::Instant::now();
        let mut report = RotateReport {
            vm: self.vm.name.clone(),
            applied: false,
            generation: self
                .generations
                .last_issued(&self.vm.name)
                .unwrap_or(guest.applied),
            credentials: Vec::new(),
            units: Vec::new(),
            error: None,
            owed_units: guest.owed.clone(),
        };
        let unknown: Vec<&String> = only
            .iter()
            .filter(|n| !self.vm.credentials.contains_key(*n))
            .collect();
        if !unknown.is_empty() {
            report.error = Some(format!(
                "VM {} has no credential named {}",
                self.vm.name,
                unknown
                    .iter()
                    .take(10)
                    .map(|n| format!("{:?}", rules::display_name(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return Ok(report);
        }
        // An explicit rotate while the guest owes unit actions resends
        // the same bytes under a new generation: the guest retries what it
        // owes on every Apply, and the report then says whether that
        // worked. Other syncs leave the retrying to the guest.
        let resend_for_owed = why == Why::Rotate && !guest.owed.is_empty();
        let deadline = SOURCE_DEADLINE.min(self.timing.rpc_timeout);
        // `rotate` reads the store now instead of waiting for its poll.
        // Bounded: the refresh waits for the store's watcher, whose round
        // against a store that accepts and never answers lasts a request
        // timeout per secret; past the deadline this rotate uses what the
        // watcher last read, and the VM task goes on serving commands.
        if why == Why::Rotate {
            let refresh =
                crate::openbao::store().refresh(crate::openbao::secrets_of(&self.vm, only));
            if tokio::time::timeout(deadline, refresh).await.is_err() {
                warn!(vm = %self.vm.name, "the OpenBao store did not answer the rotate's read in time; using the values last read");
            }
        }
        // A rotate reads every source it names, whatever the source cache
        // says: a file's stamp (inode, size, times) does not see every
        // change (a writer that keeps a tmpfs file mapped and rewrites it
        // in place changes none of them), and `rotate` is how a user says
        // "the value changed". Other syncs trust the stamp; the guest is
        // pushed only what differs from what it holds either way.
        let no_digests = BTreeMap::new();
        let (values, errors) = source::read_vm(
            &self.vm,
            only,
            self.credentials_dir.as_deref(),
            if why == Why::Rotate {
                &no_digests
            } else {
                &guest.held
            },
            deadline,
        )
        .await;
        let mut outcomes: BTreeMap<String, CredentialOutcome> = BTreeMap::new();
        for (name, e) in &errors {
            outcomes.insert(
                name.clone(),
                outcome(name, Outcome::Failed, Some(e.to_string())),
            );
            let state = if matches!(
                e,
                source::SourceError::Missing { .. } | source::SourceError::OpenBaoDeleted { .. }
            ) {
                CredState::SourceMissing
            } else {
                CredState::SourceError
            };
            let removed = matches!(e, source::SourceError::OpenBaoDeleted { remove: true, .. });
            self.set_source_problem(name, state, e.to_string(), removed);
        }
        // The names to push; their bytes stay in the zeroizing buffers
        // until a request is built (once per try).
        let mut push: Vec<String> = Vec::new();
        for (name, f) in &values {
            let current = guest.held.get(name) == Some(&f.digest());
            let has_bytes = matches!(f, source::Fetched::Value(_));
            if has_bytes && (!current || resend_for_owed) {
                push.push(name.clone());
            } else {
                outcomes.insert(name.clone(), outcome(name, Outcome::Unchanged, None));
                self.set_cred(name, CredState::Applied, None);
            }
        }
        let removals: Vec<String> = if only.is_empty() {
            guest
                .held
                .keys()
                .filter(|n| !self.vm.credentials.contains_key(*n))
                .take(rules::MAX_CREDENTIALS_PER_MESSAGE.saturating_sub(push.len()))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        // A secret deleted in the store is removed from the guest only
        // when its credential says `on_delete = "remove"`.
        let removals: Vec<String> = removals
            .into_iter()
            .chain(errors.iter().filter_map(|(n, e)| {
                matches!(e, source::SourceError::OpenBaoDeleted { remove: true, .. })
                    .then(|| n.clone())
                    .filter(|n| guest.held.contains_key(n))
            }))
            .take(rules::MAX_CREDENTIALS_PER_MESSAGE.saturating_sub(push.len()))
            .collect();
        let digests: BTreeMap<String, [u8; 32]> = values
            .iter()
            .map(|(n, f)| (n.clone(), f.digest()))
            .collect();

        if push.is_empty() && removals.is_empty() {
            report.applied = errors.is_empty() && guest.owed.is_empty();
            if !guest.owed.is_empty() {
                report.error = Some(owed_error(&guest.owed));
            }
            report.credentials = outcomes.into_values().collect();
            self.finish(&report, guest);
            return Ok(report);
        }

        let generation = match self.generations.issue(&self.vm.name).await {
            Ok(g) => g,
            Err(e) => {
                metrics::global().failure(&self.vm.name, FailureKind::GenerationStore);
                report.error = Some(format!("no generation issued, nothing sent: {e}"));
                report.credentials = outcomes.into_values().collect();
                self.finish(&report, guest);
                return Ok(report);
            }
        };
        self.update(|s| s.generation_sent = generation);
        report.generation = generation;
        let names = push;
        info!(vm = %self.vm.name, generation, push = ?names, remove = ?removals, "pushing to guest");
        let request = || pb::ApplyRequest {
            generation,
            upserts: names
                .iter()
                .filter_map(|n| match values.get(n) {
                    Some(source::Fetched::Value(v)) => Some(pb::Credential {
                        name: n.clone(),
                        // This copy lives only for the duration of the
                        // call; prost messages cannot be zeroizing (see
                        // ARCHITECTURE.md).
                        value: v.bytes.to_vec(),
                        sha256: v.digest.to_vec(),
                    }),
                    _ => None,
                })
                .collect(),
            removals: removals.clone(),
        };
        let mut busy = 0u32;
        let reply = loop {
            // The guest answers once its unit actions are done, which it
            // bounds by UNIT_ACTIONS_BUDGET: a unit slow to restart is not
            // a lost guest.
            let sent = tokio::time::timeout(
                self.timing.rpc_timeout + rules::UNIT_ACTIONS_BUDGET,
                client.apply(request()),
            )
            .await;
            let status = match sent {
                Err(_) => return Err(format!("Apply of generation {generation} timed out")),
                Ok(Ok(r)) => break r.into_inner(),
                Ok(Err(status)) => status,
            };
            let msg = guest_text(status.message());
            let refusal = match status.code() {
                // The guest's store is busy and nothing was applied: the
                // same content and generation again, after a short wait.
                Code::Aborted if busy + 1 < APPLY_BUSY_TRIES => {
                    busy += 1;
                    debug!(vm = %self.vm.name, generation, tries = busy, "guest store busy; resending");
                    tokio::time::sleep(APPLY_BUSY_DELAY * busy).await;
                    continue;
                }
                Code::Aborted => format!(
                    "the guest's store stayed busy through {APPLY_BUSY_TRIES} tries of generation {generation}; nothing applied; the next rotate or poll tries again ({msg})"
                ),
                Code::FailedPrecondition => format!(
                    "the guest refused generation {generation} as not newer than the one it says it applied ({}); nothing applied; the next attempt uses a higher generation ({msg})",
                    guest.applied
                ),
                Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => {
                    format!("the guest refused generation {generation}; nothing applied: {msg}")
                }
                _ => return Err(format!("Apply failed: {msg}")),
            };
            drop(values);
            let kind = match status.code() {
                Code::Aborted => FailureKind::GuestBusy,
                Code::FailedPrecondition => FailureKind::NotNewer,
                _ => FailureKind::PushRefused,
            };
            metrics::global().failure(&self.vm.name, kind);
            warn!(vm = %self.vm.name, generation, error = %refusal, "push not applied");
            for n in names.iter().chain(removals.iter()) {
                outcomes.insert(
                    n.clone(),
                    outcome(n, Outcome::Failed, Some(refusal.clone())),
                );
                self.set_cred(n, CredState::Refused, Some(refusal.clone()));
            }
            report.error = Some(refusal);
            report.credentials = outcomes.into_values().collect();
            self.retry_due = matches!(status.code(), Code::Aborted | Code::FailedPrecondition);
            if status.code() == Code::FailedPrecondition {
                // Learn what the guest now claims, for status.
                let g = self.hello(client).await?;
                self.admit(&g)?;
                *guest = g;
            }
            self.finish(&report, guest);
            return Ok(report);
        };
        drop(values);

        // A claim: shown, compared with what we sent, never adopted.
        guest.applied = reply.applied_generation;
        let mut all_ok = true;
        for r in reply
            .results
            .into_iter()
            .take(rules::MAX_CREDENTIALS_PER_MESSAGE)
        {
            // Only names we sent count; anything else is ignored.
            if !(names.contains(&r.name) || removals.contains(&r.name)) {
                continue;
            }
            let o = match pb::Outcome::try_from(r.outcome) {
                Ok(pb::Outcome::Written) => Outcome::Written,
                Ok(pb::Outcome::Unchanged) => Outcome::Unchanged,
                Ok(pb::Outcome::Removed) if removals.contains(&r.name) => Outcome::Removed,
                _ => Outcome::Failed,
            };
            let error = (!r.error.is_empty()).then(|| guest_text(&r.error));
            match o {
                Outcome::Written | Outcome::Unchanged => {
                    if let Some(d) = digests.get(&r.name) {
                        guest.held.insert(r.name.clone(), *d);
                    }
                    self.set_cred(&r.name, CredState::Applied, None);
                }
                Outcome::Removed => {
                    guest.held.remove(&r.name);
                    self.cred_state.remove(&r.name);
                }
                // `Omitted` is only ever a marker the host makes itself.
                Outcome::Failed | Outcome::Omitted => {
                    all_ok = false;
                    metrics::global().failure(&self.vm.name, FailureKind::CredentialRefused);
                    let e = error
                        .clone()
                        .unwrap_or_else(|| "the guest reported a failure".into());
                    self.set_cred(&r.name, CredState::Refused, Some(e));
                }
            }
            outcomes.insert(r.name.clone(), outcome(&r.name, o, error));
        }
        for n in names.iter().chain(removals.iter()) {
            if !outcomes.contains_key(n) {
                all_ok = false;
                outcomes.insert(
                    n.clone(),
                    outcome(
                        n,
                        Outcome::Failed,
                        Some("the guest did not report on it".into()),
                    ),
                );
            }
        }
        report.units = bound_units(reply.units);
        guest.owed = bound_units(reply.owed_units);
        report.owed_units = guest.owed.clone();
        let took = reply.applied_generation == generation;
        if took {
            metrics::global().rotated(&self.vm.name, started.elapsed());
        }
        report.applied = took && all_ok && errors.is_empty() && guest.owed.is_empty();
        if !took {
            report.error = Some(format!(
                "the guest did not apply generation {generation} (it says it is at {})",
                reply.applied_generation
            ));
        } else if !guest.owed.is_empty() {
            report.error = Some(owed_error(&guest.owed));
        }
        report.credentials = outcomes.into_values().collect();
        self.finish(&report, guest);
        Ok(report)
    }

    fn finish(&self, report: &RotateReport, guest: &GuestView) {
        let m = metrics::global();
        for _ in report.units.iter().filter(|u| !u.ok) {
            m.failure(&self.vm.name, FailureKind::UnitFailed);
        }
        if report.applied {
            m.succeeded(&self.vm.name, SystemTime::now());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let creds: Vec<CredentialStatus> = self
            .vm
            .credentials
            .values()
            .map(|c| {
                let (state, error) = match self.cred_state.get(&c.name) {
                    Some((s, e)) => (*s, e.clone()),
                    None => (CredState::Pending, None),
                };
                CredentialStatus {
                    name: c.name.clone(),
                    boot: c.boot,
                    state,
                    error,
                }
            })
            .collect();
        let problems: Vec<String> = report
            .credentials
            .iter()
            .filter_map(|c| c.error.as_ref().map(|e| format!("{}: {e}", c.name)))
            .chain(report.error.clone())
            .collect();
        self.update(|s| {
            s.generation_applied = guest.applied;
            s.last_sync = Some(now);
            s.credentials = creds;
            s.owed_units = guest.owed.clone();
            s.last_error =
                (!problems.is_empty()).then(|| cap(&problems.join("; "), bound::LAST_ERROR));
        });
    }
}

fn owed_error(owed: &[UnitOutcome]) -> String {
    let list: Vec<String> = owed
        .iter()
        .take(5)
        .map(|u| format!("{} {}", u.unit, u.action))
        .collect();
    let more = owed.len().saturating_sub(list.len());
    format!(
        "the guest still owes {} unit action(s): {}{}; it retries them, and the next rotate asks again",
        owed.len(),
        list.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// A guest's list of unit results, cut to [`bound::UNITS`] entries with
/// every string bounded and escaped; a cut list ends with one "… N more"
/// entry.
fn bound_units(units: Vec<pb::UnitResult>) -> Vec<UnitOutcome> {
    let total = units.len();
    let mut out: Vec<UnitOutcome> = units
        .into_iter()
        .take(bound::UNITS)
        .map(|u| UnitOutcome {
            unit: cap(&guest_text(&u.unit), bound::UNIT),
            action: cap(&guest_text(&u.action), bound::ACTION),
            ok: u.ok,
            error: (!u.error.is_empty()).then(|| guest_text(&u.error)),
        })
        .collect();
    if total > bound::UNITS {
        out.push(UnitOutcome {
            unit: format!("… {} more", total - bound::UNITS),
            action: String::new(),
            ok: false,
            error: None,
        });
    }
    out
}

impl VmTask {
    /// A sync worth a line at INFO: something changed, or the push failed.
    /// A credential whose source is missing or unreadable is not repeated
    /// on every poll: `set_cred` logs when that starts and ends.
    fn log_report(&self, r: &RotateReport, why: Why) {
        let changed: Vec<String> = r
            .credentials
            .iter()
            .filter(|c| c.outcome != Outcome::Unchanged)
            .filter(|c| {
                !(c.outcome == Outcome::Failed
                    && self
                        .cred_state
                        .get(&c.name)
                        .is_some_and(|(s, _)| s.is_source_problem()))
            })
            .map(|c| format!("{}={}", c.name, c.outcome))
            .collect();
        let why = why.as_str();
        if changed.is_empty() && r.error.is_none() {
            debug!(vm = %r.vm, generation = r.generation, why, "in sync");
        } else {
            info!(vm = %r.vm, generation = r.generation, applied = r.applied, why, credentials = ?changed, error = ?r.error, "sync result");
        }
    }

    /// Records a source problem of a credential (see `set_cred`); `removed`:
    /// the secret was deleted in the store and `on_delete = "remove"` takes
    /// it from the guest too, which the warning says instead of the guest
    /// keeping its last value.
    fn set_source_problem(&mut self, name: &str, state: CredState, error: String, removed: bool) {
        self.record_cred(name, state, Some(error), removed);
    }

    /// Records a credential's state; a source going missing or unreadable
    /// (or its error changing) is logged once at WARN, its return at INFO.
    fn set_cred(&mut self, name: &str, state: CredState, error: Option<String>) {
        self.record_cred(name, state, error, false);
    }

    fn record_cred(&mut self, name: &str, state: CredState, error: Option<String>, removed: bool) {
        let prev = self
            .cred_state
            .insert(name.to_string(), (state, error.clone()));
        let was_problem = prev.as_ref().is_some_and(|(s, _)| s.is_source_problem());
        let vm = &self.vm.name;
        if state.is_source_problem() {
            if prev.as_ref() != Some(&(state, error.clone())) {
                let kind = if state == CredState::SourceMissing {
                    FailureKind::SourceMissing
                } else {
                    FailureKind::SourceError
                };
                metrics::global().failure(vm, kind);
                let consequence = if removed {
                    "the guest's copy is removed (on_delete = \"remove\")"
                } else {
                    "the guest keeps its last value until it is back"
                };
                warn!(vm = %vm, credential = name, error = error.as_deref().unwrap_or(""), "source {}; {consequence} (logged again when this changes)", state.as_str());
            }
        } else if was_problem {
            info!(vm = %vm, credential = name, "source is back");
        }
    }
}

/// `s` cut to `max` characters, ending "… N more" when cut (the marker
/// may take the total a few characters past `max`).
fn cap(s: &str, max: usize) -> String {
    let total = s.chars().count();
    if total <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push_str(&format!("… {} more", total - max));
    out
}

/// True for a character that shows as itself: not a control, format
/// (bidi overrides, zero-width), line or paragraph separator, private-use,
/// surrogate or unassigned code point, and not a space other than ASCII's.
fn visible(ch: char) -> bool {
    use GeneralCategory as G;
    if ch == ' ' {
        return true;
    }
    !matches!(
        get_general_category(ch),
        G::Control
            | G::Format
            | G::LineSeparator
            | G::ParagraphSeparator
            | G::SpaceSeparator
            | G::PrivateUse
            | G::Surrogate
            | G::Unassigned
    )
}

/// A guest-supplied string made safe for logs and terminals: at most
/// [`bound::TEXT`] characters (then "… N more"), every character that is
/// not printable and visible written as `\u{…}` (or `\n`, `\t`, …).
///
/// The bound is on what comes out, escapes included: bounding only the
/// input let 300 invisible characters become 3000 (`\u{10fffd}` each), so
/// a guest's 64 owed unit actions could push one VM's `status` line past
/// the control socket's line limit and break `status` for every VM (found
/// in review).
pub fn guest_text(s: &str) -> String {
    let mut out = String::new();
    let (mut shown, mut used) = (0usize, 0usize);
    for ch in s.chars() {
        let len = if visible(ch) {
            1
        } else {
            ch.escape_default().count()
        };
        if shown + len > bound::TEXT {
            break;
        }
        if len == 1 && visible(ch) {
            out.push(ch);
        } else {
            out.extend(ch.escape_default());
        }
        shown += len;
        used += 1;
    }
    let total = used + s.chars().skip(used).count();
    if total > used {
        out.push_str(&format!("… {} more", total - used));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every VM holds its task's future for as long as it runs, sized for
    /// its largest state. The dial, `Hello` and the sync are boxed so
    /// that it stays small while idle: it was 7.5 KiB per VM (release).
    #[test]
    fn the_vm_task_future_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_tx, rx) = mpsc::channel(1);
        let task = VmTask {
            vm: Arc::new(Vm {
                name: "vm".into(),
                target: transport::Target::Unix {
                    path: dir.path().join("vm.sock"),
                },
                port: 1,
                launch_key: crate::config::LaunchKeyMode::Off,
                credentials: BTreeMap::new(),
            }),
            timing: Timing {
                poll: Duration::ZERO,
                backoff_max: Duration::from_secs(1),
                rpc_timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(60),
            },
            keys: Arc::new(KeyRing::load(dir.path()).expect("host key")),
            launch_keys: LaunchKeys::default(),
            generations: Generations::open(dir.path().join("generations")).expect("generations"),
            credentials_dir: None,
            status: Arc::new(Mutex::new(VmStatus {
                vm: "vm".into(),
                target: String::new(),
                connected: false,
                generation_sent: 0,
                generation_applied: 0,
                last_error: None,
                last_sync: None,
                credentials: Vec::new(),
                owed_units: Vec::new(),
                guest_version: None,
                guest_pins: Vec::new(),
                key_refused: false,
                key_trust: KeyTrust::Unknown,
                launch_key: LaunchKeyState::Off,
            })),
            rx,
            cred_state: BTreeMap::new(),
            reach: Reach::Unknown,
            retry_due: false,
            store_changes: crate::openbao::store().subscribe(),
        };
        let size = std::mem::size_of_val(&task.run());
        assert!(size <= 2048, "the VM task's future is {size} bytes");
    }

    /// Each VM's command channel allocates a block of 32 commands.
    #[test]
    fn a_command_is_small() {
        assert!(std::mem::size_of::<Command>() <= 40);
    }

    #[test]
    fn guest_text_is_bounded_and_escaped() {
        assert_eq!(guest_text("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        let long = guest_text(&"x".repeat(1000));
        assert!(long.starts_with(&"x".repeat(bound::TEXT)), "{long}");
        assert!(long.ends_with("… 700 more"), "{long}");
        assert_eq!(
            guest_text(&"x".repeat(bound::TEXT)),
            "x".repeat(bound::TEXT)
        );
        // Escapes count against the bound: 300 invisible characters do
        // not become 3000.
        let escaped = guest_text(&"\u{10fffd}".repeat(bound::TEXT));
        let shown = escaped.split('…').next().unwrap_or_default();
        assert!(shown.chars().count() <= bound::TEXT, "{escaped}");
        assert!(
            escaped.ends_with(&format!("… {} more", bound::TEXT - bound::TEXT / 10)),
            "{escaped}"
        );
    }

    /// What the worst guest can put in its owed unit actions stays a
    /// small part of a `status` line (the control socket's lines are at
    /// most 256 KiB, and every VM's must fit in one).
    #[test]
    fn the_worst_owed_units_encode_to_a_bounded_size() {
        let worst: Vec<pb::UnitResult> = (0..1000)
            .map(|_| pb::UnitResult {
                unit: "\u{10ffff}\u{1F600}".repeat(5000),
                action: "\u{10fffd}".repeat(5000),
                ok: false,
                error: "\u{10fffd}\u{1F600}".repeat(5000),
            })
            .collect();
        let json = serde_json::to_vec(&bound_units(worst)).unwrap();
        assert!(json.len() < 160 * 1024, "{} bytes", json.len());
    }

    #[test]
    fn guest_text_escapes_invisible_and_reordering_characters() {
        let cases = [
            // Bidi overrides and isolates (Cf): "Trojan Source".
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            ("a\u{2066}b\u{2069}", "a\\u{2066}b\\u{2069}"),
            // Zero-width space, joiner, non-joiner, BOM (Cf).
            (
                "a\u{200b}b\u{200d}c\u{200c}\u{feff}",
                "a\\u{200b}b\\u{200d}c\\u{200c}\\u{feff}",
            ),
            // Line and paragraph separators (Zl, Zp).
            ("line\u{2028}para\u{2029}", "line\\u{2028}para\\u{2029}"),
            // Spaces other than ASCII's (Zs): no-break, ideographic.
            ("a\u{a0}b\u{3000}c d", "a\\u{a0}b\\u{3000}c d"),
            // C1 control, DEL, private use, unassigned.
            (
                "\u{85}\u{7f}\u{e000}\u{378}",
                "\\u{85}\\u{7f}\\u{e000}\\u{378}",
            ),
            // ANSI escape sequences.
            ("\x1b]0;title\x07", "\\u{1b}]0;title\\u{7}"),
        ];
        for (input, want) in cases {
            assert_eq!(guest_text(input), want, "{input:?}");
        }
        // Visible text of other scripts passes unchanged.
        assert_eq!(guest_text("héllo wörld 日本 ✓"), "héllo wörld 日本 ✓");
    }

    #[test]
    fn units_are_bounded_with_a_marker() {
        let many: Vec<pb::UnitResult> = (0..1000)
            .map(|i| pb::UnitResult {
                unit: format!("u{i}.service{}", "x".repeat(10_000)),
                action: "restart\u{202e}".repeat(100),
                ok: false,
                error: "e".repeat(100_000),
            })
            .collect();
        let out = bound_units(many);
        assert_eq!(out.len(), bound::UNITS + 1);
        assert_eq!(
            out[bound::UNITS].unit,
            format!("… {} more", 1000 - bound::UNITS)
        );
        for u in &out[..bound::UNITS] {
            assert!(u.unit.chars().count() < bound::UNIT + 20);
            assert!(u.action.chars().count() < bound::ACTION + 20);
            assert!(!u.action.contains('\u{202e}'));
            assert!(u.error.as_ref().unwrap().chars().count() < bound::TEXT + 20);
        }
    }

    #[test]
    fn backoff_spreads_vms_out_and_stays_in_bounds() {
        let max = Duration::from_secs(30);
        // Many VMs' first redial after a host restart: seeded, so the test
        // is deterministic, and the draws must not bunch up.
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<Duration> = (0..1000).map(|_| backoff_delay(0, max, &mut rng)).collect();
        assert!(draws
            .iter()
            .all(|d| *d >= BACKOFF_FLOOR && *d <= BACKOFF_START));
        let mut buckets = [0u32; 10];
        let width = BACKOFF_START.as_micros() / 10;
        for d in &draws {
            buckets[((d.as_micros() / width) as usize).min(9)] += 1;
        }
        // Uniform would be 100 per bucket (the first is a little short:
        // the floor); no bucket holds more than twice its share.
        assert!(buckets.iter().all(|b| *b < 200), "{buckets:?}");
        assert!(buckets[1..].iter().all(|b| *b > 50), "{buckets:?}");
        // The ceiling grows, and is capped.
        let mut rng = fastrand::Rng::with_seed(8);
        let late: Vec<Duration> = (0..1000)
            .map(|_| backoff_delay(40, max, &mut rng))
            .collect();
        assert!(late.iter().all(|d| *d <= max));
        assert!(late.iter().any(|d| *d > max / 2));
        // Two VMs with different seeds do not draw the same sequence.
        let mut a = fastrand::Rng::with_seed(1);
        let mut b = fastrand::Rng::with_seed(2);
        let sa: Vec<Duration> = (0..5).map(|i| backoff_delay(i, max, &mut a)).collect();
        let sb: Vec<Duration> = (0..5).map(|i| backoff_delay(i, max, &mut b)).collect();
        assert_ne!(sa, sb);
    }

    #[test]
    fn probes_of_vms_connected_together_spread_out() {
        let keepalive = Duration::from_secs(60);
        let mut rng = fastrand::Rng::with_seed(11);
        let draws: Vec<Duration> = (0..1000)
            .map(|_| probe_interval(keepalive, &mut rng))
            .collect();
        assert!(draws
            .iter()
            .all(|d| *d >= keepalive * 3 / 4 && *d <= keepalive));
        // 1000 first probes over the 15 s spread: no second holds more
        // than twice its share (66), and every second has some.
        let mut per_second = [0u32; 16];
        for d in &draws {
            per_second[((d.as_secs_f64() - 45.0) as usize).min(15)] += 1;
        }
        assert!(
            per_second[..15].iter().all(|n| *n > 20 && *n < 133),
            "{per_second:?}"
        );
        // A zero interval (never configured so, but) stays zero, no panic.
        assert_eq!(probe_interval(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn probes_round_up_to_a_shared_grid() {
        let epoch = tokio::time::Instant::now();
        let step = Duration::from_secs(1);
        for ms in [0u64, 1, 999, 1000, 1001, 59_250, 3_600_000] {
            let t = epoch + Duration::from_millis(ms);
            let a = align_up(t, epoch, step);
            assert!(a >= t && a < t + step, "{ms}");
            assert_eq!((a - epoch).as_nanos() % step.as_nanos(), 0, "{ms}");
        }
        // Two VMs whose draws fall in the same step share one deadline.
        let a = align_up(epoch + Duration::from_millis(45_100), epoch, step);
        let b = align_up(epoch + Duration::from_millis(45_900), epoch, step);
        assert_eq!(a, b);
        // A time before the epoch (cannot happen: the epoch is the first
        // call) maps to the epoch.
        assert_eq!(align_up(epoch, epoch + step, step), epoch + step);
    }

    #[test]
    fn probes_are_mostly_pings_with_a_hello_every_few_and_while_units_are_owed() {
        // A session's probes, nothing owed: a Hello every HELLO_EVERY.
        let mut since = 0u32;
        let mut kinds = Vec::new();
        for _ in 0..3 * HELLO_EVERY {
            let k = probe_kind(since, false);
            since = if k == Probe::Hello { 0 } else { since + 1 };
            kinds.push(k);
        }
        let hellos = kinds.iter().filter(|k| **k == Probe::Hello).count();
        assert_eq!(hellos, 3, "{kinds:?}");
        assert_eq!(kinds[0], Probe::Ping, "the session began with a Hello");
        // While the guest owes unit actions, every probe is a Hello.
        assert_eq!(probe_kind(0, true), Probe::Hello);
    }

    #[test]
    fn cap_marks_what_it_cut() {
        assert_eq!(cap("abc", 3), "abc");
        assert_eq!(cap("abcdef", 3), "abc… 3 more");
    }
}
