//! End-to-end tests of `vmcred-host launch` through the binary, written
//! against the CLI and config documented in README.md:
//!
//! ```text
//! vmcred-host launch --config FILE --vm NAME [--hypervisor H] [--runtime-dir DIR] --dry-run -- ARGV...
//! ```
//!
//! with `--dry-run` printing the rewritten argv as a JSON array on stdout.
//! They need `launch` wired into `main.rs` (the implementation and its unit
//! tests are in `host-agent/src/launch.rs`); until then they fail.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;

const SECRET: &[u8] = b"hunter2-api-key,]\"\n";
const ENVIRONMENT: &[u8] = b"production-xyzzy";
const PIN_HEX: &str = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

struct Env {
    _tmp: tempfile::TempDir,
    config: PathBuf,
    creds: PathBuf,
    /// What the tests pass as `--runtime-dir`.
    run: PathBuf,
}

impl Env {
    /// Where test-vm's launch writes its files: its own directory in the
    /// runtime directory.
    fn vm_dir(&self) -> PathBuf {
        self.run.join("test-vm")
    }
}

/// A config with one VM: API_KEY (boot, allowed on cloud-hypervisor's
/// command line only if `api_key_allowed`), ENVIRONMENT (boot, allowed),
/// LATE (not boot).
fn setup(api_key_allowed: bool) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let state = root.join("state");
    fs::create_dir(&state).unwrap();
    fs::write(state.join("host.pin"), format!("sha256:{PIN_HEX}\n")).unwrap();
    let src = root.join("src");
    fs::create_dir(&src).unwrap();
    for (name, value) in [
        ("api-key", SECRET),
        ("environment", ENVIRONMENT),
        ("late", b"late".as_slice()),
    ] {
        fs::write(src.join(name), value).unwrap();
    }
    // What systemd's LoadCredential= on the VM's unit would provide.
    let creds = root.join("creds");
    fs::create_dir(&creds).unwrap();
    fs::write(creds.join("API_KEY"), SECRET).unwrap();
    fs::write(creds.join("ENVIRONMENT"), ENVIRONMENT).unwrap();

    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let config = root.join("host.toml");
    fs::write(
        &config,
        format!(
            r#"state_dir = {state}
control_socket = {control}
launch_socket = {launch}

[vms.test-vm]
cid = 3
port = 700

[vms.test-vm.credentials.API_KEY]
path = {api}
boot = true
allow_on_command_line = {api_key_allowed}

[vms.test-vm.credentials.ENVIRONMENT]
path = {env}
boot = true
allow_on_command_line = true

[vms.test-vm.credentials.LATE]
path = {late}
"#,
            state = q(&state),
            control = q(&root.join("control.sock")),
            launch = q(&root.join("launch.sock")),
            api = q(&src.join("api-key")),
            env = q(&src.join("environment")),
            late = q(&src.join("late")),
        ),
    )
    .unwrap();
    let run = root.join("run");
    Env {
        _tmp: tmp,
        config,
        creds,
        run,
    }
}

fn launch(env: &Env, with_credentials: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmcred-host"));
    cmd.arg("launch")
        .arg("--config")
        .arg(&env.config)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("VMCRED_LAUNCH_RUNTIME_DIR");
    if with_credentials {
        cmd.env("CREDENTIALS_DIRECTORY", &env.creds);
    }
    cmd.output().unwrap()
}

fn has(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_secret(out: &Output) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    for stream in [&out.stdout, &out.stderr] {
        assert!(!has(stream, b"hunter2"), "secret value in output");
        assert!(!has(stream, b64.as_bytes()), "base64 of secret in output");
    }
}

