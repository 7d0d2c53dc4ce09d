//! Reading credential values on the host. Values go straight into zeroizing
//! buffers and are bounded while reading, so a runaway source (a device, a
//! huge file) costs at most 1 MiB + 1 byte.
//!
//! A source may hang: a FIFO, a hung FUSE or NFS mount. Files are opened
//! with `O_NONBLOCK` (a FIFO then opens at once and is refused by `fstat`
//! as not a regular file), and every read that could block runs on a
//! blocking thread under a deadline, so a hung `open()` or `read()` costs
//! one parked thread and a `timed out` error for that credential, never the
//! VM's task or the runtime. While a read of a path is still hung, later
//! reads of the same path fail at once instead of parking another thread.
//! Only a file the kernel shows cannot block (a cached lookup to tmpfs or
//! ramfs, `memfs.rs`) is read in the VM's task, saving a rotate the thread
//! hop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use vmcred_proto::rules::{self, MAX_CREDENTIAL_BYTES};
use zeroize::Zeroizing;

use crate::config::{Credential, Source, Vm};

mod memfs;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SourceError {
    #[error("source {source_desc} does not exist (yet)")]
    Missing { source_desc: String },
    #[error("cannot read source {source_desc}: {why}")]
    Unreadable { source_desc: String, why: String },
    #[error("source {source_desc} is not a regular file")]
    NotAFile { source_desc: String },
    #[error("reading source {source_desc} timed out after {after:?} (a hung mount or a FIFO?); the guest keeps the value it has")]
    TimedOut {
        source_desc: String,
        after: Duration,
    },
    #[error("source {source_desc}: an earlier read is still blocked (a hung mount?); the guest keeps the value it has")]
    StillBlocked { source_desc: String },
    #[error("$CREDENTIALS_DIRECTORY is not set, but credential {name} is configured as credential = \"{id}\"; add LoadCredential={id}:SOURCE to vmcred-host.service")]
    NoCredentialsDirectory { name: String, id: String },
    #[error(transparent)]
    Rule(#[from] rules::RuleError),
    /// The store cannot give this credential now; the guest keeps its value.
    #[error("openbao: {0}")]
    OpenBao(String),
    /// The secret or its current version is deleted; `remove` when the
    /// credential's `on_delete = "remove"`.
    #[error("openbao: {why}")]
    OpenBaoDeleted { why: String, remove: bool },
}

/// One credential's value as read now.
pub struct Value {
    pub bytes: Zeroizing<Vec<u8>>,
    pub digest: [u8; 32],
}

/// The path a credential's value is read from.
pub fn resolve(cred: &Credential, credentials_dir: Option<&Path>) -> Result<PathBuf, SourceError> {
    match &cred.source {
        Source::Path(p) => Ok(p.clone()),
        Source::OpenBao(_) => Err(SourceError::Unreadable {
            source_desc: cred.source.to_string(),
            why: "not a file".into(),
        }),
        Source::Credential(id) => {
            credentials_dir
                .map(|d| d.join(id))
                .ok_or_else(|| SourceError::NoCredentialsDirectory {
                    name: cred.name.clone(),
                    id: id.clone(),
                })
        }
    }
}

/// Reads one credential. Symlinks are followed on purpose: sops-nix and
/// clan publish secrets as links into a generation directory.
pub fn read(cred: &Credential, credentials_dir: Option<&Path>) -> Result<Value, SourceError> {
    match read_if_changed(cred, credentials_dir, None)? {
        Fetched::Value(v) => Ok(v),
        // `known: None` always reads.
        Fetched::Unchanged { .. } => Err(SourceError::Unreadable {
            source_desc: cred.source.to_string(),
            why: "internal: a forced read returned no bytes".into(),
        }),
    }
}

/// One credential as a sync sees it: its bytes, or only its digest when
/// the file is the same version as one already read whose digest the
/// guest holds.
pub enum Fetched {
    Value(Value),
    Unchanged { digest: [u8; 32], len: usize },
}

impl Fetched {
    pub fn digest(&self) -> [u8; 32] {
        match self {
            Fetched::Value(v) => v.digest,
            Fetched::Unchanged { digest, .. } => *digest,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Fetched::Value(v) => v.bytes.len(),
            Fetched::Unchanged { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What identifies one version of a file without reading it. A file
/// replaced by rename (sops-nix, clan, `install`) gets a new inode; one
/// rewritten in place gets a new mtime and ctime (nanoseconds on tmpfs,
/// ext4, xfs, btrfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// How long ago a file must have changed for its stamp to be trusted.
/// File systems keep timestamps in granules (a kernel tick on tmpfs and
/// ext4 without fine-grained timestamps, a second or two on some others),
/// so a same-size rewrite in place within the granule of the read that
/// cached a stamp keeps that stamp. A version that changed less than this
/// before its read is not cached (git's "racy" entries): it is read again
/// at each sync until it has been still for this long.
pub const RACY: Duration = Duration::from_secs(2);

impl Stamp {
    /// Whether the version this stamp names had been still for [`RACY`]
    /// when its read began at `read_at` (a change time in the future, after
    /// the clock went back, is not).
    fn settled(&self, read_at: SystemTime) -> bool {
        let at = |(secs, nsec): (i64, i64)| {
            let secs = u64::try_from(secs).unwrap_or(0);
            let nsec = u32::try_from(nsec).unwrap_or(0).min(999_999_999);
            SystemTime::UNIX_EPOCH + Duration::new(secs, nsec)
        };
        let changed = at(self.mtime).max(at(self.ctime));
        read_at
            .duration_since(changed)
            .is_ok_and(|still| still >= RACY)
    }
}

/// The digest of the version of each source path last read, shared by
/// every VM, so a source several VMs use is read once per change.
static DIGESTS: Mutex<BTreeMap<PathBuf, (Stamp, [u8; 32])>> = Mutex::new(BTreeMap::new());
/// Entries kept at most; past it the cache starts over (paths of
/// credentials since removed from the config would otherwise stay).
const MAX_CACHED: usize = 65_536;
/// Full reads done, for tests and benchmarks.
static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a source's bytes were read by this process.
pub fn reads() -> u64 {
    READS.load(Ordering::Relaxed)
}

/// Sources opened in the VM's task (memory file systems, see `memfs.rs`)
/// rather than on a reader thread, for tests and benchmarks.
static INLINE_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many source reads skipped the reader thread.
pub fn inline_reads() -> u64 {
    INLINE_READS.load(Ordering::Relaxed)
}

/// Opens the source (never blocking on a FIFO), and reads it unless its
/// stamp is that of the version last read and that version's digest is
/// `known` (what the guest holds): then only the digest is returned.
pub fn read_if_changed(
    cred: &Credential,
    credentials_dir: Option<&Path>,
    known: Option<[u8; 32]>,
) -> Result<Fetched, SourceError> {
    let path = resolve(cred, credentials_dir)?;
    let desc = cred.source.to_string();
    // O_NONBLOCK: opening a FIFO must not wait for a writer. It changes
    // nothing for a regular file, the only kind read.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Missing { source_desc: desc })
        }
        Err(e) => {
            return Err(SourceError::Unreadable {
                source_desc: desc,
                why: e.to_string(),
            })
        }
    };
    // This runs on a reader thread (or for a direct `read`): what it
    // learns of the file's mount lets later reads of files on tmpfs or
    // ramfs skip the thread hop.
    memfs::learn(&file);
    read_opened(cred, path, file, known)
}

/// [`read_if_changed`] from the open file of `path`.
fn read_opened(
    cred: &Credential,
    path: PathBuf,
    file: std::fs::File,
    known: Option<[u8; 32]>,
) -> Result<Fetched, SourceError> {
    let desc = cred.source.to_string();
    let meta = file.metadata().map_err(|e| SourceError::Unreadable {
        source_desc: desc.clone(),
        why: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(SourceError::NotAFile { source_desc: desc });
    }
    let stamp = Stamp::of(&meta);
    let read_at = SystemTime::now();
    if let Some(known) = known {
        let cached = DIGESTS.lock().ok().and_then(|c| c.get(&path).copied());
        if cached == Some((stamp, known)) {
            rules::validate_size(&cred.name, meta.len() as usize)?;
            return Ok(Fetched::Unchanged {
                digest: known,
                len: meta.len() as usize,
            });
        }
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(
        (meta.len() as usize).min(MAX_CREDENTIAL_BYTES) + 1,
    ));
    READS.fetch_add(1, Ordering::Relaxed);
    file.take(MAX_CREDENTIAL_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SourceError::Unreadable {
            source_desc: desc,
            why: e.to_string(),
        })?;
    rules::validate_size(&cred.name, bytes.len())?;
    let digest = rules::digest(&bytes);
    // The stamp is from before the read: a write during it changes the
    // stamp, so the next sync reads again. A version too recent to trust
    // its stamp (see `RACY`) is not cached.
    if let Ok(mut c) = DIGESTS.lock() {
        if !stamp.settled(read_at) {
            c.remove(&path);
        } else {
            if c.len() >= MAX_CACHED && !c.contains_key(&path) {
                c.clear();
            }
            c.insert(path, (stamp, digest));
        }
    }
    Ok(Fetched::Value(Value { bytes, digest }))
}

/// Paths whose read is parked on a hung source.
static BLOCKED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Reads one credential (see [`read_if_changed`]) on a blocking thread,
/// giving up after `deadline`.
pub async fn read_with_deadline(
    cred: &Credential,
    credentials_dir: Option<&Path>,
    known: Option<[u8; 32]>,
    deadline: Duration,
) -> Result<Fetched, SourceError> {
    // Already in memory: the store's watcher did the network part.
    if let Source::OpenBao(r) = &cred.source {
        return crate::openbao::store()
            .read(&cred.name, r)
            .map(Fetched::Value);
    }
    let path = resolve(cred, credentials_dir)?;
    // A file the kernel shows cannot block (memfs.rs) is read here, with
    // no thread hop; a path whose earlier read is still hung is not.
    let parked = BLOCKED.lock().map(|b| b.contains(&path)).unwrap_or(false);
    if !parked {
        if let Some(file) = memfs::open(&path) {
            INLINE_READS.fetch_add(1, Ordering::Relaxed);
            return read_opened(cred, path, file, known);
        }
    }
    let cred = cred.clone();
    let dir = credentials_dir.map(Path::to_path_buf);
    run_with_deadline(path, cred.source.to_string(), deadline, move || {
        read_if_changed(&cred, dir.as_deref(), known)
    })
    .await
}

/// Runs `f` (a read of `path`) on a blocking thread under `deadline`.
async fn run_with_deadline<T, F>(
    path: PathBuf,
    desc: String,
    deadline: Duration,
    f: F,
) -> Result<T, SourceError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SourceError> + Send + 'static,
{
    if BLOCKED.lock().map(|b| b.contains(&path)).unwrap_or(false) {
        return Err(SourceError::StillBlocked { source_desc: desc });
    }
    let done = Arc::new(AtomicBool::new(false));
    let (done2, path2) = (done.clone(), path.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let submitted = readers::submit(Box::new(move || {
        let r = f();
        // Under the lock, so that a timeout cannot mark the path blocked
        // after this read has finished.
        if let Ok(mut b) = BLOCKED.lock() {
            done2.store(true, Ordering::SeqCst);
            b.remove(&path2);
        }
        let _ = tx.send(r);
    }));
    if let Err(why) = submitted {
        return Err(SourceError::Unreadable {
            source_desc: desc,
            why,
        });
    }
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(SourceError::Unreadable {
            source_desc: desc,
            why: "the reader thread failed".into(),
        }),
        Err(_) => {
            if let Ok(mut b) = BLOCKED.lock() {
                if !done.load(Ordering::SeqCst) {
                    b.insert(path);
                }
            }
            Err(SourceError::TimedOut {
                source_desc: desc,
                after: deadline,
            })
        }
    }
}

/// The threads that open and read sources. Not tokio's blocking pool: the
/// runtime waits for its threads at shutdown, so one read parked on a hung
/// mount would keep SIGTERM from stopping the agent. These threads are
/// detached and die with the process. The pool grows by one when no reader
/// is idle (a hung read keeps its thread), up to [`MAX_READERS`]; past
/// that, reads queue, each still under its deadline. The queue is bounded
/// by the number of source paths: a read that timed out marks its path
/// blocked, and a blocked path is not submitted again until that read ran.
mod readers {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Mutex, OnceLock};

    pub type Job = Box<dyn FnOnce() + Send>;
    /// Reader threads at most: each hung source path holds one.
    pub const MAX_READERS: usize = 64;

    struct Pool {
        tx: Mutex<mpsc::Sender<Job>>,
        rx: Arc<Mutex<mpsc::Receiver<Job>>>,
        idle: Arc<AtomicUsize>,
        total: AtomicUsize,
    }

    fn pool() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            Pool {
                tx: Mutex::new(tx),
                rx: Arc::new(Mutex::new(rx)),
                idle: Arc::new(AtomicUsize::new(0)),
                total: AtomicUsize::new(0),
            }
        })
    }

