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

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use vmcred_proto::rpc::pb::{
    ApplyReply, ApplyRequest, CredentialResult, Held, HelloReply, HelloRequest, Outcome,
};
use vmcred_proto::rpc::Guest;
use vmcred_proto::rules::{
    display_name, validate_name, validate_size, validate_total, verify_digest, RuleError,
    BOOTSTRAP_CREDENTIAL, MAX_CREDENTIALS_PER_MESSAGE,
};
use zeroize::Zeroizing;

use crate::config::GuestConfig;
use crate::notify::Readiness;
use crate::store::{reserved_name, Current, State, Store, StoreError};
use crate::units::{plan, UnitRunner};

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
}

impl GuestService {
    pub fn new(
        store: Arc<Store>,
        config: Arc<GuestConfig>,
        units: UnitRunner,
        readiness: Arc<Readiness>,
    ) -> Self {
        GuestService {
            inner: Arc::new(Inner {
                store,
                config,
                units,
                apply_lock: Arc::new(Mutex::new(())),
                readiness,
            }),
        }
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
    /// Names whose file changed (written or removed): their units run.
    changed: Vec<String>,
    applied_generation: u64,
    all_ok: bool,
}

/// Writes and removes under the store's locks. Blocking: runs on the
/// blocking pool.
fn apply_to_store(
    store: &Store,
    config: &GuestConfig,
    generation: u64,
    upserts: Vec<Upsert>,
    removals: Vec<String>,
) -> Result<Applied, StoreError> {
    let mut batch = store.batch()?;
    let before = store.state();
    let mut state: State = before.clone();
    let mut results = Vec::with_capacity(upserts.len() + removals.len());
    let mut changed = Vec::new();
    for u in upserts {
        let mode = config.mode(&u.name);
        let digest = vmcred_proto::rules::digest(&u.value);
        let same = match store.current(&u.name) {
            Ok(Current::Regular { sha256, mode: m }) => sha256 == digest && m == mode,
            Ok(_) => false,
            Err(e) => {
                results.push(result(&u.name, Outcome::Failed, e.to_string()));
                continue;
            }
        };
        if same {
            state.managed.insert(u.name.clone());
            results.push(result(&u.name, Outcome::Unchanged, String::new()));
            continue;
        }
        match batch.write(&u.name, &u.value, mode) {
            Ok(()) => {
                state.managed.insert(u.name.clone());
                changed.push(u.name.clone());
                results.push(result(&u.name, Outcome::Written, String::new()));
            }
            Err(e) => results.push(result(&u.name, Outcome::Failed, e.to_string())),
        }
        // `u` (and its zeroizing value) is dropped here, before the next one.
    }
    for name in removals {
        if !state.managed.contains(&name) {
            results.push(result(
                &name,
                Outcome::Failed,
                "not written by vmcred; left in place".into(),
            ));
            continue;
        }
        match batch.remove(&name) {
            Ok(()) => {
                state.managed.remove(&name);
                results.push(result(&name, Outcome::Removed, String::new()));
                changed.push(name);
            }
            Err(e) => results.push(result(&name, Outcome::Failed, e.to_string())),
        }
    }
    let all_ok = results.iter().all(|r| r.outcome != Outcome::Failed as i32);
    if all_ok {
        state.generation = generation;
    }
    let applied_generation = if state == before {
        before.generation
    } else {
        let target = state.generation;
        match batch.commit(state) {
            Ok(()) => target,
            Err(e) => {
                tracing::error!(error = %e, generation, "cannot persist the state; the generation stays unapplied");
                before.generation
            }
        }
    };
    Ok(Applied {
        results,
        changed,
        applied_generation,
        all_ok: all_ok && applied_generation == generation,
    })
}

fn outcome_word(o: i32) -> &'static str {
    match Outcome::try_from(o) {
        Ok(Outcome::Written) => "written",
        Ok(Outcome::Unchanged) => "unchanged",
        Ok(Outcome::Removed) => "removed",
        Ok(Outcome::Failed) => "FAILED",
        _ => "?",
    }
}

impl Inner {
    async fn apply(
        self: Arc<Self>,
        generation: u64,
        upserts: Vec<Upsert>,
        removals: Vec<String>,
    ) -> Result<ApplyReply, Status> {
        let _serial = self.apply_lock.clone().lock_owned().await;
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
        let (store, config) = (self.store.clone(), self.config.clone());
        let done = tokio::task::spawn_blocking(move || {
            apply_to_store(&store, &config, generation, upserts, removals)
        })
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;

        let summary = done
            .results
            .iter()
            .map(|r| format!("{} {}", r.name, outcome_word(r.outcome)))
            .collect::<Vec<_>>()
            .join(", ");
        for r in done.results.iter().filter(|r| !r.error.is_empty()) {
            tracing::warn!(generation, name = %r.name, error = %r.error, "credential not applied");
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

        let actions = plan(&self.config, done.changed.iter().map(String::as_str));
        let units = self.units.run_all(&actions).await;

        if done.all_ok {
            self.readiness.ready(&format!(
                "generation {} applied ({} credentials managed)",
                done.applied_generation,
                self.store.state().managed.len()
            ));
        } else {
            self.readiness.status(&format!(
                "generation {generation} not fully applied; generation {} stays applied",
                done.applied_generation
            ));
        }
        Ok(ApplyReply {
            applied_generation: done.applied_generation,
            results: done.results,
            units,
            owed_units: Vec::new(),
        })
    }
}

#[tonic::async_trait]
impl Guest for GuestService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let req = request.into_inner();
        let store = self.inner.store.clone();
        let (generation, held) = tokio::task::spawn_blocking(move || {
            let generation = store.state().generation;
            store.held().map(|h| (generation, h))
        })
        .await
        .map_err(|e| Status::internal(format!("hello task failed: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            vm = ?display_name(&req.vm),
            host_version = ?display_name(&req.host_version),
            applied_generation = generation,
            held = held.len(),
            "host said hello"
        );
        if generation > 0 {
            // After an agent restart the host finds nothing to do and sends
            // no Apply; what is on disk is already the synced set.
            self.inner
                .readiness
                .ready(&format!("host connected; generation {generation} applied"));
        }
        Ok(Response::new(HelloReply {
            owed_units: Vec::new(),
            applied_generation: generation,
            held: held
                .into_iter()
                .map(|(name, sha256)| Held {
                    name,
                    sha256: sha256.to_vec(),
                })
                .collect(),
            guest_version: vmcred_proto::VERSION.to_string(),
        }))
    }

    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
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
        tokio::spawn(self.inner.clone().apply(generation, upserts, removals))
            .await
            .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
            .map(Response::new)
    }
}
