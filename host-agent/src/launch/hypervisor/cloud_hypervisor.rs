//! cloud-hypervisor: hybrid vsock (`--vsock cid=N,socket=PATH`). Boot data
//! goes into its one `--platform ...,oem_strings=[...]` (SMBIOS), merged
//! with what is there (microvm.nix's `vmm.notify_socket`). It has no file
//! form, so a boot secret goes there only when the user allowed it;
//! `--carrier cmdline` moves the bootstrap to `--cmdline`.

use super::{bad_argv, find_once, unsupported, value_at};
use crate::launch::carrier::cmdline::{self, ValueAt};
use crate::launch::carrier::smbios;
use crate::launch::{Build, Carrier, Hypervisor, LaunchError, LaunchInput, Payload};
use vmcred_proto::rules::BOOTSTRAP_CREDENTIAL;

const CH: Hypervisor = Hypervisor::CloudHypervisor;
const PLATFORM: &[&str] = &["--platform"];
const CMDLINE: &[&str] = &["--cmdline"];

/// The one `--platform` and its value.
fn platform(argv: &[std::ffi::OsString]) -> Result<Option<(ValueAt, &str)>, LaunchError> {
    let Some(at) = find_once(CH, argv, 1, PLATFORM)? else {
        return Ok(None);
    };
    let value = value_at(argv, at)
        .ok_or_else(|| bad_argv(CH, "the --platform value is not UTF-8".into()))?;
    Ok(Some((at, value)))
}

fn bootstrap_on_cmdline(input: &LaunchInput) -> Result<bool, LaunchError> {
    match input.carrier.forced() {
        None | Some(Carrier::Smbios) => Ok(false),
        Some(Carrier::Cmdline) => Ok(true),
        Some(c) => Err(unsupported(
            CH,
            c,
            String::new(),
            "smbios (--platform oem_strings) and cmdline (--cmdline)",
        )),
    }
}

pub(super) fn check(input: &LaunchInput) -> Result<(), LaunchError> {
    let on_cmdline = bootstrap_on_cmdline(input)?;
    if let Some(refused) = input.not_allowed_on_command_line() {
        return Err(LaunchError::CommandLineNotAllowed {
            vm: input.vm.clone(),
            names: refused.names,
            plural: refused.plural,
            them: refused.them,
        });
    }
    let names: Vec<&str> = std::iter::once(BOOTSTRAP_CREDENTIAL)
        .chain(input.boot_credentials.iter().map(|c| c.name.as_str()))
        .collect();
    // Parsing checks the existing --platform for duplicates.
    if let Some((_, value)) = platform(&input.argv)? {
        smbios::merge_platform(value, &[], &names)?;
    }
    if let Some(at) = find_once(CH, &input.argv, 1, CMDLINE)? {
        let text = value_at(&input.argv, at)
            .ok_or_else(|| bad_argv(CH, "the --cmdline value is not UTF-8 text".into()))?;
        // Whatever the carrier, a name the kernel command line already sets
        // would shadow (or be shadowed by) ours.
        if let Some(name) = cmdline::defined_names(text)
            .into_iter()
            .find(|n| names.contains(&n.as_str()))
        {
            return Err(LaunchError::AlreadyDefined {
                hypervisor: CH,
                name,
                place: "on the kernel command line (--cmdline)",
            });
        }
    }
    if on_cmdline && find_once(CH, &input.argv, 1, &["--kernel"])?.is_none() {
        return Err(bad_argv(
            CH,
            "--carrier cmdline needs a kernel booted directly (--kernel): with firmware, --cmdline is not read; use the default carrier (--platform oem_strings)".into(),
        ));
    }
    Ok(())
}

/// Merges `payloads` as OEM strings into the one `--platform` (or a new
/// one at the end).
fn merge_into_platform(build: &mut Build<'_>, payloads: &[&Payload]) -> Result<(), LaunchError> {
    if payloads.is_empty() {
        return Ok(());
    }
    let real: Vec<_> = payloads.iter().map(|p| smbios::oem_string(p)).collect();
    let real: Vec<&str> = real.iter().map(|s| s.as_str()).collect();
    let shown: Vec<String> = payloads
        .iter()
        .map(|p| smbios::shown_oem_string(p))
        .collect();
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    let names: Vec<&str> = payloads.iter().map(|p| p.name.as_str()).collect();
    for p in payloads.iter().filter(|p| p.secret) {
        build.warnings.push(format!(
            "credential {} is on cloud-hypervisor's command line, readable by every local user via /proc/PID/cmdline: marked allow_on_command_line",
            p.name
        ));
        build.redacted.push(p.name.clone());
    }
    match platform(&build.argv)? {
        Some((at, value)) => {
            let value = value.to_string();
            let new_real = smbios::merge_platform(&value, &real, &names)?;
            let new_shown = smbios::merge_platform(&value, &shown, &names)?;
            match at {
                ValueAt::Separate(i) => build.set(i, new_real.into(), new_shown.into()),
                ValueAt::Inline(i, _) => build.set(
                    i,
                    format!("--platform={new_real}").into(),
                    format!("--platform={new_shown}").into(),
                ),
            }
        }
        None => {
            let new_real = smbios::merge_platform("", &real, &names)?;
            let new_shown = smbios::merge_platform("", &shown, &names)?;
            let end = build.argv.len();
            build.insert(
                end,
                vec!["--platform".into(), new_real.into()],
                vec!["--platform".into(), new_shown.into()],
            );
        }
    }
    Ok(())
}

pub(super) fn apply(build: &mut Build<'_>, payloads: &[Payload]) -> Result<(), LaunchError> {
    let on_cmdline = bootstrap_on_cmdline(build.input)?;
    let all: Vec<&Payload> = payloads.iter().collect();
    if on_cmdline {
        let (bootstrap, secrets) = all.split_at(1.min(all.len()));
        let at = find_once(CH, &build.argv, 1, CMDLINE)?;
        let end = build.argv.len();
        cmdline::apply_to_argv(build, at, "--cmdline", end, bootstrap)?;
        merge_into_platform(build, secrets)
    } else {
        merge_into_platform(build, &all)
    }
}
