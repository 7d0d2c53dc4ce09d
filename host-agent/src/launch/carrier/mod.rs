//! Boot-data carriers: how a credential reaches the guest's PID 1 at boot.
//! One file per carrier; the hypervisor adapters pick which.

pub mod cmdline;
pub mod fw_cfg;
pub mod smbios;

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// `prefix` followed by `path`, with every `,` doubled: qemu splits option
/// strings on `,`, and `,,` is a literal comma.
pub(crate) fn qemu_opt_with_path(prefix: &str, path: &Path) -> OsString {
    let mut opt = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        if b == b',' {
            opt.push(b',');
        }
        opt.push(b);
    }
    OsString::from_vec(opt)
}

/// Splits a qemu option string on `,`, where `,,` is a literal comma.
pub(crate) fn split_qemu_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}
