//! `vmcred-host`: the host side of vmcred. See README.md for the commands
//! and the config format.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use vmcred_host::config::{Config, DEFAULT_CONFIG};
use vmcred_host::control::{self, Reply, Request};
use vmcred_host::{launch, serve, source};

#[derive(Parser)]
#[command(
    name = "vmcred-host",
    version,
    about = "Deliver systemd credentials into microVMs over vsock, and rotate them without a restart",
    long_about = "vmcred-host serves credentials to the guest agents of many VMs (serve), wraps a \
                  hypervisor launch so the guest gets its bootstrap and boot-time credentials at boot \
                  (SMBIOS, fw_cfg or the kernel command line: launch), and triggers and reports rotations (rotate, status). \
                  Secret values are never printed."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: dial every configured VM, keep its credentials in sync.
    ///
    /// Sends sd_notify READY=1 once its sockets listen. SIGTERM stops it;
    /// SIGHUP re-reads the config (a bad config is logged and the old one kept).
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Re-read the sources of VM's credentials (all, or those named), push
    /// them and wait for the guest's acknowledgement.
    ///
    /// Exit status 0 only if the guest applied the new generation and every
    /// mapped unit action succeeded; 1 otherwise, with the reason. A guest
    /// that is down applies when it is back.
    Rotate {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait for the acknowledgement (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The VM, as named in the config.
        vm: String,
        /// Credentials to rotate; all of the VM's when none are named.
        credentials: Vec<String>,
    },
    /// Show each VM: connected or not, generations sent and applied, last error.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the host key pin that guests are given (from state_dir/host.pin).
    Pin {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmcred-host: {e:#}");
            ExitCode::from(2)
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Serve { config } => {
            runtime()?.block_on(serve::serve(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rotate {
            config,
            timeout,
            json,
            vm,
            credentials,
        } => {
            let cfg = Config::load(&config)?;
            let req = Request::Rotate {
                vm: vm.clone(),
                credentials,
                timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            };
            let reply = runtime()?
                .block_on(control::call(
                    &cfg.control_socket,
                    &req,
                    timeout + Duration::from_secs(5),
                ))
                .map_err(anyhow::Error::msg)?;
            Ok(print_rotate(&vm, reply, json))
        }
        Cmd::Status { config, json } => {
            let cfg = Config::load(&config)?;
            let reply = runtime()?
                .block_on(control::call(
                    &cfg.control_socket,
                    &Request::Status,
                    Duration::from_secs(10),
                ))
                .map_err(anyhow::Error::msg)?;
            match reply {
                Reply::Status(vms) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&vms)?);
                    } else {
                        print_status(&vms);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Reply::Error(e) => bail!("{e}"),
                _ => bail!("unexpected reply to status"),
            }
        }
        Cmd::Launch {
            config,
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
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!("{}: OK", cfg.path.display());
            println!(
                "state_dir {}  control {}  launch {}",
                cfg.state_dir.display(),
                cfg.control_socket.display(),
                cfg.launch_socket.display()
            );
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
        Cmd::Pin { config } => {
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

fn print_rotate(vm: &str, reply: Reply, json: bool) -> ExitCode {
    match reply {
        Reply::Rotate(r) => {
            let units_ok = r.units.iter().all(|u| u.ok);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                for c in &r.credentials {
                    match &c.error {
                        Some(e) => println!("{vm} {}: {} ({e})", c.name, c.outcome),
                        None => println!("{vm} {}: {}", c.name, c.outcome),
                    }
                }
                for u in &r.units {
                    match &u.error {
                        Some(e) => println!(
                            "{vm} unit {} {}: {} ({e})",
                            u.unit,
                            u.action,
                            if u.ok { "ok" } else { "FAILED" }
                        ),
                        None => println!(
                            "{vm} unit {} {}: {}",
                            u.unit,
                            u.action,
                            if u.ok { "ok" } else { "FAILED" }
                        ),
                    }
                }
                if r.applied && units_ok {
                    println!("{vm}: generation {} applied", r.generation);
                } else if r.applied {
                    println!(
                        "{vm}: generation {} applied, but a unit action failed",
                        r.generation
                    );
                } else {
                    println!(
                        "{vm}: NOT applied: {}",
                        r.error.as_deref().unwrap_or("see the credentials above")
                    );
                }
            }
            if r.applied && units_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Reply::Error(e) => {
            eprintln!("vmcred-host: {vm}: NOT applied: {e}");
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("vmcred-host: unexpected reply to rotate");
            ExitCode::FAILURE
        }
    }
}

fn print_status(vms: &[control::VmStatus]) {
    if vms.is_empty() {
        println!("no VMs configured");
    }
    for s in vms {
        println!(
            "{}: {} ({}), generation sent {} applied {}",
            s.vm,
            if s.connected {
                "connected"
            } else {
                "not connected"
            },
            s.target,
            s.generation_sent,
            s.generation_applied
        );
        for c in &s.credentials {
            println!(
                "  {}{}: {}{}",
                c.name,
                if c.boot { " [boot]" } else { "" },
                c.state,
                c.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
        if let Some(e) = &s.last_error {
            println!("  last error: {e}");
        }
    }
}
