//! The gRPC service the host calls: `Hello` (what the guest holds) and
//! `Apply` (write, remove, run unit actions, acknowledge).
//!
//! Everything in a request is checked before anything touches the disk,
//! and a request with any bad field is refused whole, so a host bug or a
//! corrupted message cannot leave a half-applied set behind. Values are
//! held in zeroizing buffers for as short a time as possible, and no value
//! ever reaches a log line or an error message: only names do.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status};
use vmcred_proto::rpc::pb::{
    ApplyReply, ApplyRequest, CredentialResult, Held, HelloReply, HelloRequest, Outcome,
    TrustReply, TrustRequest, UnitResult,
};
use vmcred_proto::rpc::Guest;
use vmcred_proto::rules::{
    display_name, validate_name, validate_size, validate_total, verify_digest, RuleError,
    BOOTSTRAP_CREDENTIAL, MAX_CREDENTIALS_PER_MESSAGE,
};
use vmcred_proto::tls::Pin as HostPin;
use zeroize::Zeroizing;

use crate::config::{Deliver, GuestConfig};
use crate::creds_socket::SocketValues;
use crate::notify::Readiness;
use crate::owed::{merge_owed, owed_reply, prune_owed};
use crate::pins::{PinError, PinStore};
use crate::server::SessionInfo;
use crate::store::{reserved_name, Change, Current, Store, StoreError, TxError};
use crate::units::{Action, UnitRunner};

/// One received credential. No `Debug` on purpose: it holds a value.
struct Upsert {
    name: String,
    value: Zeroizing<Vec<u8>>,
    sha256: Vec<u8>,
}

/// The guest agent's gRPC service.
#[derive(Clone)]
pub struct GuestService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    config: Arc<GuestConfig>,
    units: UnitRunner,
    /// One Apply at a time, from writes through unit actions, so that two
    /// requests cannot interleave their writes or race on the generation.
    apply_lock: Arc<Mutex<()>>,
    readiness: Arc<Readiness>,
    /// Wakes the retry of owed unit actions.
    retry: Notify,
    /// What the last Hello logged at INFO said (VM name, applied
    /// generation): the host's keepalive Hello every few seconds repeats it,
    /// and a repeat is logged at DEBUG only.
    last_hello: std::sync::Mutex<Option<(String, u64)>>,
    /// The host key pins, when this guest takes part in key rollovers.
    pins: std::sync::OnceLock<Arc<PinStore>>,
    /// Values of `deliver = "socket"` credentials (no file).
    memory: Arc<SocketValues>,
    /// The VM's launch key, returned in every `HelloReply` (only ever to
    /// a host the TLS layer authenticated by its pin).
    launch_key: std::sync::OnceLock<Zeroizing<Vec<u8>>>,
}

impl GuestService {
    /// Also starts the retry of owed unit actions (so it must be called
    /// inside a Tokio runtime). What a previous run left owed is pruned to
    /// what the configuration still maps, and retried at once.
    pub fn new(
        store: Arc<Store>,
        config: Arc<GuestConfig>,
        units: UnitRunner,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self::with_socket_values(store, config, units, readiness, Arc::default())
    }

    /// As `new`, keeping `deliver = "socket"` values in `memory`, which the
    /// credential socket serves from.
    pub fn with_socket_values(
        store: Arc<Store>,
        config: Arc<GuestConfig>,
        units: UnitRunner,
        readiness: Arc<Readiness>,
        memory: Arc<SocketValues>,
    ) -> Self {
        let mut st = store.state();
        prune_owed(&config, &mut st.owed, &st.managed.clone(), &[]);
        if st.owed != store.state().owed {
            if let Err(e) = store.batch().and_then(|mut b| b.commit(st)) {
                tracing::warn!(error = %e, "cannot drop owed unit actions the configuration no longer maps");
            }
        }
        let inner = Arc::new(Inner {
            store,
            config,
            units,
            apply_lock: Arc::new(Mutex::new(())),
            readiness,
            retry: Notify::new(),
            last_hello: std::sync::Mutex::new(None),
            pins: std::sync::OnceLock::new(),
            memory,
            launch_key: std::sync::OnceLock::new(),
        });
        if !inner.store.state().owed.is_empty() {
            inner.retry.notify_one();
        }
        tokio::spawn(inner.clone().retry_loop());
        GuestService { inner }
    }

