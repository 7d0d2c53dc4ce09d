//! The command line, shared by the two binaries: `vmcred-host-agent` (the
//! full agent, clap's parse of [`args::Cli`]) and `vmcred-host` (the small
//! front that runs `rotate` and `status` itself and execs the agent for
//! everything else, see ARCHITECTURE.md "Binaries"). Both run `rotate` and
//! `status` through [`rotate`] and [`status`] and print through [`report`],
//! so their output and exit codes are the same code, not a copy.

pub mod args;
pub mod front;
pub mod report;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use crate::client;
use crate::config::load_control_socket;
use crate::control::{Reply, Request};

pub use args::{RotateArgs, StatusArgs};
use report::Exit;

/// How a command's error is shown, and its exit code: the cause chain on
/// one line (each error carries its cause once, see config::ConfigError).
pub fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("vmcred-host: {e:#}");
    Exit::of_error(e).into()
}

/// `vmcred-host rotate`.
pub fn rotate(config: &Path, a: RotateArgs) -> Result<ExitCode> {
    let RotateArgs {
        timeout,
        json,
        vms,
        all,
        args,
    } = a;
    // Only the socket is read from the config: the daemon checks the
    // names, so a single-VM rotate costs the same whatever the number of
    // VMs configured.
    let socket = load_control_socket(config)?;
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
    let end = client::call(
        &socket,
        &req,
        timeout.saturating_add(Duration::from_secs(5)),
        |item| out.item(item),
    )?;
    if let Reply::Unknown(e) = end {
        return Ok(report::unknown_name(&e));
    }
    Ok(out.finish(end).into())
}

/// `vmcred-host status`.
pub fn status(config: &Path, a: StatusArgs) -> Result<ExitCode> {
    let StatusArgs { json, vms } = a;
    let socket = load_control_socket(config)?;
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