    pub fn submit(job: Job) -> Result<(), String> {
        let p = pool();
        let grow = p.idle.load(Ordering::SeqCst) == 0
            && p.total
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < MAX_READERS).then_some(n + 1)
                })
                .is_ok();
        if grow {
            let n = p.total.load(Ordering::SeqCst);
            let (rx, idle) = (p.rx.clone(), p.idle.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vmcred-source-{n}"))
                .spawn(move || loop {
                    idle.fetch_add(1, Ordering::SeqCst);
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    idle.fetch_sub(1, Ordering::SeqCst);
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                p.total.fetch_sub(1, Ordering::SeqCst);
                return Err(format!("cannot start a source reader thread: {e}"));
            }
        }
        p.tx.lock()
            .map_err(|_| "the source reader pool is broken".to_string())?
            .send(job)
            .map_err(|_| "the source reader pool is gone".to_string())
    }
}

/// Reads the named credentials of a VM (all when `only` is empty), each
/// on its own blocking thread under `deadline`; a credential whose file is
/// unchanged since it was last read and whose digest is in `known` (what
/// the guest holds) is not read again. Values that cannot be read are
/// reported per name, not fatal: a late credential whose file does not
/// exist yet, or a hung one, must not block the others.
pub async fn read_vm(
    vm: &Vm,
    only: &[String],
    credentials_dir: Option<&Path>,
    known: &BTreeMap<String, [u8; 32]>,
    deadline: Duration,
) -> (BTreeMap<String, Fetched>, BTreeMap<String, SourceError>) {
    let mut values = BTreeMap::new();
    let mut errors = BTreeMap::new();
    // Awaited together inside the caller's task, not spawned: every read
    // is handed to the reader threads at the first poll, so they still run
    // at once, and a rotate's read costs no task spawn (each woke the other
    // runtime worker; see ARCHITECTURE.md, "Local sockets").
    let reads = vm
        .credentials
        .iter()
        .filter(|(name, _)| only.is_empty() || only.contains(*name))
        .map(|(name, cred)| {
            let known = known.get(name).copied();
            async move {
                let r = read_with_deadline(cred, credentials_dir, known, deadline).await;
                (name.clone(), r)
            }
        });
    for (name, r) in futures_util::future::join_all(reads).await {
        match r {
            Ok(v) => {
                values.insert(name, v);
            }
            Err(e) => {
                errors.insert(name, e);
            }
        }
    }
    // The guest's mount holds 1 MiB in all: refuse a set that cannot fit,
    // before any byte of it leaves the host.
    if let Err(e) = rules::validate_total(values.values().map(Fetched::len)) {
        for name in values.keys() {
            errors.insert(name.clone(), SourceError::Rule(e.clone()));
        }
        values.clear();
    }
    (values, errors)
}