    /// Lets authenticated hosts see and extend (`Trust`) the pin set the
    /// TLS server checks. Without it, `Trust` is refused as unimplemented.
    pub fn with_pins(self, pins: Arc<PinStore>) -> Self {
        if self.inner.pins.set(pins).is_err() {
            tracing::warn!("with_pins called twice; keeping the first pin store");
        }
        self
    }

    /// The launch key `launch` passed to this VM (see `HelloReply`).
    pub fn with_launch_key(self, key: Zeroizing<Vec<u8>>) -> Self {
        let _ = self.inner.launch_key.set(key);
        self
    }

    fn pin_bytes(&self) -> Vec<Vec<u8>> {
        self.inner
            .pins
            .get()
            .map(|p| p.pins().iter().map(|p| p.0.to_vec()).collect())
            .unwrap_or_default()
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Checks every field of a request; the first problem refuses all of it.
fn validate(upserts: &[Upsert], removals: &[String]) -> Result<(), Status> {
    let count = upserts.len().saturating_add(removals.len());
    if count > MAX_CREDENTIALS_PER_MESSAGE {
        return Err(invalid(RuleError::TooMany { count }));
    }
    let mut seen = HashSet::with_capacity(count);
    for name in upserts.iter().map(|u| &u.name).chain(removals) {
        validate_name(name).map_err(invalid)?;
        if name == BOOTSTRAP_CREDENTIAL {
            return Err(invalid(format!(
                "credential {BOOTSTRAP_CREDENTIAL:?} is the guest's bootstrap; the host may not overwrite or remove it"
            )));
        }
        if let Some(why) = reserved_name(name) {
            return Err(invalid(format!(
                "credential name {:?} is not allowed: {why}",
                display_name(name)
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid(RuleError::Duplicate {
                name: display_name(name),
            }));
        }
    }
    for u in upserts {
        validate_size(&u.name, u.value.len()).map_err(invalid)?;
    }
    validate_total(upserts.iter().map(|u| u.value.len())).map_err(invalid)?;
    for u in upserts {
        verify_digest(&u.name, &u.value, &u.sha256).map_err(invalid)?;
    }
    Ok(())
}

fn result(name: &str, outcome: Outcome, error: String) -> CredentialResult {
    CredentialResult {
        name: name.to_string(),
        outcome: outcome as i32,
        error,
    }
}

/// What the disk part of an Apply did.
struct Applied {
    results: Vec<CredentialResult>,
    applied_generation: u64,
    all_ok: bool,
}

/// Writes and removes under the store's locks, all or nothing. Blocking:
/// runs on the blocking pool.
fn apply_to_store(
    store: &Store,
    config: &GuestConfig,
    memory: &SocketValues,
    generation: u64,
    upserts: Vec<Upsert>,
    removals: Vec<String>,
) -> Result<Applied, StoreError> {
    let mut batch = store.batch()?;
    let before = store.state();
    // Outcome each name gets if the push is committed.
    let mut planned: Vec<(String, Outcome)> = Vec::with_capacity(upserts.len() + removals.len());
    let mut changes = Vec::new();
    let mut refused: Option<(String, String)> = None;
    // `deliver = "socket"` values: swapped into memory once the push has
    // committed; a file such a credential had (delivered as a file before)
    // is removed in the same push.
    let mut to_memory: Vec<&Upsert> = Vec::new();
    let mut from_memory: Vec<String> = Vec::new();
    let mut memory_changed: Vec<String> = Vec::new();
    let had_file = |name: &str| {
        before.managed.contains(name)
            && matches!(store.current_cached(name), Ok(Current::Regular { .. }))
    };
    for u in &upserts {
        if config.deliver(&u.name) == Deliver::Socket {
            let file = had_file(&u.name);
            if file {
                changes.push(Change::Remove { name: &u.name });
            }
            if !file && memory.digest(&u.name) == Some(vmcred_proto::rules::digest(&u.value)) {
                planned.push((u.name.clone(), Outcome::Unchanged));
            } else {
                planned.push((u.name.clone(), Outcome::Written));
                memory_changed.push(u.name.clone());
            }
            to_memory.push(u);
            continue;
        }
        let mode = config.mode(&u.name);
        let digest = vmcred_proto::rules::digest(&u.value);
        match store.current_cached(&u.name) {
            Ok(Current::Regular { sha256, mode: m }) if sha256 == digest && m == mode => {
                planned.push((u.name.clone(), Outcome::Unchanged));
            }
            Ok(_) => {
                planned.push((u.name.clone(), Outcome::Written));
                changes.push(Change::Write {
                    name: &u.name,
                    value: &u.value,
                    mode,
                });
            }
            Err(e) => {
                planned.push((u.name.clone(), Outcome::Failed));
                refused.get_or_insert((u.name.clone(), e.to_string()));
            }
        }
    }
    for name in &removals {
        if config.deliver(name) == Deliver::Socket || memory.digest(name).is_some() {
            if had_file(name) {
                changes.push(Change::Remove { name });
            } else if memory.digest(name).is_some() {
                memory_changed.push(name.clone());
            }
            planned.push((name.clone(), Outcome::Removed));
            from_memory.push(name.clone());
            continue;
        }
        if !before.managed.contains(name) {
            // Already gone is removed (a push that named it may never have
            // been applied); a file vmcred did not write is not touched.
            match store.current_cached(name) {
                Ok(Current::Missing) => planned.push((name.clone(), Outcome::Removed)),
                _ => {
                    planned.push((name.clone(), Outcome::Failed));
                    refused.get_or_insert((name.clone(), NOT_OURS.into()));
                }
            }
            continue;
        }
        planned.push((name.clone(), Outcome::Removed));
        changes.push(Change::Remove { name });
    }
    let mut next = before.clone();
    next.generation = generation;
    for (name, outcome) in &planned {
        match outcome {
            Outcome::Written | Outcome::Unchanged => {
                next.managed.insert(name.clone());
            }
            Outcome::Removed => {
                next.managed.remove(name);
            }
            _ => {}
        }
    }
    // Only what changes (on disk or in memory) runs unit actions.
    let mut changed: Vec<String> = changes.iter().map(|c| c.name().to_string()).collect();
    for name in memory_changed {
        if !changed.contains(&name) {
            changed.push(name);
        }
    }
    let removed: Vec<String> = changes
        .iter()
        .filter(|c| matches!(c, Change::Remove { .. }))
        .map(|c| c.name().to_string())
        .collect();
    merge_owed(config, &mut next.owed, &next.managed, &changed);
    prune_owed(config, &mut next.owed, &next.managed, &removed);

    let failure = match refused {
        Some((name, error)) => Some((Some(name), error, Vec::new())),
        None => match batch.push(&changes, Some(generation), next) {
            Ok(()) => None,
            Err(TxError::NothingApplied { name, error }) => {
                Some((name, error.to_string(), Vec::new()))
            }
            Err(e) => {
                let text = e.to_string();
                let (name, applied) = match e {
                    TxError::Partial { name, applied, .. } => (name, applied),
                    TxError::NothingApplied { name, .. } => (name, Vec::new()),
                };
                // What did change still gets its unit actions.
                let mut st = store.state();
                let managed = st.managed.clone();
                merge_owed(config, &mut st.owed, &managed, &applied);
                if let Err(err) = batch.commit(st) {
                    tracing::error!(error = %err, "cannot record the unit actions owed after a partial push");
                }
                Some((name, text, applied))
            }
        },
    };
    drop(changes);
    if failure.is_none() {
        memory.swap(
            to_memory
                .iter()
                .map(|u| (u.name.clone(), u.value.clone()))
                .collect(),
            &from_memory,
        );
    }
    drop(to_memory);
    // Values are dropped (and zeroized) here, before any unit runs.
    drop(upserts);
    let Some((failed, error, applied)) = failure else {
        let results = planned
            .into_iter()
            .map(|(n, o)| result(&n, o, String::new()))
            .collect();
        return Ok(Applied {
            results,
            applied_generation: generation,
            all_ok: true,
        });
    };
    let results = planned
        .into_iter()
        .map(|(n, o)| {
            if applied.contains(&n) || o == Outcome::Unchanged {
                return result(&n, o, String::new());
            }
            match &failed {
                Some(f) if *f != n => result(
                    &n,
                    Outcome::Failed,
                    format!(
                        "not applied: a push is all or nothing, and {} failed",
                        display_name(f)
                    ),
                ),
                // This one failed, or the push as a whole did.
                _ => result(&n, Outcome::Failed, error.clone()),
            }
        })
        .collect();
    Ok(Applied {
        results,
        applied_generation: before.generation,
        all_ok: false,
    })
}

const NOT_OURS: &str = "not written by vmcred; left in place";

fn outcome_word(o: i32) -> &'static str {
    match Outcome::try_from(o) {
        Ok(Outcome::Written) => "written",
        Ok(Outcome::Unchanged) => "unchanged",
        Ok(Outcome::Removed) => "removed",
        Ok(Outcome::Failed) => "FAILED",
        _ => "?",
    }
}

/// Status for a store error that stopped an Apply before anything changed.
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Busy { .. } => Status::aborted(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

impl Inner {
    async fn apply(
        self: Arc<Self>,
        session: Option<crate::pins::HostPin>,
        generation: u64,
        upserts: Vec<Upsert>,
        removals: Vec<String>,
    ) -> Result<ApplyReply, Status> {
        let _serial = self.apply_lock.clone().lock_owned().await;
        // Checked again here, after waiting our turn: an Apply queued behind
        // another may have outlived its session's key (a rollover dropped it
        // meanwhile), and this task runs on even after its session closed.
        if let (Some(pins), Some(pin)) = (self.pins.get(), session) {
            if !vmcred_proto::tls::PinPolicy::accepts(&**pins, &pin) {
                tracing::warn!(generation, "refused an Apply whose session's host key was dropped while it waited; nothing applied");
                return Err(Status::unauthenticated(
                    "this session's host key is no longer pinned (a key rollover dropped it); nothing applied",
                ));
            }
        }
        let applied = self.store.state().generation;
        if generation <= applied {
            tracing::warn!(
                generation,
                applied,
                "refused an Apply that is not newer than the applied generation"
            );
            return Err(Status::failed_precondition(format!(
                "generation {generation} is not newer than the applied generation {applied}; refusing (rollback protection)"
            )));
        }
        // On this thread, not the blocking pool: a push is a handful of
        // syscalls on a tmpfs/ramfs (tens of microseconds), while a pool
        // thread, gone after its idle keep-alive, costs a thread creation
        // and several wake-ups per push on a VM. The guest serves one host
        // session, so nothing else waits on this thread meanwhile; the
        // store's file lock never blocks (busy is an error at once), and
        // its mutex is held elsewhere only by a credential-socket read.
        let done = apply_to_store(
            &self.store,
            &self.config,
            &self.memory,
            generation,
            upserts,
            removals,
        )
        .map_err(|e| {
            tracing::warn!(generation, error = %e, "apply not started; nothing applied");
            store_status(e)
        })?;

        let summary = done
            .results
            .iter()
            .map(|r| format!("{} {}", r.name, outcome_word(r.outcome)))
            .collect::<Vec<_>>()
            .join(", ");
        for r in done.results.iter().filter(|r| !r.error.is_empty()) {
            tracing::warn!(generation, credential = %r.name, error = %r.error, "credential not applied");
        }
        tracing::info!(
            generation,
            applied_generation = done.applied_generation,
            "apply: {}",
            if summary.is_empty() {
                "nothing"
            } else {
                &summary
            }
        );

        // The actions this push planned are owed now (saved with it), and
        // so is anything owed from before: run them all.
        let units = self.run_owed().await;
        let owed = owed_reply(&self.store.state().owed);

        if done.all_ok {
            self.readiness.ready(&format!(
                "generation {} applied ({} credentials managed)",
                done.applied_generation,
                self.store.state().managed.len()
            ));
        } else {
            self.readiness.status(&format!(
                "generation {generation} not applied; generation {} stays applied",
                done.applied_generation
            ));
        }
        Ok(ApplyReply {
            applied_generation: done.applied_generation,
            results: done.results,
            units,
            owed_units: owed,
        })
    }

    /// Runs every owed unit action once, in order, and records the
    /// outcome: a success clears it, a failure keeps it with its error.
    /// The caller holds `apply_lock`.
    async fn run_owed(&self) -> Vec<UnitResult> {
        let owed = self.store.state().owed;
        if owed.is_empty() {
            return Vec::new();
        }
        let actions: Vec<(String, Action)> =
            owed.iter().map(|o| (o.unit.clone(), o.action)).collect();
        let results = self.units.run_all(&actions).await;
        // Inline for the reason given in `apply`.
        let saved = (|| -> Result<(), StoreError> {
            let store = &self.store;
            let mut batch = store.batch()?;
            let mut st = store.state();
            for r in &results {
                let Some(pos) = st
                    .owed
                    .iter()
                    .position(|o| o.unit == r.unit && o.action.as_str() == r.action)
                else {
                    continue;
                };
                if r.ok {
                    st.owed.remove(pos);
                } else {
                    st.owed[pos].error = r.error.clone();
                }
            }
            batch.commit(st)
        })();
        if let Err(e) = saved {
            tracing::warn!(error = %e, "cannot record the outcome of owed unit actions; they are retried")
        }
        results
    }

    /// Retries owed unit actions: when woken (a Hello), and while some are
    /// owed, with a back-off from 10 s to 5 min. Nothing owed, no wake-up.
    async fn retry_loop(self: Arc<Self>) {
        let mut backoff = RETRY_MIN;
        loop {
            if self.store.state().owed.is_empty() {
                self.retry.notified().await;
                backoff = RETRY_MIN;
            } else {
                tokio::select! {
                    () = self.retry.notified() => {}
                    () = tokio::time::sleep(backoff) => {}
                }
            }
            let _serial = self.apply_lock.clone().lock_owned().await;
            let results = self.run_owed().await;
            backoff = if results.iter().all(|r| r.ok) {
                RETRY_MIN
            } else {
                (backoff * 2).min(RETRY_MAX)
            };
        }
    }
}

/// Back-off of the idle retry of owed unit actions (at most 6 a minute).
const RETRY_MIN: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(300);

#[tonic::async_trait]
impl Guest for GuestService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let req = request.into_inner();
        let inner = &self.inner;
        // On this thread: with the digests cached since the last push, a
        // Hello is one `fstatat` per credential and reads no file; a
        // blocking-pool thread would cost more than the work (the host's
        // keepalive probe is a Hello, so this is most of an idle guest's
        // wake-ups).
        let generation = inner.store.state().generation;
        let mut held = inner.store.held().map_err(store_status)?;
        // A `deliver = "socket"` credential is held only in memory: after
        // an agent restart it is missing here, and so is a file left from
        // when it was delivered as a file, so the host sends it again (and
        // that push removes the file).
        held.retain(|(n, _)| inner.config.deliver(n) != Deliver::Socket);
        held.extend(inner.memory.held());
        held.sort();
        let seen = (display_name(&req.vm), generation);
        let repeat = match self.inner.last_hello.lock() {
            Ok(mut last) => last.replace(seen.clone()).as_ref() == Some(&seen),
            Err(_) => false,
        };
        if repeat {
            tracing::debug!(vm = ?seen.0, applied_generation = generation, "host said hello");
        } else {
            tracing::info!(
                vm = ?seen.0,
                host_version = ?display_name(&req.host_version),
                applied_generation = generation,
                held = held.len(),
                "host said hello"
            );
        }
        if generation > 0 {
            // After an agent restart the host finds nothing to do and sends
            // no Apply; what is on disk is already the synced set.
            self.inner
                .readiness
                .ready(&format!("host connected; generation {generation} applied"));
        }
        // Owed unit actions are retried in the background: a Hello answers
        // at once with what is owed now.
        let owed = owed_reply(&self.inner.store.state().owed);
        if !owed.is_empty() {
            self.inner.retry.notify_one();
        }
        Ok(Response::new(HelloReply {
            owed_units: owed,
            applied_generation: generation,
            held: held
                .into_iter()
                .map(|(name, sha256)| Held {
                    name,
                    sha256: sha256.to_vec(),
                })
                .collect(),
            guest_version: vmcred_proto::VERSION.to_string(),
            pins: self.pin_bytes(),
            launch_key: self
                .inner
                .launch_key
                .get()
                .map(|k| k.to_vec())
                .unwrap_or_default(),
        }))
    }

    async fn trust(&self, request: Request<TrustRequest>) -> Result<Response<TrustReply>, Status> {
        let Some(pins) = self.inner.pins.get().cloned() else {
            return Err(Status::unimplemented(
                "this guest agent keeps a fixed host key pin",
            ));
        };
        let session = request
            .extensions()
            .get::<SessionInfo>()
            .map(|s| s.pin)
            .ok_or_else(|| {
                Status::permission_denied("no authenticated host key on this session")
            })?;
        let req = request.into_inner();
        if req.next_pin.is_empty() {
            return Ok(Response::new(TrustReply {
                pins: self.pin_bytes(),
            }));
        }
        let next = <[u8; 32]>::try_from(req.next_pin.as_slice())
            .map(HostPin)
            .map_err(|_| {
                invalid(format!(
                    "next_pin is {} bytes; a pin is 32 (SHA-256)",
                    req.next_pin.len()
                ))
            })?;
        let now = tokio::task::spawn_blocking(move || pins.add_next(session, next))
            .await
            .map_err(|e| Status::internal(format!("trust task failed: {e}")))?
            .map_err(|e| match e {
                PinError::NotPinned => Status::permission_denied(e.to_string()),
                PinError::NextAlreadySet { .. } => Status::failed_precondition(e.to_string()),
                other => Status::unavailable(other.to_string()),
            })?;
        Ok(Response::new(TrustReply {
            pins: now.iter().map(|p| p.0.to_vec()).collect(),
        }))
    }

    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        let session = request.extensions().get::<SessionInfo>().map(|s| s.pin);
        let mut req = request.into_inner();
        let generation = req.generation;
        let upserts: Vec<Upsert> = req
            .upserts
            .iter_mut()
            .map(|c| Upsert {
                name: std::mem::take(&mut c.name),
                value: Zeroizing::new(std::mem::take(&mut c.value)),
                sha256: std::mem::take(&mut c.sha256),
            })
            .collect();
        let removals = std::mem::take(&mut req.removals);
        drop(req);
        if let Err(status) = validate(&upserts, &removals) {
            tracing::warn!(
                generation,
                error = %status.message(),
                "refused an invalid Apply; nothing written"
            );
            return Err(status);
        }
        // A spawned task finishes even if the host hangs up mid-request:
        // credentials written must also get their unit actions.
        tokio::spawn(
            self.inner
                .clone()
                .apply(session, generation, upserts, removals),
        )
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
        .map(Response::new)
    }
}
