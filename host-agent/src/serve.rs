//! `vmcred-host serve`: owns the VM tasks and the two local sockets, and
//! maps signals to lifecycle (SIGTERM/SIGINT stop, SIGHUP reloads).
//!
//! Nothing here holds a lock across I/O: the VM table is an immutable
//! snapshot behind a short-lived mutex, replaced whole on reload, and every
//! local connection runs in its own task with deadlines on its reads and
//! writes. Connections are bounded per socket (the accept loop waits for a
//! free slot, so the kernel's backlog is the queue), and control requests
//! wait a bounded time for a work slot, then get an explicit `busy`.
//! Read-only (`control_group`) clients have their own, smaller pools of
//! connections and work slots, so they can never keep root waiting, with a
//! share per uid, so that one of them cannot keep the others out. Who may
//! do what is decided from the peer's credentials as the kernel recorded
//! them, never by asking the user or group database (`access`).

mod access;
mod limits;
mod lock;
mod read_only;
mod socket;
mod vsock_device;
mod watchdog;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::AsyncWrite;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use vmcred_proto::rules;

pub use limits::raise_nofile_limit;
pub use lock::{LockError, StateLock};

use crate::config::{Config, LaunchKeyMode};
use crate::control::{self, Reply, Request, RotateReport};
use crate::generations::Generations;
use crate::keyring::{self, KeyRing, KeyStep};
use crate::launch_key::LaunchKeys;
use crate::source;
use crate::vm::{self, Command, Timing, VmHandle};
use access::Access;
use limits::{LogLimiter, Repeated};
use socket::{Bound, Group};

/// Connections open at once per socket; the next ones wait in the kernel's
/// listen backlog until one finishes.
const MAX_CONNECTIONS: usize = 256;
/// Full-access (root) control requests worked on at once; others wait up
/// to `QUEUE_WAIT`. Read-only requests never take these slots (theirs are
/// in `read_only`).
const MAX_ACTIVE: usize = 32;
/// How long a control request waits for a work slot before `busy`.
const QUEUE_WAIT: Duration = Duration::from_secs(30);
/// How long a control client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a launch client has to send its line: the launch wrapper sends
/// it at once, so anything slower is a stuck or hostile client.
const LAUNCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Refused clients (either socket) whose request line we wait for, at once.
const MAX_REFUSING: usize = 16;
/// How long a client may keep the daemon waiting on writes, in all, over
/// its whole reply (not per line: a client that reads a little now and
/// then would otherwise hold its slots for as long as it liked). Time the
/// daemon spends waiting for guests does not count.
const REPLY_WRITE_BUDGET: Duration = Duration::from_secs(10);
/// Longest client-supplied text (such as a parse error, which quotes the
/// request) put into a log line or an error reply.
const SHOWN_TEXT: usize = 200;
/// At most one wake-up per VM per this period; further `launched` lines
/// are acknowledged and dropped, so a flood cannot become a storm of
/// dials and Hellos at the guest.
const WAKE_EVERY: Duration = Duration::from_secs(1);
/// Longest rotate timeout a client may ask for.
const MAX_ROTATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a reload waits to hand a busy VM task its new config.
const RECONFIGURE_WAIT: Duration = Duration::from_secs(60);
/// One line per kind of repeated problem per this period.
const LOG_EVERY: Duration = Duration::from_secs(10);

type Vms = Arc<BTreeMap<String, VmHandle>>;

/// What a reload replaces, swapped whole.
struct Shared {
    vms: Vms,
    launch_uids: Arc<Vec<u32>>,
}

struct Daemon {
    keys: Arc<KeyRing>,
    /// Per-VM launch keys (`launch_key = "required"`), made or read by
    /// `ensure_launch_keys` (at start and on each reload), checked by the
    /// VM tasks.
    launch_keys: LaunchKeys,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
    shared: Mutex<Shared>,
    /// Last wake-up sent per VM (only configured VMs are ever keys).
    wakes: Mutex<HashMap<String, Instant>>,
    /// Work slots of full-access clients.
    work: Arc<Semaphore>,
    /// Connections and work slots of read-only clients, shared per uid.
    read_only: read_only::Pools,
    /// Refused clients waited on at once (see `refuse`).
    refusing: Arc<Semaphore>,
    logs: LogLimiter,
    me: u32,
    /// `control_group` as at start (the socket's group cannot change later).
    control_gid: Option<u32>,
    /// Where VM tasks run (see `serve_with`).
    vm_runtime: tokio::runtime::Handle,
}

