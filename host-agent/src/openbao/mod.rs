//! OpenBao / Vault KV v2 as a credential source.
//!
//! One store per host agent process. A watcher task polls each configured
//! secret's metadata (`current_version`) at the configured interval,
//! jittered so that many hosts do not poll in step, and reads the data of a
//! version only when the version changed. What it read is kept in memory
//! (zeroizing) and served to the VM tasks' syncs like a file's bytes; a
//! change, or a change in whether the store can be read, wakes every VM
//! task to sync. `rotate` reads the VM's secrets at once.
//!
//! The store is not trusted to go backwards: the highest version seen of
//! each secret is kept in `state_dir/openbao-versions.json` (written
//! atomically) and a lower current version is refused. While the store is
//! unreachable, the token refused, the secret deleted or rolled back, the
//! credential's source reports the reason and the guest keeps the value
//! it has.

pub mod auth;
pub mod config;
pub mod http;
pub mod reply;
pub mod zbuf;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::config::{Config, Source};
use crate::source::{SourceError, Value};
use config::{SecretKey, SecretRef, Server};
use http::{Client, Method};
use vmcred_proto::rules;

/// Why a secret cannot be read now. Never holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The first read has not finished yet.
    NotYetRead,
    Unreachable(String),
    /// HTTP 403 on this secret's read while the token is valid (another
    /// read or `lookup-self` succeeded): the token's policy lacks it.
    Denied,
    /// HTTP 403 on every read of a round, and the token may not look
    /// itself up: the policy lacks the secret or the token is dead.
    DeniedUnproven,
    /// The store refused the token itself (every read and `lookup-self`
    /// got 403), or the token file still holds that refused token.
    TokenRefused,
    Auth(String),
    /// No such secret (404 on its metadata): deleted, or never written.
    NotFound,
    /// The current version is soft-deleted or destroyed.
    VersionDeleted(u64),
    /// The data read found this version gone, and the metadata read
    /// again does not say it is deleted (it still names it current, or
    /// moved on again): not taken as a deletion; the next round reads
    /// again.
    VersionVanished(u64),
    /// The store's current version is below the highest one seen.
    Rollback {
        current: u64,
        seen: u64,
    },
    Http(u16, String),
    /// HTTP 404 whose body is not OpenBao's (a proxy's or load balancer's
    /// page): the store's error, never taken as "deleted".
    Foreign404(&'static str),
    BadReply(String),
}

impl Problem {
    fn is_deleted(&self) -> bool {
        matches!(self, Problem::NotFound | Problem::VersionDeleted(_))
    }

    fn describe(&self, key: &SecretKey, address: &str) -> String {
        match self {
            Problem::NotYetRead => format!("{key} not read from the store yet"),
            Problem::Unreachable(e) => format!("cannot reach {address}: {e}; the guest keeps its last value and delivery resumes when the store is back"),
            Problem::Denied => format!("permission denied reading {key}: the token is valid but its policy does not cover this secret; add read on {m}/data/{p} and {m}/metadata/{p} to the token's policy", m = key.mount, p = key.path),
            Problem::DeniedUnproven => format!("permission denied reading {key}, and the token may not look itself up (no `default` policy), so whether it is still valid is unknown; add read on {m}/data/{p} and {m}/metadata/{p} to the token's policy, or replace the token if it was revoked or expired", m = key.mount, p = key.path),
            Problem::TokenRefused => format!("the store refused the token (revoked or expired) while reading {key}; put a valid token in the token file, or check the AppRole role and secret id"),
            Problem::Auth(e) => format!("login failed: {e}"),
            Problem::NotFound => format!("{key} does not exist (deleted?)"),
            Problem::VersionDeleted(v) => format!("version {v} of {key} is deleted or destroyed"),
            Problem::VersionVanished(v) => format!("the data of version {v} of {key} was not found, yet the metadata does not say it is deleted (written over while being read?); not taken as deleted: the guest keeps its last value and the next round reads again"),
            Problem::Rollback { current, seen } => format!("{key} is at version {current}, below version {seen} already seen; refusing a rollback (put a new version above {seen}, or, if the secret was re-created on purpose, remove its entry from openbao-versions.json in the state directory)"),
            Problem::Http(s, e) => format!("HTTP {s} for {key}: {e}"),
            Problem::Foreign404(what) => format!("HTTP 404 for {key} from {address}, but the reply is not OpenBao's ({what}): a reverse proxy or load balancer in front of the store? Not taken as deleted; the guest keeps its last value"),
            Problem::BadReply(e) => format!("{key}: {e}"),
        }
    }
}

