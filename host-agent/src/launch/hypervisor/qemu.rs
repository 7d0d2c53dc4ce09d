//! qemu: AF_VSOCK by CID (`vhost-vsock-*,guest-cid=N`). Boot data goes
//! through private files, by machine type: `-smbios type=11,path=` where the
//! machine builds SMBIOS tables (`pc`, `q35`), `-fw_cfg` where it does not
//! (`microvm`, microvm.nix's default; `virt` booted without firmware). A
//! boot secret always goes through such a file, never the command line;
//! `--carrier cmdline` moves only the bootstrap to `-append`.

use super::{bad_argv, find_once, find_option, unsupported, value_at};
use crate::launch::carrier::{cmdline, fw_cfg, smbios, split_qemu_opts};
use crate::launch::{Build, Carrier, Hypervisor, LaunchError, LaunchInput, Payload};
use vmcred_proto::rules::{BOOTSTRAP_CREDENTIAL, LAUNCH_KEY_CREDENTIAL};

const Q: Hypervisor = Hypervisor::Qemu;
const MACHINE: &[&str] = &["-M", "-machine", "--machine"];
const APPEND: &[&str] = &["-append", "--append"];
const OFFERS: &str = "smbios (machine types pc, q35), fw-cfg (any machine type) and cmdline";

/// The private-file carrier a machine type has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineCarrier {
    /// SMBIOS tables are built (and fw_cfg exists too).
    Smbios,
    /// No SMBIOS tables; fw_cfg only.
    FwCfg,
}

/// The carrier a machine type reads: `None` for a type vmcred does not
/// know.
pub fn carriers_for_machine(machine: &str) -> Option<MachineCarrier> {
    match machine {
        "microvm" => Some(MachineCarrier::FwCfg),
        // Without firmware (microvm.nix boots `-kernel` directly) an arm
        // guest finds no SMBIOS tables; fw_cfg is always there.
        m if m == "virt" || m.starts_with("virt-") => Some(MachineCarrier::FwCfg),
        m if m == "pc" || m == "q35" || m.starts_with("pc-") => Some(MachineCarrier::Smbios),
        _ => None,
    }
}

/// The machine type on the argv (the last `-M`/`-machine` that names one,
/// bare or as `type=`), `None` when none does: qemu's default, `pc`.
fn machine_type(argv: &[std::ffi::OsString]) -> Result<Option<String>, LaunchError> {
    let mut machine = None;
    for at in find_option(Q, argv, 1, MACHINE)? {
        let value = value_at(argv, at)
            .ok_or_else(|| bad_argv(Q, "the -M value is not UTF-8 text".into()))?;
        let opts = split_qemu_opts(value);
        let named = opts.iter().enumerate().find_map(|(i, o)| {
            o.strip_prefix("type=")
                .or_else(|| (i == 0 && !o.contains('=') && !o.is_empty()).then_some(o.as_str()))
        });
        if let Some(t) = named {
            machine = Some(t.to_string());
        }
    }
    Ok(machine)
}

/// Where the bootstrap and the boot secrets go.
struct Plan {
    bootstrap: Carrier,
    secrets: Carrier,
}

fn plan(input: &LaunchInput) -> Result<Plan, LaunchError> {
    let machine = machine_type(&input.argv)?;
    let shown = machine.as_deref().unwrap_or("pc (qemu's default)");
    let auto = match machine.as_deref() {
        None => Ok(Carrier::Smbios),
        Some(m) => match carriers_for_machine(m) {
            Some(MachineCarrier::Smbios) => Ok(Carrier::Smbios),
            Some(MachineCarrier::FwCfg) => Ok(Carrier::FwCfg),
            None => Err(bad_argv(
                Q,
                format!(
                    "machine type {m:?} (-M): vmcred does not know whether it builds SMBIOS tables; pass --carrier fw-cfg (fw_cfg exists on most machine types) or --carrier smbios"
                ),
            )),
        },
    };
    let has_smbios = matches!(auto, Ok(Carrier::Smbios));
    match input.carrier.forced() {
        None => {
            let c = auto?;
            Ok(Plan {
                bootstrap: c,
                secrets: c,
            })
        }
        Some(Carrier::Smbios) => {
            // `microvm` never builds SMBIOS tables; `virt` does when booted
            // through UEFI firmware, which the user may know it is.
            if machine.as_deref() == Some("microvm") {
                return Err(unsupported(
                    Q,
                    Carrier::Smbios,
                    format!(" machine type {shown}, which builds no SMBIOS tables"),
                    OFFERS,
                ));
            }
            Ok(Plan {
                bootstrap: Carrier::Smbios,
                secrets: Carrier::Smbios,
            })
        }
        Some(Carrier::FwCfg) => Ok(Plan {
            bootstrap: Carrier::FwCfg,
            secrets: Carrier::FwCfg,
        }),
        Some(Carrier::Cmdline) => {
            // Secrets (the launch key too) stay in private files; the
            // machine type decides which, and is only needed when there are
            // secrets.
            let secrets = if input.boot_credentials.is_empty() && !input.launch_key.is_required() {
                Carrier::FwCfg
            } else if has_smbios {
                Carrier::Smbios
            } else {
                auto?
            };
            Ok(Plan {
                bootstrap: Carrier::Cmdline,
                secrets,
            })
        }
    }
}

