//! `vmcred-host serve`: owns the VM tasks and the two local sockets, and
//! maps signals to lifecycle (SIGTERM/SIGINT stop, SIGHUP reloads).

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, RwLock, Semaphore};
use tracing::{error, info, warn};
use vmcred_proto::tls;

use crate::config::Config;
use crate::control::{self, Reply, Request};
use crate::generations::Generations;
use crate::source;
use crate::vm::{self, Command, Timing, VmHandle};

/// Local clients served at once per socket; more wait in the backlog.
const MAX_CLIENTS: usize = 32;
/// How long a local client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Vms = Arc<RwLock<BTreeMap<String, VmHandle>>>;

struct Daemon {
    tls: Arc<rustls::ClientConfig>,
    generations: Generations,
    credentials_dir: Option<PathBuf>,
    vms: Vms,
}

fn timing(cfg: &Config) -> Timing {
    Timing {
        poll: cfg.poll_interval,
        backoff_max: cfg.dial_backoff_max,
        rpc_timeout: cfg.rpc_timeout,
    }
}

pub async fn serve(config_path: &Path) -> Result<()> {
    let mut cfg = Config::load(config_path)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let identity = tls::Identity::load_or_create(&cfg.state_dir)?;
    info!(pin = %identity.pin()?, state_dir = %cfg.state_dir.display(), "host key ready");
    let daemon = Arc::new(Daemon {
        tls: tls::host_client_config(&identity)?,
        generations: Generations::open(cfg.state_dir.join("generations"))
            .context("cannot open the generations directory")?,
        credentials_dir: source::credentials_directory(),
        vms: Arc::new(RwLock::new(BTreeMap::new())),
    });
    drop(identity);

    let control = bind(&cfg.control_socket, 0o600)?;
    let launch = bind(&cfg.launch_socket, 0o666)?;
    daemon.apply_config(&cfg).await;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let control_slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let launch_slots = Arc::new(Semaphore::new(MAX_CLIENTS));
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
                notify(&[sd_notify::NotifyState::Reloading]);
                match Config::load(config_path) {
                    Ok(new) => {
                        if new.control_socket != cfg.control_socket || new.launch_socket != cfg.launch_socket || new.state_dir != cfg.state_dir {
                            warn!("socket paths and state_dir changes take effect only after a restart");
                        }
                        daemon.apply_config(&new).await;
                        info!(vms = new.vms.len(), "config reloaded");
                        cfg = new;
                        notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status(&cfg))]);
                    }
                    Err(e) => {
                        error!(error = %e, "config reload failed; keeping the previous config");
                        notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&format!("reload failed: {e}"))]);
                    }
                }
            }
            conn = control.accept() => match conn {
                Ok((s, _)) => spawn_client(daemon.clone(), s, control_slots.clone(), true),
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
            conn = launch.accept() => match conn {
                Ok((s, _)) => spawn_client(daemon.clone(), s, launch_slots.clone(), false),
                Err(e) => warn!(error = %e, "launch socket accept failed"),
            },
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    info!("stopping");
    daemon.vms.write().await.clear();
    for p in [&cfg.control_socket, &cfg.launch_socket] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
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

/// Binds a Unix socket at `path` with `mode`, replacing a stale one.
fn bind(path: &Path, mode: u32) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", path.display())),
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

fn spawn_client(daemon: Arc<Daemon>, s: UnixStream, slots: Arc<Semaphore>, control: bool) {
    let Ok(permit) = slots.try_acquire_owned() else {
        warn!("too many local clients at once; dropping one");
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = daemon.client(s, control).await {
            warn!(error = %e, "local client");
        }
    });
}

impl Daemon {
    async fn apply_config(&self, cfg: &Config) {
        crate::openbao::store().configure(cfg, self.credentials_dir.clone());
        let t = timing(cfg);
        let mut vms = self.vms.write().await;
        vms.retain(|name, _| cfg.vms.contains_key(name));
        for (name, vm) in &cfg.vms {
            match vms.get(name) {
                Some(h) if h.vm.target == vm.target => {
                    // Every reload re-reads every source, changed entry or
                    // not: SIGHUP is also how a secret manager says "files
                    // replaced".
                    let _ =
                        h.tx.send(Command::Reconfigure(Box::new(vm.clone()), t))
                            .await;
                }
                _ => {
                    let h = vm::spawn(
                        vm.clone(),
                        t,
                        self.tls.clone(),
                        self.generations.clone(),
                        self.credentials_dir.clone(),
                    );
                    vms.insert(name.clone(), h);
                }
            }
        }
        // Handles whose config changed but not their target keep their
        // `vm` snapshot up to date for the next comparison.
        for (name, vm) in &cfg.vms {
            if let Some(h) = vms.get_mut(name) {
                h.vm = Arc::new(vm.clone());
            }
        }
    }

    async fn client(&self, mut s: UnixStream, control: bool) -> Result<(), String> {
        let cred = s.peer_cred().map_err(|e| e.to_string())?;
        let me = nix::unistd::geteuid().as_raw();
        let req: Request = match control::read_line(&mut s, REQUEST_TIMEOUT).await {
            Ok(r) => r,
            Err(e) => {
                let _ =
                    control::write_line(&mut s, &Reply::Error(format!("bad request: {e}"))).await;
                return Err(format!("bad request from uid {}: {e}", cred.uid()));
            }
        };
        let reply = match (control, req) {
            (_, Request::Launched { vm }) => self.launched(&vm).await,
            (false, _) => Reply::Error("the launch socket only takes launched".into()),
            (true, _) if cred.uid() != 0 && cred.uid() != me => {
                Reply::Error(format!("uid {} may not use the control socket", cred.uid()))
            }
            (true, Request::Status) => {
                let vms = self.vms.read().await;
                Reply::Status(
                    vms.values()
                        .filter_map(|h| h.status.lock().ok().map(|s| s.clone()))
                        .collect(),
                )
            }
            (
                true,
                Request::Rotate {
                    vm,
                    credentials,
                    timeout_ms,
                },
            ) => {
                self.rotate(&vm, credentials, Duration::from_millis(timeout_ms))
                    .await
            }
        };
        control::write_line(&mut s, &reply)
            .await
            .map_err(|e| e.to_string())
    }

    async fn launched(&self, vm: &str) -> Reply {
        match self.vms.read().await.get(vm) {
            Some(h) => {
                // A full queue means a wake-up is already on its way.
                let _ = h.tx.try_send(Command::Wake);
                info!(vm, "VM launched; dialling now");
                Reply::Ok
            }
            None => Reply::Error(format!(
                "no VM named {:?} in the config",
                vmcred_proto::rules::display_name(vm)
            )),
        }
    }

    async fn rotate(&self, vm: &str, credentials: Vec<String>, timeout: Duration) -> Reply {
        let Some(h) = self.vms.read().await.get(vm).cloned() else {
            return Reply::Error(format!(
                "no VM named {:?} in the config",
                vmcred_proto::rules::display_name(vm)
            ));
        };
        let (tx, rx) = oneshot::channel();
        if h.tx
            .send(Command::Rotate {
                credentials,
                reply: tx,
            })
            .await
            .is_err()
        {
            return Reply::Error(format!("VM {vm} is shutting down"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(report)) => Reply::Rotate(report),
            Ok(Err(_)) => Reply::Error(format!(
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
                Reply::Error(match last {
                    Some(e) => format!("timed out after {timeout:?}: the guest is not connected ({e}); it will apply when it is back"),
                    None => format!("timed out after {timeout:?} waiting for the guest's acknowledgement; it will apply when it can"),
                })
            }
        }
    }
}
