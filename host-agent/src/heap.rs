//! Hands the kernel back the heap pages a burst freed.
//!
//! A host start, a SIGHUP or a `rotate --all` runs a TLS handshake or a
//! push for every VM at once. Their transient buffers are freed after the
//! burst, but they lay between the connections' long-lived allocations,
//! so glibc cannot shrink its heap from the top and keeps those pages
//! resident (`M_TRIM_THRESHOLD` acts on the top of the heap only).
//! `malloc_trim(0)` also releases whole free pages inside the heap
//! (`madvise(MADV_DONTNEED)`); live allocations do not move.
//!
//! The trimmer reads glibc's counters on a slow tick and trims once the
//! heap has grown a sizeable free part since the last trim and the burst
//! is over (what is in use stopped moving). Measured effect in
//! ARCHITECTURE.md, "Host cost per VM".

use std::time::Duration;

/// How often the trimmer reads the heap's counters.
pub const TICK: Duration = Duration::from_secs(2);

/// Free heap below which a trim is not worth its walk over the arena.
pub const MIN_FREE: usize = 2 << 20;

/// glibc's counters for the heap, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Allocated and not yet freed (`uordblks`).
    pub in_use: usize,
    /// Free inside the heap, resident or not (`fordblks`).
    pub free: usize,
}

/// The heap's counters now; `None` where the allocator is not glibc's.
pub fn stats() -> Option<HeapStats> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 reads the allocator's counters under its own
        // locks and returns them by value.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapStats {
            in_use: m.uordblks,
            free: m.fordblks,
        })
    }
    #[cfg(not(target_env = "gnu"))]
    {
        None
    }
}

/// Releases the heap's free pages to the kernel; true if any were.
pub fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only gives free pages of the allocator's own
        // arenas back to the kernel; no live allocation moves or changes.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// When to trim, from successive looks at the heap one tick apart.
#[derive(Debug, Default)]
pub struct Policy {
    last: Option<HeapStats>,
    /// Free bytes right after the last trim, lowered whenever the free
    /// part shrinks (reused memory is resident again): only free memory
    /// beyond it is new.
    trimmed_free: usize,
}

impl Policy {
    /// Takes the counters of this tick; true when a trim is due now: the
    /// free part grew by at least [`MIN_FREE`] and an eighth of what is in
    /// use since the last trim, and what is in use moved by less than an
    /// eighth since the previous tick (the burst is over).
    pub fn due(&mut self, now: HeapStats) -> bool {
        self.trimmed_free = self.trimmed_free.min(now.free);
        let quiet = self
            .last
            .is_some_and(|l| l.in_use.abs_diff(now.in_use) < now.in_use / 8 + 1);
        self.last = Some(now);
        let grown = now.free - self.trimmed_free;
        let due = quiet && grown >= MIN_FREE.max(now.in_use / 8);
        if due {
            // glibc keeps counting trimmed pages as free: remember where
            // this trim left the free part.
            self.trimmed_free = now.free;
        }
        due
    }
}

/// Runs the trimmer for the daemon's life. The trim runs on a blocking
/// thread: it walks the arena under the allocator's lock.
pub async fn run() {
    let mut policy = Policy::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(now) = stats() else { return };
        if policy.due(now) {
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                in_use = now.in_use,
                free = now.free,
                released,
                "returned the heap's free pages to the kernel"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn at(in_use: usize, free: usize) -> HeapStats {
        HeapStats { in_use, free }
    }

    #[test]
    fn trims_once_after_a_burst_has_settled() {
        let mut p = Policy::default();
        // Start-up: little free.
        assert!(!p.due(at(10 * MIB, MIB / 2)));
        // A burst: in use jumps, then falls back and leaves free memory.
        assert!(!p.due(at(60 * MIB, MIB)));
        assert!(!p.due(at(40 * MIB, 25 * MIB)), "still moving");
        assert!(p.due(at(40 * MIB, 25 * MIB)), "settled: trim");
        // The same heap is not trimmed again, tick after tick.
        for _ in 0..5 {
            assert!(!p.due(at(40 * MIB, 25 * MIB)));
        }
    }

    #[test]
    fn a_new_burst_after_reuse_trims_again() {
        let mut p = Policy::default();
        p.due(at(40 * MIB, 25 * MIB));
        assert!(p.due(at(40 * MIB, 25 * MIB)));
        // The free memory is reused (resident again), then freed again.
        p.due(at(60 * MIB, 5 * MIB));
        p.due(at(40 * MIB, 25 * MIB));
        assert!(p.due(at(40 * MIB, 25 * MIB)));
    }

    #[test]
    fn small_free_parts_are_left_alone() {
        let mut p = Policy::default();
        for _ in 0..5 {
            assert!(!p.due(at(40 * MIB, MIB)));
        }
        // An eighth of what is in use is the bar on a large heap.
        for _ in 0..5 {
            assert!(!p.due(at(400 * MIB, 40 * MIB)));
        }
    }

    /// A trim gives back only free memory: what is still allocated keeps
    /// its contents, with freed blocks between them (as after a burst).
    #[test]
    fn trim_keeps_live_allocations_intact() {
        let mut blocks: Vec<Vec<u8>> = (0..512u32)
            .map(|i| vec![(i % 251) as u8; 16 * 1024 + (i as usize % 7) * 512])
            .collect();
        let mut kept = Vec::new();
        for (i, b) in blocks.drain(..).enumerate() {
            if i % 2 == 0 {
                kept.push((i, b));
            }
        }
        let _ = trim();
        for (i, b) in &kept {
            let want = (*i as u32 % 251) as u8;
            assert_eq!(b.len(), 16 * 1024 + (i % 7) * 512);
            assert!(b.iter().all(|&x| x == want), "block {i} changed");
        }
        if let Some(s) = stats() {
            assert!(s.in_use > 0);
        }
    }
}
