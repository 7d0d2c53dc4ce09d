//! Gives the heap's free pages back to the kernel after a burst of work.
//!
//! A fan-out (host start, SIGHUP, `rotate --all`) dials, syncs and pushes
//! to every VM at once: TLS and HTTP/2 handshakes, source reads, `Apply`
//! messages, all allocated and freed within the burst. glibc keeps the
//! freed pages resident for the next allocation, so after a burst the
//! host's RSS holds the burst's peak, not what it still uses
//! (ARCHITECTURE.md, "Host cost per VM"). Once a burst of at least
//! [`BURST`] dials or syncs has ended and nothing new started for
//! [`QUIET`], `malloc_trim(0)` hands the free pages back.
//!
//! Not a periodic trimmer: nothing wakes while the host is idle, and a
//! burst costs one trim.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Dials and syncs since the last trim before one is worth it.
pub const BURST: usize = 64;

/// How long nothing new must have started before the trim runs.
pub const QUIET: Duration = Duration::from_secs(1);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Started since the last trim; also tells the waiting trim whether
/// anything started while it waited.
static STARTED: AtomicUsize = AtomicUsize::new(0);
static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Marks one dial or sync in flight; dropping it may schedule a trim.
#[must_use]
pub struct Busy(());

pub fn busy() -> Busy {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    STARTED.fetch_add(1, Ordering::SeqCst);
    Busy(())
}

impl Drop for Busy {
    fn drop(&mut self) {
        if IN_FLIGHT.fetch_sub(1, Ordering::SeqCst) != 1 || STARTED.load(Ordering::SeqCst) < BURST
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if SCHEDULED.swap(true, Ordering::SeqCst) {
            return;
        }
        runtime.spawn(async {
            // Wait until a whole QUIET passed with nothing started and
            // nothing left in flight.
            loop {
                let seen = STARTED.load(Ordering::SeqCst);
                tokio::time::sleep(QUIET).await;
                if STARTED.load(Ordering::SeqCst) == seen && IN_FLIGHT.load(Ordering::SeqCst) == 0
                {
                    break;
                }
            }
            STARTED.store(0, Ordering::SeqCst);
            // It walks the whole heap under the allocator's lock: off the
            // runtime's workers.
            let _ = tokio::task::spawn_blocking(trim).await;
            SCHEDULED.store(false, Ordering::SeqCst);
        });
    }
}

/// Returns free heap pages to the kernel.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory the allocator owns; it
    // takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of work followed by quiet ends in a trim that returns the
    /// burst's freed pages (RSS falls), and leaves nothing scheduled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_then_quiet_trims() {
        // Freed memory that glibc keeps: many small blocks (below the mmap
        // threshold), touched, then freed with a few kept in between so
        // that the heap's top cannot simply shrink.
        let mut kept = Vec::new();
        {
            let mut blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 8192]).collect();
            for (i, b) in blocks.drain(..).enumerate() {
                if i % 512 == 511 {
                    kept.push(b);
                }
            }
        }
        let before = rss_anon_kib();
        let guards: Vec<Busy> = (0..BURST).map(|_| busy()).collect();
        drop(guards);
        // Bounded wait for the event (the trim), not a timing assertion.
        let mut after = before;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = rss_anon_kib();
            if !SCHEDULED.load(Ordering::SeqCst) && after + 8 * 1024 < before {
                break;
            }
        }
        assert!(
            after + 8 * 1024 < before,
            "RSS fell by at least 8 MiB after the burst: {before} -> {after} KiB"
        );
        drop(kept);
    }

    fn rss_anon_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon")
    }
}