/// A control request's work slot, held until its reply is written.
enum WorkSlot {
    Root { _slot: OwnedSemaphorePermit },
    ReadOnly { _slot: read_only::Work },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketKind {
    Control,
    Launch,
}

fn timing(cfg: &Config) -> Timing {
    Timing {
        poll: cfg.poll_interval,
        backoff_max: cfg.dial_backoff_max,
        rpc_timeout: cfg.rpc_timeout,
        keepalive: cfg.keepalive_interval,
    }
}

/// Runs the daemon with the VM tasks on the current runtime.
pub async fn serve(config_path: &Path) -> Result<()> {
    serve_with(config_path, tokio::runtime::Handle::current()).await
}

/// Runs the daemon with the VM tasks on `vm_runtime`. Given a runtime of
/// their own, a VM task stuck in a blocking call (which can stall every
/// worker's I/O driver of its runtime) cannot stop the sockets or SIGTERM:
/// those run on the caller's runtime, and the caller shuts `vm_runtime`
/// down with a deadline.
pub async fn serve_with(config_path: &Path, vm_runtime: tokio::runtime::Handle) -> Result<()> {
    match limits::raise_nofile_limit() {
        Ok(n) => debug!(nofile = n, "descriptor limit"),
        Err(e) => warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let mut cfg = load_config(config_path).await?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let state_lock = StateLock::acquire(&cfg.state_dir)?;
    let keys = Arc::new(KeyRing::load(&cfg.state_dir)?);
    info!(pin = %keys.current().pin, phase = ?keys.phase(), state_dir = %cfg.state_dir.display(), "host key ready");
    let daemon = Arc::new(Daemon {
        keys,
        launch_keys: LaunchKeys::default(),
        generations: Generations::open(cfg.state_dir.join("generations"))
            .context("cannot open the generations directory")?,
        credentials_dir: source::credentials_directory(),
        shared: Mutex::new(Shared {
            vms: Arc::new(BTreeMap::new()),
            launch_uids: Arc::new(cfg.launch_uids()),
        }),
        wakes: Mutex::new(HashMap::new()),
        work: Arc::new(Semaphore::new(MAX_ACTIVE)),
        read_only: read_only::Pools::default(),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        logs: LogLimiter::new(LOG_EVERY),
        me: nix::unistd::geteuid().as_raw(),
        control_gid: cfg.control_group.as_ref().map(|g| g.gid),
        vm_runtime,
    });

    daemon.ensure_launch_keys(&cfg);
    // Before the sockets exist: a client can connect (and a supervisor
    // signal) as soon as one is in place, and a SIGTERM then must still
    // remove them rather than kill the process with the default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // The launch socket first, so that a control socket that answers
    // means both are in place. Anyone may connect; only root and
    // `launch_users` are answered (peer credentials), which also works
    // when the hypervisor users have no group in common.
    let mut launch = Bound::new(&cfg.launch_socket, 0o666, None)?;
    // With a control_group its members may read `status`: 0660 and that
    // group; the peer check below still decides what each may do.
    let for_group = |path: &Path| match &cfg.control_group {
        None => Bound::new(path, 0o600, None),
        Some(g) => Bound::new(
            path,
            0o660,
            Some(Group {
                gid: g.gid,
                name: &g.name,
            }),
        ),
    };
    let mut control = for_group(&cfg.control_socket)?;
    // The metrics socket: the same readers as `status`.
    let mut metrics_socket = match &cfg.metrics_socket {
        Some(p) => Some(for_group(p)?),
        None => None,
    };
    daemon.apply_config(&cfg);

    let mut loops = JoinSet::new();
    for (bound, kind) in [
        (&mut control, SocketKind::Control),
        (&mut launch, SocketKind::Launch),
    ] {
        if let Some(l) = bound.listener.take() {
            loops.spawn(accept_loop(daemon.clone(), l, kind));
        }
    }
    loops.spawn(watchdog::run(daemon.vm_runtime.clone()));
    let statuses: crate::metrics::export::Statuses = {
        let d = daemon.clone();
        Arc::new(move || {
            let (vms, _) = d.snapshot();
            vms.values().map(|h| d.vm_status(h)).collect()
        })
    };
    if let Some(l) = metrics_socket.as_mut().and_then(|b| b.listener.take()) {
        loops.spawn(crate::metrics::export::serve_socket(l, statuses.clone()));
    }
    if let Some(path) = &cfg.metrics_textfile {
        loops.spawn(crate::metrics::export::write_textfile(
            path.clone(),
            cfg.metrics_interval,
            statuses,
        ));
    }
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status(&cfg)),
    ]);
    info!(vms = cfg.vms.len(), control = %cfg.control_socket.display(), "serving");

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Type=notify-reload needs the reload's start time with it.
                match sd_notify::NotifyState::monotonic_usec_now() {
                    Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
                    Err(e) => warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
                }
                match load_config(config_path).await {
                    Ok(new) => {
                        if new.control_socket != cfg.control_socket || new.launch_socket != cfg.launch_socket || new.state_dir != cfg.state_dir || new.control_group != cfg.control_group || new.metrics_socket != cfg.metrics_socket || new.metrics_textfile != cfg.metrics_textfile || new.metrics_interval != cfg.metrics_interval {
                            warn!("socket paths, control_group, metrics_* and state_dir changes take effect only after a restart");
                        }
                        daemon.apply_config(&new);
                        info!(vms = new.vms.len(), "config reloaded");
                        cfg = new;
                        notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status(&cfg))]);
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "config reload failed; keeping the previous config");
                        notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&format!("reload failed: {e:#}"))]);
                    }
                }
            }
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    info!("stopping");
    loops.abort_all();
    // Dropping the handles stops every VM task at its next await; one stuck
    // in a blocking call is left to the runtime's shutdown deadline.
    daemon.replace_vms(Arc::new(BTreeMap::new()), None);
    control.remove_if_ours();
    launch.remove_if_ours();
    if let Some(m) = &metrics_socket {
        m.remove_if_ours();
    }
    drop(state_lock);
    Ok(())
}

