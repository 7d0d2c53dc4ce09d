//! qemu fw_cfg: `-fw_cfg name=opt/io.systemd.credentials/NAME,file=F`.
//! Works on every qemu machine type, `microvm` included (which has no
//! SMBIOS); the file holds the raw value and lives in the private runtime
//! directory, so no value reaches the command line.

use super::super::{Build, Carrier, LaunchError, Payload};
use super::qemu_opt_with_path;
use crate::launch::runtime_dir::file_name_part;

/// The fw_cfg name prefix systemd imports credentials from.
pub const PREFIX: &str = "opt/io.systemd.credentials/";
/// qemu's limit for a fw_cfg file name (FW_CFG_MAX_FILE_PATH 56, NUL
/// included).
pub const MAX_FW_CFG_NAME: usize = 55;
/// What that leaves for a credential name.
pub const MAX_NAME: usize = MAX_FW_CFG_NAME - PREFIX.len();

/// Refuses a name that does not fit a fw_cfg file name.
pub fn check_name(vm: &str, name: &str) -> Result<(), LaunchError> {
    if name.len() > MAX_NAME {
        return Err(LaunchError::FwCfgNameTooLong {
            vm: vm.to_string(),
            name: name.to_string(),
            len: name.len(),
            max: MAX_NAME,
        });
    }
    Ok(())
}

/// Writes one file per payload and appends `-fw_cfg name=...,file=...`.
pub(crate) fn qemu_add(build: &mut Build<'_>, payloads: &[&Payload]) -> Result<(), LaunchError> {
    for p in payloads {
        check_name(&build.input.vm, &p.name)?;
        let index = build.files.len();
        let file = format!("{index:02}-{}.fw_cfg", file_name_part(&p.name));
        let path = build.write_file(&file, &p.value, Carrier::FwCfg, &p.name)?;
        // Names never contain ',' (refused for boot credentials).
        let opt = qemu_opt_with_path(&format!("name={PREFIX}{},file=", p.name), &path);
        build.push_public(&["-fw_cfg".into(), opt]);
    }
    Ok(())
}
