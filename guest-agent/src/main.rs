//! `vmcred-guest`: receives credentials from the host agent and writes them
//! into systemd's system credentials directory.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing_subscriber::filter::Targets;
use vmcred_guest::cli::Cli;
use vmcred_guest::config::GuestConfig;
use vmcred_guest::listener::GuestListener;
use vmcred_guest::notify::Readiness;
use vmcred_guest::pins::PinStore;
use vmcred_guest::server::{serve_pinned, ServerOptions};
use vmcred_guest::service::GuestService;
use vmcred_guest::store::{Limits, Store};
use vmcred_guest::units::UnitRunner;

const DEFAULT_INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// `Targets` ("info,vmcred_guest=debug") rather than `EnvFilter`: the
/// same directives minus span-field matching, without the regex engine
/// that `EnvFilter` links (see "Guest footprint" in ARCHITECTURE.md).
fn init_logging(level: Option<&str>) -> Result<()> {
    let filter: Targets = match level {
        Some(l) => l
            .parse()
            .with_context(|| format!("bad --log-level {l:?}"))?,
        None => std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO)),
    };
    vmcred_guest::logs::init(filter);
    Ok(())
}

/// One thread for all async work: the guest serves one host connection
/// at a time, so worker threads would only cost memory (a stack and a
/// malloc arena each). `Hello` and `Apply` do their store work on this
/// thread too (see `service.rs`); the blocking pool, whose threads exit
/// after `BLOCKING_THREAD_KEEP_ALIVE` idle, serves only what may wait on
/// a slow disk or a lock: credential-socket reads, a `Trust` that writes
/// the pins, and the shutdown's wait for a write in progress.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
}

