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
use std::os::unix::fs::PermissionsExt;
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
    run: PathBuf,
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
    let run = root.join("run").join("test-vm");
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

fn argv_of(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "launch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not a JSON array of strings ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
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
        assert_eq!(path.parent(), Some(env.run.as_path()));
        let meta = fs::metadata(path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o400, "{path:?}");
        contents.push(fs::read_to_string(path).unwrap());
    }
    assert_eq!(
        fs::metadata(&env.run).unwrap().permissions().mode() & 0o7777,
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
    let out = launch(
        &env,
        true,
        &[
            "--vm",
            "test-vm",
            "--hypervisor",
            "qemu",
            "--runtime-dir",
            &run,
            "--dry-run",
            "--",
            "qemu-system-x86_64",
            "-m",
            "512",
        ],
    );
    check_qemu(&env, &out);
}

#[test]
fn qemu_is_recognised_without_hypervisor_flag() {
    let env = setup(false);
    let run = env.run.display().to_string();
    let out = launch(
        &env,
        true,
        &[
            "--vm",
            "test-vm",
            "--runtime-dir",
            &run,
            "--dry-run",
            "--",
            "qemu-system-x86_64",
            "-m",
            "512",
        ],
    );
    check_qemu(&env, &out);
}

#[test]
fn cloud_hypervisor_refuses_a_secret_not_allowed_on_its_command_line() {
    let env = setup(false);
    let out = launch(
        &env,
        true,
        &[
            "--vm",
            "test-vm",
            "--dry-run",
            "--",
            "cloud-hypervisor",
            "--platform",
            "oem_strings=[x=1]",
        ],
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
    let out = launch(
        &env,
        true,
        &[
            "--vm",
            "test-vm",
            "--hypervisor",
            "cloud-hypervisor",
            "--dry-run",
            "--",
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
    let out = launch(
        &env,
        false,
        &[
            "--vm",
            "test-vm",
            "--hypervisor",
            "qemu",
            "--runtime-dir",
            &run,
            "--dry-run",
            "--",
            "qemu-system-x86_64",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");
    assert!(err.contains("LoadCredential="), "{err}");
}

#[test]
fn unknown_vm_is_refused() {
    let env = setup(false);
    let out = launch(
        &env,
        true,
        &[
            "--vm",
            "no-such-vm",
            "--dry-run",
            "--",
            "qemu-system-x86_64",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-vm"), "{err}");
}
