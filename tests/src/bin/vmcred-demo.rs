//! `vmcred-demo`: the whole story on this machine, no VM needed. A real
//! host agent and a real guest agent, joined by a hybrid-vsock muxer
//! stand-in; the guest's credentials directory is a read-only ramfs in a
//! private mount namespace when we are root, as systemd makes it.

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};
use vmcred_tests::World;

/// Runs a real vmcred host agent and guest agent on this machine and walks
/// through boot-time credentials, a late credential, a rotation, its unit
/// action and an impostor host. Needs no VM; as root the guest's credentials
/// directory is a read-only ramfs in a private mount namespace.
#[derive(Parser)]
#[command(name = "vmcred-demo")]
struct Args {
    /// Keep the work directory (configs, agent logs, recorded unit actions)
    /// and print its path, instead of deleting it at the end.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("\nDEMO FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn short_digest(v: &[u8]) -> String {
    hex::encode(&Sha256::digest(v)[..6])
}

fn random_secret() -> Result<Vec<u8>> {
    let mut b = [0u8; 24];
    let f = std::fs::File::open("/dev/urandom")?;
    use std::io::Read;
    f.take(24).read_exact(&mut b)?;
    Ok(hex::encode(b).into_bytes())
}

/// Variables `cargo run` sets for the program it runs. They must not reach
/// the inner cargo: build scripts (ring's, for one) declare
/// `rerun-if-env-changed` on some of them, so an inner build that sees
/// `CARGO_MANIFEST_DIR=…/tests` where a plain `cargo build` saw nothing
/// reruns them and rebuilds the TLS stack and both agents, on every run.
fn is_set_by_cargo_run(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_")
}