/// Reads the config off the async workers (it is a file read).
async fn load_config(path: &Path) -> Result<Config> {
    let path = path.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .context("config loader panicked")??)
}

fn status(cfg: &Config) -> String {
    format!("serving {} VM(s)", cfg.vms.len())
}

fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Accepts connections while a connection slot is free, and never spins:
/// out of descriptors, it sleeps before trying again; repeated errors are
/// logged once per period with a count.
async fn accept_loop(daemon: Arc<Daemon>, listener: UnixListener, kind: SocketKind) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let what = match kind {
        SocketKind::Control => Repeated::AcceptControl,
        SocketKind::Launch => Repeated::AcceptLaunch,
    };
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = loop {
            match listener.accept().await {
                Ok((s, _)) => break s,
                Err(e) => {
                    if let Some(suppressed) = daemon.logs.allow(what) {
                        warn!(socket = ?kind, error = %e, suppressed, "accept failed; backing off");
                    }
                    tokio::time::sleep(if limits::is_exhaustion(&e) {
                        limits::EXHAUSTED_BACKOFF
                    } else {
                        limits::ERROR_BACKOFF
                    })
                    .await;
                }
            }
        };
        let d = daemon.clone();
        tokio::spawn(async move {
            match kind {
                SocketKind::Control => d.control_client(stream, permit).await,
                SocketKind::Launch => d.launch_client(stream, permit).await,
            }
        });
    }
}

