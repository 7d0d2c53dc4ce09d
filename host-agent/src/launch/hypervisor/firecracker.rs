//! firecracker: hybrid vsock (`vsock.uds_path` in its config, microvm.nix's
//! `notify.vsock`: nothing to change). Its kernel command line is
//! `boot-source.boot_args` in the JSON file given with `--config-file`: a
//! private copy (0400, in the runtime directory) gets the bootstrap, every
//! other field is kept, and the argv points at the copy. The original file
//! is not touched.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use super::{bad_argv, find_once, value_at};
use crate::launch::carrier::cmdline::{self, ValueAt};
use crate::launch::{Build, Carrier, Hypervisor, LaunchError, LaunchInput, Payload};

const FC: Hypervisor = Hypervisor::Firecracker;
const CONFIG_FILE: &[&str] = &["--config-file"];
/// Largest config file read: microvm.nix's are a few KiB.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// The copy's name in the runtime directory.
const COPY_NAME: &str = "config.firecracker.json";

fn config_path(argv: &[std::ffi::OsString]) -> Result<(ValueAt, PathBuf), LaunchError> {
    let at = find_once(FC, argv, 1, CONFIG_FILE)?.ok_or_else(|| {
        bad_argv(
            FC,
            "no --config-file PATH: vmcred passes the bootstrap in boot-source.boot_args of firecracker's JSON config (microvm.nix's runner always gives one); start firecracker with --config-file".into(),
        )
    })?;
    let path = match at {
        ValueAt::Separate(i) => PathBuf::from(&argv[i]),
        ValueAt::Inline(..) => PathBuf::from(
            value_at(argv, at)
                .ok_or_else(|| bad_argv(FC, "the --config-file path is not UTF-8".into()))?,
        ),
    };
    Ok((at, path))
}

pub(super) fn check(input: &LaunchInput) -> Result<(), LaunchError> {
    if let Some(c) = input.carrier.forced().filter(|c| *c != Carrier::Cmdline) {
        return Err(super::unsupported(
            FC,
            c,
            String::new(),
            "only the kernel command line (boot-source.boot_args; --carrier cmdline)",
        ));
    }
    config_path(&input.argv)?;
    cmdline::refuse_unallowed(input, cmdline::exposure(FC))
}

/// Reads and parses the config: a regular file (no FIFO wait), bounded.
fn read_config(path: &Path) -> Result<Value, LaunchError> {
    let fail = |problem: String| LaunchError::FirecrackerConfig {
        path: path.to_path_buf(),
        problem,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| fail(format!("cannot open: {e}")))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    let mut raw = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if raw.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "is larger than {MAX_CONFIG_BYTES} bytes; not a firecracker config"
        )));
    }
    serde_json::from_slice(&raw).map_err(|e| fail(format!("is not valid JSON: {e}")))
}

pub(super) fn apply(build: &mut Build<'_>, payloads: &[Payload]) -> Result<(), LaunchError> {
    let (at, path) = config_path(&build.argv)?;
    let mut config = read_config(&path)?;
    let fail = |problem: &str| LaunchError::FirecrackerConfig {
        path: path.clone(),
        problem: problem.to_string(),
    };
    let existing = config
        .get("boot-source")
        .ok_or_else(|| fail("has no \"boot-source\" object; firecracker needs one to boot a kernel"))?
        .get("boot_args")
        .ok_or_else(|| fail("has no boot-source.boot_args: firecracker would use its built-in default command line, which vmcred cannot extend without replacing it; set boot_args explicitly"))?
        .as_str()
        .ok_or_else(|| fail("boot-source.boot_args is not a string"))?
        .to_string();
    let all: Vec<&Payload> = payloads.iter().collect();
    let (merged, _shown) = cmdline::merge(build, &existing, &all, false)?;
    let slot = config
        .get_mut("boot-source")
        .and_then(|b| b.get_mut("boot_args"))
        .ok_or_else(|| fail("boot-source.boot_args vanished"))?;
    *slot = Value::String(merged.to_string());
    // Reserved up front so that serialising does not reallocate (and leave
    // unwiped copies of an allowed secret behind).
    let mut text = Zeroizing::new(Vec::with_capacity(
        (existing.len() + merged.len()) * 2 + 64 * 1024,
    ));
    let written = serde_json::to_writer_pretty(&mut *text, &config);
    if let Some(Value::String(s)) = config
        .get_mut("boot-source")
        .and_then(|b| b.get_mut("boot_args"))
    {
        s.zeroize();
    }
    written.map_err(|e| fail(&format!("cannot encode the copy: {e}")))?;
    let copy = build.write_file(COPY_NAME, &text, Carrier::Cmdline, "firecracker-config")?;
    match at {
        ValueAt::Separate(i) => build.set(i, copy.clone().into(), copy.into()),
        ValueAt::Inline(i, _) => {
            let mut arg = std::ffi::OsString::from("--config-file=");
            arg.push(&copy);
            build.set(i, arg.clone(), arg);
        }
    }
    Ok(())
}
