//! The credential socket: a service in the guest can take a credential's
//! current value with `LoadCredential=NAME:/run/vmcred/creds.sock`.
//!
//! systemd connects to an `AF_UNIX` stream socket given as a
//! `LoadCredential=` path after binding its own end to the abstract address
//! `\0<random hex>/unit/<unit>/<credential>`, and reads until EOF. That
//! address is chosen by whoever connects, so it is believed only when the
//! peer is root (`SO_PEERCRED`): the service manager (on systemd >= 255 its
//! `systemd-executor` child, on older ones a forked child of PID 1, so the
//! peer's pid is never 1 and is not checked). The socket itself is 0600 in
//! the agent's root-only state directory.
//!
//! A unit gets a value only if the guest's config lists it in that
//! credential's `socket_units`, and only the value the last committed push
//! delivered: the managed file in the credentials directory, read under the
//! store's writer lock so never mid-push ([`Store::read_committed`]), or, with
//! `deliver = "socket"`, the copy in [`SocketValues`] (memory only, no
//! file). Anything else is refused. A plain close
//! would not do: systemd reads an immediate EOF as an *empty* credential
//! and starts the unit with it. So a refusal to root sends more bytes than
//! systemd accepts for any credential (1 MiB, or 1 MiB + 128 KiB
//! encrypted); systemd's read then fails with E2BIG and the unit's
//! credential setup fails, as it does for a missing file.
//!
//! The same holds for every way a connection can end early: at its
//! deadline, or when the agent stops. A request still being decided is
//! refused that way, and a value cut off mid-write is followed by the
//! refusal's bytes, so that systemd's read fails rather than returning
//! the part that was sent (`Stopper`).
//!
//! A refusal is only a refusal once systemd has read past its limit, and
//! the socket's buffer holds about 200 KiB: closing before the peer has
//! read the rest would hand it that much as a credential. So a refusal
//! the peer has not taken within [`REFUSAL_GRACE`] is not closed: it
//! *lingers*, its connection slot given back, still written as the peer
//! reads, until it is all sent, the peer hangs up, or [`LINGER_LIMIT`]
//! has passed. At most [`MAX_LINGERING`] linger; a new one closes the
//! oldest (whose peer has read least willingly). A peer closed on that
//! way, at the limit, or when the agent exits after waiting
//! [`LINGER_AT_STOP`] for them, may read a short answer, which is logged;
//! only root peers ever get a refusal, so only root can cause that.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use vmcred_proto::rules::{display_name, validate_name};
use zeroize::Zeroizing;

use crate::config::{validate_unit, Deliver, GuestConfig};
use crate::store::Store;

/// The socket's file name in the agent's state directory.
pub const SOCKET_NAME: &str = "creds.sock";
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one connection may take from accept to close: a peer that
/// does not read its value cannot hold a slot for longer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes sent to refuse a root peer: more than systemd's largest
/// credential (`CREDENTIAL_ENCRYPTED_SIZE_MAX`, 1 MiB + 128 KiB), so that
/// its read fails instead of yielding an empty credential.
pub const REFUSAL_BYTES: usize = 2 * 1024 * 1024;
/// How long the refusal (or the padding after a cut-off value) may hold
/// its connection slot; after that it lingers (see the module docs).
pub const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// Refusals still being written after their grace, at most; root peers
/// only, each one a peer that neither reads nor hangs up.
pub const MAX_LINGERING: usize = 64;
/// How long a stopping agent waits for lingering refusals to be read.
pub const LINGER_AT_STOP: Duration = Duration::from_secs(10);
/// How long a refusal may linger while the agent runs.
pub const LINGER_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum CredsSocketError {
    #[error("credential socket {path}: {why}")]
    Bind { path: String, why: String },
}

/// What systemd asks for, read from its abstract address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub unit: String,
    pub credential: String,
}

/// Why a peer's address is not a request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("the peer is not bound to an abstract address (systemd's LoadCredential= binds one)")]
    NotAbstract,
    #[error("the peer's address is not \"<random hex>/unit/<unit>/<credential>\"")]
    Shape,
    #[error("the peer's address names a bad unit: {0}")]
    Unit(String),
    #[error("the peer's address names a bad credential: {0}")]
    Credential(String),
}

