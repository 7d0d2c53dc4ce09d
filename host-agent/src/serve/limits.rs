//! Resource limits of the daemon: descriptors, accept back-off and log
//! volume. A host with thousands of VMs holds a descriptor per connected
//! guest; when they run out, `accept` fails at once, and a loop that only
//! logs and retries would spin a core and flood the journal.

use std::time::Duration;

/// How long an accept loop sleeps after running out of descriptors (or
/// kernel memory): long enough for connections to finish, short enough not
/// to be noticed by a client.
pub const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);
/// After any other accept error.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as daemons with many
/// connections do (the default soft limit of 1024 is for `select()`, which
/// we do not use). Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// Whether an accept error means "out of descriptors or memory", which only
/// time cures.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The kinds of log line that a peer or the environment can repeat at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repeated {
    AcceptControl,
    AcceptLaunch,
    RefusedControlPeer,
    RefusedLaunchPeer,
    BadRequest,
    Busy,
    WriteFailed,
}

/// At most one line per kind per period (`proto::loglimit`, shared with
/// the guest's refusal log); the next line that gets through says how many
/// were suppressed in between.
pub type LogLimiter = vmcred_proto::loglimit::LogLimiter<Repeated>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let got = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(got, lim.rlim_cur);
    }

    #[test]
    fn exhaustion_errors_are_recognised() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            assert!(is_exhaustion(&std::io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