/// `$CREDENTIALS_DIRECTORY` of this process, if systemd set it.
pub fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Credential;

    fn cred(name: &str, source: Source) -> Credential {
        Credential {
            name: name.into(),
            source,
            boot: false,
            allow_on_command_line: false,
        }
    }

    #[test]
    fn reads_paths_and_credentials_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"v1").unwrap();
        let v = read(&cred("A", Source::Path(d.path().join("f"))), None).unwrap();
        assert_eq!(&v.bytes[..], b"v1");
        assert_eq!(v.digest, rules::digest(b"v1"));
        let v = read(&cred("A", Source::Credential("f".into())), Some(d.path())).unwrap();
        assert_eq!(&v.bytes[..], b"v1");
        let e = read(&cred("A", Source::Credential("f".into())), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("LoadCredential=f:"), "{e}");
    }

    #[test]
    fn missing_oversized_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let e = read(&cred("A", Source::Path(d.path().join("nope"))), None)
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::Missing { .. }));
        let e = read(&cred("A", Source::Path(d.path().to_path_buf())), None)
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::NotAFile { .. }));
        std::fs::write(d.path().join("big"), vec![b'x'; MAX_CREDENTIAL_BYTES + 1]).unwrap();
        let e = read(&cred("A", Source::Path(d.path().join("big"))), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("1 MiB"), "{e}");
    }

    #[tokio::test]
    async fn a_fifo_is_refused_at_once_not_waited_on() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever opens it: a blocking open() would hang forever.
        let e = read_with_deadline(
            &cred("A", Source::Path(fifo.clone())),
            None,
            None,
            Duration::from_secs(30),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, SourceError::NotAFile { .. }), "{e}");
        // A symlink to a regular file is still followed (sops-nix layout).
        std::fs::write(d.path().join("real"), b"v").unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        let v = read_with_deadline(
            &cred("A", Source::Path(d.path().join("link"))),
            None,
            None,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(matches!(v, Fetched::Value(v) if &v.bytes[..] == b"v"));
    }

    #[tokio::test]
    async fn a_hung_read_times_out_and_is_not_stacked() {
        let path = PathBuf::from("/nonexistent/hung-source-test");
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let e = run_with_deadline(
            path.clone(),
            "hung".into(),
            Duration::from_millis(50),
            move || {
                let _ = gate.recv();
                Err::<(), _>(SourceError::Missing {
                    source_desc: "hung".into(),
                })
            },
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, SourceError::TimedOut { .. }), "{e}");
        assert!(e.to_string().contains("timed out"), "{e}");
        // While the first read is parked, the path is not read again.
        let e = run_with_deadline(path.clone(), "hung".into(), Duration::from_secs(30), || {
            Err::<(), _>(SourceError::Unreadable {
                source_desc: "x".into(),
                why: "must not run while an earlier read is blocked".into(),
            })
        })
        .await
        .err()
        .unwrap();
        assert!(matches!(e, SourceError::StillBlocked { .. }), "{e}");
        // Once the hung read returns, the path is usable again.
        release.send(()).unwrap();
        vmcred_wait(|| !BLOCKED.lock().unwrap().contains(&path)).await;
        let e = run_with_deadline(path, "x".into(), Duration::from_secs(30), || {
            Err::<(), _>(SourceError::Missing {
                source_desc: "x".into(),
            })
        })
        .await
        .err()
        .unwrap();
        assert!(matches!(e, SourceError::Missing { .. }), "{e}");
    }

    /// Waits until a file written now has a stamp old enough to cache.
    fn settle() {
        std::thread::sleep(RACY + Duration::from_millis(100));
    }

    /// A version read right after it changed is not cached: a same-size
    /// rewrite in place within the file system's timestamp granule (same
    /// stamp) must still be seen.
    #[test]
    fn a_version_read_right_after_its_change_is_read_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, b"one").unwrap();
        let c = cred("A", Source::Path(p.clone()));
        let fetch = |known| read_if_changed(&c, None, known).unwrap();
        let d1 = fetch(None).digest();
        assert!(matches!(fetch(Some(d1)), Fetched::Value(v) if &v.bytes[..] == b"one"));
        std::fs::write(&p, b"two").unwrap();
        assert!(matches!(fetch(Some(d1)), Fetched::Value(v) if &v.bytes[..] == b"two"));
        // A change time in the future (the clock went back) is not settled.
        let now = SystemTime::now();
        let stamp = |secs: i64| Stamp {
            dev: 0,
            ino: 0,
            size: 0,
            mtime: (secs, 0),
            ctime: (secs, 0),
        };
        let epoch =
            |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(!stamp(epoch(now) + 60).settled(now));
        assert!(!stamp(epoch(now)).settled(now));
        assert!(stamp(epoch(now) - 3).settled(now));
    }

    #[test]
    fn an_unchanged_file_is_not_read_again_and_every_kind_of_change_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, b"one").unwrap();
        let c = cred("A", Source::Path(p.clone()));
        let fetch = |known| read_if_changed(&c, None, known).unwrap();
        settle();
        let first = fetch(None);
        assert!(matches!(first, Fetched::Value(_)));
        let d1 = first.digest();
        // Same file, the guest holds its digest: no read.
        assert!(matches!(fetch(Some(d1)), Fetched::Unchanged { digest, len: 3 } if digest == d1));
        // The guest holds something else: the bytes are needed.
        assert!(matches!(fetch(Some([0; 32])), Fetched::Value(_)));
        // Replaced by rename (new inode), same size and content length.
        let tmp = d.path().join("s.new");
        std::fs::write(&tmp, b"two").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let f = fetch(Some(d1));
        assert!(matches!(&f, Fetched::Value(v) if &v.bytes[..] == b"two"));
        let d2 = f.digest();
        // Read again while its change is recent; once settled, not.
        assert!(matches!(fetch(Some(d2)), Fetched::Value(_)));
        settle();
        assert!(matches!(fetch(Some(d2)), Fetched::Value(_)));
        assert!(matches!(fetch(Some(d2)), Fetched::Unchanged { .. }));
        // Rewritten in place, same size.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"six").unwrap();
        assert!(matches!(fetch(Some(d2)), Fetched::Value(v) if &v.bytes[..] == b"six"));
    }

    /// The same change detection when the source is on tmpfs and read in
    /// the VM's task (memfs.rs): a rename over it and a same-size rewrite
    /// in place are both read again, never served from what was read before.
    #[tokio::test]
    async fn a_source_on_tmpfs_is_read_inline_and_every_change_is_seen() {
        if !memfs::tests::available_or_skip() {
            return;
        }
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, b"one").unwrap();
        let c = cred("A", Source::Path(p.clone()));
        let deadline = Duration::from_secs(30);
        settle();
        let inline_before = inline_reads();
        let fetch = |known| read_with_deadline(&c, None, known, deadline);
        let first = fetch(None).await.unwrap();
        assert!(matches!(&first, Fetched::Value(v) if &v.bytes[..] == b"one"));
        let d1 = first.digest();
        assert!(
            matches!(fetch(Some(d1)).await.unwrap(), Fetched::Unchanged { digest, len: 3 } if digest == d1)
        );
        let tmp = d.path().join("s.new");
        std::fs::write(&tmp, b"two").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        let f = fetch(Some(d1)).await.unwrap();
        assert!(matches!(&f, Fetched::Value(v) if &v.bytes[..] == b"two"));
        let d2 = f.digest();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"six").unwrap();
        let f = fetch(Some(d2)).await.unwrap();
        assert!(matches!(&f, Fetched::Value(v) if &v.bytes[..] == b"six"));
        // Removed: the reader thread says so, as for any file.
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            fetch(None).await.err().unwrap(),
            SourceError::Missing { .. }
        ));
        // At least the reads above after the first lookup went inline (the
        // counter is shared with tests running alongside).
        assert!(inline_reads() >= inline_before + 3);
        // Too large on tmpfs: refused as from a reader thread.
        std::fs::write(&p, vec![b'x'; MAX_CREDENTIAL_BYTES + 1]).unwrap();
        let e = fetch(None).await.err().unwrap();
        assert!(e.to_string().contains("1 MiB"), "{e}");
    }

    #[test]
    fn a_hung_read_does_not_keep_the_runtime_from_shutting_down() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (_keep, gate) = std::sync::mpsc::channel::<()>();
        let e = rt
            .block_on(run_with_deadline(
                PathBuf::from("/nonexistent/hung-at-shutdown"),
                "hung".into(),
                Duration::from_millis(20),
                move || {
                    // Parked for as long as the test lives.
                    let _ = gate.recv();
                    Err::<(), _>(SourceError::Missing {
                        source_desc: "hung".into(),
                    })
                },
            ))
            .err()
            .unwrap();
        assert!(matches!(e, SourceError::TimedOut { .. }), "{e}");
        // Dropping the runtime (what `serve` does on SIGTERM) must not
        // wait for the parked read.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(rt);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("runtime shutdown waited for a hung source read");
    }

    #[tokio::test]
    async fn a_burst_beyond_the_reader_pool_queues_instead_of_failing() {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..(readers::MAX_READERS * 3) {
            set.spawn(run_with_deadline(
                PathBuf::from(format!("/nonexistent/burst-{i}")),
                format!("burst-{i}"),
                Duration::from_secs(60),
                move || {
                    std::thread::sleep(Duration::from_millis(20));
                    Ok(i)
                },
            ));
        }
        let mut done = 0;
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
            done += 1;
        }
        assert_eq!(done, readers::MAX_READERS * 3);
    }

    /// Waits (bounded) for a condition another thread makes true.
    async fn vmcred_wait(mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 10 s");
    }
}