/// What one read of a secret found.
enum Read {
    /// The version is the one already held.
    Unchanged,
    New {
        version: u64,
        body: Zeroizing<Vec<u8>>,
    },
}

/// One secret as last read.
#[derive(Default)]
struct Entry {
    version: u64,
    /// The whole data reply; fields are taken from it on each sync.
    body: Option<Arc<Zeroizing<Vec<u8>>>>,
    problem: Option<Problem>,
}

#[derive(Default)]
struct Shared {
    server: Option<Server>,
    secrets: BTreeSet<SecretKey>,
    cache: BTreeMap<SecretKey, Entry>,
    /// Highest version seen per `address mount/path`.
    seen: BTreeMap<String, u64>,
    /// Bumped whenever `server` changes (SIGHUP): a round that started
    /// under another epoch ran against another server, or another token
    /// or CA, and its results are dropped.
    epoch: u64,
    state_file: Option<PathBuf>,
    credentials_dir: Option<PathBuf>,
    watcher: bool,
}

/// The HTTP client and login, rebuilt when `[openbao]` changes.
struct Engine {
    server: Server,
    client: Client,
    auth: auth::Auth,
}

pub struct Store {
    shared: Mutex<Shared>,
    /// Bumped whenever a secret's value or readability changed.
    changed: watch::Sender<u64>,
    kick: Notify,
    engine: tokio::sync::Mutex<Option<Engine>>,
}

/// The process's store. Empty (and idle) until a config with `[openbao]`
/// is applied.
pub fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| Store {
        shared: Mutex::new(Shared::default()),
        changed: watch::channel(0).0,
        kick: Notify::new(),
        engine: tokio::sync::Mutex::new(None),
    })
}

/// What a 404 on one of a secret's reads means, when OpenBao itself said
/// it: the secret is gone (metadata) or its version is (data).
#[derive(Clone, Copy)]
enum Gone {
    Secret,
    Version(u64),
}

/// A read of `path` with the token, judged the same way for metadata and
/// data: 403 is this secret's refusal (whether the token itself is refused
/// is decided per round), any other status but 200 is the store's
/// error. A 404 means deleted only when its body is OpenBao's own
/// ([`reply::not_found`]); anything else in front of the store answering
/// 404 is an error, so that it cannot remove credentials from guests.
async fn get(engine: &Engine, token: &str, path: &str, gone: Gone) -> Result<http::Reply, Problem> {
    let r = engine
        .client
        .request(Method::Get, path, Some(token), None)
        .await
        .map_err(Problem::Unreachable)?;
    match r.status {
        200 => Ok(r),
        403 => Err(Problem::Denied),
        404 => Err(match (reply::not_found(&r.body), gone) {
            (reply::NotFound::Absent, Gone::Secret) => Problem::NotFound,
            // The store's own word that this version is deleted or
            // destroyed: its data reply with the version's metadata.
            (reply::NotFound::VersionGone, Gone::Version(v)) => Problem::VersionDeleted(v),
            // No such version: purged by a write since the metadata named
            // it, or the whole secret deleted; the metadata, read again,
            // tells which (`read_one`).
            (reply::NotFound::Absent, Gone::Version(v)) => Problem::VersionVanished(v),
            // A deleted version's data reply from the metadata endpoint:
            // not what OpenBao sends there.
            (reply::NotFound::VersionGone, Gone::Secret) => {
                Problem::Foreign404("a data reply where metadata was asked for")
            }
            (reply::NotFound::Error(e), _) => Problem::Http(404, e),
            (reply::NotFound::Foreign(what), _) => Problem::Foreign404(what),
        }),
        s => Err(Problem::Http(s, reply::errors(&r.body))),
    }
}