/// Parses systemd's abstract address (without its leading NUL):
/// `<random hex>/unit/<unit>/<credential>`.
pub fn parse_address(name: &[u8]) -> Result<Request, AddressError> {
    let text = std::str::from_utf8(name).map_err(|_| AddressError::Shape)?;
    let mut parts = text.split('/');
    let (Some(random), Some("unit"), Some(unit), Some(credential), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(AddressError::Shape);
    };
    if random.is_empty() || random.len() > 16 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AddressError::Shape);
    }
    validate_unit(unit).map_err(AddressError::Unit)?;
    validate_name(credential).map_err(|e| AddressError::Credential(e.to_string()))?;
    Ok(Request {
        unit: unit.to_string(),
        credential: credential.to_string(),
    })
}

/// Why a connection got no value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("cannot read the peer's credentials: {0}")]
    PeerCred(String),
    #[error("peer uid {uid} is not root; only the service manager may ask")]
    NotRoot { uid: u32 },
    #[error("{0}")]
    Address(AddressError),
    #[error("unit {unit:?} is not in socket_units of credential {credential:?}")]
    NotMapped { unit: String, credential: String },
    #[error("credential {credential:?} is not held (no push has delivered it)")]
    NotHeld { credential: String },
    #[error("cannot read credential {credential:?}: {why}")]
    Read { credential: String, why: String },
    #[error("not decided within the connection's deadline of {}", humantime::format_duration(*.0))]
    Deadline(Duration),
    #[error("the agent is stopping")]
    Stopping,
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Served(Request),
    /// The value's write was cut off (deadline, or the agent stopping) and
    /// the refusal's bytes followed it, so systemd's read fails.
    CutOff(Request),
    Refused(Refusal),
}

/// Values of `deliver = "socket"` credentials: in memory only, never in a
/// file. The service swaps a push's values in, all at once, after the push
/// committed; an agent restart loses them, and the host, seeing them
/// missing from `Hello.held`, pushes them again. No `Debug`: it holds values.
#[derive(Default)]
pub struct SocketValues {
    values: std::sync::Mutex<ValueMap>,
}

/// Name to value and its SHA-256.
type ValueMap = std::collections::BTreeMap<String, (Zeroizing<Vec<u8>>, [u8; 32])>;

impl SocketValues {
    fn lock(&self) -> std::sync::MutexGuard<'_, ValueMap> {
        // A panic while holding it cannot leave a half-written map: every
        // change is one insert or remove.
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The digest of the value held for `name`.
    pub fn digest(&self, name: &str) -> Option<[u8; 32]> {
        self.lock().get(name).map(|(_, d)| *d)
    }

    /// A copy of the value held for `name`.
    pub fn get(&self, name: &str) -> Option<Zeroizing<Vec<u8>>> {
        self.lock().get(name).map(|(v, _)| v.clone())
    }

    /// Names and digests of everything held.
    pub fn held(&self) -> Vec<(String, [u8; 32])> {
        self.lock()
            .iter()
            .map(|(n, (_, d))| (n.clone(), *d))
            .collect()
    }

    /// Sets and removes in one step, so a reader sees all of a push or
    /// none of it.
    pub fn swap(&self, set: Vec<(String, Zeroizing<Vec<u8>>)>, remove: &[String]) {
        let mut map = self.lock();
        for (name, value) in set {
            let digest = vmcred_proto::rules::digest(&value);
            map.insert(name, (value, digest));
        }
        for name in remove {
            map.remove(name);
        }
    }
}

/// A bound credential socket, not yet serving.
pub struct CredsSocket {
    listener: UnixListener,
    path: PathBuf,
    deadline: Duration,
    stopper: Stopper,
}

/// Stops a [`CredsSocket`]'s service without leaving systemd an empty or
/// cut-off credential: see the module docs.
#[derive(Clone)]
pub struct Stopper {
    stopping: Arc<watch::Sender<bool>>,
    slots: Arc<Semaphore>,
    lingering: Arc<Lingering>,
}

/// Refusals written on after their grace (see the module docs).
#[derive(Default)]
struct Lingering {
    tasks: std::sync::Mutex<Tasks>,
    ended: tokio::sync::Notify,
}

/// The last id given, and the lingering tasks by id, oldest first.
type Tasks = (u64, Vec<(u64, tokio::task::AbortHandle)>);

