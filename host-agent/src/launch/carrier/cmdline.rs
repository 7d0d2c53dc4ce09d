//! The kernel command line: `"systemd.set_credential=NAME:VALUE"`.
//!
//! Every hypervisor has exactly one kernel command line (qemu `-append`,
//! cloud-hypervisor `--cmdline`, crosvm and kvmtool `-p`, alioth `-c`,
//! firecracker `boot-source.boot_args`), so the parameter is merged into
//! the value already there, never added as a second option.
//!
//! The parameter is quoted as a whole: the bootstrap holds spaces, and an
//! unquoted value is cut at the first one. Measured in real guests, this
//! text form works on systemd 252, 257 and 262, while
//! `systemd.set_credential_binary=` is ignored by 252. The command line is
//! readable by every process in the guest (`/proc/cmdline`), and the guest
//! kernel logs it at boot (`Kernel command line: …`, notice level): into
//! its ring buffer and the guest journal, and onto its console when the
//! console log level lets notices through (Linux's default 7 does; `quiet`
//! or `loglevel=5` and below do not). microvm.nix sends the serial console
//! to the hypervisor's stdout, that is the host journal of `microvm@<vm>`.
//! Public data only, unless the user marked a credential
//! `allow_on_command_line`.

use std::ffi::OsString;

use zeroize::Zeroizing;

use super::super::{Build, Hypervisor, LaunchError, Payload};

/// The parameter systemd reads a text credential from.
pub const PARAM: &str = "systemd.set_credential=";
/// The binary form (systemd >= 253), recognised in existing command lines.
const BINARY_PARAM: &str = "systemd.set_credential_binary=";
/// The kernel's COMMAND_LINE_SIZE on x86-64 and arm64 (2048) minus the
/// terminating NUL: what is longer is cut silently.
pub const MAX_LEN: usize = 2047;

/// Why a value cannot be a quoted kernel parameter, if it cannot.
fn unsafe_because(value: &[u8]) -> Option<&'static str> {
    if std::str::from_utf8(value).is_err() {
        return Some("its value is not UTF-8 text");
    }
    if value.contains(&b'"') {
        return Some("its value contains a double quote, which would end the quoted parameter");
    }
    if value.iter().any(|b| b.is_ascii_control()) {
        return Some("its value contains a control character (a newline, say)");
    }
    None
}

/// `"systemd.set_credential=NAME:VALUE"`, or why the value cannot be one.
fn param(vm: &str, p: &Payload) -> Result<Zeroizing<String>, LaunchError> {
    if let Some(why) = unsafe_because(&p.value) {
        return Err(LaunchError::NotCommandLineSafe {
            vm: vm.to_string(),
            name: p.name.clone(),
            why,
        });
    }
    let mut text = Zeroizing::new(String::with_capacity(
        PARAM.len() + p.name.len() + p.value.len() + 3,
    ));
    text.push('"');
    text.push_str(PARAM);
    text.push_str(&p.name);
    text.push(':');
    text.push_str(&String::from_utf8_lossy(&p.value));
    text.push('"');
    Ok(text)
}

/// The parameter as `--dry-run` shows it.
fn shown_param(p: &Payload) -> String {
    if p.secret {
        format!("\"{PARAM}{}:<redacted>\"", p.name)
    } else {
        format!(
            "\"{PARAM}{}:{}\"",
            p.name,
            String::from_utf8_lossy(&p.value)
        )
    }
}

/// The words systemd's PID 1 reads from a kernel command line, as its
/// `proc_cmdline_parse` splits `/proc/cmdline` (`extract_first_word` with
/// `EXTRACT_UNQUOTE|EXTRACT_RELAX|EXTRACT_RETAIN_ESCAPE`): white space
/// separates words; a `'` or `"` anywhere in a word opens a quote that
/// the same character closes, both removed, white space inside kept; an
/// unclosed quote runs to the end; a backslash is an ordinary character.
fn systemd_words(cmdline: &str) -> Vec<Zeroizing<String>> {
    let mut words = Vec::new();
    let mut word: Option<Zeroizing<String>> = None;
    let mut quote: Option<char> = None;
    for c in cmdline.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.get_or_insert_with(Default::default).push(c),
            None if matches!(c, ' ' | '\t' | '\n' | '\r') => words.extend(word.take()),
            None => {
                let w = word.get_or_insert_with(Default::default);
                if c == '\'' || c == '"' {
                    quote = Some(c);
                } else {
                    w.push(c);
                }
            }
        }
    }
    words.extend(word);
    words
}

/// systemd's `proc_cmdline_key_streq`: keys are equal when they differ
/// only in `-` against `_`.
fn key_eq(key: &str, want: &str) -> bool {
    key.len() == want.len()
        && key
            .bytes()
            .zip(want.bytes())
            .all(|(a, b)| a == b || (matches!(a, b'-' | b'_') && matches!(b, b'-' | b'_')))
}

/// The credential names a kernel command line sets, read as systemd reads
/// them: every word whose key is `systemd.set_credential` or
/// `systemd.set_credential_binary` (`-` and `_` alike, quotes removed),
/// the name being its value up to the first `:` (a word without one is
/// ignored by systemd too). `rd.` forms are not credentials: systemd
/// parses the command line for them without stripping that prefix.
pub fn defined_names(cmdline: &str) -> Vec<String> {
    systemd_words(cmdline)
        .iter()
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            let is_credential = key_eq(key, &PARAM[..PARAM.len() - 1])
                || key_eq(key, &BINARY_PARAM[..BINARY_PARAM.len() - 1]);
            if !is_credential {
                return None;
            }
            let (name, _) = value.split_once(':')?;
            Some(name.to_string())
        })
        .collect()
}

