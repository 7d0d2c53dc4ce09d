//! What several of the host agent's integration tests share.

use std::path::{Path, PathBuf};

/// Writes `DIR/host.toml`: state, control and launch sockets in `DIR`,
/// `extra` top-level lines (e.g. `dial_backoff_max = "100ms"\n`), and one
/// VM, `vm0`, whose socket nothing listens on, so `serve` runs and keeps
/// redialling without a guest. Returns the file's path.
pub fn config_with_unreachable_vm(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ncontrol_socket = \"{}\"\nlaunch_socket = \"{}\"\n{extra}[vms.vm0]\nunix_socket = \"{}\"\n",
            dir.join("state").display(),
            dir.join("control.sock").display(),
            dir.join("launch.sock").display(),
            dir.join("nothing.sock").display(),
        ),
    )
    .expect("write host.toml");
    config
}
