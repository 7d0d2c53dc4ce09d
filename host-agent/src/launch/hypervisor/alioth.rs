//! alioth: AF_VSOCK by CID (`--vsock vhost,cid=N`); the only carrier is
//! the kernel command line, `-c`/`--cmdline` (clap alias `--cmd-line`; its
//! CPUs are `--num-cpu` or `-p`/`--cpu`), after the `boot` subcommand or
//! its alias `run` (which microvm.nix's runner uses).

use super::CmdlineOnly;
use crate::launch::Hypervisor;

pub(super) const SPEC: CmdlineOnly = CmdlineOnly {
    hypervisor: Hypervisor::Alioth,
    subcommands: &["run", "boot"],
    names: &["-c", "--cmdline", "--cmd-line"],
    example: "alioth run --memory size=MEM --num-cpu CPUS -k KERNEL -i INITRD -c CMDLINE ...",
};
