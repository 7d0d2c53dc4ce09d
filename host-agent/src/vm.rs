//! One task per VM: dial the guest with back-off, bring it in sync, then
//! push every change and answer rotations with the guest's acknowledgement.
//!
//! The task owns the connection; everything else talks to it through a
//! channel (`Command`) and reads its `VmStatus`. The guest is treated as
//! untrusted input: its replies are bounded by the gRPC message limit,
//! every call has a deadline, and any string from it is sanitised before it
//! reaches a log line or a `rotate` report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use vmcred_proto::rpc::pb;
use vmcred_proto::rpc::GuestClient;
use vmcred_proto::{rules, tls, transport};

use crate::config::Vm;
use crate::control::{CredentialOutcome, CredentialStatus, RotateReport, UnitOutcome, VmStatus};
use crate::generations::Generations;
use crate::source;

const BACKOFF_START: Duration = Duration::from_millis(250);
/// How often a connected VM is asked `Hello`, to notice a dead connection
/// (cloud-hypervisor does not propagate half-close).
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Longest guest-supplied string we keep.
const MAX_GUEST_TEXT: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub poll: Duration,
    pub backoff_max: Duration,
    pub rpc_timeout: Duration,
}

pub enum Command {
    Rotate {
        credentials: Vec<String>,
        reply: oneshot::Sender<RotateReport>,
    },
    /// The VM was just launched: dial now instead of waiting out the back-off.
    Wake,
    Reconfigure(Box<Vm>, Timing),
}

/// The handle the daemon keeps per VM. Dropping every sender stops the task.
#[derive(Clone)]
pub struct VmHandle {
    pub tx: mpsc::Sender<Command>,
    pub status: Arc<Mutex<VmStatus>>,
    pub vm: Arc<Vm>,
}

pub fn spawn(
    vm: Vm,
    timing: Timing,
    tls: Arc<rustls::ClientConfig>,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
) -> VmHandle {
    let (tx, rx) = mpsc::channel(64);
    let status = Arc::new(Mutex::new(VmStatus {
        vm: vm.name.clone(),
        target: vm.target.to_string(),
        connected: false,
        generation_sent: generations.get(&vm.name).unwrap_or(0),
        generation_applied: 0,
        last_error: None,
        last_sync: None,
        credentials: Vec::new(),
    }));
    let handle = VmHandle {
        tx,
        status: status.clone(),
        vm: Arc::new(vm.clone()),
    };
    let task = VmTask {
        vm,
        timing,
        tls,
        generations,
        credentials_dir,
        status,
        rx,
        cred_state: BTreeMap::new(),
    };
    tokio::spawn(task.run());
    handle
}

/// What we know of the guest's side.
struct GuestView {
    applied: u64,
    held: BTreeMap<String, [u8; 32]>,
}

/// Why a session ended.
enum SessionEnd {
    /// The handle was dropped: the VM left the config or the daemon stops.
    Stopped,
    /// The connection failed; dial again.
    Lost(String),
}

struct VmTask {
    vm: Vm,
    timing: Timing,
    tls: Arc<rustls::ClientConfig>,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
    status: Arc<Mutex<VmStatus>>,
    rx: mpsc::Receiver<Command>,
    cred_state: BTreeMap<String, (String, Option<String>)>,
}

type Pending = Vec<(Vec<String>, oneshot::Sender<RotateReport>)>;

