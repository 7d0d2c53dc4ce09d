//! alioth: AF_VSOCK by CID (`--vsock vhost,cid=N`); the only carrier is
//! the kernel command line, `-c`/`--cmdline` (its CPU count is
//! `--num-cpu`), after the `run` subcommand.

use super::CmdlineOnly;
use crate::launch::Hypervisor;

pub(super) const SPEC: CmdlineOnly = CmdlineOnly {
    hypervisor: Hypervisor::Alioth,
    names: &["-c", "--cmdline"],
    example: "alioth run --memory size=MEM --num-cpu CPUS -k KERNEL -i INITRD -c CMDLINE ...",
};