/// What a successful launch printed, parsed as `what` says it is.
fn json_of<T: serde::de::DeserializeOwned>(out: &Output, what: &str) -> T {
    assert!(
        out.status.success(),
        "launch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not {what} ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn argv_of(out: &Output) -> Vec<String> {
    json_of(out, "a JSON array of strings")
}

fn binary_oem(name: &str, value: &[u8]) -> String {
    format!(
        "io.systemd.credential.binary:{name}={}",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

fn bootstrap_oem() -> String {
    format!(
        "io.systemd.credential:vmcred.bootstrap=vmcred-bootstrap-v1 port=700 pin=sha256:{PIN_HEX} host=vsock"
    )
}

fn check_qemu(env: &Env, out: &Output) {
    assert_no_secret(out);
    let argv = argv_of(out);
    assert_eq!(argv[..3], ["qemu-system-x86_64", "-m", "512"]);
    let rest = &argv[3..];
    assert_eq!(rest.len(), 6, "{argv:?}");
    let mut contents = Vec::new();
    for pair in rest.chunks(2) {
        assert_eq!(pair[0], "-smbios");
        let path = pair[1].strip_prefix("type=11,path=").unwrap();
        let path = Path::new(path);
        assert_eq!(path.parent(), Some(env.vm_dir().as_path()));
        let meta = fs::metadata(path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o400, "{path:?}");
        contents.push(fs::read_to_string(path).unwrap());
    }
    assert_eq!(
        fs::metadata(env.vm_dir()).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    contents.sort();
    let mut want = vec![
        bootstrap_oem(),
        binary_oem("API_KEY", SECRET),
        binary_oem("ENVIRONMENT", ENVIRONMENT),
    ];
    want.sort();
    assert_eq!(contents, want, "LATE is not a boot credential");
}

#[test]
fn qemu_dry_run_passes_values_through_private_files() {
    let env = setup(false);
    let run = env.run.display().to_string();
    let out = dry_run(
        &env,
        true,
        "test-vm",
        &["--hypervisor", "qemu", "--runtime-dir", &run],
        &["qemu-system-x86_64", "-m", "512"],
    );
    check_qemu(&env, &out);
}

/// Two VMs given one runtime directory (one `$VMCRED_LAUNCH_RUNTIME_DIR`
/// for all, as the review reproduced with `--dry-run`): each launch
/// writes only in its VM's own directory, so launching b neither
/// replaces nor removes the files a's hypervisor is about to read.
#[test]
fn two_vms_sharing_a_runtime_directory_keep_their_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let state = root.join("state");
    fs::create_dir(&state).unwrap();
    fs::write(state.join("host.pin"), format!("sha256:{PIN_HEX}\n")).unwrap();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut toml = format!(
        "state_dir = {}\ncontrol_socket = {}\nlaunch_socket = {}\n",
        q(&state),
        q(&root.join("control.sock")),
        q(&root.join("launch.sock")),
    );
    let shared = root.join("rt2");
    let launch_vm = |vm: &str| -> DryRun {
        let out = Command::new(env!("CARGO_BIN_EXE_vmcred-host"))
            .args(["launch", "--config"])
            .arg(root.join("host.toml"))
            .args([
                "--vm",
                vm,
                "--hypervisor",
                "qemu",
                "--dry-run",
                "--json",
                "--",
            ])
            .args(qemu_argv(MICROVM, "device"))
            .env_remove("RUNTIME_DIRECTORY")
            .env("VMCRED_LAUNCH_RUNTIME_DIR", &shared)
            .env("CREDENTIALS_DIRECTORY", root.join(format!("creds-{vm}")))
            .output()
            .unwrap();
        parse_dry(&out)
    };
    for (vm, cid) in [("a", 3), ("b", 4)] {
        let creds = root.join(format!("creds-{vm}"));
        fs::create_dir(&creds).unwrap();
        fs::write(creds.join("DB_PASSWORD"), format!("secret-of-{vm}")).unwrap();
        toml.push_str(&format!(
            "\n[vms.{vm}]\ncid = {cid}\n\n[vms.{vm}.credentials.DB_PASSWORD]\npath = {}\nboot = true\n",
            q(&creds.join("DB_PASSWORD"))
        ));
    }
    fs::write(root.join("host.toml"), toml).unwrap();

    let a = launch_vm("a");
    let b = launch_vm("b");
    let secret_file = |d: &DryRun| {
        d.files
            .iter()
            .find(|f| f.name == "DB_PASSWORD")
            .map(|f| f.path.clone())
            .unwrap()
    };
    let (a_file, b_file) = (secret_file(&a), secret_file(&b));
    assert_ne!(a_file, b_file);
    assert!(
        a.argv
            .iter()
            .any(|arg| arg.ends_with(&a_file.display().to_string())),
        "{:?}",
        a.argv
    );
    assert_eq!(
        fs::read(&a_file).unwrap(),
        b"secret-of-a",
        "a's file after b's launch"
    );
    assert_eq!(fs::read(&b_file).unwrap(), b"secret-of-b");
    for f in a.files.iter().chain(&b.files) {
        assert!(f.path.is_file(), "{f:?} still there");
    }
    assert_eq!(a_file.parent(), Some(shared.join("a").as_path()));
    assert_eq!(b_file.parent(), Some(shared.join("b").as_path()));
}

#[test]
fn qemu_is_recognised_without_hypervisor_flag() {
    let env = setup(false);
    let run = env.run.display().to_string();
    let out = dry_run(
        &env,
        true,
        "test-vm",
        &["--runtime-dir", &run],
        &["qemu-system-x86_64", "-m", "512"],
    );
    check_qemu(&env, &out);
}

#[test]
fn cloud_hypervisor_refuses_a_secret_not_allowed_on_its_command_line() {
    let env = setup(false);
    let out = dry_run(
        &env,
        true,
        "test-vm",
        &[],
        &["cloud-hypervisor", "--platform", "oem_strings=[x=1]"],
    );
    assert!(!out.status.success());
    assert_no_secret(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("API_KEY"), "{err}");
    assert!(err.contains("allow_on_command_line"), "{err}");
    assert!(!env.run.exists());
}

#[test]
fn cloud_hypervisor_merges_allowed_values_with_a_warning() {
    let env = setup(true);
    let out = dry_run(
        &env,
        true,
        "test-vm",
        &["--hypervisor", "cloud-hypervisor"],
        &[
            "cloud-hypervisor",
            "--cpus",
            "boot=1",
            "--platform",
            "oem_strings=[x=1],serial_number=abc",
        ],
    );
    let argv = argv_of(&out);
    assert_eq!(
        argv[..4],
        ["cloud-hypervisor", "--cpus", "boot=1", "--platform"]
    );
    assert_eq!(argv.len(), 5);
    // The dry run shows the allowed secrets redacted, and says so.
    assert_eq!(
        argv[4],
        format!(
            "oem_strings=[x=1,{},{},{}],serial_number=abc",
            bootstrap_oem(),
            "io.systemd.credential.binary:API_KEY=<redacted>",
            "io.systemd.credential.binary:ENVIRONMENT=<redacted>"
        )
    );
    assert_no_secret(&out);
    assert!(
        has(&out.stderr, b"API_KEY, ENVIRONMENT are shown as <redacted>"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["API_KEY", "ENVIRONMENT"] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("credential {name} "))
                    && l.contains("/proc/PID/cmdline")),
            "no warning for {name}: {err}"
        );
    }
    assert!(!has(&out.stderr, b"hunter2"), "secret value in a warning");
}

#[test]
fn missing_credentials_directory_is_explained() {
    let env = setup(false);
    let run = env.run.display().to_string();
    let out = dry_run(
        &env,
        false,
        "test-vm",
        &["--hypervisor", "qemu", "--runtime-dir", &run],
        &["qemu-system-x86_64"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");
    assert!(err.contains("LoadCredential="), "{err}");
}

#[test]
fn unknown_vm_is_refused() {
    let env = setup(false);
    let out = dry_run(&env, true, "no-such-vm", &[], &["qemu-system-x86_64"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-vm"), "{err}");
}

// ------------------------------------------------------------------
// Every hypervisor microvm.nix runs with vsock, on argvs shaped like its
// runners' (lib/runners/<hypervisor>.nix), through `--dry-run --json`.
// ------------------------------------------------------------------

const KERNEL_PARAMS: &str =
    "console=ttyS0 reboot=t panic=-1 root=fstab loglevel=4 init=/nix/store/dddd-nixos-system/init";
/// A value the kernel command line can carry (no quote, no control byte).
const PLAIN: &[u8] = b"plain-value with spaces";

/// One credential in a test config.
struct Cred {
    name: &'static str,
    value: &'static [u8],
    boot: bool,
    allow: bool,
}

const fn cred(name: &'static str, value: &'static [u8], boot: bool, allow: bool) -> Cred {
    Cred {
        name,
        value,
        boot,
        allow,
    }
}

/// A config with one VM `test-vm` reached through `target` (a TOML line).
fn setup_vm(target: &str, creds: &[Cred]) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let state = root.join("state");
    fs::create_dir(&state).unwrap();
    fs::write(state.join("host.pin"), format!("sha256:{PIN_HEX}\n")).unwrap();
    let src = root.join("src");
    let creds_dir = root.join("creds");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&creds_dir).unwrap();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut toml = format!(
        "state_dir = {}\ncontrol_socket = {}\nlaunch_socket = {}\n\n[vms.test-vm]\n{target}\nport = 700\n",
        q(&state),
        q(&root.join("control.sock")),
        q(&root.join("launch.sock")),
    );
    for c in creds {
        fs::write(src.join(c.name), c.value).unwrap();
        if c.boot {
            fs::write(creds_dir.join(c.name), c.value).unwrap();
        }
        toml.push_str(&format!(
            "\n[vms.test-vm.credentials.{}]\npath = {}\nboot = {}\nallow_on_command_line = {}\n",
            c.name,
            q(&src.join(c.name)),
            c.boot,
            c.allow
        ));
    }
    let config = root.join("host.toml");
    fs::write(&config, toml).unwrap();
    let run = root.join("run");
    Env {
        _tmp: tmp,
        config,
        creds: creds_dir,
        run,
    }
}

const VSOCK: &str = "cid = 3";
const HYBRID: &str = "hybrid_socket = \"/var/lib/microvms/test-vm/notify.vsock\"";

fn bootstrap_text(host: &str) -> String {
    format!("vmcred-bootstrap-v1 port=700 pin=sha256:{PIN_HEX} host={host}")
}

fn cmdline_param(name: &str, value: &str) -> String {
    format!("\"systemd.set_credential={name}:{value}\"")
}

/// What `--dry-run --json` prints.
#[derive(Debug, serde::Deserialize)]
struct DryRun {
    argv0: String,
    argv: Vec<String>,
    files: Vec<DryFile>,
}

#[derive(Debug, serde::Deserialize)]
struct DryFile {
    path: PathBuf,
    mode: String,
    carrier: String,
    name: String,
}

/// Runs `launch --vm VM FLAGS --dry-run -- ARGV`, with or without the
/// credentials directory.
fn dry_run(env: &Env, with_credentials: bool, vm: &str, flags: &[&str], argv: &[&str]) -> Output {
    let mut args = vec!["--vm", vm];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--dry-run", "--"]);
    args.extend_from_slice(argv);
    launch(env, with_credentials, &args)
}

/// Runs `launch --dry-run --json` with the runtime dir and the
/// credentials directory set.
fn dry_json(env: &Env, extra: &[&str], argv: &[String]) -> Output {
    let run = env.run.display().to_string();
    let mut flags = vec!["--runtime-dir", &run, "--json"];
    flags.extend_from_slice(extra);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    dry_run(env, true, "test-vm", &flags, &argv)
}

fn parse_dry(out: &Output) -> DryRun {
    json_of(out, "the dry-run JSON")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn qemu_argv(machine: &str, dev: &str) -> Vec<String> {
    let append = format!("earlyprintk=ttyS0 {KERNEL_PARAMS}");
    strings(&[
        "/nix/store/aaaa-qemu-9.2.0/bin/qemu-system-x86_64",
        "-name",
        "test-vm",
        "-M",
        machine,
        "-m",
        "512M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-kernel",
        "/nix/store/bbbb-linux/bzImage",
        "-initrd",
        "/nix/store/cccc-initrd/initrd",
        "-chardev",
        "stdio,id=stdio,signal=off",
        &format!("virtio-rng-{dev}"),
        "-smbios",
        "type=1,uuid=5e0c2d3e-6e6c-4a6b-8d7a-0f7a3d1c9b21",
        "-serial",
        "chardev:stdio",
        "-enable-kvm",
        "-device",
        "i8042",
        "-append",
        &append,
        "-drive",
        "id=store,format=raw,read-only=on,file=/nix/store/ffff-store.img,if=none,aio=io_uring",
        "-device",
        &format!("virtio-blk-{dev},drive=store"),
        "-device",
        &format!("vhost-vsock-{dev},guest-cid=3"),
    ])
}

const MICROVM: &str =
    "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=off,pic=off,pit=off,rtc=on,usb=off";
const Q35: &str = "q35,accel=kvm:tcg,acpi=on,mem-merge=on";

/// The argv after the original: `(option, value)` pairs.
fn tail_pairs(original: &[String], argv: &[String]) -> Vec<(String, String)> {
    assert_eq!(argv[..original.len()], original[..], "original argv kept");
    argv[original.len()..]
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

fn check_file(f: &DryFile, dir: &Path, carrier: &str) -> Vec<u8> {
    assert_eq!(f.path.parent(), Some(dir), "{f:?}");
    assert_eq!(f.mode, "0400");
    assert_eq!(f.carrier, carrier);
    let meta = fs::symlink_metadata(&f.path).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o400, "{f:?}");
    fs::read(&f.path).unwrap()
}

/// The value of LATE, a credential that is not `boot`: it must never
/// appear anywhere at launch.
const LATE_VALUE: &[u8] = b"late-only-over-vsock-q9";

fn qemu_creds() -> Vec<Cred> {
    vec![
        cred("API_KEY", SECRET, true, false),
        cred("ENVIRONMENT", ENVIRONMENT, true, false),
        cred("LATE", LATE_VALUE, false, false),
    ]
}

/// No value of a credential that is not `boot` in the output or the files.
fn assert_no_late(out: &Output, files: &[DryFile]) {
    assert!(!has(&out.stdout, LATE_VALUE) && !has(&out.stderr, LATE_VALUE));
    for f in files {
        assert!(!has(&fs::read(&f.path).unwrap(), LATE_VALUE), "{f:?}");
    }
}

#[test]
fn qemu_microvm_machine_gets_fw_cfg_files() {
    let env = setup_vm(VSOCK, &qemu_creds());
    let argv = qemu_argv(MICROVM, "device");
    let out = dry_json(&env, &[], &argv);
    assert_no_secret(&out);
    let dry = parse_dry(&out);
    assert_no_late(&out, &dry.files);
    assert_eq!(dry.argv0, argv[0], "the process name defaults to argv[0]");
    let pairs = tail_pairs(&argv, &dry.argv);
    assert_eq!(pairs.len(), 3, "{pairs:?}");
    assert_eq!(dry.files.len(), 3);
    let bootstrap = bootstrap_text("vsock");
    let want: [(&str, &[u8]); 3] = [
        ("vmcred.bootstrap", bootstrap.as_bytes()),
        ("API_KEY", SECRET),
        ("ENVIRONMENT", ENVIRONMENT),
    ];
    for ((pair, file), (name, value)) in pairs.iter().zip(&dry.files).zip(want) {
        assert_eq!(file.name, name);
        assert_eq!(check_file(file, &env.vm_dir(), "fw-cfg"), value, "{name}");
        assert_eq!(pair.0, "-fw_cfg");
        assert_eq!(
            pair.1,
            format!(
                "name=opt/io.systemd.credentials/{name},file={}",
                file.path.display()
            )
        );
    }
    assert_eq!(
        fs::metadata(env.vm_dir()).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

#[test]
fn qemu_q35_and_default_machine_get_smbios_files() {
    for argv in [
        qemu_argv(Q35, "pci"),
        qemu_argv("pc-q35-9.2,accel=kvm", "pci"),
        qemu_argv("type=pc-i440fx-9.2,accel=kvm", "pci"),
        strings(&[
            "qemu-system-x86_64",
            "-m",
            "512",
            "-append",
            "console=ttyS0",
        ]),
    ] {
        let env = setup_vm(VSOCK, &qemu_creds());
        let out = dry_json(&env, &[], &argv);
        assert_no_secret(&out);
        let dry = parse_dry(&out);
        assert_no_late(&out, &dry.files);
        let pairs = tail_pairs(&argv, &dry.argv);
        assert_eq!(pairs.len(), 3, "{pairs:?}");
        let mut contents = Vec::new();
        for (pair, file) in pairs.iter().zip(&dry.files) {
            assert_eq!(pair.0, "-smbios");
            assert_eq!(pair.1, format!("type=11,path={}", file.path.display()));
            contents.push(String::from_utf8(check_file(file, &env.vm_dir(), "smbios")).unwrap());
        }
        assert_eq!(
            contents,
            [
                bootstrap_oem(),
                binary_oem("API_KEY", SECRET),
                binary_oem("ENVIRONMENT", ENVIRONMENT)
            ]
        );
    }
}

#[test]
fn qemu_carrier_override() {
    // cmdline: the bootstrap joins the one -append; secrets stay in files.
    let env = setup_vm(VSOCK, &qemu_creds());
    let argv = qemu_argv(MICROVM, "device");
    let out = dry_json(&env, &["--carrier", "cmdline"], &argv);
    assert_no_secret(&out);
    let dry = parse_dry(&out);
    let at = argv.iter().position(|a| a == "-append").unwrap() + 1;
    let mut want = argv.clone();
    want[at] = format!(
        "{} {}",
        argv[at],
        cmdline_param("vmcred.bootstrap", &bootstrap_text("vsock"))
    );
    assert_eq!(dry.argv[..argv.len()], want[..]);
    let pairs = tail_pairs(&want, &dry.argv);
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    assert!(pairs.iter().all(|p| p.0 == "-fw_cfg"), "{pairs:?}");
    let names: Vec<&str> = dry.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["API_KEY", "ENVIRONMENT"]);

    // fw-cfg on q35 is fine.
    let env = setup_vm(VSOCK, &qemu_creds());
    let argv = qemu_argv(Q35, "pci");
    let dry = parse_dry(&dry_json(&env, &["--carrier", "fw-cfg"], &argv));
    assert!(dry.files.iter().all(|f| f.carrier == "fw-cfg"));
    assert_eq!(tail_pairs(&argv, &dry.argv)[0].0, "-fw_cfg");

    // smbios on microvm is not: the error names both.
    let env = setup_vm(VSOCK, &qemu_creds());
    let out = dry_json(
        &env,
        &["--carrier", "smbios"],
        &qemu_argv(MICROVM, "device"),
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("--carrier smbios") && e.contains("qemu") && e.contains("microvm"),
        "{e}"
    );
    assert!(!env.run.exists(), "nothing written after a refusal");
}

#[test]
fn qemu_fw_cfg_names_are_limited_to_28_bytes() {
    let long = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_12"; // 29 bytes
    let env = setup_vm(VSOCK, &[cred(long, SECRET, true, false)]);
    let out = dry_json(&env, &[], &qemu_argv(MICROVM, "device"));
    assert!(!out.status.success());
    assert_no_secret(&out);
    let e = stderr(&out);
    for needle in [long, "29 bytes", "55 bytes", "28 bytes", "fw_cfg"] {
        assert!(e.contains(needle), "{needle:?} missing in: {e}");
    }
    // On q35 (SMBIOS) the same name is fine; 28 bytes are fine on microvm.
    assert!(dry_json(&env, &[], &qemu_argv(Q35, "pci")).status.success());
    let env = setup_vm(VSOCK, &[cred(&long[..28], SECRET, true, false)]);
    let dry = parse_dry(&dry_json(&env, &[], &qemu_argv(MICROVM, "device")));
    assert_eq!(dry.files[1].name, &long[..28]);
}

#[test]
fn qemu_unknown_machine_type_is_an_error_naming_it() {
    let env = setup_vm(VSOCK, &[]);
    let out = dry_json(&env, &[], &qemu_argv("isapc", "device"));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("qemu argv") && e.contains("\"isapc\"") && e.contains("--carrier"),
        "{e}"
    );
    // ... and --carrier decides.
    let dry = parse_dry(&dry_json(
        &env,
        &["--carrier", "fw-cfg"],
        &qemu_argv("isapc", "device"),
    ));
    assert_eq!(dry.files[0].carrier, "fw-cfg");
}

fn ch_argv(platform: &str) -> Vec<String> {
    let cmdline = format!("earlyprintk=ttyS0 {KERNEL_PARAMS}");
    strings(&[
        "/nix/store/x-cloud-hypervisor-48.0/bin/cloud-hypervisor",
        "--cpus",
        "boot=1",
        "--watchdog",
        "--kernel",
        "/nix/store/bbbb-linux/vmlinux",
        "--initramfs",
        "/nix/store/cccc-initrd/initrd",
        "--cmdline",
        &cmdline,
        "--seccomp",
        "true",
        "--memory",
        "mergeable=on,shared=on,size=512M",
        "--platform",
        platform,
        "--disk",
        "path=/nix/store/ffff-store.img,readonly=on",
        "--vsock",
        "cid=3,socket=notify.vsock",
        "--console",
        "null",
        "--serial",
        "tty",
    ])
}

const NOTIFY_OEM: &str = "io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888";

#[test]
fn cloud_hypervisor_runner_argv_keeps_its_oem_strings() {
    let env = setup_vm(HYBRID, &[cred("LATE", b"late", false, false)]);
    let argv = ch_argv(&format!("oem_strings=[{NOTIFY_OEM}]"));
    let dry = parse_dry(&dry_json(&env, &[], &argv));
    let at = argv.iter().position(|a| a == "--platform").unwrap() + 1;
    let mut want = argv.clone();
    want[at] = format!(
        "oem_strings=[{NOTIFY_OEM},io.systemd.credential:vmcred.bootstrap={}]",
        bootstrap_text("hybrid")
    );
    assert_eq!(dry.argv, want);
    assert!(dry.files.is_empty());
    assert!(!env.run.exists(), "cloud-hypervisor needs no runtime files");

    // --carrier cmdline: the bootstrap joins --cmdline, --platform is kept.
    let dry = parse_dry(&dry_json(&env, &["--carrier", "cmdline"], &argv));
    let at = argv.iter().position(|a| a == "--cmdline").unwrap() + 1;
    let mut want = argv.clone();
    want[at] = format!(
        "{} {}",
        argv[at],
        cmdline_param("vmcred.bootstrap", &bootstrap_text("hybrid"))
    );
    assert_eq!(dry.argv, want);

    let out = dry_json(&env, &["--carrier", "fw-cfg"], &argv);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("--carrier fw-cfg") && e.contains("cloud-hypervisor"),
        "{e}"
    );
}

fn firecracker_config() -> serde_json::Value {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": "/nix/store/bbbb-linux-dev/vmlinux",
            "initrd_path": "/nix/store/cccc-initrd/initrd",
            "boot_args": format!("console=ttyS0,115200 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd {KERNEL_PARAMS}")
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 512, "smt": true },
        "drives": [{
            "drive_id": "store",
            "path_on_host": "/nix/store/ffff-store.img",
            "is_root_device": false,
            "is_read_only": true,
            "io_engine": "Sync"
        }],
        "network-interfaces": [],
        "vsock": { "guest_cid": 3, "uds_path": "notify.vsock" }
    })
}