impl VmTask {
    async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        let mut pending: Pending = Vec::new();
        loop {
            match self.connect().await {
                Ok(client) => {
                    backoff = BACKOFF_START;
                    self.update(|s| {
                        s.connected = true;
                        s.last_error = None;
                    });
                    info!(vm = %self.vm.name, target = %self.vm.target, "connected to guest agent");
                    let end = self.session(client, &mut pending).await;
                    self.update(|s| s.connected = false);
                    match end {
                        SessionEnd::Stopped => return,
                        SessionEnd::Lost(e) => {
                            warn!(vm = %self.vm.name, error = %e, "lost the guest agent; will redial");
                            self.update(|s| s.last_error = Some(e));
                        }
                    }
                }
                Err(e) => {
                    debug!(vm = %self.vm.name, error = %e, "guest agent not reachable");
                    self.update(|s| s.last_error = Some(e));
                }
            }
            // Wait out the back-off, or less if someone needs us now.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.rx.recv() => match cmd {
                        None => return,
                        Some(Command::Wake) => break,
                        Some(Command::Rotate { credentials, reply }) => {
                            pending.push((credentials, reply));
                            break;
                        }
                        Some(Command::Reconfigure(vm, timing)) => {
                            self.vm = *vm;
                            self.timing = timing;
                        }
                    },
                }
            }
            pending.retain(|(_, reply)| !reply.is_closed());
            backoff = (backoff * 2).min(self.timing.backoff_max);
        }
    }

    fn update(&self, f: impl FnOnce(&mut VmStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn connect(&self) -> Result<GuestClient<Channel>, String> {
        let stream = transport::dial(&self.vm.target, self.timing.rpc_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout(
            self.timing.rpc_timeout,
            connector.connect(tls::server_name(), stream),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake with the guest failed: {e}"))?;
        vmcred_proto::rpc::client_over(tls)
            .await
            .map_err(|e| format!("gRPC setup failed: {e}"))
    }

    async fn hello(&self, client: &mut GuestClient<Channel>) -> Result<GuestView, String> {
        let req = pb::HelloRequest {
            host_version: vmcred_proto::VERSION.into(),
            vm: self.vm.name.clone(),
        };
        let reply = tokio::time::timeout(self.timing.rpc_timeout, client.hello(req))
            .await
            .map_err(|_| "Hello timed out".to_string())?
            .map_err(|s| format!("Hello failed: {}", guest_text(s.message())))?
            .into_inner();
        let mut held = BTreeMap::new();
        for h in reply.held.into_iter().take(rules::MAX_FILES) {
            // A malformed entry only means we resend that credential.
            if rules::validate_name(&h.name).is_ok() {
                if let Ok(d) = <[u8; 32]>::try_from(h.sha256.as_slice()) {
                    held.insert(h.name, d);
                }
            }
        }
        Ok(GuestView {
            applied: reply.applied_generation,
            held,
        })
    }

    async fn session(
        &mut self,
        mut client: GuestClient<Channel>,
        pending: &mut Pending,
    ) -> SessionEnd {
        let mut guest = match self.hello(&mut client).await {
            Ok(g) => g,
            Err(e) => return SessionEnd::Lost(e),
        };
        self.update(|s| s.generation_applied = guest.applied);
        match self.sync(&mut client, &mut guest, &[]).await {
            Ok(r) => log_report(&r, "initial sync"),
            Err(e) => return SessionEnd::Lost(e),
        }
        for (creds, reply) in pending.drain(..) {
            match self.sync(&mut client, &mut guest, &creds).await {
                Ok(r) => {
                    let _ = reply.send(r);
                }
                Err(e) => return SessionEnd::Lost(e),
            }
        }
        let mut poll = tokio::time::interval(if self.timing.poll.is_zero() {
            Duration::from_secs(3600 * 24 * 365)
        } else {
            self.timing.poll
        });
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let result = tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    None => return SessionEnd::Stopped,
                    // A launch during a session means the old connection
                    // belongs to a VM that is gone: find out now, not at the
                    // next keepalive.
                    Some(Command::Wake) => self.hello(&mut client).await.map(|g| {
                        guest.applied = g.applied;
                        guest.held = g.held;
                    }),
                    Some(Command::Rotate { credentials, reply }) => {
                        let r = self.sync(&mut client, &mut guest, &credentials).await;
                        if let Ok(report) = &r {
                            log_report(report, "rotate");
                            let _ = reply.send(report.clone());
                        } else {
                            // Keep the caller waiting for the redial.
                            pending.push((credentials, reply));
                        }
                        r.map(|_| ())
                    }
                    Some(Command::Reconfigure(vm, timing)) => {
                        self.vm = *vm;
                        self.timing = timing;
                        self.sync(&mut client, &mut guest, &[]).await.map(|r| log_report(&r, "config reload"))
                    }
                },
                _ = poll.tick(), if !self.timing.poll.is_zero() => {
                    self.sync(&mut client, &mut guest, &[]).await.map(|r| log_report(&r, "poll"))
                }
                _ = keepalive.tick() => {
                    self.hello(&mut client).await.map(|g| {
                        guest.applied = g.applied;
                        guest.held = g.held;
                    })
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
    async fn sync(
        &mut self,
        client: &mut GuestClient<Channel>,
        guest: &mut GuestView,
        only: &[String],
    ) -> Result<RotateReport, String> {
        let mut report = RotateReport {
            vm: self.vm.name.clone(),
            applied: false,
            generation: guest.applied,
            credentials: Vec::new(),
            units: Vec::new(),
            error: None,
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
                    .map(|n| format!("{:?}", rules::display_name(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return Ok(report);
        }
        let (values, errors) = source::read_vm(&self.vm, only, self.credentials_dir.as_deref());
        let mut outcomes: BTreeMap<String, CredentialOutcome> = BTreeMap::new();
        for (name, e) in &errors {
            outcomes.insert(
                name.clone(),
                CredentialOutcome {
                    name: name.clone(),
                    outcome: "failed".into(),
                    error: Some(e.to_string()),
                },
            );
            let state = if matches!(e, source::SourceError::Missing { .. }) {
                "source-missing"
            } else {
                "error"
            };
            self.cred_state
                .insert(name.clone(), (state.into(), Some(e.to_string())));
        }
        let mut upserts = Vec::new();
        for (name, v) in &values {
            if guest.held.get(name) == Some(&v.digest) {
                outcomes.insert(
                    name.clone(),
                    CredentialOutcome {
                        name: name.clone(),
                        outcome: "unchanged".into(),
                        error: None,
                    },
                );
                self.cred_state
                    .insert(name.clone(), ("applied".into(), None));
            } else {
                upserts.push(pb::Credential {
                    name: name.clone(),
                    // This copy lives only for the duration of the call;
                    // prost messages cannot be zeroizing (see ARCHITECTURE.md).
                    value: v.bytes.to_vec(),
                    sha256: v.digest.to_vec(),
                });
            }
        }
        let removals: Vec<String> = if only.is_empty() {
            guest
                .held
                .keys()
                .filter(|n| !self.vm.credentials.contains_key(*n))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let digests: BTreeMap<String, [u8; 32]> =
            values.iter().map(|(n, v)| (n.clone(), v.digest)).collect();
        drop(values);

        if upserts.is_empty() && removals.is_empty() {
            report.applied = errors.is_empty();
            report.generation = guest.applied;
            report.credentials = outcomes.into_values().collect();
            self.finish(&report, guest.applied);
            return Ok(report);
        }

        let sent = match self.generations.get(&self.vm.name) {
            Ok(g) => g,
            Err(e) => {
                report.error = Some(format!("cannot read the generation state: {e}"));
                return Ok(report);
            }
        };
        let generation = sent.max(guest.applied).saturating_add(1);
        if let Err(e) = self.generations.set(&self.vm.name, generation) {
            report.error = Some(format!("cannot record generation {generation}: {e}"));
            return Ok(report);
        }
        self.update(|s| s.generation_sent = generation);
        let names: Vec<String> = upserts.iter().map(|c| c.name.clone()).collect();
        info!(vm = %self.vm.name, generation, push = ?names, remove = ?removals, "pushing to guest");
        let req = pb::ApplyRequest {
            generation,
            upserts,
            removals: removals.clone(),
        };
        let reply = match tokio::time::timeout(self.timing.rpc_timeout, client.apply(req)).await {
            Err(_) => return Err(format!("Apply of generation {generation} timed out")),
            Ok(Err(status)) => {
                use tonic::Code;
                let msg = guest_text(status.message());
                match status.code() {
                    Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
                    | Code::OutOfRange => {
                        warn!(vm = %self.vm.name, generation, error = %msg, "guest refused the push");
                        report.error =
                            Some(format!("guest refused generation {generation}: {msg}"));
                        for n in &names {
                            outcomes.insert(
                                n.clone(),
                                CredentialOutcome {
                                    name: n.clone(),
                                    outcome: "failed".into(),
                                    error: Some(msg.clone()),
                                },
                            );
                        }
                        report.credentials = outcomes.into_values().collect();
                        self.update(|s| s.last_error = Some(msg.clone()));
                        if status.code() == Code::FailedPrecondition {
                            *guest = self.hello(client).await?;
                        }
                        return Ok(report);
                    }
                    _ => return Err(format!("Apply failed: {msg}")),
                }
            }
            Ok(Ok(r)) => r.into_inner(),
        };

        // The guest may not claim more than we sent.
        let applied = reply.applied_generation.min(generation);
        guest.applied = guest.applied.max(applied);
        let mut all_ok = true;
        for r in reply
            .results
            .into_iter()
            .take(rules::MAX_CREDENTIALS_PER_MESSAGE)
        {
            let known = names.contains(&r.name) || removals.contains(&r.name);
            if !known {
                continue;
            }
            let outcome = match pb::Outcome::try_from(r.outcome) {
                Ok(pb::Outcome::Written) => "written",
                Ok(pb::Outcome::Unchanged) => "unchanged",
                Ok(pb::Outcome::Removed) => "removed",
                _ => "failed",
            };
            match outcome {
                "written" | "unchanged" => {
                    if let Some(d) = digests.get(&r.name) {
                        guest.held.insert(r.name.clone(), *d);
                    }
                    self.cred_state
                        .insert(r.name.clone(), ("applied".into(), None));
                }
                "removed" => {
                    guest.held.remove(&r.name);
                    self.cred_state.remove(&r.name);
                }
                _ => {
                    all_ok = false;
                    self.cred_state
                        .insert(r.name.clone(), ("error".into(), Some(guest_text(&r.error))));
                }
            }
            outcomes.insert(
                r.name.clone(),
                CredentialOutcome {
                    name: r.name,
                    outcome: outcome.into(),
                    error: (!r.error.is_empty()).then(|| guest_text(&r.error)),
                },
            );
        }
        for n in names.iter().chain(removals.iter()) {
            if !outcomes.contains_key(n) {
                all_ok = false;
                outcomes.insert(
                    n.clone(),
                    CredentialOutcome {
                        name: n.clone(),
                        outcome: "failed".into(),
                        error: Some("the guest did not report on it".into()),
                    },
                );
            }
        }
        report.units = reply
            .units
            .into_iter()
            .take(rules::MAX_CREDENTIALS_PER_MESSAGE)
            .map(|u| UnitOutcome {
                unit: guest_text(&u.unit),
                action: guest_text(&u.action),
                ok: u.ok,
                error: (!u.error.is_empty()).then(|| guest_text(&u.error)),
            })
            .collect();
        report.generation = applied;
        report.applied = applied == generation && all_ok && errors.is_empty();
        if applied != generation && report.error.is_none() {
            report.error = Some(format!(
                "the guest did not apply generation {generation} (it is at {applied})"
            ));
        }
        report.credentials = outcomes.into_values().collect();
        self.finish(&report, guest.applied);
        Ok(report)
    }

    fn finish(&self, report: &RotateReport, applied: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let creds: Vec<CredentialStatus> = self
            .vm
            .credentials
            .values()
            .map(|c| {
                let (state, error) = self
                    .cred_state
                    .get(&c.name)
                    .cloned()
                    .unwrap_or_else(|| ("pending".into(), None));
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
            s.generation_applied = applied;
            s.generation_sent = s.generation_sent.max(applied);
            s.last_sync = Some(now);
            s.credentials = creds;
            s.last_error = (!problems.is_empty()).then(|| problems.join("; "));
        });
    }
}

fn log_report(r: &RotateReport, why: &str) {
    let changed: Vec<String> = r
        .credentials
        .iter()
        .filter(|c| c.outcome != "unchanged")
        .map(|c| format!("{}={}", c.name, c.outcome))
        .collect();
    if changed.is_empty() && r.error.is_none() {
        debug!(vm = %r.vm, generation = r.generation, why, "in sync");
    } else {
        info!(vm = %r.vm, generation = r.generation, applied = r.applied, why, credentials = ?changed, error = ?r.error, "sync result");
    }
}

/// A guest-supplied string made safe for logs and terminals: bounded, with
/// control characters escaped.
pub fn guest_text(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars().take(MAX_GUEST_TEXT) {
        if ch.is_control() {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::guest_text;

    #[test]
    fn guest_text_is_bounded_and_escaped() {
        assert_eq!(guest_text("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(guest_text(&"x".repeat(1000)).len(), 300);
    }
}
