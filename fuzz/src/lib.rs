//! Shared pieces of the fuzz targets: one runtime per process, a real guest
//! store in a fresh temporary directory, and a snapshot of a directory to
//! prove that a refused request changed nothing.
//!
//! Every target is an `afl::fuzz!` binary in `src/bin/`; AFL++ runs them in
//! persistent mode, and a panic anywhere (including in a spawned task: the
//! release profile aborts on panic) is a crash.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tokio::runtime::Runtime;
use vmcred_guest::config::GuestConfig;
use vmcred_guest::notify::Readiness;
use vmcred_guest::service::GuestService;
use vmcred_guest::store::{Limits, State, Store};
use vmcred_guest::units::UnitRunner;

/// One current-thread runtime per fuzzing process, for targets without a
/// guest fixture: building one per input would dominate the cost of an
/// execution.
pub fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the fuzz target")
    })
}

/// Where targets create their temporary directories: the directory
/// `fuzz/run.sh` made for this run alone (`VMCRED_FUZZ_SCRATCH`, on tmpfs
/// when there is one, so thousands of stores a second cost no disk I/O),
/// else `/dev/shm`, else the system's temporary directory.
///
/// The per-run directory is what lets a run clean up after itself without
/// touching another run's live stores: several runs share this machine,
/// and a run that once removed every `vmcred-fuzz-*` directory in
/// `/dev/shm` pulled the store from under a running `guest_hello`, which
/// then aborted on every input.
pub fn scratch_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMCRED_FUZZ_SCRATCH") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh directory named `prefix…` under [`scratch_root`], removed when
/// dropped: every fixture's, so none lands anywhere else.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_root())
        .expect("a scratch directory")
}

/// Names in the guest's credentials directory at the start of every
/// `guest_apply` execution.
pub const BASE_GENERATION: u64 = 5;
pub const MANAGED: &str = "API_KEY";
pub const MANAGED_VALUE: &[u8] = b"old-api-key";
/// A credential PID 1 imported at boot: not vmcred's to remove.
pub const FOREIGN: &str = "FOREIGN";
pub const FOREIGN_VALUE: &[u8] = b"from-smbios";

/// The guest config every guest target uses: one credential with its own
/// mode, and no unit actions (a unit action would spawn `systemctl`).
pub const GUEST_CONFIG: &str = "[credentials.API_KEY]\nmode = \"0440\"\n";

/// A real guest agent's store and service in a fresh directory, with a
/// runtime of its own. The service starts a background task (the retry of
/// owed unit actions) that lives as long as its runtime and holds the
/// store, with its directory descriptor: on a runtime shared by every
/// execution those tasks piled up, one per input, until the process ran
/// out of file descriptors and `guest_apply` aborted. Dropping the fixture
/// drops its runtime, and with it the task, the store and the descriptor.
/// (The agent itself makes one service per process.)
pub struct GuestFixture {
    /// Dropped first, so the task lets go of the store before the
    /// directory is removed.
    pub rt: Runtime,
    pub dir: tempfile::TempDir,
    pub creds: PathBuf,
    pub state: PathBuf,
    pub store: Arc<Store>,
    pub service: GuestService,
}

impl GuestFixture {
    /// A store holding one managed credential at generation
    /// [`BASE_GENERATION`], one boot-time credential and the bootstrap.
    pub fn new() -> GuestFixture {
        let dir = scratch_dir("vmcred-fuzz-");
        let creds = dir.path().join("creds");
        let state = dir.path().join("state");
        std::fs::create_dir(&creds).expect("creds dir");
        std::fs::create_dir(&state).expect("state dir");
        for (name, value) in [
            (MANAGED, MANAGED_VALUE),
            (FOREIGN, FOREIGN_VALUE),
            (
                "vmcred.bootstrap",
                b"vmcred-bootstrap-v1 port=700".as_slice(),
            ),
        ] {
            let p = creds.join(name);
            std::fs::write(&p, value).expect("seed credential");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400))
                .expect("seed mode");
        }
        let st = State {
            generation: BASE_GENERATION,
            managed: [MANAGED.to_string()].into_iter().collect(),
            owed: Vec::new(),
        };
        std::fs::write(
            state.join("state.json"),
            serde_json::to_vec(&st).expect("state json"),
        )
        .expect("state file");
        let store =
            Arc::new(Store::open(&creds, &state, Limits::default()).expect("open the store"));
        let config = Arc::new(GuestConfig::parse(GUEST_CONFIG).expect("guest config"));
        // The service starts its background retry task at construction,
        // so it is built inside the fixture's runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the guest fixture");
        let entered = rt.enter();
        let service = GuestService::new(
            store.clone(),
            config,
            UnitRunner::new(PathBuf::from("/bin/false")),
            Arc::new(Readiness::new()),
        );
        drop(entered);
        GuestFixture {
            rt,
            dir,
            creds,
            state,
            store,
            service,
        }
    }
}

impl Default for GuestFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// One file as a snapshot sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub mode: u32,
    pub bytes: Vec<u8>,
}

/// Every entry of `dir` (not recursive) with its mode and contents; what a
/// refused request must leave exactly as it was.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read the directory") {
        let e = e.expect("a directory entry");
        let meta = std::fs::symlink_metadata(e.path()).expect("stat an entry");
        let bytes = if meta.is_file() {
            std::fs::read(e.path()).expect("read an entry")
        } else {
            Vec::new()
        };
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            Entry {
                mode: meta.mode(),
                bytes,
            },
        );
    }
    out
}

/// The store's temporary files (`.NAME.vmcred-tmp`, `.vmcred-tmp.HASH`):
/// none may survive a request, accepted or refused.
pub fn is_temp_name(name: &str) -> bool {
    (name.starts_with('.') && name.ends_with(".vmcred-tmp")) || name.starts_with(".vmcred-tmp.")
}

/// Characters that must never reach a log line or a terminal unescaped:
/// controls, and (issue 9 point 6) bidi overrides and isolates, line and
/// paragraph separators, zero-width characters and other invisible format
/// characters.
pub fn is_dangerous_char(c: char, strict: bool) -> bool {
    if c.is_control() {
        return true;
    }
    if !strict {
        return false;
    }
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{2069}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcred_proto::rpc::Guest;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("list /proc/self/fd")
            .count()
    }

    /// `guest_apply` makes a fixture per input, thousands a second in one
    /// process: a fixture must give back everything it opened.
    #[test]
    fn fixtures_leak_no_descriptors() {
        drop(GuestFixture::new());
        let before = open_fds();
        for _ in 0..200 {
            let fx = GuestFixture::new();
            let reply = fx
                .rt
                .block_on(fx.service.hello(tonic::Request::new(Default::default())))
                .expect("Hello");
            assert_eq!(reply.into_inner().applied_generation, BASE_GENERATION);
        }
        let after = open_fds();
        assert!(
            after <= before + 8,
            "{} descriptors more after 200 fixtures",
            after - before
        );
    }
}
