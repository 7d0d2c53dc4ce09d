//! `vmcred-host`: the host side of vmcred. See README.md for the commands
//! and the config format.

mod logs;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use vmcred_host::config::{load_control_socket, Config, DEFAULT_CONFIG};
use vmcred_host::control::{Reply, Request};
use vmcred_host::keyring::KeyStep;
use vmcred_host::{client, launch, serve, source};

use report::Exit;

/// How long a stopping `serve` waits for its tasks before it exits anyway
/// (a VM task stuck in a blocking call must not keep the agent alive).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "vmcred-host",
    version,
    about = "Deliver systemd credentials into microVMs over vsock, and rotate them without a restart",
    long_about = "vmcred-host serves credentials to the guest agents of many VMs (serve), wraps a \
                  hypervisor launch so the guest gets its bootstrap and boot-time credentials at boot \
                  (SMBIOS, fw_cfg or the kernel command line: launch), and triggers and reports rotations (rotate, status). \
                  Secret values are never printed.",
    after_help = "Exit status (stable):\n  \
                  0  success\n  \
                  1  a VM did not apply or is out of sync, or the command failed\n  \
                  2  usage error (bad arguments, or a VM or credential not in the config)\n  \
                  3  the agent is not running or not reachable (control socket)\n  \
                  4  config error (unreadable or invalid config file)"
)]
struct Cli {
    /// The host config file (TOML); every command reads it.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: dial every configured VM, keep its credentials in sync.
    ///
    /// Sends sd_notify READY=1 once its sockets listen. SIGTERM stops it
    /// (within 5 s even if a VM task is stuck); SIGHUP re-reads the config
    /// (a bad config is logged and the old one kept). Only one agent may use
    /// a state_dir at a time.
    Serve,
    /// Re-read the sources of VMs' credentials (all, or those named), push
    /// them and wait for the guests' acknowledgements.
    ///
    /// `rotate VM [CRED...]` rotates one VM. With `--vm A --vm B` or `--all`,
    /// every positional argument is a credential name, all VMs rotate at once
    /// over one connection, and a per-VM table is printed at the end.
    /// Exit status 0 only if every VM applied the new generation and every
    /// mapped unit action succeeded; 1 otherwise, with the reason. A guest
    /// that is down applies when it is back.
    Rotate {
        /// How long to wait for the acknowledgements (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the result as JSON (schema 1, see README).
        #[arg(long)]
        json: bool,
        /// Rotate this VM (repeatable).
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Rotate every configured VM.
        #[arg(long, conflicts_with = "vms")]
        all: bool,
        /// `VM [CRED...]`, or only `CRED...` with --vm/--all. No credential
        /// named: all of each VM's credentials.
        #[arg(value_name = "VM|CRED")]
        args: Vec<String>,
    },
    /// Show each VM: connected or not, in sync or not, generation applied,
    /// last error. One line per VM and a summary.
    ///
    /// Exit status 1 when any shown VM is out of sync (not connected, a
    /// generation not applied, a credential not applied, or an error).
    Status {
        /// Print JSON (schema 1, see README) instead of the table.
        #[arg(long)]
        json: bool,
        /// Show only this VM (repeatable).
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
    },
    /// Wrap a hypervisor: pass the guest its bootstrap and boot-time
    /// credentials at launch, tell the serving agent the VM launched, exec.
    ///
    /// Boot credentials are read from $CREDENTIALS_DIRECTORY (LoadCredential=
    /// on the VM's unit). qemu gets them through private files (-smbios
    /// type=11,path= or -fw_cfg, by machine type); other hypervisors only
    /// have a command line, so a boot secret goes there only if marked
    /// allow_on_command_line. The bootstrap is public.
    Launch {
        /// The VM, as named in the config.
        #[arg(long)]
        vm: String,
        /// Guessed from the program name when not given.
        #[arg(long, value_enum)]
        hypervisor: Option<launch::Hypervisor>,
        /// Where the bootstrap goes; auto: the hypervisor's (for qemu, the
        /// machine type's) best carrier.
        #[arg(long, value_enum, default_value = "auto")]
        carrier: launch::CarrierChoice,
        /// The process name (argv[0]) the hypervisor gets, e.g. microvm@VM
        /// [default: the program as given].
        #[arg(long)]
        argv0: Option<std::ffi::OsString>,
        /// Private directory for the files the hypervisor reads [default:
        /// $VMCRED_LAUNCH_RUNTIME_DIR, else the first entry of
        /// $RUNTIME_DIRECTORY, else /run/vmcred/launch/VM as root].
        #[arg(long)]
        runtime_dir: Option<PathBuf>,
        /// Print the resulting argv (secrets redacted) instead of exec'ing it.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: print {"argv0","argv","files"} as JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
        /// The hypervisor command line.
        #[arg(last = true, required = true)]
        argv: Vec<std::ffi::OsString>,
    },
    /// Validate a config file and print what it configures (no values are read).
    CheckConfig,
    /// Print the host key pin that guests are given (from state_dir/host.pin).
    Pin,
    /// Write man pages (DIR/man1) and bash, zsh and fish completions
    /// (DIR/completions); for packaging.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Roll the host key over without relaunching VMs: `prepare` (make the
    /// next key; connected guests store its pin), `switch` (dial with it;
    /// the old key is kept for guests that were down), `retire` (delete
    /// the old key), or `revoke-old` (switch and retire at once, for a
    /// leaked key). `show` changes nothing.
    ///
    /// Prints one line per VM with the pins its guest holds. Exit status 0
    /// when every VM is where the step leads (after prepare: holds the next
    /// pin; otherwise: trusts the current key); 1 otherwise.
    RotateKey {
        #[arg(value_enum)]
        step: KeyStepArg,
        /// With switch: switch even though some guests lack the next pin.
        #[arg(long)]
        force: bool,
        /// With switch: retire the old key at once (= revoke-old).
        #[arg(long)]
        revoke: bool,
        /// How long to wait for the VMs to redial after the step.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeyStepArg {
    Show,
    Prepare,
    Switch,
    Retire,
    RevokeOld,
}

fn main() -> ExitCode {
    logs::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Each error carries its cause once (see config::ConfigError).
            eprintln!("vmcred-host: {e:#}");
            Exit::of_error(&e).into()
        }
    }
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
        Cmd::Rotate {
            timeout,
            json,
            vms,
            all,
            args,
        } => {
            // Only the socket is read from the config: the daemon checks
            // the names, so a single-VM rotate costs the same whatever the
            // number of VMs configured.
            let socket = load_control_socket(&config)?;
            let (vms, credentials, many) = if all || !vms.is_empty() {
                (vms, args, true)
            } else {
                let mut args = args.into_iter();
                let Some(vm) = args.next() else {
                    return Ok(report::usage(
                        "name a VM (rotate VM [CRED...]), or use --vm VM or --all",
                    ));
                };
                (vec![vm], args.collect(), false)
            };
            let expected = (!all).then_some(vms.len());
            let req = Request::Rotate {
                vms: if all { Vec::new() } else { vms },
                all,
                credentials,
                timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            };
            let mut out = report::RotateOutput::new(json, many, expected);
            let end = client::call(&socket, &req, timeout + Duration::from_secs(5), |item| {
                out.item(item)
            })?;
            if let Reply::Unknown(e) = end {
                return Ok(report::unknown_name(&e));
            }
            Ok(out.finish(end).into())
        }
        Cmd::Status { json, vms } => {
            let socket = load_control_socket(&config)?;
            let mut out = report::StatusOutput::new(json);
            let end = client::call(
                &socket,
                &Request::Status { vms },
                Duration::from_secs(30),
                |item| out.item(item),
            )?;
            if let Reply::Unknown(e) = end {
                return Ok(report::unknown_name(&e));
            }
            Ok(out.finish(end).into())
        }
        Cmd::Launch {
            vm,
            hypervisor,
            carrier,
            argv0,
            runtime_dir,
            dry_run,
            json,
            argv,
        } => run_launch(
            &config,
            LaunchArgs {
                vm,
                hypervisor,
                carrier,
                argv0,
                runtime_dir,
                dry_run,
                json,
                argv,
            },
        ),
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

/// `vmcred-host launch`'s arguments.
struct LaunchArgs {
    vm: String,
    hypervisor: Option<launch::Hypervisor>,
    carrier: launch::CarrierChoice,
    argv0: Option<std::ffi::OsString>,
    runtime_dir: Option<PathBuf>,
    dry_run: bool,
    json: bool,
    argv: Vec<std::ffi::OsString>,
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
        vm_name,
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