/// `existing` with `params` appended, one space apart.
fn join(existing: &str, params: &[&str]) -> String {
    let base = existing.trim_end();
    let mut out =
        String::with_capacity(base.len() + params.iter().map(|p| p.len() + 1).sum::<usize>());
    out.push_str(base);
    for p in params {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(p);
    }
    out
}

/// The merged command line, real and as shown, for `payloads` added to
/// `existing`. Refuses a name `existing` already sets, a value that cannot
/// be quoted, and a result the kernel would cut. Warns about secrets.
pub(crate) fn merge(
    build: &mut Build<'_>,
    existing: &str,
    payloads: &[&Payload],
    on_host_argv: bool,
) -> Result<(Zeroizing<String>, String), LaunchError> {
    let hypervisor = build.input.hypervisor;
    let already = defined_names(existing);
    for p in payloads {
        if already.contains(&p.name) {
            return Err(LaunchError::AlreadyDefined {
                hypervisor,
                name: p.name.clone(),
                place: "on the kernel command line",
            });
        }
    }
    let mut real_params = Vec::with_capacity(payloads.len());
    for p in payloads {
        real_params.push(param(&build.input.vm, p)?);
    }
    let real_refs: Vec<&str> = real_params.iter().map(|s| s.as_str()).collect();
    let real = Zeroizing::new(join(existing, &real_refs));
    if real.len() > MAX_LEN {
        return Err(LaunchError::CommandLineTooLong {
            hypervisor,
            len: real.len(),
            max: MAX_LEN,
        });
    }
    let shown_params: Vec<String> = payloads.iter().map(|p| shown_param(p)).collect();
    let shown_refs: Vec<&str> = shown_params.iter().map(String::as_str).collect();
    let shown = join(existing, &shown_refs);
    for p in payloads.iter().filter(|p| p.secret) {
        build.warnings.push(format!(
            "credential {} is on the guest's kernel command line, readable by every process in the guest (/proc/cmdline){}, and logged by the guest kernel at boot (\"Kernel command line: ...\", notice level: in the guest's kernel log and journal, and in the host journal of the VM's unit when the guest console prints notices, as Linux's default log level does; microvm.nix sends the console to the hypervisor's output): marked allow_on_command_line",
            p.name,
            if on_host_argv {
                format!(" and by every local user through {hypervisor}'s /proc/PID/cmdline")
            } else {
                String::new()
            }
        ));
        if on_host_argv {
            build.redacted.push(p.name.clone());
        }
    }
    Ok((real, shown))
}

/// Where an argv's kernel command line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueAt {
    /// `argv[i]` is the value (after a separate option).
    Separate(usize),
    /// `argv[i]` is `--option=value`, the value after `prefix` bytes.
    Inline(usize, usize),
}

/// Merges `payloads` into the argv's kernel command line at `at`, or, if
/// there is none, inserts `flag VALUE` at `insert_at`.
pub(crate) fn apply_to_argv(
    build: &mut Build<'_>,
    at: Option<ValueAt>,
    flag: &str,
    insert_at: usize,
    payloads: &[&Payload],
) -> Result<(), LaunchError> {
    let (existing, prefix) = match at {
        Some(ValueAt::Separate(i)) => (build.argv[i].clone(), String::new()),
        Some(ValueAt::Inline(i, n)) => {
            let Some(whole) = build.argv[i].to_str().map(str::to_string) else {
                return Err(build.bad_argv(format!(
                    "the kernel command line ({flag}) is not UTF-8 text"
                )));
            };
            let Some((pfx, value)) = whole.split_at_checked(n) else {
                return Err(build.bad_argv(format!("cannot split {flag}=VALUE")));
            };
            (OsString::from(value), pfx.to_string())
        }
        None => (OsString::new(), String::new()),
    };
    let Some(existing) = existing.to_str().map(str::to_string) else {
        return Err(build.bad_argv(format!(
            "the kernel command line ({flag}) is not UTF-8 text"
        )));
    };
    let (real, shown) = merge(build, &existing, payloads, true)?;
    match at {
        Some(ValueAt::Separate(i)) | Some(ValueAt::Inline(i, _)) => build.set(
            i,
            format!("{prefix}{}", real.as_str()).into(),
            format!("{prefix}{shown}").into(),
        ),
        None => build.insert(
            insert_at,
            vec![flag.into(), real.as_str().into()],
            vec![flag.into(), shown.into()],
        ),
    }
    Ok(())
}

/// `hypervisor` gets a boot credential that is not the bootstrap on the
/// kernel command line only if the user allowed it.
pub(crate) fn refuse_unallowed(
    input: &crate::launch::LaunchInput,
    exposure: &'static str,
) -> Result<(), LaunchError> {
    let Some(refused) = input.not_allowed_on_command_line() else {
        return Ok(());
    };
    Err(LaunchError::KernelCommandLineNotAllowed {
        vm: input.vm.clone(),
        hypervisor: input.hypervisor,
        names: refused.names,
        plural: refused.plural,
        them: refused.them,
        exposure,
    })
}

/// What the kernel command line exposes on `hypervisor`.
pub(crate) fn exposure(hypervisor: Hypervisor) -> &'static str {
    match hypervisor {
        Hypervisor::Firecracker => "which every process in the guest can read and the guest kernel logs at boot (to its console too, and so to the host journal, unless its log level is 5 or lower)",
        _ => "which every process in the guest, and every local user on the host (through the hypervisor's /proc/PID/cmdline), can read, and which the guest kernel logs at boot (to its console too, and so to the host journal, unless its log level is 5 or lower)",
    }
}
