//! `vmcred-host-agent`: the full host agent (`serve`, `launch`, and every
//! command with its clap help). Users run `vmcred-host`, the small front
//! in `bin/front.rs`, which runs `rotate` and `status` itself and execs this
//! binary with the same arguments for everything else. See README.md for
//! the commands and the config format, ARCHITECTURE.md "Binaries".

mod logs;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use vmcred_host::cli::args::{Cli, Cmd, KeyStepArg, LaunchArgs};
use vmcred_host::cli::report;
use vmcred_host::config::{Config, LaunchKeyMode};
use vmcred_host::control::Request;
use vmcred_host::keyring::KeyStep;
use vmcred_host::{cli, client, launch, serve, source};

/// glibc's allocator, except that blocks of 16 KiB or more get pages of
/// their own: each connection's HTTP/2 write buffer is then resident only
/// where written (`vmcred_host::heap`, ARCHITECTURE.md "Host cost per VM").
#[global_allocator]
static ALLOCATOR: vmcred_host::heap::PageBacked = vmcred_host::heap::PageBacked;

/// How long a stopping `serve` waits for its tasks before it exits anyway
/// (a VM task stuck in a blocking call must not keep the agent alive).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    keep_process_name();
    let parsed = Cli::parse();
    if parsed.command.logs() {
        logs::init();
    }
    match run(parsed) {
        Ok(code) => code,
        Err(e) => cli::fail(&e),
    }
}

/// The process name (`/proc/self/comm`) stays `vmcred-host` when the front
/// execs this binary, which would otherwise rename it `vmcred-host-age`
/// (the kernel keeps 15 bytes of the file name): `ps`, `pgrep -x
/// vmcred-host`, `top` and the journal's `_COMM=` show the agent as
/// before. Set before any thread starts, so that threads inherit it.
fn keep_process_name() {
    // Failing only leaves the name the kernel gave; nothing depends on it.
    let _ = nix::sys::prctl::set_name(c"vmcred-host");
}

/// One malloc arena for the whole daemon. glibc gives every thread that
/// allocates an arena of its own (up to eight per core) and keeps what is
/// freed there; with the VM tasks moving between two workers, the extra
/// arenas held about 10 MiB more at 1000 VMs (vmcred-bench: 90.1 MiB with
/// `MALLOC_ARENA_MAX=16`, 80.3 with this). The workers rarely allocate at
/// once, so sharing costs little.
/// `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator tunable; called before
        // the runtimes start any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// One thread: `serve`'s sockets and signals (the CLI clients are
