//! kvmtool (`lkvm`): AF_VSOCK by CID (`--vsock CID`); the only carrier is
//! the kernel command line, `-p`/`--params`, after the `run` subcommand.

use super::CmdlineOnly;
use crate::launch::Hypervisor;

pub(super) const SPEC: CmdlineOnly = CmdlineOnly {
    hypervisor: Hypervisor::Kvmtool,
    subcommands: &["run"],
    names: &["-p", "--params"],
    example: "lkvm run --name NAME -m MEM -c CPUS -k KERNEL -i INITRD -p PARAMS ...",
};