/// Refuses a qemu argv that already passes one of our credentials through
/// `-smbios type=11,value=...` or `-fw_cfg name=opt/io.systemd.credentials/...`.
fn check_existing(input: &LaunchInput, names: &[&str]) -> Result<(), LaunchError> {
    let argv = &input.argv;
    for at in find_option(Q, argv, 1, &["-smbios", "--smbios"])? {
        let value = value_at(argv, at).map(str::to_string).unwrap_or_default();
        let params = split_qemu_opts(&value);
        if !params.iter().any(|p| p == "type=11") {
            continue;
        }
        for p in &params {
            let Some(v) = p.strip_prefix("value=") else {
                continue;
            };
            if let Some(name) = smbios::credential_name(v).filter(|n| names.contains(n)) {
                return Err(LaunchError::AlreadyDefined {
                    hypervisor: Q,
                    name: name.to_string(),
                    place: "in -smbios type=11,value=...",
                });
            }
        }
    }
    for at in find_option(Q, argv, 1, &["-fw_cfg", "--fw_cfg"])? {
        let value = value_at(argv, at).map(str::to_string).unwrap_or_default();
        let params = split_qemu_opts(&value);
        // `-fw_cfg [name=]NAME,file=F`: the name may be implicit.
        let fw_name = params.iter().enumerate().find_map(|(i, p)| {
            p.strip_prefix("name=")
                .or_else(|| (i == 0 && !p.contains('=')).then_some(p.as_str()))
        });
        if let Some(name) = fw_name
            .and_then(|n| n.strip_prefix(fw_cfg::PREFIX))
            .filter(|n| names.contains(n))
        {
            return Err(LaunchError::AlreadyDefined {
                hypervisor: Q,
                name: name.to_string(),
                place: "in -fw_cfg name=opt/io.systemd.credentials/...",
            });
        }
    }
    Ok(())
}

pub(super) fn check(input: &LaunchInput) -> Result<(), LaunchError> {
    let names: Vec<&str> = std::iter::once(BOOTSTRAP_CREDENTIAL)
        .chain(
            input
                .launch_key
                .is_required()
                .then_some(LAUNCH_KEY_CREDENTIAL),
        )
        .chain(input.boot_credentials.iter().map(|c| c.name.as_str()))
        .collect();
    check_existing(input, &names)?;
    let plan = plan(input)?;
    if plan.secrets == Carrier::FwCfg {
        for c in &input.boot_credentials {
            fw_cfg::check_name(&input.vm, &c.name)?;
        }
    }
    // Whatever the carrier, a name the kernel command line already sets
    // would shadow (or be shadowed by) ours.
    if let Some(at) = find_once(Q, &input.argv, 1, APPEND)? {
        let text = value_at(&input.argv, at)
            .ok_or_else(|| bad_argv(Q, "the -append value is not UTF-8 text".into()))?;
        if let Some(name) = cmdline::defined_names(text)
            .into_iter()
            .find(|n| names.contains(&n.as_str()))
        {
            return Err(LaunchError::AlreadyDefined {
                hypervisor: Q,
                name,
                place: "on the kernel command line (-append)",
            });
        }
    }
    if plan.bootstrap == Carrier::Cmdline
        && find_option(Q, &input.argv, 1, &["-kernel", "--kernel"])?.is_empty()
    {
        return Err(bad_argv(
            Q,
            "--carrier cmdline needs a kernel booted directly (-kernel): qemu takes -append only with -kernel; use --carrier fw-cfg or smbios".into(),
        ));
    }
    Ok(())
}

fn add_files(
    build: &mut Build<'_>,
    carrier: Carrier,
    payloads: &[&Payload],
) -> Result<(), LaunchError> {
    match carrier {
        Carrier::Smbios => smbios::qemu_add(build, payloads),
        Carrier::FwCfg => fw_cfg::qemu_add(build, payloads),
        Carrier::Cmdline => {
            let at = find_once(Q, &build.argv, 1, APPEND)?;
            let end = build.argv.len();
            cmdline::apply_to_argv(build, at, "-append", end, payloads)
        }
    }
}

pub(super) fn apply(build: &mut Build<'_>, payloads: &[Payload]) -> Result<(), LaunchError> {
    let plan = plan(build.input)?;
    let (bootstrap, secrets) = payloads.split_at(1.min(payloads.len()));
    let secrets: Vec<&Payload> = secrets.iter().collect();
    let bootstrap: Vec<&Payload> = bootstrap.iter().collect();
    if plan.bootstrap == plan.secrets {
        let all: Vec<&Payload> = bootstrap.iter().chain(&secrets).copied().collect();
        add_files(build, plan.bootstrap, &all)
    } else {
        add_files(build, plan.bootstrap, &bootstrap)?;
        add_files(build, plan.secrets, &secrets)
    }
}