fn firecracker_argv(config: &Path) -> Vec<String> {
    strings(&[
        "/nix/store/x-firecracker-1.13.1/bin/firecracker",
        "--config-file",
        &config.display().to_string(),
        "--api-sock",
        "test-vm.sock",
        "--enable-pci",
    ])
}

#[test]
fn firecracker_gets_a_private_config_copy_with_the_bootstrap() {
    let env = setup_vm(
        HYBRID,
        &[
            cred("LATE", b"late", false, false),
            cred("PLAIN", PLAIN, true, true),
        ],
    );
    let original = env._tmp.path().join("firecracker-test-vm.json");
    let text = serde_json::to_vec_pretty(&firecracker_config()).unwrap();
    fs::write(&original, &text).unwrap();
    let argv = firecracker_argv(&original);
    let out = dry_json(&env, &[], &argv);
    let dry = parse_dry(&out);
    assert_eq!(fs::read(&original).unwrap(), text, "original untouched");
    assert_eq!(dry.files.len(), 1);
    let copy = &dry.files[0];
    assert_eq!(copy.name, "firecracker-config");
    let mut want_argv = argv.clone();
    want_argv[2] = copy.path.display().to_string();
    assert_eq!(dry.argv, want_argv);

    let got: serde_json::Value =
        serde_json::from_slice(&check_file(copy, &env.vm_dir(), "cmdline")).unwrap();
    let mut want = firecracker_config();
    let args = want["boot-source"]["boot_args"]
        .as_str()
        .unwrap()
        .to_string();
    want["boot-source"]["boot_args"] = format!(
        "{args} {} {}",
        cmdline_param("vmcred.bootstrap", &bootstrap_text("hybrid")),
        cmdline_param("PLAIN", std::str::from_utf8(PLAIN).unwrap())
    )
    .into();
    assert_eq!(got, want, "every other field kept");
    let e = stderr(&out);
    assert!(
        e.contains("credential PLAIN is on the guest's kernel command line"),
        "{e}"
    );

    // A relaunch replaces the stale copy.
    parse_dry(&dry_json(&env, &[], &argv));
}

