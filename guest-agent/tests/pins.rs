//! A session's authority ends with its host key's pin: the real server
//! (Unix socket, real TLS) with a rollover's pin set, played by two host
//! keys. The pin is dropped the way a rollover drops it (`PinStore::seen`
//! of the newer key), without a new session, so that superseding cannot
//! be what closes the old one.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{applied, apply, connect, cred};
use vmcred_guest::config::GuestConfig;
use vmcred_guest::creds_socket::SocketValues;
use vmcred_guest::listener::GuestListener;
use vmcred_guest::notify::Readiness;
use vmcred_guest::pins::PinStore;
use vmcred_guest::server::{serve_pinned, ServerOptions};
use vmcred_guest::service::GuestService;
use vmcred_guest::store::{Limits, Store};
use vmcred_guest::units::UnitRunner;
use vmcred_proto::rpc::pb::HelloRequest;
use vmcred_proto::tls::Identity;

fn hello() -> HelloRequest {
    HelloRequest {
        host_version: "test".into(),
        vm: "test-vm".into(),
    }
}

struct Rolled {
    tmp: tempfile::TempDir,
    socket: std::path::PathBuf,
    old: Identity,
    new: Identity,
    pins: Arc<PinStore>,
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rolled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A systemctl that records its calls and, for units named `gate*`,
/// waits while the file `gate` exists.
fn gated_systemctl(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("systemctl");
    let (calls, gate) = (dir.join("calls"), dir.join("gate"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\ncase \"$2\" in gate*) while [ -e '{}' ]; do sleep 0.05; done;; esac\nexit 0\n",
            calls.display(),
            gate.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A guest whose pins are `[old, new]`: the old key's host announced the
/// new one, and no session has used the new one yet.
async fn rolled(config: &str) -> Rolled {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("credentials");
    let state = tmp.path().join("state");
    let socket = tmp.path().join("guest.sock");
    std::fs::create_dir(&creds).unwrap();
    let (old, new) = (
        Identity::generate("vmcred-host").unwrap(),
        Identity::generate("vmcred-host").unwrap(),
    );
    let store = Arc::new(Store::open(&creds, &state, Limits::default()).unwrap());
    let pins = Arc::new(PinStore::open(&state, old.pin().unwrap()).unwrap());
    pins.add_next(old.pin().unwrap(), new.pin().unwrap())
        .unwrap();
    let service = GuestService::with_socket_values(
        store.clone(),
        Arc::new(GuestConfig::parse(config).unwrap()),
        UnitRunner::new(gated_systemctl(tmp.path())),
        Arc::new(Readiness::new()),
        Arc::new(SocketValues::default()),
    )
    .with_pins(pins.clone());
    let me = nix::unistd::geteuid().as_raw();
    let listener = GuestListener::unix(&socket, vec![me]).unwrap();
    let served = pins.clone();
    let task = tokio::spawn(async move {
        let r = serve_pinned(listener, served, service, ServerOptions::default()).await;
        panic!("server stopped: {r:?}");
    });
    Rolled {
        tmp,
        socket,
        old,
        new,
        pins,
        store,
        task,
    }
}

#[tokio::test]
async fn a_session_whose_pin_is_dropped_gets_no_further_rpc() {
    let g = rolled("").await;
    let mut old = connect(&g.socket, &g.old).await.unwrap();
    old.hello(hello()).await.unwrap();
    applied(&mut old, 1, vec![cred("A", b"one")], &[]).await;

    // The rollover's switch: the guest saw the new key and dropped the old.
    g.pins.seen(g.new.pin().unwrap());
    assert_eq!(g.pins.pins(), vec![g.new.pin().unwrap()]);

    // The old session can do nothing more: refused at the door, or closed
    // by the guest first.
    assert!(old
        .apply(apply(2, vec![cred("A", b"two")], &[]))
        .await
        .is_err());
    assert!(old.hello(hello()).await.is_err());
    assert_eq!(g.store.state().generation, 1);
    // And a new connection with the old key is refused at the handshake
    // (TLS 1.3: the client learns it on its first read).
    if let Ok(mut again) = connect(&g.socket, &g.old).await {
        assert!(again.hello(hello()).await.is_err());
    }
    // The new key works.
    let mut new = connect(&g.socket, &g.new).await.unwrap();
    applied(&mut new, 3, vec![cred("A", b"three")], &[]).await;
    assert_eq!(g.store.state().generation, 3);
}

/// An Apply that passed every check at its start but waited for the store
/// behind another Apply is checked again when its turn comes.
#[tokio::test]
async fn a_queued_apply_is_refused_once_its_pin_is_dropped() {
    let g = rolled("[credentials.\"A\"]\nrestart_units = [\"gate.service\"]\n").await;
    let gate = g.tmp.path().join("gate");
    let calls = g.tmp.path().join("calls");
    std::fs::write(&gate, "").unwrap();
    let mut old = connect(&g.socket, &g.old).await.unwrap();
    // The first Apply holds the apply lock while its unit action waits at
    // the gate.
    let first = {
        let mut c = old.clone();
        tokio::spawn(async move { c.apply(apply(1, vec![cred("A", b"one")], &[])).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .contains("gate.service")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first Apply never reached its unit action"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The second is received and queued behind it (no event says when it
    // is queued; if it arrived later it is refused at the door instead,
    // which this test also accepts).
    let second =
        tokio::spawn(async move { old.apply(apply(2, vec![cred("A", b"two")], &[])).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.pins.seen(g.new.pin().unwrap());
    std::fs::remove_file(&gate).unwrap();

    // The first was authorised when it started and completes, though its
    // reply may be lost with the closed session; the second is refused
    // (its reply, too, may be the closed session).
    let _ = first.await.unwrap();
    assert!(second.await.unwrap().is_err());
    // Give a task that ran on regardless every chance to finish: the next
    // Apply waits for the same lock.
    let mut new = connect(&g.socket, &g.new).await.unwrap();
    let reply = new.hello(hello()).await.unwrap().into_inner();
    assert_eq!(reply.applied_generation, 1);
    assert_eq!(g.store.state().generation, 1);
    assert_eq!(
        std::fs::read(g.tmp.path().join("credentials/A")).unwrap(),
        b"one"
    );
}
