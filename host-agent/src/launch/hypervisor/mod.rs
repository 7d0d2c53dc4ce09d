//! One adapter per hypervisor, in the shape of microvm.nix's
//! `lib/runners/<hypervisor>.nix`: each knows its hypervisor's argv (where
//! the kernel command line is, what a carrier looks like there) and which
//! carriers it offers. `check` refuses what cannot work before any secret
//! is read; `apply` rewrites the argv.

mod alioth;
mod cloud_hypervisor;
mod crosvm;
mod firecracker;
mod kvmtool;
mod qemu;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

pub use qemu::{carriers_for_machine, MachineCarrier};

use super::carrier::cmdline::{self, ValueAt};
use super::{Build, Carrier, Hypervisor, LaunchError, LaunchInput, Payload};

/// Refuses, before any value is read, an argv or a carrier this
/// hypervisor cannot do, and boot secrets it would have to expose.
pub(crate) fn check(input: &LaunchInput) -> Result<(), LaunchError> {
    match input.hypervisor {
        Hypervisor::Qemu => qemu::check(input),
        Hypervisor::CloudHypervisor => cloud_hypervisor::check(input),
        Hypervisor::Firecracker => firecracker::check(input),
        Hypervisor::Crosvm => cmdline_only_check(input, &crosvm::SPEC),
        Hypervisor::Kvmtool => cmdline_only_check(input, &kvmtool::SPEC),
        Hypervisor::Alioth => cmdline_only_check(input, &alioth::SPEC),
    }
}

/// Passes `payloads` (the bootstrap first) through the chosen carriers.
pub(crate) fn apply(build: &mut Build<'_>, payloads: &[Payload]) -> Result<(), LaunchError> {
    match build.input.hypervisor {
        Hypervisor::Qemu => qemu::apply(build, payloads),
        Hypervisor::CloudHypervisor => cloud_hypervisor::apply(build, payloads),
        Hypervisor::Firecracker => firecracker::apply(build, payloads),
        Hypervisor::Crosvm => cmdline_only_apply(build, payloads, &crosvm::SPEC),
        Hypervisor::Kvmtool => cmdline_only_apply(build, payloads, &kvmtool::SPEC),
        Hypervisor::Alioth => cmdline_only_apply(build, payloads, &alioth::SPEC),
    }
}

/// An error for a `--carrier` the hypervisor cannot do.
fn unsupported(
    hypervisor: Hypervisor,
    carrier: Carrier,
    detail: String,
    offers: &'static str,
) -> LaunchError {
    LaunchError::CarrierUnsupported {
        hypervisor,
        carrier,
        detail,
        offers,
    }
}

fn bad_argv(hypervisor: Hypervisor, problem: String) -> LaunchError {
    LaunchError::BadArgv {
        hypervisor,
        problem,
    }
}

/// Every place in `argv[from..]` where one of `names` is given with its
/// value: `NAME VALUE`, or `--long=VALUE` for a long name. A name at the
/// end without a value is an error naming it.
pub(crate) fn find_option(
    hypervisor: Hypervisor,
    argv: &[OsString],
    from: usize,
    names: &[&str],
) -> Result<Vec<ValueAt>, LaunchError> {
    let mut found = Vec::new();
    let mut i = from;
    while i < argv.len() {
        let arg = argv[i].as_bytes();
        if names.iter().any(|n| arg == n.as_bytes()) {
            if i + 1 >= argv.len() {
                return Err(bad_argv(
                    hypervisor,
                    format!("{} has no value", argv[i].to_string_lossy()),
                ));
            }
            found.push(ValueAt::Separate(i + 1));
            i += 2;
            continue;
        }
        if let Some(n) = names.iter().find(|n| {
            n.starts_with("--")
                && arg.len() > n.len()
                && arg.starts_with(n.as_bytes())
                && arg[n.len()] == b'='
        }) {
            found.push(ValueAt::Inline(i, n.len() + 1));
        }
        i += 1;
    }
    Ok(found)
}

/// The one occurrence of an option that may be given at most once.
pub(crate) fn find_once(
    hypervisor: Hypervisor,
    argv: &[OsString],
    from: usize,
    names: &[&str],
) -> Result<Option<ValueAt>, LaunchError> {
    let found = find_option(hypervisor, argv, from, names)?;
    if found.len() > 1 {
        return Err(bad_argv(
            hypervisor,
            format!(
                "{} is given {} times; vmcred merges into the one value {hypervisor} uses: give it once",
                names.join("/"),
                found.len()
            ),
        ));
    }
    Ok(found.first().copied())
}

/// The value at `at`, as text.
pub(crate) fn value_at(argv: &[OsString], at: ValueAt) -> Option<&str> {
    match at {
        ValueAt::Separate(i) => argv[i].to_str(),
        ValueAt::Inline(i, n) => argv[i].to_str().and_then(|s| s.get(n..)),
    }
}

/// What a hypervisor with only a kernel command line looks like: a
/// subcommand that starts the VM, then options, one of which is the
/// command line.
pub(crate) struct CmdlineOnly {
    pub hypervisor: Hypervisor,
    /// The subcommand that starts a VM, and its aliases.
    pub subcommands: &'static [&'static str],
    /// The option names of the kernel command line, short first.
    pub names: &'static [&'static str],
    /// How microvm.nix's runner invokes it, for error messages.
    pub example: &'static str,
}

/// The index of the subcommand that starts the VM (`run`).
fn run_subcommand(argv: &[OsString], spec: &CmdlineOnly) -> Result<usize, LaunchError> {
    argv.iter()
        .skip(1)
        .position(|a| {
            spec.subcommands
                .iter()
                .any(|s| a.as_bytes() == s.as_bytes())
        })
        .map(|i| i + 1)
        .ok_or_else(|| {
            bad_argv(
                spec.hypervisor,
                format!(
                    "no `{}` subcommand: expected `{}` (as microvm.nix's runner passes it)",
                    spec.subcommands.join("` or `"),
                    spec.example
                ),
            )
        })
}

fn cmdline_only_check(input: &LaunchInput, spec: &CmdlineOnly) -> Result<(), LaunchError> {
    if let Some(c) = input.carrier.forced().filter(|c| *c != Carrier::Cmdline) {
        return Err(unsupported(
            spec.hypervisor,
            c,
            String::new(),
            "only the kernel command line (--carrier cmdline)",
        ));
    }
    let run = run_subcommand(&input.argv, spec)?;
    if let Some(at) = find_once(spec.hypervisor, &input.argv, run + 1, spec.names)? {
        if value_at(&input.argv, at).is_none() {
            return Err(bad_argv(
                spec.hypervisor,
                format!(
                    "the kernel command line ({}) is not UTF-8 text",
                    spec.names[0]
                ),
            ));
        }
    }
    cmdline::refuse_unallowed(input, cmdline::exposure(spec.hypervisor))
}

fn cmdline_only_apply(
    build: &mut Build<'_>,
    payloads: &[Payload],
    spec: &CmdlineOnly,
) -> Result<(), LaunchError> {
    let run = run_subcommand(&build.argv, spec)?;
    let at = find_once(spec.hypervisor, &build.argv, run + 1, spec.names)?;
    let all: Vec<&Payload> = payloads.iter().collect();
    // A new option goes right after `run`: options after a positional
    // (crosvm's kernel path) are not read by every parser.
    cmdline::apply_to_argv(build, at, spec.names[0], run + 1, &all)
}