#[test]
fn firecracker_without_config_file_or_boot_args_is_explained() {
    let env = setup_vm(HYBRID, &[]);
    let out = dry_json(
        &env,
        &[],
        &strings(&["firecracker", "--api-sock", "test-vm.sock"]),
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("firecracker argv") && e.contains("--config-file"),
        "{e}"
    );

    let config = env._tmp.path().join("fc.json");
    let mut c = firecracker_config();
    c["boot-source"]
        .as_object_mut()
        .unwrap()
        .remove("boot_args");
    fs::write(&config, serde_json::to_vec(&c).unwrap()).unwrap();
    let out = dry_json(&env, &[], &firecracker_argv(&config));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("boot_args") && e.contains(&config.display().to_string()),
        "{e}"
    );

    let out = dry_json(&env, &["--carrier", "smbios"], &firecracker_argv(&config));
    assert!(stderr(&out).contains("--carrier smbios is not possible with firecracker"));
}

fn crosvm_argv() -> Vec<String> {
    strings(&[
        "/nix/store/x-crosvm/bin/crosvm",
        "run",
        "-m",
        "512",
        "-c",
        "1",
        "--serial",
        "type=stdout,console=true,stdin=true",
        "-p",
        &format!("console=ttyS0 reboot=k panic=1 {KERNEL_PARAMS}"),
        "--no-balloon",
        "-r",
        "/nix/store/ffff-store.img",
        "-s",
        "test-vm.sock",
        "--vsock",
        "3",
        "--initrd",
        "/nix/store/cccc-initrd/initrd",
        "/nix/store/bbbb-linux/bzImage",
    ])
}

