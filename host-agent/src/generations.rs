//! The host's generation numbers. A generation is the host's alone: each
//! push to a VM gets `max(last issued to that VM + 1, wall-clock
//! microseconds since the Unix epoch)`. What a guest reports as applied is a
//! claim, shown in `status` and never fed back into this counter, so no
//! reply can stop rotations.
//!
//! Durability is a single host-wide high-water mark, `state_dir/generations/
//! reserved`, written by a background thread: every number handed out is
//! at most the mark already on disk, and the writer moves the mark
//! [`RESERVE_AHEAD`] past the clock before issuing reaches it. A push
//! waits for the disk only when issuing outruns the writer (more than half
//! a window of generations in the time of one write). After a restart
//! every VM starts above the mark read at open, so nothing issued before a
//! crash is ever issued again, whatever the clock did. See
//! ARCHITECTURE.md "Generations" for the whole argument.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::watch;

/// How far past the clock the durable mark is moved each time.
pub const RESERVE_AHEAD: Duration = Duration::from_secs(2);
/// The file that holds the mark, inside the generations directory.
const MARK_FILE: &str = "reserved";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GenerationError {
    #[error("{path} does not hold a generation number; fix it or remove it (removing it is safe: generations restart from the clock)")]
    Garbage { path: String },
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("cannot record the generation high-water mark in {path}: {why}")]
    Write { path: String, why: String },
    #[error("the generation counter of VM {vm} is exhausted (the state file holds an absurd mark); remove {path} and restart")]
    Exhausted { vm: String, path: String },
    #[error("the generation writer stopped")]
    WriterGone,
}

/// Hands out generations; cheap to clone (one shared state and writer).
#[derive(Clone)]
pub struct Generations {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    state: Mutex<State>,
    /// Asks the writer to make a mark durable.
    want: Mutex<mpsc::Sender<u64>>,
    /// The writer's attempts so far, and the mark on disk or the error of
    /// its last attempt.
    durable: watch::Receiver<(u64, Result<u64, GenerationError>)>,
}

struct State {
    /// Everything issued before this process started is at most this.
    floor: u64,
    /// Last generation issued per VM by this process.
    last: HashMap<String, u64>,
    /// Highest mark asked of the writer.
    requested: u64,
}

