//! Resource limits of the daemon: descriptors, accept back-off and log
//! volume. A host with thousands of VMs holds a descriptor per connected
//! guest; when they run out, `accept` fails at once, and a loop that only
//! logs and retries would spin a core and flood the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// At most one line per kind per `every`; the next line that gets through
/// says how many were suppressed in between.
pub struct LogLimiter {
    every: Duration,
    seen: Mutex<HashMap<Repeated, (Instant, u64)>>,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line of `kind` may be written now.
    pub fn allow(&self, kind: Repeated) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        match seen.get_mut(&kind) {
            Some((last, suppressed)) if now.duration_since(*last) < self.every => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                seen.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_one_line_through_per_period_and_counts_the_rest() {
        let l = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(l.allow(Repeated::Busy), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.allow(Repeated::Busy), None);
        }
        // Other kinds are independent.
        assert_eq!(l.allow(Repeated::AcceptLaunch), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow(Repeated::Busy), Some(1000));
    }

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