fn kvmtool_argv() -> Vec<String> {
    strings(&[
        "/nix/store/x-kvmtool/bin/lkvm",
        "run",
        "--name",
        "test-vm",
        "-m",
        "512",
        "-c",
        "1",
        "--console",
        "serial",
        "--rng",
        "-k",
        "/nix/store/bbbb-linux/bzImage",
        "-i",
        "/nix/store/cccc-initrd/initrd",
        "-p",
        &format!("console=ttyS0 reboot=k panic=1 {KERNEL_PARAMS}"),
        "-d",
        "/nix/store/ffff-store.img,ro",
        "--vsock",
        "3",
    ])
}

fn alioth_argv() -> Vec<String> {
    strings(&[
        "/nix/store/x-alioth/bin/alioth",
        "run",
        "--memory",
        "size=512M,backend=memfd",
        "--num-cpu",
        "1",
        "-k",
        "/nix/store/bbbb-linux/bzImage",
        "-i",
        "/nix/store/cccc-initrd/initrd",
        "-c",
        &format!("console=ttyS0 reboot=k panic=1 {KERNEL_PARAMS}"),
        "--entropy",
        "--blk",
        "path=/nix/store/ffff-store.img,readonly=true",
        "--vsock",
        "vhost,cid=3",
    ])
}