/// Data reads of one secret in a round: the one the metadata named, and
/// one more when a write replaced that version before it was read.
const DATA_READS: usize = 2;

/// The data reply of one version of a secret. `VersionDeleted`: the store
/// said this version is deleted or destroyed; `VersionVanished`: it knows
/// no such version, and the caller asks the metadata why.
async fn read_data(
    engine: &Engine,
    token: &str,
    key: &SecretKey,
    version: u64,
) -> Result<Zeroizing<Vec<u8>>, Problem> {
    let r = get(
        engine,
        token,
        &format!("/v1/{}/data/{}?version={version}", key.mount, key.path),
        Gone::Version(version),
    )
    .await?;
    match reply::check_data(&r.body) {
        Ok(()) => Ok(r.body),
        Err(reply::FieldError::NoData) => Err(Problem::VersionDeleted(version)),
        Err(_) => Err(Problem::BadReply("the data reply is not KV v2 data".into())),
    }
}

/// The server a round runs against, by address and config epoch.
struct Round<'a> {
    address: &'a str,
    epoch: u64,
}

/// Reads requests use: the persisted key of a secret.
fn seen_key(address: &str, key: &SecretKey) -> String {
    format!("{address} {key}")
}

const STATE_FILE: &str = "openbao-versions.json";

impl Store {
    /// Takes the `[openbao]` table and the set of secrets the VMs use;
    /// starts the watcher the first time, and makes it poll at once.
    pub fn configure(&self, cfg: &Config, credentials_dir: Option<PathBuf>) {
        let secrets: BTreeSet<SecretKey> = cfg
            .vms
            .values()
            .flat_map(|vm| vm.credentials.values())
            .filter_map(|c| match &c.source {
                Source::OpenBao(r) => Some(r.key()),
                _ => None,
            })
            .collect();
        let start = {
            let Ok(mut s) = self.shared.lock() else {
                return;
            };
            let state_file = cfg.state_dir.join(STATE_FILE);
            if s.state_file.as_ref() != Some(&state_file) {
                s.seen = load_seen(&state_file);
                s.state_file = Some(state_file);
            }
            if s.server != cfg.openbao {
                s.cache.clear();
                s.epoch = s.epoch.wrapping_add(1);
            }
            s.server = cfg.openbao.clone();
            s.cache.retain(|k, _| secrets.contains(k));
            s.secrets = secrets;
            s.credentials_dir = credentials_dir;
            let start = s.server.is_some() && !s.watcher;
            if start {
                s.watcher = true;
            }
            start
        };
        if start {
            tokio::spawn(async { store().watch().await });
        } else {
            self.kick.notify_one();
        }
    }

    /// A receiver that sees every change of a secret's value or state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads these secrets now (for `rotate`), whatever their version.
    pub async fn refresh(&self, keys: BTreeSet<SecretKey>) {
        if keys.is_empty() {
            return;
        }
        debug!(secrets = keys.len(), "openbao: rotate reads the store now");
        self.round(Some(keys)).await;
    }