/// A reply's writer: every write of the reply draws on one budget of
/// `REPLY_WRITE_BUDGET`, so a slow reader is cut off once it has kept the
/// daemon waiting that long in all, however it paces its reads.
struct Out<W> {
    w: W,
    left: Duration,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    fn new(w: W) -> Self {
        Out {
            w,
            left: REPLY_WRITE_BUDGET,
        }
    }

    /// Writes one reply line.
    async fn send(&mut self, reply: &Reply) -> Result<(), String> {
        self.send_lines(std::slice::from_ref(reply)).await
    }

    /// Writes reply lines in one write.
    async fn send_lines(&mut self, replies: &[Reply]) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let written =
            tokio::time::timeout(self.left, control::write_lines(&mut self.w, replies)).await;
        self.left = self.left.saturating_sub(started.elapsed());
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the client did not read its reply: it kept the daemon waiting \
                 {REPLY_WRITE_BUDGET:?} in all; connection closed"
            )),
        }
    }
}

impl Daemon {
    fn snapshot(&self) -> (Vms, Arc<Vec<u32>>) {
        match self.shared.lock() {
            Ok(s) => (s.vms.clone(), s.launch_uids.clone()),
            Err(p) => {
                let s = p.into_inner();
                (s.vms.clone(), s.launch_uids.clone())
            }
        }
    }

    /// Swaps the VM table (and the launch uids); the old table is dropped
    /// outside the lock.
    fn replace_vms(&self, vms: Vms, launch_uids: Option<Vec<u32>>) {
        let old = {
            let mut s = match self.shared.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if let Some(u) = launch_uids {
                s.launch_uids = Arc::new(u);
            }
            std::mem::replace(&mut s.vms, vms)
        };
        drop(old);
    }

    /// Makes or reads the launch keys of the VMs that require one, and
    /// makes them the required set. Before the VM tasks start or get a new
    /// config; at start also before the sockets exist, so that a `launch`
    /// that found the control socket finds its key file too (a VM's unit
    /// waits for readiness, which comes later still).
    fn ensure_launch_keys(&self, cfg: &Config) {
        let required = cfg
            .vms
            .values()
            .filter(|v| v.launch_key == LaunchKeyMode::Required)
            .map(|v| v.name.as_str());
        for (vm, e) in self.launch_keys.ensure(&cfg.state_dir, required) {
            error!(vm = %vm, error = %e, "no launch key for this VM: nothing is pushed to it until this is mended and the config reloaded");
        }
    }

