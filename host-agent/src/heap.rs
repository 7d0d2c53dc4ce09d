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

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Allocations of at least this many bytes get pages of their own.
pub const LARGE: usize = 16 * 1024;

const PAGE: usize = 4096;

/// The host's allocator: glibc's, except that blocks of [`LARGE`] bytes
/// or more are mapped pages of their own, released on free.
///
/// Each connection's HTTP/2 write buffer is 16 KiB (h2 0.4, no setting),
/// allocated at connect and only ever written from its start (h2 clears
/// it after each flush and chains payloads over 256 bytes instead of
/// copying them), so its first page is all an idle connection uses.
/// From glibc it was carved out of memory the connect burst had already
/// written, so all four pages were resident; fresh pages are resident
/// only once written. Large blocks are rare otherwise: in a whole
/// vmcred-bench run at N = 1000 (1000 connects, a SIGHUP and a `rotate
/// --all`) there were 1027 allocations of 16 KiB or more, 1000 of them
/// these buffers, so the extra `mmap`/`munmap` per block costs nothing
/// measurable (ARCHITECTURE.md, "Host cost per VM").
pub struct PageBacked;

fn large(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= PAGE
}

fn pages(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages(size),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

// SAFETY: every block is either glibc's or a mapping of its own, decided
// by its layout alone, which the caller passes unchanged to `dealloc` and
// `realloc`; mappings are page aligned, which satisfies any alignment up
// to a page, and larger alignments stay with glibc.
unsafe impl GlobalAlloc for PageBacked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if large(&layout) {
            // SAFETY: see `map`.
            unsafe { map(layout.size()) }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if large(&layout) {
            // SAFETY: see `map`; fresh anonymous pages read as zero.
            unsafe { map(layout.size()) }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if large(&layout) {
            // SAFETY: `ptr` is a mapping of `pages(layout.size())` bytes
            // made by `map`, and the caller no longer uses it.
            unsafe {
                libc::munmap(ptr.cast(), pages(layout.size()));
            }
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid, non-overflowing new size
        // for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (large(&layout), large(&new_layout)) {
            // SAFETY: forwarded with the caller's guarantees.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                // SAFETY: `ptr` is a mapping of `pages(layout.size())`
                // bytes; mremap keeps its contents and may move it.
                let p = unsafe {
                    libc::mremap(
                        ptr.cast(),
                        pages(layout.size()),
                        pages(new_size),
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if p == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    p.cast()
                }
            }
            _ => {
                // SAFETY: a new block from this allocator, the old one's
                // bytes copied (as many as both hold), then the old one
                // freed by the path that made it.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// The agent binary (`main.rs`) sets [`PageBacked`] as its allocator;
/// the library does not, so the front binary, the test harnesses and the
/// fuzz targets (whose sanitizers check glibc's blocks) keep glibc's. The
/// unit tests below set it for their own binary.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: PageBacked = PageBacked;

/// Dials and syncs since the last trim before one is worth it.
pub const BURST: usize = 64;

/// How long nothing new must have started before the trim runs.
pub const QUIET: Duration = Duration::from_secs(1);

/// How many `QUIET` waits a scheduled trim makes at most: a host whose
/// work never pauses for a whole second (many VMs redialling, steady
/// rotations) still trims, and its trim task does not wake forever.
pub const PATIENCE: u32 = 10;

/// The bursts of one heap: the process's is [`busy`]'s; tests make their
/// own, so that they do not see each other's work.
struct Bursts {
    in_flight: AtomicUsize,
    /// Started since the last trim; also tells the waiting trim whether
    /// anything started while it waited.
    started: AtomicUsize,
    scheduled: AtomicBool,
    /// Trims done (tests: that one ran, and when).
    #[cfg(test)]
    trims: AtomicUsize,
}

static BURSTS: Bursts = Bursts::new();

#[cfg(test)]
thread_local! {
    /// [`busy`] calls made on this thread: a test on a current-thread
    /// runtime counts its own tasks' calls, whatever other tests do.
    static TAKEN_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks one dial or sync in flight; dropping it may schedule a trim.
#[must_use]
pub struct Busy(&'static Bursts);

/// Marks one dial or sync of the process in flight.
pub fn busy() -> Busy {
    #[cfg(test)]
    TAKEN_HERE.with(|n| n.set(n.get() + 1));
    BURSTS.busy()
}

/// How many times [`busy`] was called on this thread.
#[cfg(test)]
pub(crate) fn taken_here() -> usize {
    TAKEN_HERE.with(|n| n.get())
}

impl Bursts {
    const fn new() -> Bursts {
        Bursts {
            in_flight: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            scheduled: AtomicBool::new(false),
            #[cfg(test)]
            trims: AtomicUsize::new(0),
        }
    }

    fn busy(&'static self) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        Busy(self)
    }

    /// Waits until a whole QUIET passed with nothing started and nothing
    /// left in flight, or PATIENCE of them (trimming while work runs is
    /// safe: only free pages go), then trims.
    async fn trim_when_quiet(&'static self) {
        for _ in 0..PATIENCE {
            let seen = self.started.load(Ordering::SeqCst);
            tokio::time::sleep(QUIET).await;
            if self.started.load(Ordering::SeqCst) == seen
                && self.in_flight.load(Ordering::SeqCst) == 0
            {
                break;
            }
        }
        self.started.store(0, Ordering::SeqCst);
        // It walks the whole heap under the allocator's lock: off the
        // runtime's workers.
        let _ = tokio::task::spawn_blocking(trim).await;
        #[cfg(test)]
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.scheduled.store(false, Ordering::SeqCst);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let b = self.0;
        if b.in_flight.fetch_sub(1, Ordering::SeqCst) != 1
            || b.started.load(Ordering::SeqCst) < BURST
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if b.scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        runtime.spawn(b.trim_when_quiet());
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
        static B: Bursts = Bursts::new();
        let before = rss_anon_kib();
        let guards: Vec<Busy> = (0..BURST).map(|_| B.busy()).collect();
        drop(guards);
        // Bounded wait for the event (the trim), not a timing assertion.
        let mut after = before;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = rss_anon_kib();
            if !B.scheduled.load(Ordering::SeqCst) && after + 8 * 1024 < before {
                break;
            }
        }
        assert!(
            after + 8 * 1024 < before,
            "RSS fell by at least 8 MiB after the burst: {before} -> {after} KiB"
        );
        drop(kept);
    }

    /// Waits, in steps of virtual time, until `b` has trimmed `n` times;
    /// returns when (virtual time) it saw it.
    async fn trimmed(b: &Bursts, n: usize) -> tokio::time::Instant {
        for _ in 0..10_000 {
            if b.trims.load(Ordering::SeqCst) >= n {
                return tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no trim in 100 s of virtual time");
    }

    /// With nothing in flight and nothing new, a burst is trimmed after
    /// one quiet period.
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_trimmed_after_one_quiet_period() {
        static B: Bursts = Bursts::new();
        let start = tokio::time::Instant::now();
        drop((0..BURST).map(|_| B.busy()).collect::<Vec<_>>());
        assert!(B.scheduled.load(Ordering::SeqCst));
        let at = trimmed(&B, 1).await - start;
        assert!(at >= QUIET && at < 2 * QUIET, "trimmed after {at:?}");
        assert!(!B.scheduled.load(Ordering::SeqCst));
    }

    /// Something that stays in flight for ever (a dial that hangs, a
    /// session's sync that never ends) does not keep a scheduled trim
    /// waiting, and waking every quiet period, for ever: it trims after
    /// PATIENCE quiet periods and its task ends.
    #[tokio::test(start_paused = true)]
    async fn a_trim_waits_at_most_patience_quiet_periods() {
        static B: Bursts = Bursts::new();
        let start = tokio::time::Instant::now();
        drop((0..BURST).map(|_| B.busy()).collect::<Vec<_>>());
        assert!(B.scheduled.load(Ordering::SeqCst));
        let stuck = B.busy();
        let at = trimmed(&B, 1).await - start;
        assert!(
            at >= QUIET * PATIENCE && at < QUIET * (PATIENCE + 1),
            "trimmed after {at:?}, with work in flight the whole time"
        );
        assert!(!B.scheduled.load(Ordering::SeqCst));
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0, "the trim's task still runs");
        // An hour later, still in flight: nothing more was scheduled.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(B.trims.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.num_alive_tasks(), 0);
        drop(stuck);
        assert!(
            !B.scheduled.load(Ordering::SeqCst),
            "one dial after a trim is not a burst"
        );
    }

    /// Failed dials of the VM of `handle` so far (the host's metrics).
    fn unreachable_count(handle: &crate::vm::VmHandle) -> u64 {
        let status = handle.status.lock().expect("status").clone();
        let key = format!(
            "vmcred_vm_failures_total{{vm=\"{}\",kind=\"unreachable\"}} ",
            status.vm
        );
        let text = crate::metrics::global().render(vec![status]);
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map_or(0, |n| n.trim().parse().expect("a count"))
    }

    /// Only a dial that reached something is burst work (`vm.rs`,
    /// `open`): VMs that are down redial for ever, and if each failed
    /// dial counted, BURST of them would schedule trims over and over and
    /// keep each from finding a quiet period. Counted on this thread (a
    /// current-thread runtime), so other tests' VMs do not count.
    #[tokio::test(start_paused = true)]
    async fn only_dials_that_reach_something_are_burst_work() {
        use crate::config::Vm;
        use crate::vm::{spawn, Timing};
        use std::sync::Arc;

        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Arc::new(crate::keyring::KeyRing::load(dir.path()).expect("host key"));
        let generations = crate::generations::Generations::open(dir.path().join("generations"))
            .expect("generations");
        let timing = Timing {
            poll: Duration::ZERO,
            backoff_max: Duration::from_secs(1),
            rpc_timeout: Duration::from_secs(1),
            keepalive: Duration::from_secs(60),
        };
        let vm = |name: String, socket: &str| {
            Arc::new(Vm {
                name,
                target: vmcred_proto::transport::Target::Unix {
                    path: dir.path().join(socket),
                },
                port: 1,
                launch_key: crate::config::LaunchKeyMode::Off,
                credentials: Default::default(),
            })
        };
        let taken = taken_here();
        // BURST VMs whose sockets nothing listens on, each failing its
        // dial at least three times (the back-off is virtual time).
        let names: Vec<String> = (0..BURST).map(|i| format!("heap-down-{i}")).collect();
        let down: Vec<_> = names
            .iter()
            .map(|n| {
                let v = vm(n.clone(), &format!("{n}.sock"));
                spawn(
                    v,
                    timing,
                    keys.clone(),
                    Default::default(),
                    generations.clone(),
                    None,
                )
            })
            .collect();
        let mut dialled = false;
        for _ in 0..10_000 {
            if down.iter().all(|h| unreachable_count(h) >= 3) {
                dialled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(dialled, "the VMs did not redial");
        assert_eq!(
            taken_here() - taken,
            0,
            "failed dials were counted as burst work"
        );

        // The counter's control: a socket that accepts (into its backlog)
        // is reached, and that dial counts, whatever follows.
        let _listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("up.sock")).expect("bind");
        let up = spawn(
            vm("heap-up".into(), "up.sock"),
            timing,
            keys.clone(),
            Default::default(),
            generations.clone(),
            None,
        );
        for _ in 0..10_000 {
            if taken_here() > taken {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            taken_here() > taken,
            "a dial that reached a socket was not counted"
        );
        drop((down, up));
    }

    /// Large blocks round-trip through every path: allocate, grow and
    /// shrink across the threshold both ways, zeroed, freed.
    #[test]
    fn large_blocks_keep_their_bytes_across_every_path() {
        let mut v: Vec<u8> = Vec::with_capacity(100);
        for i in 0..(3 * LARGE) {
            v.push(i as u8);
        }
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, b)| *b == i as u8));
        v.truncate(LARGE / 2);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, b)| *b == i as u8));
        v.extend(std::iter::repeat_n(7, 5 * LARGE));
        assert_eq!(v[LARGE / 2 + 1], 7);
        assert_eq!(
            v[..LARGE / 2],
            (0..LARGE / 2).map(|i| i as u8).collect::<Vec<_>>()[..]
        );
        let z = vec![0u8; 2 * LARGE + 1];
        assert!(z.iter().all(|b| *b == 0));
        // Page-aligned types larger than the threshold stay correct.
        #[repr(align(4096))]
        struct Aligned([u8; 4096]);
        let a: Vec<Aligned> = (0..5).map(|i| Aligned([i; 4096])).collect();
        assert!(a.iter().enumerate().all(|(i, x)| x.0[4095] == i as u8));
        assert_eq!(a.as_ptr() as usize % 4096, 0);
    }

    /// A large block is resident only where it was written, even when the
    /// heap holds freed memory that was written before (as after a
    /// connect burst): the point of giving it pages of its own.
    #[test]
    fn a_large_block_is_resident_only_where_written() {
        // Written and freed, with a block kept after it so that glibc
        // keeps it rather than shrinking the heap.
        let written: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 4000]).collect();
        let fence = vec![1u8; 4000];
        drop(written);
        let mut block: Vec<u8> = Vec::with_capacity(LARGE);
        block.push(1);
        let start = (block.as_ptr() as usize).div_ceil(PAGE) * PAGE + PAGE;
        let end = (block.as_ptr() as usize + LARGE) / PAGE * PAGE;
        let mut resident = vec![0u8; (end - start) / PAGE];
        // SAFETY: the range lies inside `block`'s allocation, page aligned;
        // mincore only reports on it.
        let r = unsafe {
            libc::mincore(
                start as *mut libc::c_void,
                end - start,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        let pages = resident.iter().filter(|p| *p & 1 == 1).count();
        assert_eq!(
            pages,
            0,
            "unwritten pages of a large block resident: {pages} of {}",
            resident.len()
        );
        drop((block, fence));
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