/// (hypervisor, argv, the kernel command line option)
fn cmdline_only() -> [(&'static str, Vec<String>, &'static str); 3] {
    [
        ("crosvm", crosvm_argv(), "-p"),
        ("kvmtool", kvmtool_argv(), "-p"),
        ("alioth", alioth_argv(), "-c"),
    ]
}

#[test]
fn cmdline_hypervisors_merge_the_bootstrap_into_their_one_command_line() {
    for (name, argv, opt) in cmdline_only() {
        let env = setup_vm(VSOCK, &[cred("LATE", b"late", false, false)]);
        let dry = parse_dry(&dry_json(&env, &[], &argv));
        let at = argv.iter().position(|a| a == opt).unwrap() + 1;
        let mut want = argv.clone();
        want[at] = format!(
            "{} {}",
            argv[at],
            cmdline_param("vmcred.bootstrap", &bootstrap_text("vsock"))
        );
        assert_eq!(dry.argv, want, "{name}");
        assert!(dry.files.is_empty(), "{name}");

        // Without a command line, one is added right after `run`.
        let mut bare = argv.clone();
        bare.drain(at - 1..=at);
        let dry = parse_dry(&dry_json(&env, &[], &bare));
        let mut want = bare.clone();
        want.splice(
            2..2,
            [
                opt.to_string(),
                cmdline_param("vmcred.bootstrap", &bootstrap_text("vsock")),
            ],
        );
        assert_eq!(dry.argv, want, "{name}");

        // An argv the adapter does not understand: no `run`, a bare option.
        let mut no_run = argv.clone();
        no_run.remove(1);
        let out = dry_json(&env, &[], &no_run);
        let e = stderr(&out);
        assert!(!out.status.success());
        assert!(
            e.contains(&format!("{name} argv")) && e.contains("`run`"),
            "{e}"
        );
        let mut dangling = argv.clone();
        dangling.push(opt.to_string());
        let e = stderr(&dry_json(&env, &[], &dangling));
        assert!(
            e.contains(&format!("{name} argv: {opt} has no value")),
            "{e}"
        );

        // Only the kernel command line.
        for carrier in ["smbios", "fw-cfg"] {
            let e = stderr(&dry_json(&env, &["--carrier", carrier], &argv));
            assert!(
                e.contains(&format!("--carrier {carrier} is not possible with {name}")),
                "{e}"
            );
        }
    }
}

#[test]
fn cmdline_hypervisors_put_no_unallowed_secret_on_a_command_line() {
    for (name, argv, opt) in cmdline_only() {
        // Not allowed: refused, telling the user to use vsock.
        let env = setup_vm(VSOCK, &[cred("API_KEY", SECRET, true, false)]);
        let out = dry_json(&env, &[], &argv);
        assert!(!out.status.success(), "{name}");
        assert_no_secret(&out);
        let e = stderr(&out);
        for needle in [
            "API_KEY",
            "boot = false",
            "over vsock",
            "allow_on_command_line",
        ] {
            assert!(e.contains(needle), "{name}: {needle:?} missing in: {e}");
        }

        // Allowed, but not text the quoted form can carry: refused.
        let env = setup_vm(VSOCK, &[cred("API_KEY", SECRET, true, true)]);
        let out = dry_json(&env, &[], &argv);
        assert!(!out.status.success(), "{name}");
        assert_no_secret(&out);
        assert!(stderr(&out).contains("double quote"), "{}", stderr(&out));

        // Allowed and plain: on the command line, with a warning, and
        // redacted in the dry run.
        let env = setup_vm(VSOCK, &[cred("PLAIN", PLAIN, true, true)]);
        let out = dry_json(&env, &[], &argv);
        let dry = parse_dry(&out);
        let at = argv.iter().position(|a| a == opt).unwrap() + 1;
        assert!(
            dry.argv[at].ends_with(&cmdline_param("PLAIN", "<redacted>")),
            "{}",
            dry.argv[at]
        );
        assert!(!has(&out.stdout, PLAIN));
        let e = stderr(&out);
        assert!(e.contains("credential PLAIN is on the guest's kernel command line"));
        assert!(
            e.contains("PLAIN are shown as <redacted>") || e.contains("PLAIN is"),
            "{e}"
        );
    }
}

#[test]
fn existing_bootstrap_on_the_command_line_is_refused() {
    let env = setup_vm(VSOCK, &[]);
    let mut argv = crosvm_argv();
    let at = argv.iter().position(|a| a == "-p").unwrap() + 1;
    argv[at].push_str(" \"systemd.set_credential=vmcred.bootstrap:old\"");
    let e = stderr(&dry_json(&env, &[], &argv));
    assert!(
        e.contains("already defines credential \"vmcred.bootstrap\""),
        "{e}"
    );
}