    /// Starts, stops and reconfigures VM tasks to match `cfg`. Never waits
    /// on a VM task: a busy one gets its new config from a helper task.
    fn apply_config(&self, cfg: &Config) {
        vsock_device::warn_if_open(cfg);
        crate::openbao::store().configure(cfg, self.credentials_dir.clone());
        self.ensure_launch_keys(cfg);
        let t = timing(cfg);
        let (old, _) = self.snapshot();
        let mut new = BTreeMap::new();
        let mut reconfigure = Vec::new();
        for (name, vm) in &cfg.vms {
            match old.get(name) {
                Some(h) if h.vm.target == vm.target => {
                    let mut h = h.clone();
                    h.vm = vm.clone();
                    // Every reload re-reads every source, changed entry or
                    // not: SIGHUP is also how a secret manager says "files
                    // replaced".
                    reconfigure.push((h.tx.clone(), vm.clone()));
                    new.insert(name.clone(), h);
                }
                _ => {
                    let _on = self.vm_runtime.enter();
                    let h = vm::spawn(
                        vm.clone(),
                        t,
                        self.keys.clone(),
                        self.launch_keys.clone(),
                        self.generations.clone(),
                        self.credentials_dir.clone(),
                    );
                    new.insert(name.clone(), h);
                }
            }
        }
        self.replace_vms(Arc::new(new), Some(cfg.launch_uids()));
        crate::metrics::global().retain(|name| cfg.vms.contains_key(name));
        drop(old);
        if let Ok(mut w) = self.wakes.lock() {
            w.retain(|name, _| cfg.vms.contains_key(name));
        }
        for (tx, vm) in reconfigure {
            match tx.try_send(Command::Reconfigure(vm, Box::new(t))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(RECONFIGURE_WAIT, tx.send(cmd)).await;
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// `slot` is the connection's slot; a refused peer gives it back at
    /// once, so strangers cannot crowd out the hypervisor's users.
    async fn launch_client(&self, mut s: UnixStream, slot: OwnedSemaphorePermit) {
        let (_, uids) = self.snapshot();
        let uid = match s.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                debug!(error = %e, "cannot read a launch client's credentials");
                return;
            }
        };
        if !uids.contains(&uid) {
            drop(slot);
            if let Some(suppressed) = self.logs.allow(Repeated::RefusedLaunchPeer) {
                warn!(
                    uid,
                    suppressed, "refused a launch notification from a user not in launch_users"
                );
            }
            self.refuse(
                s,
                Reply::Error(format!(
                    "uid {uid} may not notify launches; add its user to launch_users in the host config"
                )),
            )
            .await;
            return;
        }
        let _slot = slot;
        let reply = match control::read_line(&mut s, LAUNCH_REQUEST_TIMEOUT).await {
            Ok(Request::Launched { vm }) => self.launched(&vm),
            Ok(_) => Reply::Error("the launch socket only takes launched".into()),
            Err(e) => {
                let e = control::shorten(&e.to_string(), SHOWN_TEXT);
                if let Some(suppressed) = self.logs.allow(Repeated::BadRequest) {
                    warn!(uid, error = %e, suppressed, "bad request on the launch socket");
                }
                Reply::Error(format!("bad request: {e}"))
            }
        };
        let _ = Out::new(&mut s).send(&reply).await;
    }

    fn launched(&self, vm: &str) -> Reply {
        let (vms, _) = self.snapshot();
        let Some(h) = vms.get(vm) else {
            return Reply::Error(format!(
                "no VM named {:?} in the config",
                rules::display_name(vm)
            ));
        };
        let now = Instant::now();
        let fresh = match self.wakes.lock() {
            Ok(mut w) => match w.get(vm) {
                Some(last) if now.duration_since(*last) < WAKE_EVERY => false,
                _ => {
                    w.insert(vm.to_string(), now);
                    true
                }
            },
            Err(_) => true,
        };
        if fresh {
            // A full queue means a wake-up is already on its way.
            let _ = h.tx.try_send(Command::Wake);
            info!(vm, "VM launched; dialling now");
        } else {
            debug!(vm, "launch notification coalesced with the previous one");
        }
        Reply::Ok
    }

    /// Answers a refused peer with `why` (an error, or `busy`). Its
    /// connection slot is already given back; from a small pool of its own
    /// it may first finish writing its line, so that it reads the reason
    /// rather than a broken pipe. When that pool is full the reason is
    /// written at once.
    async fn refuse(&self, mut s: UnixStream, why: Reply) {
        if let Ok(_refusing) = self.refusing.clone().try_acquire_owned() {
            let _ =
                control::read_line::<_, serde_json::Value>(&mut s, LAUNCH_REQUEST_TIMEOUT).await;
        }
        let _ = Out::new(&mut s).send(&why).await;
    }

    /// What a control peer may do: everything as root or the agent's own
    /// uid; only `status` as a member of `control_group` (its primary group
    /// or one of its supplementary groups, as the kernel recorded them at
    /// connect). Never waits: no user or group database is asked.
    fn control_access(&self, s: &UnixStream, uid: u32, gid: u32) -> std::io::Result<Access> {
        access::decide(uid, gid, self.me, self.control_gid, || {
            access::peer_groups(s.as_fd())
        })
    }

    async fn control_client(&self, s: UnixStream, slot: OwnedSemaphorePermit) {
        let (uid, gid) = match s.peer_cred() {
            Ok(c) => (c.uid(), c.gid()),
            Err(e) => {
                debug!(error = %e, "cannot read a control client's credentials");
                return;
            }
        };
        let access = match self.control_access(&s, uid, gid) {
            Ok(Access::None) => Err(format!("uid {uid} may not use the control socket")),
            Ok(a) => Ok(a),
            Err(e) => Err(format!(
                "cannot read the supplementary groups of uid {uid} from its connection \
                 (SO_PEERGROUPS: {e}); nothing was done. A member of control_group by its \
                 primary group is admitted without them"
            )),
        };
        let access = match access {
            Ok(a) => a,
            Err(why) => {
                drop(slot);
                if let Some(suppressed) = self.logs.allow(Repeated::RefusedControlPeer) {
                    warn!(uid, suppressed, reason = %why, "refused a control client");
                }
                self.refuse(s, Reply::Error(why)).await;
                return;
            }
        };
        // Read-only clients hold at most a few of the connection slots, each
        // uid at most its share, and none of root's work slots: they cannot
        // keep root waiting, nor one of them the others.
        let read_only = if access == Access::ReadOnly {
            match self.read_only.connect(uid) {
                Ok(c) => Some(c),
                Err(busy) => {
                    drop(slot);
                    let why = busy.reason(uid, QUEUE_WAIT);
                    if let Some(suppressed) = self.logs.allow(Repeated::Busy) {
                        warn!(uid, suppressed, reason = %why, "read-only control client refused: busy");
                    }
                    self.refuse(s, Reply::Busy(why)).await;
                    return;
                }
            }
        } else {
            None
        };
        let _slot = slot;
        let (r, w) = s.into_split();
        let mut w = Out::new(w);
        let req: Request = match control::read_line(r, REQUEST_TIMEOUT).await {
            Ok(r) => r,
            Err(e) => {
                let e = control::shorten(&e.to_string(), SHOWN_TEXT);
                if let Some(suppressed) = self.logs.allow(Repeated::BadRequest) {
                    warn!(uid, error = %e, suppressed, "bad request on the control socket");
                }
                let _ = w.send(&Reply::Error(format!("bad request: {e}"))).await;
                return;
            }
        };
        let work = match &read_only {
            None => match tokio::time::timeout(QUEUE_WAIT, self.work.clone().acquire_owned()).await
            {
                Ok(Ok(p)) => Ok(WorkSlot::Root { _slot: p }),
                _ => Err(format!(
                    "all {MAX_ACTIVE} work slots for root requests stayed taken for \
                     {QUEUE_WAIT:?}; nothing was done, try again"
                )),
            },
            Some(c) => c
                .work(QUEUE_WAIT)
                .await
                .map(|w| WorkSlot::ReadOnly { _slot: w })
                .map_err(|busy| busy.reason(uid, QUEUE_WAIT)),
        };
        let _work = match work {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(suppressed) = self.logs.allow(Repeated::Busy) {
                    warn!(uid, suppressed, reason = %why, "control request refused: busy");
                }
                let _ = w.send(&Reply::Busy(why)).await;
                return;
            }
        };
        let result = match req {
            Request::Status { vms } => self.status(&mut w, &vms).await,
            _ if access != Access::Full => {
                w.send(&Reply::Error(format!(
                    "uid {uid} may only read status (control_group); rotate needs root"
                )))
                .await
            }
            Request::Launched { vm } => w.send(&self.launched(&vm)).await,
            Request::RotateKey {
                step,
                force,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms).min(MAX_ROTATE_TIMEOUT);
                self.rotate_key(&mut w, step, force, timeout).await
            }
            Request::Rotate {
                vms,
                all,
                credentials,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms).min(MAX_ROTATE_TIMEOUT);
                self.rotate(&mut w, vms, all, credentials, timeout).await
            }
        };
        if let Err(e) = result {
            if let Some(suppressed) = self.logs.allow(Repeated::WriteFailed) {
                warn!(error = %e, suppressed, "control client");
            }
        }
    }

    /// A VM's status, with its key trust judged against the keys now.
    fn vm_status(&self, h: &VmHandle) -> control::VmStatus {
        let mut item = match h.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        item.key_trust = keyring::trust_of(&self.keys, &item.guest_pins, item.key_refused);
        item
    }

    /// A `rotate-key` step: refuses out of order; `switch` refuses while a
    /// guest lacks the next pin unless forced. After a step that changed
    /// the keys every VM redials (handing over the next pin, or proving
    /// the switch to guests so they drop the old pin); one `status` line
    /// per VM follows once it has (or `timeout` passed).
    async fn rotate_key<W: AsyncWrite + Unpin>(
        &self,
        w: &mut Out<W>,
        step: KeyStep,
        force: bool,
        timeout: Duration,
    ) -> Result<(), String> {
        let (vms, _) = self.snapshot();
        if step == KeyStep::Switch && !force && self.keys.next_pin().is_some() {
            let lacking: Vec<&String> = vms
                .values()
                .filter(|h| self.vm_status(h).key_trust != control::KeyTrust::HasNext)
                .map(|h| &h.vm.name)
                .collect();
            if !lacking.is_empty() {
                return w
                    .send(&Reply::Error(format!(
                        "not switching: {} not acknowledged the next key's pin (see `vmcred-host \
                         status`). Wait for them to connect, or `switch --force`: they then \
                         fall back to the previous key until `retire`, after which they must be \
                         relaunched",
                        if lacking.len() == 1 {
                            format!("VM {} has", some_names(&lacking))
                        } else {
                            format!("VMs {} have", some_names(&lacking))
                        }
                    )))
                    .await;
            }
        }
        let keys = self.keys.clone();
        let outcome = match tokio::task::spawn_blocking(move || keys.step(step)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return w.send(&Reply::Error(e.to_string())).await,
            Err(e) => return w.send(&Reply::Error(format!("internal error: {e}"))).await,
        };
        let report = control::KeyReport {
            step,
            outcome,
            phase: self.keys.phase(),
            current_pin: self.keys.current().pin.to_string(),
            next_pin: self.keys.next_pin().map(|p| p.to_string()),
            previous_pin: self.keys.prev().map(|k| k.pin.to_string()),
        };
        w.send(&Reply::Key(report)).await?;
        if outcome == keyring::StepOutcome::Done || step == KeyStep::Prepare {
            let mut waits = JoinSet::new();
            for h in vms.values() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if h.tx.try_send(Command::Rekey(tx)).is_ok() {
                    waits.spawn(async move {
                        let _ = tokio::time::timeout(timeout, rx).await;
                    });
                }
            }
            while waits.join_next().await.is_some() {}
        }
        let mut count = 0u64;
        for h in vms.values() {
            w.send(&Reply::Status(control::bound_status(self.vm_status(h))))
                .await?;
            count += 1;
        }
        w.send(&Reply::Done { count }).await
    }

    /// One line per VM from the current table, then `done`.
    async fn status<W: AsyncWrite + Unpin>(
        &self,
        w: &mut Out<W>,
        only: &[String],
    ) -> Result<(), String> {
        let (vms, _) = self.snapshot();
        if let Some(e) = unknown_vms(&vms, only) {
            return w.send(&Reply::Unknown(e)).await;
        }
        let mut count = 0u64;
        // Each VM once, however often it was named: the reply is never
        // longer than the table.
        let mut seen = std::collections::BTreeSet::new();
        let selected: Vec<&VmHandle> = if only.is_empty() {
            vms.values().collect()
        } else {
            only.iter()
                .filter(|n| seen.insert(n.as_str()))
                .filter_map(|n| vms.get(n))
                .collect()
        };
        for h in selected {
            let item = self.vm_status(h);
            w.send(&Reply::Status(control::bound_status(item))).await?;
            count += 1;
        }
        w.send(&Reply::Done { count }).await
    }

    /// Rotates each named VM (or all) at once; streams each VM's report as
    /// it finishes, then `done`. Refuses up front, with nothing sent to any
    /// guest, if a VM or credential is not in the config.
    async fn rotate<W: AsyncWrite + Unpin>(
        &self,
        w: &mut Out<W>,
        only: Vec<String>,
        all: bool,
        credentials: Vec<String>,
        timeout: Duration,
    ) -> Result<(), String> {
        let (vms, _) = self.snapshot();
        let selected: Vec<VmHandle> = match (all, only.is_empty()) {
            (true, true) => vms.values().cloned().collect(),
            (false, false) => {
                if let Some(e) = unknown_vms(&vms, &only) {
                    return w.send(&Reply::Unknown(e)).await;
                }
                let mut seen = std::collections::BTreeSet::new();
                only.iter()
                    .filter(|n| seen.insert(n.as_str()))
                    .filter_map(|n| vms.get(n).cloned())
                    .collect()
            }
            (true, false) => {
                return w
                    .send(&Reply::Error("name VMs or ask for all, not both".into()))
                    .await
            }
            (false, true) => {
                return w
                    .send(&Reply::Error("name at least one VM, or ask for all".into()))
                    .await
            }
        };
        for h in &selected {
            let missing: Vec<&String> = credentials
                .iter()
                .filter(|c| !h.vm.credentials.contains_key(*c))
                .collect();
            if !missing.is_empty() {
                return w
                    .send(&Reply::Unknown(format!(
                        "VM {} has no credential named {}; nothing was rotated",
                        h.vm.name,
                        some_names(&missing)
                    )))
                    .await;
            }
        }
        let mut running = JoinSet::new();
        for h in selected {
            running.spawn(rotate_one(h, credentials.clone(), timeout));
        }
        let mut count = 0u64;
        while let Some(done) = running.join_next().await {
            let report = match done {
                Ok(r) => r,
                Err(e) => RotateReport {
                    error: Some(format!("internal error: {e}")),
                    ..Default::default()
                },
            };
            let line = Reply::Rotate(control::bound_rotate(report));
            count += 1;
            if running.is_empty() {
                // The last report and the end in one write (a single-VM
                // rotate's whole answer): the client wakes once.
                return w.send_lines(&[line, Reply::Done { count }]).await;
            }
            w.send(&line).await?;
        }
        w.send(&Reply::Done { count }).await
    }
}