    async fn watch(&self) {
        let mut rng = fastrand::Rng::new();
        loop {
            self.round(None).await;
            let (poll, renew) = {
                let poll = self
                    .shared
                    .lock()
                    .ok()
                    .and_then(|s| s.server.as_ref().map(|s| s.poll_interval))
                    .unwrap_or(Duration::ZERO);
                let renew = self
                    .engine
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|e| e.auth.renew_due());
                (poll, renew)
            };
            // Jitter: 80-120 % of the interval, so hosts that started
            // together spread out.
            let mut wait = if poll.is_zero() {
                Duration::from_secs(3600 * 24 * 365)
            } else {
                poll.mul_f64(0.8 + 0.4 * rng.f64())
            };
            if let Some(at) = renew {
                wait = wait
                    .min(at.saturating_duration_since(Instant::now()) + Duration::from_millis(10));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.kick.notified() => {}
            }
        }
    }

    /// One round of requests: all configured secrets (`None`, checking
    /// versions first) or the given ones (read whatever their version).
    async fn round(&self, only: Option<BTreeSet<SecretKey>>) {
        // The server, secrets and epoch are taken only once the engine is
        // this round's: a round that queued behind another (a rotate's
        // behind the watcher's) while a SIGHUP changed `[openbao]` then
        // runs against the new server, instead of sending the token file's
        // token (by now perhaps the new server's) to the old address and
        // having its results dropped.
        let mut guard = self.engine.lock().await;
        let (server, secrets, credentials_dir, epoch) = {
            let Ok(s) = self.shared.lock() else { return };
            let Some(server) = s.server.clone() else {
                return;
            };
            let secrets: Vec<SecretKey> = match &only {
                Some(o) => o
                    .iter()
                    .filter(|k| s.secrets.contains(k))
                    .cloned()
                    .collect(),
                None => s.secrets.iter().cloned().collect(),
            };
            (server, secrets, s.credentials_dir.clone(), s.epoch)
        };
        let at = Round {
            address: &server.address,
            epoch,
        };
        if secrets.is_empty() {
            return;
        }
        let force = only.is_some();
        if guard.as_ref().map(|e| e.server != server).unwrap_or(true) {
            match Client::new(&server) {
                Ok(client) => {
                    *guard = Some(Engine {
                        server: server.clone(),
                        client,
                        auth: auth::Auth::default(),
                    })
                }
                Err(e) => {
                    *guard = None;
                    self.record_all(
                        &at,
                        &secrets,
                        Problem::BadReply(format!("openbao client: {e}")),
                    );
                    return;
                }
            }
        }
        let Some(engine) = guard.as_mut() else { return };
        let token = match engine
            .auth
            .token(&engine.client, &engine.server, credentials_dir.as_deref())
            .await
        {
            Ok(t) => t,
            Err(p) => {
                self.record_all(&at, &secrets, p);
                return;
            }
        };
        let mut outcomes = Vec::with_capacity(secrets.len());
        for key in &secrets {
            // A SIGHUP during the round: the rest would go to the old
            // server and be dropped; the round it queued reads the new one.
            if !self.is_epoch(epoch) {
                debug!(
                    server = at.address,
                    "openbao: [openbao] changed during the round; stopping it"
                );
                return;
            }
            outcomes.push(self.read_one(engine, &token, key, force).await);
        }
        // A 403 is one secret's unless the token itself is shown refused:
        // a read the store answered proves the token; when every read was
        // refused, `lookup-self` is asked once.
        let denied = outcomes.iter().any(|o| matches!(o, Err(Problem::Denied)));
        if denied {
            let proven = outcomes.iter().any(|o| {
                matches!(
                    o,
                    Ok(_)
                        | Err(Problem::NotFound
                            | Problem::VersionDeleted(_)
                            | Problem::VersionVanished(_)
                            | Problem::Rollback { .. }
                            | Problem::BadReply(_))
                )
            });
            let verdict = if proven {
                auth::Verdict::Valid
            } else {
                engine.auth.verdict(&engine.client).await
            };
            let as_problem = match verdict {
                auth::Verdict::Valid => Problem::Denied,
                auth::Verdict::Refused => Problem::TokenRefused,
                auth::Verdict::Unknown => Problem::DeniedUnproven,
            };
            for o in &mut outcomes {
                if matches!(o, Err(Problem::Denied)) {
                    *o = Err(as_problem.clone());
                }
            }
        }
        for (key, outcome) in secrets.iter().zip(outcomes) {
            self.record(&at, key, outcome);
        }
    }

    fn is_epoch(&self, epoch: u64) -> bool {
        self.shared
            .lock()
            .map(|s| s.epoch == epoch)
            .unwrap_or(false)
    }

    fn record_all(&self, at: &Round, secrets: &[SecretKey], p: Problem) {
        for k in secrets {
            self.record(at, k, Err(p.clone()));
        }
    }

    /// Stores the outcome of one read, and tells the VM tasks if anything
    /// they would see changed.
    ///
    /// The outcome is judged and its version recorded only under the
    /// server the round ran against: when `[openbao]` changed while the
    /// round was in flight (SIGHUP), it is dropped, since the old server's
    /// versions would otherwise become the new one's rollback floor and
    /// its values the new one's cache. The round the SIGHUP queued reads
    /// the new server.
    fn record(&self, at: &Round, key: &SecretKey, outcome: Result<Read, Problem>) {
        let Ok(mut s) = self.shared.lock() else {
            return;
        };
        if s.epoch != at.epoch {
            debug!(secret = %key, server = at.address, "openbao: [openbao] changed during the round; its result is dropped");
            return;
        }
        // No VM uses it any more (SIGHUP): nothing to cache or wake.
        if !s.secrets.contains(key) {
            return;
        }
        let address = at.address;
        let mut persist = None;
        let changed = {
            let e = s.cache.entry(key.clone()).or_default();
            match outcome {
                Ok(Read::Unchanged) => e.problem.take().is_some(),
                Ok(Read::New { version, body }) => {
                    let changed = e.version != version || e.problem.is_some() || e.body.is_none();
                    e.version = version;
                    e.body = Some(Arc::new(body));
                    e.problem = None;
                    persist = Some(version);
                    changed
                }
                Err(p) => {
                    if e.problem.as_ref() != Some(&p) {
                        warn!(secret = %key, error = %p.describe(key, address), "openbao: cannot read");
                        e.problem = Some(p);
                        true
                    } else {
                        false
                    }
                }
            }
        };
        if let Some(v) = persist {
            let sk = seen_key(address, key);
            if s.seen.get(&sk).copied().unwrap_or(0) < v {
                s.seen.insert(sk, v);
                if let Some(f) = &s.state_file {
                    if let Err(e) = save_seen(f, &s.seen) {
                        warn!(file = %f.display(), error = %e, "openbao: cannot persist the versions seen");
                    }
                }
            }
        }
        drop(s);
        if changed {
            info!(secret = %key, "openbao: secret changed or its state did; syncing VMs");
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// One secret: its metadata, then its data if the version is new (or
    /// `force`, or the version has a deletion time).
    ///
    /// Whether a version is deleted is the store's word, never judged by
    /// the host's clock against a `deletion_time` (see
    /// [`reply::VersionState`]): a version with a deletion time is read,
    /// and a value (a deletion still to come) or OpenBao's "deleted" 404
    /// decides. The version the metadata names can also vanish before its
    /// data is read: a write purges it when the secret keeps
    /// `max_versions` versions, and OpenBao then answers as for a version
    /// it never had. That is never a deletion by itself: the metadata is
    /// read again and decides: the secret gone or its current version
    /// destroyed is a deletion; a newer current version is read instead,
    /// once; anything else is [`Problem::VersionVanished`], which keeps
    /// the guest's value until the next round.
    async fn read_one(
        &self,
        engine: &Engine,
        token: &str,
        key: &SecretKey,
        force: bool,
    ) -> Result<Read, Problem> {
        let cached = {
            let s = self.locked().map_err(Problem::BadReply)?;
            s.cache
                .get(key)
                .filter(|e| e.body.is_some())
                .map(|e| e.version)
        };
        let (mut version, state) = self.current_version(engine, token, key).await?;
        if !force && state == reply::VersionState::Live && cached == Some(version) {
            debug!(secret = %key, version, "openbao: unchanged");
            return Ok(Read::Unchanged);
        }
        for _ in 0..DATA_READS {
            match read_data(engine, token, key, version).await {
                Ok(body) => return Ok(Read::New { version, body }),
                Err(Problem::VersionVanished(_)) => {}
                Err(p) => return Err(p),
            }
            let (now, _) = self.current_version(engine, token, key).await?;
            if now == version {
                return Err(Problem::VersionVanished(version));
            }
            debug!(secret = %key, was = version, now, "openbao: the version moved between the metadata and the data read; reading the new one");
            version = now;
        }
        Err(Problem::VersionVanished(version))
    }

    /// The secret's current version and its state from its metadata:
    /// refused when below the highest seen (a rollback) or destroyed.
    async fn current_version(
        &self,
        engine: &Engine,
        token: &str,
        key: &SecretKey,
    ) -> Result<(u64, reply::VersionState), Problem> {
        let r = get(
            engine,
            token,
            &format!("/v1/{}/metadata/{}", key.mount, key.path),
            Gone::Secret,
        )
        .await?;
        let meta = reply::metadata(&r.body).map_err(Problem::BadReply)?;
        let seen = {
            let s = self.locked().map_err(Problem::BadReply)?;
            s.seen
                .get(&seen_key(&engine.server.address, key))
                .copied()
                .unwrap_or(0)
        };
        if meta.current_version < seen {
            return Err(Problem::Rollback {
                current: meta.current_version,
                seen,
            });
        }
        if meta.current == reply::VersionState::Destroyed {
            return Err(Problem::VersionDeleted(meta.current_version));
        }
        Ok((meta.current_version, meta.current))
    }

    /// The shared state. A poisoned lock (a panic while it was held) is
    /// an internal error for the caller to report, never a value.
    fn locked(&self) -> Result<std::sync::MutexGuard<'_, Shared>, String> {
        self.shared.lock().map_err(|_| "internal: lock".to_string())
    }

    /// The value of one credential from what the store last gave.
    pub fn read(&self, name: &str, r: &SecretRef) -> Result<Value, SourceError> {
        let key = r.key();
        let (body, version) = {
            let s = self.locked().map_err(SourceError::OpenBao)?;
            let address = s
                .server
                .as_ref()
                .map(|x| x.address.clone())
                .unwrap_or_default();
            let e = s.cache.get(&key);
            match e.and_then(|e| e.problem.clone()) {
                Some(p) if p.is_deleted() => {
                    return Err(SourceError::OpenBaoDeleted {
                        why: p.describe(&key, &address),
                        remove: r.on_delete == config::OnDelete::Remove,
                    })
                }
                Some(p) => return Err(SourceError::OpenBao(p.describe(&key, &address))),
                None => {}
            }
            match e.and_then(|e| e.body.clone().map(|b| (b, e.version))) {
                Some(x) => x,
                None => {
                    return Err(SourceError::OpenBao(
                        Problem::NotYetRead.describe(&key, &address),
                    ))
                }
            }
        };
        let v = reply::field(&body, &r.field).map_err(|e| {
            SourceError::OpenBao(match e {
                reply::FieldError::Missing => {
                    format!("{key} version {version} has no field {:?}", r.field)
                }
                reply::FieldError::NotAString => format!(
                    "field {:?} of {key} version {version} is not a string",
                    r.field
                ),
                _ => format!("{key} version {version}: the data reply is not KV v2 data"),
            })
        })?;
        let mut bytes = Zeroizing::new(Vec::with_capacity(v.len()));
        bytes.extend_from_slice(v.as_bytes());
        rules::validate_size(name, bytes.len())?;
        let digest = rules::digest(&bytes);
        Ok(Value { bytes, digest })
    }
}

/// The secrets (mount, path) behind these credentials of a VM (all when
/// `only` is empty).
pub fn secrets_of(vm: &crate::config::Vm, only: &[String]) -> BTreeSet<SecretKey> {
    vm.credentials
        .values()
        .filter(|c| only.is_empty() || only.contains(&c.name))
        .filter_map(|c| match &c.source {
            Source::OpenBao(r) => Some(r.key()),
            _ => None,
        })
        .collect()
}

fn load_seen(path: &Path) -> BTreeMap<String, u64> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            // A broken file must not silently reset the floor: warn loudly.
            warn!(file = %path.display(), error = %e, "openbao: the versions file is unreadable; rollback protection restarts from the store's current versions");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

fn save_seen(path: &Path, seen: &BTreeMap<String, u64>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(seen).map_err(std::io::Error::other)?;
    vmcred_proto::fsutil::write_atomic(path, &bytes, 0o600)
}
