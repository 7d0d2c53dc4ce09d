//! A guest agent served in-process on a real Unix socket with real TLS,
//! and a host-side client built the way the host agent builds its own.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsConnector;
use tonic::transport::Channel;
use vmcred_guest::config::GuestConfig;
use vmcred_guest::creds_socket::SocketValues;
use vmcred_guest::listener::GuestListener;
use vmcred_guest::notify::Readiness;
use vmcred_guest::server::{serve, ServerOptions};
use vmcred_guest::service::GuestService;
use vmcred_guest::store::{Limits, Store};
use vmcred_guest::units::UnitRunner;
use vmcred_proto::rpc::pb::{ApplyReply, ApplyRequest, Credential};
use vmcred_proto::rpc::{client_over, GuestClient};
use vmcred_proto::tls::{host_client_config, server_name, Identity};
use vmcred_proto::transport::{dial, Target};

pub struct Guest {
    pub tmp: tempfile::TempDir,
    pub creds: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub calls: PathBuf,
    pub host: Identity,
    pub store: Arc<Store>,
    pub readiness: Arc<Readiness>,
    /// `deliver = "socket"` values the service keeps (credential socket).
    pub memory: Arc<SocketValues>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A recording systemctl: appends its arguments to `calls`, fails for
/// units whose name starts with "bad", and for "flaky" ones while the file
/// `calls.broken` exists; takes half a second for "slow".
pub fn recording_systemctl(dir: &Path, calls: &Path) -> PathBuf {
    let p = dir.join("systemctl");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\ncase \"$2\" in slow*) sleep 0.5;; esac\ncase \"$2\" in bad*) echo \"Failed to restart $2: Unit $2 not found.\" >&2; exit 5;; esac\ncase \"$2\" in flaky*) if [ -e '{}.broken' ]; then echo \"Job for $2 failed.\" >&2; exit 1; fi;; esac\nexit 0\n",
            calls.display(),
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

pub async fn start(config: &str, limits: Limits) -> Guest {
    start_with(config, limits, ServerOptions::default()).await
}

pub async fn start_with(config: &str, limits: Limits, opts: ServerOptions) -> Guest {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    let state = tmp.path().join("state");
    let socket = tmp.path().join("guest.sock");
    let calls = tmp.path().join("calls");
    std::fs::create_dir(&creds).unwrap();
    let host = Identity::generate("vmcred-host").unwrap();
    let store = Arc::new(Store::open(&creds, &state, limits).unwrap());
    let readiness = Arc::new(Readiness::new());
    let config = Arc::new(GuestConfig::parse(config).unwrap());
    let units = UnitRunner::new(recording_systemctl(tmp.path(), &calls));
    let memory = Arc::new(SocketValues::default());
    let service = GuestService::with_socket_values(
        store.clone(),
        config,
        units,
        readiness.clone(),
        memory.clone(),
    );
    let me = nix::unistd::geteuid().as_raw();
    let listener = GuestListener::unix(&socket, vec![me]).unwrap();
    let pin = host.pin().unwrap();
    let task = tokio::spawn(async move {
        let r = serve(listener, pin, service, opts).await;
        panic!("server stopped: {r:?}");
    });
    Guest {
        tmp,
        creds,
        state,
        socket,
        calls,
        host,
        store,
        readiness,
        memory,
        task,
    }
}

pub async fn connect(socket: &Path, id: &Identity) -> Result<GuestClient<Channel>, String> {
    let s = dial(
        &Target::Unix {
            path: socket.to_path_buf(),
        },
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| e.to_string())?;
    let connector = TlsConnector::from(host_client_config(id).map_err(|e| e.to_string())?);
    let tls = connector
        .connect(server_name(), s)
        .await
        .map_err(|e| e.to_string())?;
    client_over(tls).await.map_err(|e| e.to_string())
}

impl Guest {
    pub async fn client(&self) -> GuestClient<Channel> {
        connect(&self.socket, &self.host).await.unwrap()
    }

    pub fn read(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.creds.join(name)).ok()
    }

    pub fn calls(&self) -> String {
        std::fs::read_to_string(&self.calls).unwrap_or_default()
    }
}

pub fn cred(name: &str, value: &[u8]) -> Credential {
    Credential {
        name: name.to_string(),
        value: value.to_vec(),
        sha256: vmcred_proto::rules::digest(value).to_vec(),
    }
}

pub fn apply(generation: u64, upserts: Vec<Credential>, removals: &[&str]) -> ApplyRequest {
    ApplyRequest {
        generation,
        upserts,
        removals: removals.iter().map(|s| s.to_string()).collect(),
    }
}

/// An Apply the test needs to succeed: the guest's reply. A refusal
/// fails the test, naming the generation.
pub async fn applied(
    c: &mut GuestClient<Channel>,
    generation: u64,
    upserts: Vec<Credential>,
    removals: &[&str],
) -> ApplyReply {
    c.apply(apply(generation, upserts, removals))
        .await
        .unwrap_or_else(|e| panic!("apply of generation {generation} refused: {e}"))
        .into_inner()
}

const IN_NAMESPACE: &str = "VMCRED_TEST_IN_MOUNT_NAMESPACE";

/// Runs `body` in a private mount namespace, or explains why it cannot.
pub fn in_private_mount_namespace(test: &str, body: fn()) {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        body();
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED {test}: needs root to mount (running as uid {})",
            nix::unistd::geteuid()
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = match std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED {test}: cannot run unshare(1) from util-linux: {e}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unshare failed") {
        eprintln!("SKIPPED {test}: no mount namespaces here: {stderr}");
        return;
    }
    eprintln!("{test} ran in a private mount namespace:\n{stdout}\n{stderr}");
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a private mount namespace failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