/// Long enough that a burst of pushes reuses one blocking thread, short
/// enough that an idle guest is back to one thread soon after.
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        return check_config(cli.config.as_deref());
    }
    if let Err(e) = init_logging(cli.log_level.as_deref()) {
        eprintln!("vmcred-guest: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmcred-guest: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Printed rather than logged so that it shows whatever the log
            // filter; systemd puts stderr in the journal either way.
            eprintln!("vmcred-guest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the same loader `run` uses, so nothing it accepts is
/// refused at boot. Exit 4 matches vmcred-host's "config error".
fn check_config(path: Option<&std::path::Path>) -> std::process::ExitCode {
    let Some(path) = path else {
        eprintln!("vmcred-guest: --check-config needs --config FILE");
        return std::process::ExitCode::from(2);
    };
    match GuestConfig::load(path) {
        Ok(c) => {
            println!("{}: OK", path.display());
            if let Some(t) = c.initial_sync_timeout {
                println!("initial_sync_timeout {}", humantime::format_duration(t));
            }
            for (name, p) in &c.credentials {
                println!(
                    "credential {name}: mode {:04o} restart [{}] reload [{}]",
                    p.mode,
                    p.restart_units.join(" "),
                    p.reload_units.join(" ")
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmcred-guest: {e:#}");
            std::process::ExitCode::from(4)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = match &cli.config {
        Some(p) => GuestConfig::load(p)?,
        None => GuestConfig::default(),
    };
    let initial_sync_timeout = cli
        .initial_sync_timeout
        .map(Duration::from)
        .or(config.initial_sync_timeout)
        .unwrap_or(DEFAULT_INITIAL_SYNC_TIMEOUT);

    let bootstrap = vmcred_guest::bootstrap::read(&cli.bootstrap)?;
    let limits = Limits {
        max_total_bytes: cli.max_total_bytes,
        max_files: cli.max_files,
    };
    if limits.max_files < 2 {
        bail!("--max-files must be at least 2 (the directory and one credential)");
    }
    let store = Arc::new(Store::open(&cli.credentials_dir, &cli.state_dir, limits)?);
    // After the store, which creates the state directory.
    let pins = Arc::new(PinStore::open(
        config.pin_state_dir.as_deref().unwrap_or(&cli.state_dir),
        bootstrap.pin,
    )?);
    // Bound here, before anything else can report readiness; "listening"
    // is logged only once the bind succeeded.
    let listener = match &cli.listen_unix {
        Some(path) => {
            let uids = if cli.allow_uid.is_empty() {
                vec![0]
            } else {
                cli.allow_uid.clone()
            };
            let l = GuestListener::unix(path, uids.clone())?;
            tracing::info!(socket = %path.display(), ?uids, "listening on a Unix socket");
            l
        }
        None => {
            vmcred_guest::bootstrap::check_vsock_port(&cli.bootstrap, &bootstrap)?;
            let l = GuestListener::vsock(bootstrap.port, bootstrap.host)?;
            tracing::info!(
                port = bootstrap.port,
                host = bootstrap.host.as_str(),
                "listening on vsock"
            );
            l
        }
    };

    // Also bound before anything can report readiness: units ordered
    // after this one may read it as soon as they start.
    let config = Arc::new(config);
    let memory = Arc::new(vmcred_guest::creds_socket::SocketValues::default());
    let mut creds_socket_stopper = None;
    if config.serves_socket() {
        let path = cli.state_dir.join(vmcred_guest::creds_socket::SOCKET_NAME);
        let socket = vmcred_guest::creds_socket::CredsSocket::bind(&path)?;
        tracing::info!(socket = %path.display(), "serving the credential socket");
        creds_socket_stopper = Some(socket.stopper());
        tokio::spawn(socket.serve(store.clone(), config.clone(), memory.clone()));
    }

    let state = store.state();
    tracing::info!(
        credentials_dir = %cli.credentials_dir.display(),
        applied_generation = state.generation,
        managed = state.managed.len(),
        pin = %bootstrap.pin,
        pins = ?pins.pins(),
        "vmcred-guest {} starting",
        vmcred_proto::VERSION
    );

    let readiness = Arc::new(Readiness::new());
    readiness.status("waiting for the host's first sync");
    {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            // Ends at the first sync: a timer left armed until the
            // deadline would wake the idle agent for nothing.
            tokio::select! {
                () = readiness.until_ready() => return,
                () = tokio::time::sleep(initial_sync_timeout) => {}
            }
            if !readiness.is_ready() {
                tracing::warn!(
                    timeout = %humantime::format_duration(initial_sync_timeout),
                    "no sync with the host yet; reporting ready anyway so boot goes on"
                );
                readiness.ready(
                    "ready without a host sync (initial sync timeout); waiting for the host",
                );
            }
        });
    }

    let mut service = GuestService::with_socket_values(
        store.clone(),
        config,
        UnitRunner::new(cli.systemctl.clone()),
        readiness,
        memory,
    )
    .with_pins(pins.clone());
    // A guest without its key still runs: a host that requires one then
    // refuses it and says why in its `status`.
    match vmcred_guest::bootstrap::read_launch_key(&cli.launch_key) {
        Ok(Some(key)) => {
            tracing::info!(path = %cli.launch_key.display(), "holding the VM's launch key");
            service = service.with_launch_key(key);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "no launch key to prove this VM's launch"),
    }
    let server = serve_pinned(listener, pins, service, ServerOptions::default());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    tokio::select! {
        r = server => {
            // Ending for any reason: the credential socket's peers get
            // refusals, not a bare EOF, as on SIGTERM.
            if let Some(s) = &creds_socket_stopper {
                s.stop().await;
            }
            r?;
            Ok(())
        }
        _ = term.recv() => shutdown(store, creds_socket_stopper.clone()).await,
        _ = tokio::signal::ctrl_c() => shutdown(store, creds_socket_stopper.clone()).await,
    }
}

/// Ends the credential socket's connections first (a unit asking right
/// now gets a failed load, never an empty or cut-off credential; see
/// `creds_socket`), then lets a write in progress finish (so the
/// credentials directory is read-only again), then exits while still
/// holding the store's lock, so that no write can start in between.
/// Exiting here rather than returning also spares waiting for blocking
/// tasks queued behind that lock.
async fn shutdown(
    store: Arc<Store>,
    creds_socket: Option<vmcred_guest::creds_socket::Stopper>,
) -> Result<()> {
    tracing::info!("stopping");
    if let Some(s) = creds_socket {
        s.stop().await;
    }
    let quiesced = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            let _guard = store.quiesce();
            std::process::exit(0);
        }),
    )
    .await;
    if quiesced.is_err() {
        tracing::warn!("a write was still in progress after 10s; stopping anyway");
    }
    std::process::exit(0)
}