/// blocking, see `client`).
fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config;
    match cli.command {
        Cmd::Serve => {
            limit_malloc_arenas();
            // Sockets and signals on this thread, VM tasks on their own
            // workers: a wedged VM task cannot delay SIGTERM (serve_with).
            let vms = runtime()?;
            let result =
                client_runtime()?.block_on(serve::serve_with(&config, vms.handle().clone()));
            vms.shutdown_timeout(SHUTDOWN_GRACE);
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rotate(args) => cli::rotate(&config, args),
        Cmd::Status(args) => cli::status(&config, args),
        Cmd::Launch(args) => run_launch(&config, args),
        Cmd::CheckConfig => {
            let cfg = Config::load(&config)?;
            println!("{}: OK", cfg.path.display());
            println!(
                "state_dir {}  control {}  launch {}",
                cfg.state_dir.display(),
                cfg.control_socket.display(),
                cfg.launch_socket.display()
            );
            if !cfg.launch_users.is_empty() {
                let users: Vec<String> = cfg
                    .launch_users
                    .iter()
                    .map(|u| format!("{} (uid {})", u.name, u.uid))
                    .collect();
                println!("launch_users {}", users.join(", "));
            }
            for vm in cfg.vms.values() {
                println!("vm {}: {}", vm.name, vm.target);
                for c in vm.credentials.values() {
                    println!(
                        "  {} <- {}{}{}",
                        c.name,
                        c.source,
                        if c.boot { " [boot]" } else { "" },
                        if c.allow_on_command_line {
                            " [allow_on_command_line]"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenerateDocs { dir } => {
            vmcred_docs::generate(<Cli as clap::CommandFactory>::command(), &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RotateKey {
            step,
            force,
            revoke,
            timeout,
            json,
        } => {
            let step = match (step, revoke) {
                (KeyStepArg::Switch, true) => KeyStep::RevokeOld,
                (_, true) => return Ok(report::usage("--revoke goes with switch only")),
                (KeyStepArg::Show, _) => KeyStep::Show,
                (KeyStepArg::Prepare, _) => KeyStep::Prepare,
                (KeyStepArg::Switch, _) => KeyStep::Switch,
                (KeyStepArg::Retire, _) => KeyStep::Retire,
                (KeyStepArg::RevokeOld, _) => KeyStep::RevokeOld,
            };
            let cfg = Config::load(&config)?;
            let mut out = report::KeyOutput::new(json, step);
            let end = client::call(
                &cfg.control_socket,
                &Request::RotateKey {
                    step,
                    force,
                    timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
                },
                timeout + Duration::from_secs(5),
                |item| out.item(item),
            )?;
            Ok(out.finish(end).into())
        }
        Cmd::Pin => {
            let cfg = Config::load(&config)?;
            println!("{}", read_pin(&cfg)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_launch(config: &std::path::Path, args: LaunchArgs) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let vm_name = args.vm.as_str();
    let vm = cfg
        .vms
        .get(vm_name)
        .with_context(|| format!("no VM named {vm_name:?} in {}", cfg.path.display()))?;
    let runtime_dir = launch::runtime_dir::choose(
        args.runtime_dir,
        std::env::var_os("VMCRED_LAUNCH_RUNTIME_DIR").as_deref(),
        std::env::var_os("RUNTIME_DIRECTORY").as_deref(),
        nix::unistd::geteuid().is_root(),
    );
    let input = launch::LaunchInput {
        vm: vm_name.to_string(),
        hypervisor: launch::resolve_hypervisor(args.hypervisor, &args.argv)?,
        carrier: args.carrier,
        argv0: args.argv0,
        bootstrap: vmcred_proto::bootstrap::Bootstrap {
            port: vm.port,
            pin: read_pin(&cfg)?,
            host: vm.target.host_transport(),
        },
        boot_credentials: vm
            .credentials
            .values()
            .filter(|c| c.boot)
            .map(|c| launch::BootCredential {
                name: c.name.clone(),
                allow_on_command_line: c.allow_on_command_line,
            })
            .collect(),
        launch_key: match vm.launch_key {
            LaunchKeyMode::Off => launch::LaunchKey::Off,
            LaunchKeyMode::Required => launch::LaunchKey::Required {
                agent_file: vmcred_host::launch_key::path(&cfg.state_dir, vm_name),
            },
        },
        credentials_dir: source::credentials_directory(),
        runtime_dir,
        argv: args.argv,
    };
    let prepared = launch::prepare(&input)?;
    for w in &prepared.warnings {
        tracing::warn!("{w}");
    }
    if args.dry_run {
        let text = |a: &std::ffi::OsString| a.to_string_lossy().into_owned();
        let argv: Vec<String> = prepared.shown_argv.iter().map(text).collect();
        if args.json {
            let files: Vec<serde_json::Value> = prepared
                .files
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "path": f.path.to_string_lossy(),
                        "mode": format!("{:04o}", f.mode),
                        "carrier": f.carrier,
                        "name": f.name,
                    })
                })
                .collect();
            let out = serde_json::json!({
                "argv0": text(&prepared.argv0),
                "argv": argv,
                "files": files,
            });
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{}", serde_json::to_string(&argv)?);
        }
        if !prepared.redacted.is_empty() {
            eprintln!(
                "note: the values of {} are shown as <redacted>; the real command line carries them",
                prepared.redacted.join(", ")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = launch::notify_launched(&cfg.launch_socket, vm_name) {
        tracing::warn!("could not tell the host agent that {vm_name} launched ({e}); it will dial on its own back-off");
    }
    Err(launch::exec(&prepared.argv0, &prepared.argv).into())
}

/// The public pin `serve` left in the state directory.
fn read_pin(cfg: &Config) -> Result<vmcred_proto::tls::Pin> {
    let path = cfg.state_dir.join("host.pin");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (it is created by the first start of `vmcred-host serve`)",
            path.display()
        )
    })?;
    text.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
