//! crosvm: AF_VSOCK by CID (`--vsock CID`); the only carrier is the kernel
//! command line, `-p`/`--params`, after the `run` subcommand.

use super::CmdlineOnly;
use crate::launch::Hypervisor;

pub(super) const SPEC: CmdlineOnly = CmdlineOnly {
    hypervisor: Hypervisor::Crosvm,
    subcommands: &["run"],
    names: &["-p", "--params"],
    example: "crosvm run -m MEM -c CPUS -p PARAMS ... KERNEL",
};
