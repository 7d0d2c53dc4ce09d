//! One log line per kind per period for what a peer can repeat at will
//! (refused connections, bad requests): the first gets through, the rest
//! are counted, and the next line that gets through says how many were
//! left out. A host user who connects in a loop then costs the journal a
//! line every period instead of one per attempt, and cannot push the
//! agent's other messages past journald's per-unit rate limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogLimiter<K> {
    every: Duration,
    seen: Mutex<HashMap<K, (Instant, u64)>>,
}

impl<K: Hash + Eq> LogLimiter<K> {
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line of `kind` may be written now, with
    /// the number left out since the last one; `None` when it is counted
    /// instead. Keys should be a small, fixed set (an enum), never
    /// something a peer chooses.
    pub fn allow(&self, kind: K) -> Option<u64> {
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
    fn one_line_per_kind_per_period_and_the_rest_counted() {
        let l = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(l.allow(1), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.allow(1), None);
        }
        // Other kinds are independent.
        assert_eq!(l.allow(2), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow(1), Some(1000));
    }
}