#[test]
fn hypervisor_is_named_in_unknown_program_errors() {
    let env = setup_vm(VSOCK, &[]);
    let e = stderr(&dry_json(
        &env,
        &[],
        &strings(&["/usr/bin/stratovirt", "-m", "1"]),
    ));
    for h in [
        "qemu",
        "cloud-hypervisor",
        "firecracker",
        "crosvm",
        "kvmtool",
        "alioth",
    ] {
        assert!(e.contains(h), "{h} missing in: {e}");
    }
}

// ------------------------------------------------------------------
// A real exec of a stand-in hypervisor, and the runtime directory as the
// hypervisor's (unprivileged) user.
// ------------------------------------------------------------------

/// A stand-in hypervisor: bash, whose `-c` script records the process's
/// real argv (argv[0] included, from /proc) and, for every file argument a
/// carrier added, the file's mode, owner and content as that process sees
/// them. `--hypervisor` tells the launcher which adapter to use.
fn stand_in(record: &Path) -> Vec<String> {
    let script = format!(
        r#"out={record}
cat /proc/$$/cmdline > "$out/cmdline"
n=0
for a in "$0" "$@"; do
  case "$a" in
    name=opt/io.systemd.credentials/*,file=*) f="${{a##*,file=}}" ;;
    type=11,path=*) f="${{a#type=11,path=}}" ;;
    /*.firecracker.json) f="$a" ;;
    *) continue ;;
  esac
  n=$((n+1))
  stat -c '%a %u' "$f" > "$out/$n.meta"
  cat "$f" > "$out/$n.content"
done
"#,
        record = record.display()
    );
    strings(&["/bin/bash", "-c", &script])
}

fn recorded_argv(record: &Path) -> Vec<String> {
    let raw = fs::read(record.join("cmdline")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn exec_keeps_the_process_name_and_hands_over_private_files() {
    let env = setup_vm(VSOCK, &qemu_creds());
    let record = env._tmp.path().join("record");
    fs::create_dir(&record).unwrap();
    // The agent's launch socket, answering like `serve` does.
    let socket = env._tmp.path().join("launch.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let agent = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (conn, _) = listener.accept().unwrap();
        let mut reader = std::io::BufReader::new(conn);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reader.get_mut().write_all(b"\"ok\"\n").unwrap();
        line
    });

    let mut argv = stand_in(&record);
    let qemu = qemu_argv(MICROVM, "device");
    argv.extend_from_slice(&qemu[1..]);
    let run = env.run.display().to_string();
    let mut args = vec![
        "--vm",
        "test-vm",
        "--hypervisor",
        "qemu",
        "--argv0",
        "microvm@test-vm",
        "--runtime-dir",
        &run,
        "--",
    ];
    args.extend(argv.iter().map(String::as_str));
    let out = launch(&env, true, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_no_secret(&out);
    assert_eq!(
        agent.join().unwrap(),
        "{\"cmd\":\"launched\",\"vm\":\"test-vm\"}\n"
    );

    let got = recorded_argv(&record);
    assert_eq!(got[0], "microvm@test-vm", "process name");
    assert_eq!(
        got[1..argv.len()],
        argv[1..],
        "other arguments kept, in order"
    );
    let tail = &got[argv.len()..];
    assert_eq!(tail.len(), 6, "{tail:?}");
    assert!(tail.chunks(2).all(|p| p[0] == "-fw_cfg"), "{tail:?}");
    assert!(
        !got.iter()
            .any(|a| a.contains("hunter2") || a.contains("xyzzy")),
        "no value on the argv"
    );
    let me = nix::unistd::geteuid().as_raw();
    let bootstrap = bootstrap_text("vsock");
    let want: [&[u8]; 3] = [bootstrap.as_bytes(), SECRET, ENVIRONMENT];
    for (i, value) in want.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            fs::read_to_string(record.join(format!("{n}.meta"))).unwrap(),
            format!("400 {me}\n")
        );
        assert_eq!(
            &fs::read(record.join(format!("{n}.content"))).unwrap(),
            value
        );
    }
}

#[test]
fn exec_failure_of_the_notification_is_one_warning() {
    let env = setup_vm(VSOCK, &[]);
    let record = env._tmp.path().join("record");
    fs::create_dir(&record).unwrap();
    let mut argv = stand_in(&record);
    argv.extend(strings(&["run", "-p", "console=ttyS0", "--vsock", "3"]));
    let mut args = vec!["--vm", "test-vm", "--hypervisor", "crosvm", "--"];
    args.extend(argv.iter().map(String::as_str));
    let out = launch(&env, true, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert_eq!(
        e.lines().filter(|l| l.contains("launch socket")).count(),
        1,
        "{e}"
    );
    let got = recorded_argv(&record);
    assert_eq!(got[0], "/bin/bash", "argv[0] as given by default");
    assert_eq!(
        got[3..],
        strings(&[
            "run",
            "-p",
            &format!(
                "console=ttyS0 {}",
                cmdline_param("vmcred.bootstrap", &bootstrap_text("vsock"))
            ),
            "--vsock",
            "3"
        ])[..]
    );
}

/// Runs the launcher as uid/gid 65534 with `envs` (and nothing inherited
/// that names a runtime directory).
fn launch_as_nobody(env: &Env, envs: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vmcred-host"))
        .arg("launch")
        .arg("--config")
        .arg(&env.config)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("VMCRED_LAUNCH_RUNTIME_DIR")
        .env("CREDENTIALS_DIRECTORY", &env.creds);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Makes the test tree readable by the unprivileged user, as a VM's
/// config and credentials are to `User=microvm`.
fn open_to_nobody(env: &Env) {
    let root = env._tmp.path();
    for dir in [root.to_path_buf(), root.join("state"), env.creds.clone()] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    for entry in fs::read_dir(&env.creds).unwrap() {
        let path = entry.unwrap().path();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

fn nobody_dir(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap();
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn runtime_dir_rules_as_the_hypervisors_user() {
    if !is_root() {
        eprintln!("SKIP: runtime_dir_rules_as_the_hypervisors_user needs root to become uid 65534");
        return;
    }
    let env = setup_vm(VSOCK, &[cred("API_KEY", SECRET, true, false)]);
    open_to_nobody(&env);
    let root = env._tmp.path();
    let qemu = qemu_argv(MICROVM, "device");
    let dry = |extra: &[&str]| {
        let mut a = vec!["--vm", "test-vm"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--dry-run", "--json", "--"]);
        a.extend(qemu.iter().map(String::as_str));
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let refs = |v: &[String]| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{0}")
    };
    let run = |envs: &[(&str, &Path)], extra: &[&str]| {
        let args = dry(extra);
        let joined = refs(&args);
        let args: Vec<&str> = joined.split('\u{0}').collect();
        launch_as_nobody(&env, envs, &args)
    };

    // systemd's RuntimeDirectory= (owned by the user, 0700): the files go
    // in the VM's own directory in it.
    let rt = root
        .join("systemd-run")
        .join("vmcred-launch")
        .join("test-vm");
    nobody_dir(&rt, 0o700);
    let out = run(&[("RUNTIME_DIRECTORY", &rt)], &[]);
    assert_no_secret(&out);
    let d = parse_dry(&out);
    assert_eq!(d.files.len(), 2);
    for f in &d.files {
        assert_eq!(f.path.parent(), Some(rt.join("test-vm").as_path()));
        let meta = fs::symlink_metadata(&f.path).unwrap();
        assert_eq!(meta.uid(), 65534);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o400);
    }

    // Nothing named and not root: the error names RuntimeDirectory=.
    let out = run(&[], &[]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("RuntimeDirectory=") && e.contains("uid 65534") && e.contains("--runtime-dir"),
        "{e}"
    );
    // ... which only hypervisors that need files need.
    let env2 = setup_vm(VSOCK, &[]);
    open_to_nobody(&env2);
    let mut args = vec!["--vm", "test-vm", "--dry-run", "--"];
    let crosvm = crosvm_argv();
    args.extend(crosvm.iter().map(String::as_str));
    assert!(launch_as_nobody(&env2, &[], &args).status.success());

    // A directory that is not the user's, or that others can write to, is
    // refused.
    let roots = root.join("root-owned");
    fs::create_dir(&roots).unwrap();
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o700)).unwrap();
    let e = stderr(&run(&[("RUNTIME_DIRECTORY", &roots)], &[]));
    assert!(
        e.contains("owned by uid 0") && e.contains("uid 65534"),
        "{e}"
    );
    let open = root.join("open");
    nobody_dir(&open, 0o770);
    let e = stderr(&run(&[("RUNTIME_DIRECTORY", &open)], &[]));
    assert!(
        e.contains("mode 0770") && e.contains("group or others can write"),
        "{e}"
    );
    // One that others may only read is a base: the VM's directory in it
    // is private.
    let readable = root.join("readable");
    nobody_dir(&readable, 0o755);
    let d = parse_dry(&run(&[("RUNTIME_DIRECTORY", &readable)], &[]));
    let vm_dir = readable.join("test-vm");
    assert_eq!(d.files[0].path.parent(), Some(vm_dir.as_path()));
    let meta = fs::symlink_metadata(&vm_dir).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (65534, 0o700)
    );

    // $VMCRED_LAUNCH_RUNTIME_DIR wins over $RUNTIME_DIRECTORY; a missing
    // directory under a parent the user may write is created 0700.
    let parent = root.join("nobody-parent");
    nobody_dir(&parent, 0o755);
    let fresh = parent.join("fresh");
    let out = run(
        &[
            ("RUNTIME_DIRECTORY", &open),
            ("VMCRED_LAUNCH_RUNTIME_DIR", &fresh),
        ],
        &[],
    );
    let d = parse_dry(&out);
    assert_eq!(
        d.files[0].path.parent(),
        Some(fresh.join("test-vm").as_path())
    );
    let meta = fs::symlink_metadata(&fresh).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (65534, 0o700)
    );
    // --runtime-dir wins over both.
    let fresh_s = rt.display().to_string();
    let d = parse_dry(&run(
        &[
            ("RUNTIME_DIRECTORY", &open),
            ("VMCRED_LAUNCH_RUNTIME_DIR", &open),
        ],
        &["--runtime-dir", &fresh_s],
    ));
    assert_eq!(d.files[0].path.parent(), Some(rt.join("test-vm").as_path()));
}

#[test]
fn firecracker_exec_as_the_hypervisors_user_reads_its_private_copy() {
    if !is_root() {
        eprintln!("SKIP: firecracker_exec_as_the_hypervisors_user_reads_its_private_copy needs root to become uid 65534");
        return;
    }
    let env = setup_vm(HYBRID, &[cred("LATE", LATE_VALUE, false, false)]);
    open_to_nobody(&env);
    let root = env._tmp.path();
    let original = root.join("firecracker-test-vm.json");
    fs::write(
        &original,
        serde_json::to_vec(&firecracker_config()).unwrap(),
    )
    .unwrap();
    fs::set_permissions(&original, fs::Permissions::from_mode(0o444)).unwrap();
    let record = root.join("record");
    nobody_dir(&record, 0o700);
    let rt = root.join("rt");
    nobody_dir(&rt, 0o700);

    let mut argv = stand_in(&record);
    argv.extend(strings(&[
        "--config-file",
        &original.display().to_string(),
        "--api-sock",
        "test-vm.sock",
    ]));
    let mut args = vec![
        "--vm",
        "test-vm",
        "--hypervisor",
        "firecracker",
        "--argv0",
        "microvm@test-vm",
        "--",
    ];
    args.extend(argv.iter().map(String::as_str));
    let out = launch_as_nobody(&env, &[("RUNTIME_DIRECTORY", &rt)], &args);
    assert!(out.status.success(), "{}", stderr(&out));

    let got = recorded_argv(&record);
    let copy = rt.join("test-vm").join("config.firecracker.json");
    let mut want = argv.clone();
    want[0] = "microvm@test-vm".into();
    want[4] = copy.display().to_string();
    assert_eq!(got, want);
    assert_eq!(
        fs::read_to_string(record.join("1.meta")).unwrap(),
        "400 65534\n"
    );
    let seen: serde_json::Value =
        serde_json::from_slice(&fs::read(record.join("1.content")).unwrap()).unwrap();
    let args = seen["boot-source"]["boot_args"].as_str().unwrap();
    assert!(
        args.ends_with(&cmdline_param(
            "vmcred.bootstrap",
            &bootstrap_text("hybrid")
        )),
        "{args}"
    );
    assert!(!args.contains("late-only"), "{args}");
}
