//! Footprint of a running agent, read from `/proc/PID/status` the way an
//! operator would check it: resident memory and thread count. Shared by the
//! `footprint` test and any benchmark that wants the same figures.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::World;

/// The figures of one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcFootprint {
    /// `VmRSS`: resident memory, KiB.
    pub rss_kib: u64,
    /// `RssFile`: the part of `VmRSS` that is mapped files (mostly the
    /// binary itself), KiB.
    pub rss_file_kib: u64,
    /// `RssAnon`: heap, stacks and other anonymous memory, KiB.
    pub rss_anon_kib: u64,
    /// `Threads`.
    pub threads: u64,
}

impl ProcFootprint {
    /// Reads `/proc/<pid>/status`.
    pub fn of_pid(pid: u32) -> Result<ProcFootprint> {
        Self::parse(
            &std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("cannot read /proc/{pid}/status"))?,
        )
    }

    /// Parses the text of a `/proc/PID/status` file.
    pub fn parse(status: &str) -> Result<ProcFootprint> {
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .with_context(|| format!("no {name} line in /proc/PID/status"))?;
            let num = line.split_whitespace().next().unwrap_or_default();
            num.parse()
                .with_context(|| format!("{name} is not a number: {line:?}"))
        };
        Ok(ProcFootprint {
            rss_kib: field("VmRSS")?,
            rss_file_kib: field("RssFile")?,
            rss_anon_kib: field("RssAnon")?,
            threads: field("Threads")?,
        })
    }
}

/// Runs the guest agent from `bin_dir` (with the host agent from the same
/// directory) behind the hybrid-vsock muxer stand-in with one credential,
/// waits until it is synced, rotates once, lets it settle connected and
/// idle for `settle`, and returns its footprint. The guest binary's size
/// on disk comes along for the report.
pub fn idle_guest(bin_dir: &Path, settle: Duration) -> Result<(ProcFootprint, u64)> {
    std::env::set_var("VMCRED_BIN_DIR", bin_dir);
    let mut w = World::new()?;
    w.log_level = "info".into();
    let vm = "vm1";
    w.add_vm(vm, false)?;
    w.set_secret(vm, "API_KEY", b"footprint-v1", false)?;
    w.start_host()?;
    w.boot_guest(vm)?;
    let wait = Duration::from_secs(30);
    w.wait_for_guest_value(vm, "API_KEY", b"footprint-v1", wait)?;
    w.set_secret(vm, "API_KEY", b"footprint-v2", false)?;
    let out = w.rotate(vm, &["API_KEY"], "20s")?;
    if !out.status.success() {
        bail!("rotate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    w.wait_for_guest_value(vm, "API_KEY", b"footprint-v2", wait)?;
    std::thread::sleep(settle);
    let g = w.guests.get(vm).context("no such VM")?;
    let pid = g.child.as_ref().context("guest agent not running")?.id();
    let fp = ProcFootprint::of_pid(pid)?;
    let size = std::fs::metadata(&w.bins.guest)?.len();
    Ok((fp, size))
}

/// Voluntary and involuntary context switches (`/proc/PID/task/*/status`)
/// of those threads of `pid` whose name (`comm`) `keep` accepts; a thread
/// that ends while being read counts as none.
pub fn context_switches(pid: i32, keep: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut n = 0;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !keep(comm.trim()) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let s = "Name:\tx\nVmRSS:\t   3120 kB\nRssAnon:\t     800 kB\nRssFile:\t    2320 kB\nThreads:\t1\n";
        let f = ProcFootprint::parse(s).unwrap();
        assert_eq!(
            f,
            ProcFootprint {
                rss_kib: 3120,
                rss_file_kib: 2320,
                rss_anon_kib: 800,
                threads: 1
            }
        );
        assert!(ProcFootprint::parse("VmRSS: x kB\n").is_err());
    }

    #[test]
    fn reads_own_status() {
        let f = ProcFootprint::of_pid(std::process::id()).unwrap();
        assert!(f.rss_kib > 0 && f.threads >= 1);
    }
}
