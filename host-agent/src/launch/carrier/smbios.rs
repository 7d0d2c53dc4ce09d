//! SMBIOS type 11 OEM strings (`io.systemd.credential:NAME=VALUE`), which
//! systemd's PID 1 imports at boot.
//!
//! - qemu reads each OEM string from a file (`-smbios type=11,path=FILE`),
//!   so no value reaches its command line; only machine types that build
//!   SMBIOS tables (`pc`, `q35`) have them.
//! - cloud-hypervisor takes OEM strings only on its command line, inside
//!   its one `--platform ...,oem_strings=[a,b]`, which also holds
//!   microvm.nix's own strings (`vmm.notify_socket`): merged, never added.
//!
//! Secret values use systemd's binary form
//! (`io.systemd.credential.binary:NAME=<base64>`), which carries any bytes
//! and never contains `,`, `[`, `]`, `"` or white space, so it survives
//! both hypervisors' option syntax.

use base64::Engine as _;
use zeroize::Zeroizing;

use super::super::{Build, Carrier, Hypervisor, LaunchError, Payload};
use super::qemu_opt_with_path;
use crate::launch::runtime_dir::file_name_part;

/// Prefix of a text credential in an SMBIOS OEM string.
pub const TEXT_PREFIX: &str = "io.systemd.credential:";
/// Prefix of a base64-encoded credential in an SMBIOS OEM string.
pub const BINARY_PREFIX: &str = "io.systemd.credential.binary:";

/// The OEM string for a payload: the public bootstrap as text (readable in
/// `dmidecode`), a secret in the binary form.
pub(crate) fn oem_string(p: &Payload) -> Zeroizing<String> {
    if !p.secret {
        let mut text = Zeroizing::new(String::with_capacity(
            TEXT_PREFIX.len() + p.name.len() + 1 + p.value.len(),
        ));
        text.push_str(TEXT_PREFIX);
        text.push_str(&p.name);
        text.push('=');
        text.push_str(&String::from_utf8_lossy(&p.value));
        return text;
    }
    // One allocation, so that no unwiped copy of the value is left behind.
    let b64_len = p.value.len().div_ceil(3) * 4;
    let mut text = Zeroizing::new(String::with_capacity(
        BINARY_PREFIX.len() + p.name.len() + 1 + b64_len,
    ));
    text.push_str(BINARY_PREFIX);
    text.push_str(&p.name);
    text.push('=');
    base64::engine::general_purpose::STANDARD.encode_string(&p.value[..], &mut text);
    text
}

/// The OEM string as shown by `--dry-run`: a secret's value redacted.
pub(crate) fn shown_oem_string(p: &Payload) -> String {
    if p.secret {
        format!("{BINARY_PREFIX}{}=<redacted>", p.name)
    } else {
        oem_string(p).to_string()
    }
}

/// The credential name an OEM string defines, if it is a systemd one.
pub fn credential_name(entry: &str) -> Option<&str> {
    let entry = entry.trim_start();
    let rest = entry
        .strip_prefix(BINARY_PREFIX)
        .or_else(|| entry.strip_prefix(TEXT_PREFIX))?;
    Some(rest.split('=').next().unwrap_or(rest))
}

/// qemu: writes one file per payload into the private runtime directory
/// and appends `-smbios type=11,path=FILE` for each.
pub(crate) fn qemu_add(build: &mut Build<'_>, payloads: &[&Payload]) -> Result<(), LaunchError> {
    for p in payloads {
        let index = build.files.len();
        let file = format!("{index:02}-{}.smbios", file_name_part(&p.name));
        let text = oem_string(p);
        let path = build.write_file(&file, text.as_bytes(), Carrier::Smbios, &p.name)?;
        let opt = qemu_opt_with_path("type=11,path=", &path);
        build.push_public(&["-smbios".into(), opt]);
    }
    Ok(())
}

fn bad(problem: &str) -> LaunchError {
    LaunchError::BadArgv {
        hypervisor: Hypervisor::CloudHypervisor,
        problem: problem.to_string(),
    }
}

/// Splits an option value on commas outside brackets and quotes, as
/// cloud-hypervisor's option parser does; each piece keeps its text.
fn split_ch_top_level(value: &str) -> Result<Vec<&str>, LaunchError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad("the --platform value has an unmatched ']'"));
                }
            }
            '"' => quoted = !quoted,
            ',' if depth == 0 && !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || quoted {
        return Err(bad("the --platform value has an unmatched '[' or '\"'"));
    }
    out.push(&value[start..]);
    Ok(out)
}

/// The new `--platform` value: `value` with `ours` appended to its
/// `oem_strings=[...]` (added if missing). Other keys keep their text;
/// existing OEM strings keep their order, as cloud-hypervisor reads them.
/// Refuses an existing OEM string that defines one of `names`.
pub fn merge_platform(value: &str, ours: &[&str], names: &[&str]) -> Result<String, LaunchError> {
    let items = split_ch_top_level(value)?;
    let is_oem = |item: &&str| {
        let unquoted: String = item.chars().filter(|c| *c != '"').collect();
        unquoted.split('=').next() == Some("oem_strings")
    };
    if items.iter().filter(|i| is_oem(i)).count() > 1 {
        return Err(bad("the --platform value has oem_strings more than once"));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len() + 1);
    let mut merged = false;
    for item in items {
        if !is_oem(&item) {
            out.push(item.to_string());
            continue;
        }
        // What cloud-hypervisor does: drop quotes, take what follows the
        // first '=', trim, strip brackets, split on ','.
        let unquoted: String = item.chars().filter(|c| *c != '"').collect();
        let list = unquoted
            .split_once('=')
            .map(|(_, v)| v)
            .unwrap_or_default()
            .trim()
            .trim_matches(|c| c == '[' || c == ']');
        let mut entries: Vec<&str> = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',').collect()
        };
        for e in &entries {
            if let Some(name) = credential_name(e) {
                if names.contains(&name) {
                    return Err(LaunchError::AlreadyDefined {
                        hypervisor: Hypervisor::CloudHypervisor,
                        name: name.to_string(),
                        place: "in --platform oem_strings=[...]",
                    });
                }
            }
        }
        entries.extend_from_slice(ours);
        out.push(format!("oem_strings=[{}]", entries.join(",")));
        merged = true;
    }
    if !merged && !ours.is_empty() {
        out.push(format!("oem_strings=[{}]", ours.join(",")));
    }
    Ok(out.join(","))
}