impl Lingering {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.lock().1.is_empty()
    }

    /// Writes the rest of a refusal in a task of its own, for at most
    /// [`LINGER_LIMIT`]; with [`MAX_LINGERING`] already lingering, the
    /// oldest is closed first.
    fn add(self: &Arc<Self>, mut stream: UnixStream, mut left: usize) {
        let mut g = self.lock();
        if g.1.len() >= MAX_LINGERING {
            // Not empty: MAX_LINGERING is above zero.
            let (_, oldest) = g.1.remove(0);
            oldest.abort();
            tracing::warn!(
                lingering = MAX_LINGERING,
                "credential socket: too many refusals not being read; closing the oldest, its peer may read a short answer"
            );
        }
        g.0 += 1;
        let id = g.0;
        let me = self.clone();
        let task = tokio::spawn(async move {
            // Removes this entry however the task ends (aborted too).
            let _entry = Entry(me, id);
            if tokio::time::timeout(LINGER_LIMIT, send_zeros(&mut stream, &mut left))
                .await
                .is_err()
            {
                tracing::warn!(
                    limit = %humantime::format_duration(LINGER_LIMIT),
                    "credential socket: a refusal was not read within its limit; closing, its peer may read a short answer"
                );
            }
        });
        g.1.push((id, task.abort_handle()));
    }
}

/// A lingering refusal's place in [`Lingering`], given up on drop.
struct Entry(Arc<Lingering>, u64);

impl Drop for Entry {
    fn drop(&mut self) {
        self.0.lock().1.retain(|(id, _)| *id != self.1);
        self.0.ended.notify_waiters();
    }
}

impl Stopper {
    fn new() -> Stopper {
        Stopper {
            stopping: Arc::new(watch::channel(false).0),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            lingering: Arc::new(Lingering::default()),
        }
    }

    /// Stops accepting (pending connections then fail with ECONNRESET),
    /// refuses every request still being decided, pads any value being
    /// written, and waits until every connection has ended: within
    /// [`REFUSAL_GRACE`] for those in their slots, all at once, then up to
    /// [`LINGER_AT_STOP`] for lingering refusals to be read.
    pub async fn stop(&self) {
        self.stopping.send_replace(true);
        // Every connection holds one slot until it has ended or lingers.
        let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            REFUSAL_GRACE + Duration::from_millis(500),
            self.slots.acquire_many(all),
        )
        .await;
        let drained = async {
            loop {
                let ended = self.lingering.ended.notified();
                if self.lingering.is_empty() {
                    return;
                }
                ended.await;
            }
        };
        if tokio::time::timeout(LINGER_AT_STOP, drained).await.is_err() {
            tracing::warn!(
                wait = %humantime::format_duration(LINGER_AT_STOP),
                "credential socket: stopping with refusals a peer has not read; it may read a short answer"
            );
        }
    }

    fn watch(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }
}