/// `cargo run --bin vmcred-demo` builds only this package; the agents are
/// separate binaries, so build them. This package depends on both agents'
/// libraries, so this is the same feature resolution as the outer build and
/// as `cargo test --workspace`: once those are built, it compiles nothing.
fn build_agents() -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let release = std::env::current_exe()?
        .parent()
        .is_some_and(|d| d.ends_with("release"));
    let mut c = Command::new(cargo);
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    let inherited: Vec<OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_str().is_some_and(is_set_by_cargo_run))
        .collect();
    for k in inherited {
        c.env_remove(k);
    }
    println!(
        "building vmcred-host and vmcred-guest: cargo build --workspace --bins{} (cargo's progress follows on stderr)",
        if release { " --release" } else { "" }
    );
    let status = c.status().context("cannot run cargo to build the agents")?;
    if !status.success() {
        bail!("building the agents failed ({status}); the cargo output above says why");
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    build_agents()?;
    let root = nix::unistd::geteuid().is_root();
    let mut w = World::new()?;
    if args.keep {
        w.dir.disable_cleanup(true);
    }
    w.log_level = "info".into();
    let vm = "test-vm";
    w.add_vm(vm, root)?;
    w.guests
        .get_mut(vm)
        .context("vm")?
        .units
        .insert("API_KEY".into(), vec!["demo-consumer.service".into()]);

    println!("vmcred demo: a host agent and a guest agent on this machine, joined through a");
    println!(
        "hybrid-vsock muxer stand-in (the protocol cloud-hypervisor and vhost-device-vsock speak)."
    );
    println!("Work directory: {}", w.path().display());
    if !root {
        println!("(not root: the guest's credentials directory is a plain directory, not a read-only ramfs)");
    }

    step(
        1,
        "Host secrets: root-only files, as sops-nix or clan vars leave them",
    );
    w.set_secret(vm, "ENVIRONMENT", b"test", true)?;
    let api_key_1 = random_secret()?;
    w.set_secret(vm, "API_KEY", &api_key_1, false)?;
    println!("ENVIRONMENT (boot = true): passed at launch through SMBIOS");
    println!(
        "API_KEY (boot = false): sha256 {}…, delivered only over vsock",
        short_digest(&api_key_1)
    );

    step(2, "Start the host agent (vmcred-host serve)");
    w.start_host()?;
    let pin = w.host_cmd(&["pin"])?;
    println!(
        "host key created; guests will pin {}",
        String::from_utf8_lossy(&pin.stdout).trim()
    );

    step(
        3,
        "Launch: vmcred-host launch wraps the hypervisor and adds SMBIOS OEM strings",
    );
    let argv = w.launch_dry_run(vm, "qemu")?;
    println!("qemu argv: {}", argv.join(" "));
    let secret_on_cmdline = argv
        .iter()
        .any(|a| a.contains(std::str::from_utf8(&api_key_1).unwrap_or("\u{0}")));
    println!(
        "secret values on the command line: {}",
        if secret_on_cmdline {
            "YES (bug)"
        } else {
            "none (values are in 0400 files in a 0700 directory)"
        }
    );
    if secret_on_cmdline {
        bail!("a secret reached the qemu command line");
    }

    step(
        4,
        "Boot (simulated): the demo imports the OEM strings into the guest's credentials directory as PID 1 would; the guest agent starts",
    );
    let t_boot = Instant::now();
    let imported = w.boot_guest(vm)?;
    println!(
        "imported from the SMBIOS strings (systemd's parsing rules, done here by the demo): {}",
        imported.join(", ")
    );
    let env = w
        .read_guest(vm, "ENVIRONMENT")
        .context("ENVIRONMENT not imported")?;
    println!(
        "guest has ENVIRONMENT = {:?} before any vsock traffic",
        String::from_utf8_lossy(&env)
    );

    step(
        5,
        "Late credential: API_KEY arrives over the transport, after boot",
    );
    w.wait_for_guest_value(vm, "API_KEY", &api_key_1, Duration::from_secs(30))?;
    println!(
        "guest wrote API_KEY (sha256 {}…) {} ms after the guest agent started",
        short_digest(&api_key_1),
        t_boot.elapsed().as_millis()
    );
    if root {
        println!(
            "credentials mount in the guest: {} (read-only again)",
            w.guest_mount_options(vm)?
        );
    }
    let db = random_secret()?;
    w.set_secret(vm, "DB_PASSWORD", &db, false)?;
    w.reload_host()?;
    w.wait_for_guest_value(vm, "DB_PASSWORD", &db, Duration::from_secs(30))?;
    println!("DB_PASSWORD added to the host config later (SIGHUP): in the guest, no restart");

    // The first delivery of API_KEY is a change too, so the guest already ran
    // its unit action once; wait for that record so step 7 can tell the two
    // apart.
    let units_log = w.guests[vm].systemctl_log.clone();
    let read_units_log = || std::fs::read_to_string(&units_log).unwrap_or_default();
    vmcred_tests::wait_until(Duration::from_secs(30), || {
        read_units_log().contains("demo-consumer.service")
    })
    .context("the guest ran no unit action after first writing API_KEY")?;
    let before_rotation = read_units_log();

    step(
        6,
        "Rotation: new API_KEY on the host, then `vmcred-host rotate test-vm API_KEY`",
    );
    let api_key_2 = random_secret()?;
    w.set_secret(vm, "API_KEY", &api_key_2, false)?;
    let t = Instant::now();
    let out = w.rotate(vm, &["API_KEY"], "30s")?;
    let rotate_ms = t.elapsed().as_secs_f64() * 1000.0;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("rotate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let now = w.read_guest(vm, "API_KEY").context("API_KEY gone")?;
    if now != api_key_2 {
        bail!("rotate returned 0 but the guest file does not hold the new value");
    }
    println!(
        "rotate returned 0 after {rotate_ms:.1} ms; the guest file now has sha256 {}…",
        short_digest(&now)
    );

    step(
        7,
        "Unit actions: the guest agent ran the unit mapped to API_KEY each time API_KEY changed",
    );
    let log = read_units_log();
    let after_rotation = log.strip_prefix(before_rotation.as_str()).unwrap_or(&log);
    for line in before_rotation.lines() {
        println!("{line}    <- API_KEY first written (step 5)");
    }
    for line in after_rotation.lines() {
        println!("{line}    <- API_KEY rotated (step 6), before rotate returned");
    }
    if !after_rotation.contains("demo-consumer.service") {
        bail!("the rotation ran no unit action for demo-consumer.service");
    }
    println!(
        "(try-restart restarts the unit only if it is running, so the first one starts nothing)"
    );
    println!("(on this machine systemctl is a recorder; the VM test runs the real one)");

    step(
        8,
        "Impostor: a second host agent with another key dials the same guest",
    );
    let impostor = w.path().join("impostor");
    std::fs::create_dir_all(&impostor)?;
    let fake = impostor.join("API_KEY");
    vmcred_tests::write_atomic(&fake, b"impostor-value", 0o400)?;
    let cfg = format!(
        "state_dir = \"{d}/state\"\ncontrol_socket = \"{d}/control.sock\"\nlaunch_socket = \"{d}/launch.sock\"\ndial_backoff_max = \"1s\"\n[vms.{vm}]\nhybrid_socket = \"{s}\"\nport = {p}\n[vms.{vm}.credentials.API_KEY]\npath = \"{f}\"\n",
        d = impostor.display(),
        s = w.guests[vm].muxer_socket.display(),
        p = vmcred_tests::PORT,
        f = fake.display()
    );
    std::fs::write(impostor.join("host.toml"), cfg)?;
    let mut imp = Command::new(&w.bins.host)
        .args(["serve", "--config"])
        .arg(impostor.join("host.toml"))
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(impostor.join("log"))?)
        .spawn()?;
    let refused = vmcred_tests::wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&w.guests[vm].log)
            .unwrap_or_default()
            .contains("not the pinned one")
    });
    let _ = imp.kill();
    let _ = imp.wait();
    refused.context("the guest did not log refusing the impostor")?;
    let still = w.read_guest(vm, "API_KEY").context("API_KEY gone")?;
    if still != api_key_2 {
        bail!("the impostor changed API_KEY");
    }
    println!("guest refused the impostor's TLS handshake (key not pinned); API_KEY unchanged");

    step(9, "Status (never prints values)");
    let out = w.host_cmd(&["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step(
        10,
        "Secrets stay secret: agent logs checked for every value used",
    );
    let logs = w.logs();
    for v in [&api_key_1, &api_key_2, &db] {
        if logs.contains(std::str::from_utf8(v)?) {
            bail!("a secret value appeared in an agent log");
        }
    }
    println!("no secret value in {} bytes of agent logs", logs.len());

    w.stop_host()?;
    if args.keep {
        println!(
            "\nWork directory kept: {} (host and guest configs, agent logs, systemctl.log)",
            w.path().display()
        );
    }
    println!("\nDEMO OK: boot-time OEM credential, late credential, acknowledged rotation in {rotate_ms:.1} ms, unit action, impostor refused.");
    Ok(())
}