fn unknown_vms(vms: &BTreeMap<String, VmHandle>, names: &[String]) -> Option<String> {
    let unknown: Vec<&String> = names.iter().filter(|n| !vms.contains_key(*n)).collect();
    (!unknown.is_empty()).then(|| format!("no VM named {} in the config", some_names(&unknown)))
}

/// Up to five names, quoted and escaped, then how many more: an error
/// about a request's names stays short however many it named.
fn some_names(names: &[&String]) -> String {
    const SHOWN: usize = 5;
    let mut text: Vec<String> = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{:?}", rules::display_name(n)))
        .collect();
    if names.len() > SHOWN {
        text.push(format!("and {} more", names.len() - SHOWN));
    }
    text.join(", ")
}

/// Asks one VM's task to rotate and waits for its report; every failure
/// becomes a report that says why.
async fn rotate_one(h: VmHandle, credentials: Vec<String>, timeout: Duration) -> RotateReport {
    let vm = h.vm.name.clone();
    let failed = |error: String| RotateReport {
        vm: vm.clone(),
        error: Some(error),
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, rx) = oneshot::channel();
    let cmd = Command::Rotate {
        credentials,
        reply: tx,
    };
    match tokio::time::timeout_at(deadline, h.tx.send(cmd)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return failed(format!("VM {vm} is shutting down")),
        Err(_) => {
            return failed(format!(
                "timed out after {timeout:?}: the VM's task is busy and did not take the request"
            ))
        }
    }
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(report)) => report,
        Ok(Err(_)) => failed(format!(
            "VM {vm} was removed from the config during the rotation"
        )),
        Err(_) => {
            let last = h.status.lock().ok().and_then(|s| {
                if s.connected {
                    None
                } else {
                    s.last_error.clone()
                }
            });
            failed(match last {
                Some(e) => format!("timed out after {timeout:?}: the guest is not connected ({e}); it will apply when it is back"),
                None => format!("timed out after {timeout:?} waiting for the guest's acknowledgement; it will apply when it can"),
            })
        }
    }
}