/// Resolves once the agent is stopping (never, if the sender is gone).
async fn stopping(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl CredsSocket {
    /// Binds `path` (0600). Its directory must be owned by this user and
    /// writable by no one else, so no other user can replace the socket;
    /// a stale socket from an earlier run is replaced, anything else at
    /// `path` is left alone and is an error. Must run inside a Tokio
    /// runtime.
    pub fn bind(path: &Path) -> Result<CredsSocket, CredsSocketError> {
        let err = |why: String| CredsSocketError::Bind {
            path: path.display().to_string(),
            why,
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::metadata(parent)
            .map_err(|e| err(format!("cannot inspect {}: {e}", parent.display())))?;
        let me = nix::unistd::geteuid().as_raw();
        if !dir.is_dir() || dir.uid() != me || dir.mode() & 0o022 != 0 {
            return Err(err(format!(
                "{} must be a directory owned by uid {me} and writable by no one else (it is mode {:o}, uid {})",
                parent.display(),
                dir.mode() & 0o7777,
                dir.uid()
            )));
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?,
            Ok(_) => {
                return Err(err(
                    "exists and is not a socket; remove it or choose another state directory"
                        .into(),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("cannot inspect: {e}"))),
        }
        let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("cannot make it 0600: {e}")))?;
        Ok(CredsSocket {
            listener,
            path: path.to_path_buf(),
            deadline: CONNECTION_DEADLINE,
            stopper: Stopper::new(),
        })
    }

    /// Another per-connection deadline than [`CONNECTION_DEADLINE`] (tests).
    pub fn with_deadline(mut self, deadline: Duration) -> CredsSocket {
        self.deadline = deadline;
        self
    }

    /// The handle that stops this socket's service cleanly (see
    /// [`Stopper::stop`]); take it before [`CredsSocket::serve`].
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the task is dropped or the [`Stopper`]
    /// stops it: at most [`MAX_CONNECTIONS`] at once, each decided within
    /// the deadline ([`CONNECTION_DEADLINE`]) and its value written within
    /// it too.
    pub async fn serve(
        self,
        store: Arc<Store>,
        config: Arc<GuestConfig>,
        memory: Arc<SocketValues>,
    ) {
        let slots = self.stopper.slots.clone();
        let deadline = self.deadline;
        loop {
            let stop = stopping(self.stopper.watch());
            // Returning drops the listener: connections still in its
            // backlog then fail (ECONNRESET), which systemd reports as a
            // failed load, not an empty credential.
            let stream = tokio::select! {
                biased;
                () = stop => return,
                accepted = async {
                    let permit = slots.clone().acquire_owned().await;
                    (permit, self.listener.accept().await)
                } => accepted,
            };
            let (permit, stream) = match stream {
                (Ok(p), Ok((s, _))) => (p, s),
                (Err(_), _) => return,
                (_, Err(e)) => {
                    // Out of file descriptors and the like: pause rather
                    // than spin.
                    tracing::warn!(error = %e, "credential socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (store, config, memory) = (store.clone(), config.clone(), memory.clone());
            let stopper = self.stopper.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // A backstop only: `handle` bounds each of its steps.
                let served = tokio::time::timeout(
                    deadline + REFUSAL_GRACE + REFUSAL_GRACE,
                    handle(stream, &store, &config, &memory, deadline, &stopper),
                )
                .await;
                if served.is_err() {
                    tracing::warn!(
                        "credential socket: connection dropped at its backstop deadline"
                    );
                }
            });
        }
    }
}

/// Serves one connection and logs how it ended (names only, never a value).
/// The answer must be decided, and a value written, within `deadline` of
/// the call, and before the agent stops (`stop`); past either, root gets
/// the refusal, after whatever part of a value was already sent.
pub async fn handle(
    mut stream: UnixStream,
    store: &Arc<Store>,
    config: &GuestConfig,
    memory: &SocketValues,
    deadline: Duration,
    stopper: &Stopper,
) -> Outcome {
    let stop = stopper.watch();
    // For the log only: which process asked (systemd-executor, usually).
    let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
    let until = tokio::time::Instant::now() + deadline;
    let cut = |stop: watch::Receiver<bool>| async move {
        tokio::select! {
            () = tokio::time::sleep_until(until) => Refusal::Deadline(deadline),
            () = stopping(stop) => Refusal::Stopping,
        }
    };
    let outcome = tokio::select! {
        biased;
        d = decide(&stream, store, config, memory) => d,
        why = cut(stop.clone()) => Err((why, root)),
    };
    match outcome {
        Ok((request, value)) => {
            let sent = tokio::select! {
                biased;
                r = async {
                    stream.write_all(&value).await?;
                    stream.shutdown().await
                } => Ok(r),
                why = cut(stop) => Err(why),
            };
            drop(value);
            match sent {
                Ok(Ok(())) => {
                    tracing::info!(
                        unit = %request.unit,
                        credential = %request.credential,
                        ?peer_pid,
                        "credential socket: value handed to the unit"
                    );
                    Outcome::Served(request)
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        unit = %request.unit,
                        credential = %request.credential,
                        ?peer_pid,
                        error = %e,
                        "credential socket: the peer went away before taking the value"
                    );
                    Outcome::Served(request)
                }
                Err(why) => {
                    tracing::warn!(
                        unit = %request.unit,
                        credential = %request.credential,
                        ?peer_pid,
                        reason = %why,
                        "credential socket: value cut off; refusing the rest so the unit's load fails"
                    );
                    refuse(stream, &stopper.lingering).await;
                    Outcome::CutOff(request)
                }
            }
        }
        Err((refusal, root)) => {
            tracing::warn!(reason = %refusal, ?peer_pid, "credential socket: refused");
            if root {
                refuse(stream, &stopper.lingering).await;
            }
            Outcome::Refused(refusal)
        }
    }
}

/// Sends the over-long refusal (see the module docs): within
/// [`REFUSAL_GRACE`] here, or else lingering in a task of its own, which
/// gives the connection slot back.
async fn refuse(mut stream: UnixStream, lingering: &Arc<Lingering>) {
    let mut left = REFUSAL_BYTES;
    if tokio::time::timeout(REFUSAL_GRACE, send_zeros(&mut stream, &mut left))
        .await
        .is_ok()
    {
        return;
    }
    lingering.add(stream, left);
}

/// Writes `left` zero bytes, counting down as they go (so that a caller
/// that stopped waiting can go on where this left off), then shuts the
/// socket down; ends early when the peer hangs up.
async fn send_zeros(stream: &mut UnixStream, left: &mut usize) {
    let chunk = [0u8; 64 * 1024];
    while *left > 0 {
        match stream.write(&chunk[..(*left).min(chunk.len())]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => *left -= n,
        }
    }
    let _ = stream.shutdown().await;
}

/// Who asks for what, and whether they get it. The bool in the error says
/// whether the peer is root (and so gets the over-long refusal).
async fn decide(
    stream: &UnixStream,
    store: &Arc<Store>,
    config: &GuestConfig,
    memory: &SocketValues,
) -> Result<(Request, Zeroizing<Vec<u8>>), (Refusal, bool)> {
    let cred = stream
        .peer_cred()
        .map_err(|e| (Refusal::PeerCred(e.to_string()), false))?;
    if cred.uid() != 0 {
        return Err((Refusal::NotRoot { uid: cred.uid() }, false));
    }
    let refused = |r: Refusal| (r, true);
    let addr = stream
        .peer_addr()
        .map_err(|e| refused(Refusal::PeerCred(e.to_string())))?;
    let name = addr
        .as_abstract_name()
        .ok_or(refused(Refusal::Address(AddressError::NotAbstract)))?;
    let request = parse_address(name).map_err(|e| refused(Refusal::Address(e)))?;
    if !config.socket_allows(&request.credential, &request.unit) {
        return Err(refused(Refusal::NotMapped {
            unit: display_name(&request.unit),
            credential: display_name(&request.credential),
        }));
    }
    if config.deliver(&request.credential) == Deliver::Socket {
        return match memory.get(&request.credential) {
            Some(v) => Ok((request, v)),
            None => Err(refused(Refusal::NotHeld {
                credential: request.credential.clone(),
            })),
        };
    }
    let (reader, name) = (store.clone(), request.credential.clone());
    let value = tokio::task::spawn_blocking(move || reader.read_committed(&name))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|why| {
            refused(Refusal::Read {
                credential: request.credential.clone(),
                why,
            })
        })?;
    match value {
        Some(v) => Ok((request, v)),
        None => Err(refused(Refusal::NotHeld {
            credential: request.credential.clone(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_systemds_address() {
        let r = parse_address(b"8c2f1e0a9b7d6c5e/unit/api.service/API_KEY").unwrap();
        assert_eq!(r.unit, "api.service");
        assert_eq!(r.credential, "API_KEY");
        let r = parse_address(b"0/unit/getty@tty1.service/a.b").unwrap();
        assert_eq!(r.unit, "getty@tty1.service");
    }

    #[test]
    fn refuses_malformed_addresses() {
        for (addr, want) in [
            (&b""[..], AddressError::Shape),
            (b"abc/unit/a.service", AddressError::Shape),
            (b"abc/unit/a.service/A/B", AddressError::Shape),
            (b"abc/user/a.service/A", AddressError::Shape),
            (b"/unit/a.service/A", AddressError::Shape),
            (b"xyz/unit/a.service/A", AddressError::Shape),
            (b"0123456789abcdef0/unit/a.service/A", AddressError::Shape),
            (b"ab/unit/a.service/\xff", AddressError::Shape),
        ] {
            assert_eq!(parse_address(addr), Err(want), "{addr:?}");
        }
        assert!(matches!(
            parse_address(b"ab/unit//A"),
            Err(AddressError::Unit(_))
        ));
        assert!(matches!(
            parse_address(b"ab/unit/-x/A"),
            Err(AddressError::Unit(_))
        ));
        assert!(matches!(
            parse_address(b"ab/unit/a.service/"),
            Err(AddressError::Credential(_))
        ));
        assert!(matches!(
            parse_address(b"ab/unit/a.service/.."),
            Err(AddressError::Credential(_))
        ));
    }
}