/// Microseconds since the Unix epoch; 0 if the clock is before it.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Generations {
    /// Opens (creating) the directory and reads the mark. Files named after
    /// VMs, left by the older per-VM scheme, are ignored on purpose: they
    /// may hold a number a lying guest made the old code adopt, and any
    /// honest one is far below the clock-based numbers issued now.
    pub fn open(dir: PathBuf) -> Result<Generations, GenerationError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| GenerationError::Write {
                path: dir.display().to_string(),
                why: e.to_string(),
            })?;
        let path = dir.join(MARK_FILE);
        let floor = read_mark(&path)?;
        // The first window is reserved at once, so the first pushes after
        // a start (every VM connecting at once) find it on disk instead of
        // all waiting for its write and fsync. A failed write is asked
        // again by the first `issue`.
        let ahead = floor
            .max(now_micros())
            .saturating_add(micros(RESERVE_AHEAD));
        let (tx, rx) = mpsc::channel::<u64>();
        let _ = tx.send(ahead);
        let (dtx, drx) = watch::channel((0, Ok(floor)));
        let wpath = path.clone();
        std::thread::Builder::new()
            .name("vmcred-generations".into())
            .spawn(move || writer(wpath, rx, dtx))
            .map_err(|e| GenerationError::Write {
                path: path.display().to_string(),
                why: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Generations {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(State {
                    floor,
                    last: HashMap::new(),
                    requested: ahead,
                }),
                want: Mutex::new(tx),
                durable: drx,
            }),
        })
    }

    /// The last generation this process issued to `vm`, if any.
    pub fn last_issued(&self, vm: &str) -> Option<u64> {
        self.inner.state.lock().ok()?.last.get(vm).copied()
    }

    /// A new generation for `vm`, strictly above every one issued to it
    /// before (by this process or an earlier one), and durable before it
    /// is returned.
    pub async fn issue(&self, vm: &str) -> Result<u64, GenerationError> {
        let now = now_micros();
        let (generation, attempts) = {
            let mut st = self
                .inner
                .state
                .lock()
                .map_err(|_| GenerationError::WriterGone)?;
            let last = st.last.get(vm).copied().unwrap_or(st.floor);
            let generation = last
                .checked_add(1)
                .ok_or_else(|| GenerationError::Exhausted {
                    vm: vm.to_string(),
                    path: self.inner.path.display().to_string(),
                })?
                .max(now);
            st.last.insert(vm.to_string(), generation);
            let (attempts, failed) = {
                let d = self.inner.durable.borrow();
                (d.0, d.1.is_err())
            };
            // Move the mark ahead while half a window is still left, so
            // that the push rarely waits for the disk; after a failed
            // write, ask again.
            let half = micros(RESERVE_AHEAD) / 2;
            if failed || generation.saturating_add(half) > st.requested {
                let mark = generation.max(now).saturating_add(micros(RESERVE_AHEAD));
                st.requested = st.requested.max(mark);
                let sent = self
                    .inner
                    .want
                    .lock()
                    .map(|tx| tx.send(st.requested).is_ok())
                    .unwrap_or(false);
                if !sent {
                    return Err(GenerationError::WriterGone);
                }
            }
            (generation, attempts)
        };
        let mut durable = self.inner.durable.clone();
        let seen = durable
            .wait_for(|(n, d)| match d {
                Ok(mark) => *mark >= generation,
                // Only an attempt made after this request counts.
                Err(_) => *n > attempts,
            })
            .await
            .map_err(|_| GenerationError::WriterGone)?;
        match &seen.1 {
            Ok(_) => Ok(generation),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Makes the rename that published the mark durable too.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn read_mark(path: &Path) -> Result<u64, GenerationError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map_err(|_| GenerationError::Garbage {
            path: path.display().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(GenerationError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        }),
    }
}

/// Writes marks as they are asked for, coalescing: only the highest asked
/// since the last write is written. A failed write is reported to waiters
/// and retried at the next request.
fn writer(
    path: PathBuf,
    rx: mpsc::Receiver<u64>,
    durable: watch::Sender<(u64, Result<u64, GenerationError>)>,
) {
    let mut on_disk = match &durable.borrow().1 {
        Ok(m) => *m,
        Err(_) => 0,
    };
    let mut attempts = 0u64;
    while let Ok(mut mark) = rx.recv() {
        while let Ok(m) = rx.try_recv() {
            mark = mark.max(m);
        }
        attempts += 1;
        if mark <= on_disk {
            let _old = durable.send_replace((attempts, Ok(on_disk)));
            continue;
        }
        let result =
            vmcred_proto::fsutil::write_atomic(&path, format!("{mark}\n").as_bytes(), 0o600)
                .and_then(|()| sync_dir(&path));
        match result {
            Ok(()) => {
                on_disk = mark;
                let _old = durable.send_replace((attempts, Ok(mark)));
            }
            Err(e) => {
                let _old = durable.send_replace((
                    attempts,
                    Err(GenerationError::Write {
                        path: path.display().to_string(),
                        why: e.to_string(),
                    }),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(dir: &Path) -> u64 {
        std::fs::read_to_string(dir.join(MARK_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn issued_numbers_rise_follow_the_clock_and_are_covered_by_the_mark() {
        let d = tempfile::tempdir().unwrap();
        let g = Generations::open(d.path().join("g")).unwrap();
        let before = now_micros();
        let mut last = 0;
        for _ in 0..200 {
            let n = g.issue("vm").await.unwrap();
            assert!(n > last);
            assert!(n >= before);
            // Durable before it was handed out.
            assert!(mark(&d.path().join("g")) >= n);
            last = n;
        }
        // Another VM has its own sequence, also clock-based.
        assert!(g.issue("other").await.unwrap() >= before);
        assert_eq!(g.last_issued("vm"), Some(last));
    }

    #[tokio::test]
    async fn the_first_window_is_reserved_at_open_before_any_push() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("g");
        let before = now_micros();
        let g = Generations::open(dir.clone()).unwrap();
        let mut durable = g.inner.durable.clone();
        let seen = tokio::time::timeout(
            Duration::from_secs(30),
            durable.wait_for(|(_, d)| d.as_ref().is_ok_and(|m| *m > before)),
        )
        .await
        .expect("no mark written after open")
        .unwrap()
        .clone();
        assert!(mark(&dir) >= before + micros(RESERVE_AHEAD), "{seen:?}");
        // A push then finds its generation covered already.
        let n = g.issue("vm").await.unwrap();
        assert!(n <= mark(&dir));
    }

    #[tokio::test]
    async fn a_restart_never_reissues_even_if_the_clock_went_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("g");
        let g = Generations::open(dir.clone()).unwrap();
        let first = g.issue("vm").await.unwrap();
        drop(g);
        // The clock "went back": a mark far ahead of it is on disk.
        let ahead = now_micros() + 3_600_000_000;
        std::fs::write(dir.join(MARK_FILE), format!("{ahead}\n")).unwrap();
        let g = Generations::open(dir.clone()).unwrap();
        let n = g.issue("vm").await.unwrap();
        assert!(n > ahead && n > first, "{n} {ahead}");
        assert!(mark(&dir) >= n);
    }

    #[tokio::test]
    async fn lost_state_restarts_from_the_clock_and_old_per_vm_files_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("g");
        let g = Generations::open(dir.clone()).unwrap();
        let first = g.issue("vm").await.unwrap();
        drop(g);
        std::fs::remove_dir_all(&dir).unwrap();
        let g = Generations::open(dir.clone()).unwrap();
        let before = now_micros();
        assert!(g.issue("vm").await.unwrap() >= before);
        let _ = first;
        drop(g);
        // The old scheme's per-VM file, poisoned by a guest's u64::MAX.
        std::fs::write(dir.join("vm"), format!("{}\n", u64::MAX)).unwrap();
        let g = Generations::open(dir.clone()).unwrap();
        let n = g.issue("vm").await.unwrap();
        assert!(n < u64::MAX / 2, "{n}");
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_zero() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("g");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MARK_FILE), "x").unwrap();
        let e = Generations::open(dir).err().unwrap();
        assert!(e.to_string().contains("does not hold a generation"), "{e}");
    }

    #[tokio::test]
    async fn an_exhausted_counter_is_an_error_not_a_wrap() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("g");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MARK_FILE), format!("{}\n", u64::MAX)).unwrap();
        let g = Generations::open(dir).unwrap();
        let e = g.issue("vm").await.unwrap_err();
        assert!(matches!(e, GenerationError::Exhausted { .. }), "{e}");
    }
}
