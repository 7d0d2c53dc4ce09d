//! The host agent's generation high-water mark (`state_dir/generations/
//! reserved`), read back after a restart or a crash. Invariants: no panic;
//! the file opens only when it holds exactly one number (white space around
//! it allowed), never as zero by accident; a generation issued after
//! opening is strictly above that number, or the counter says it is
//! exhausted — it never goes back.

use std::sync::OnceLock;

use vmcred_fuzz::scratch_dir;
use vmcred_host::generations::{GenerationError, Generations};

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    afl::fuzz!(|data: &[u8]| {
        let dir = DIR.get_or_init(|| scratch_dir("vmcred-fuzz-gen-"));
        let gdir = dir.path().join("g");
        std::fs::create_dir_all(&gdir).expect("the generations directory");
        std::fs::write(gdir.join("reserved"), data).expect("write the mark");
        let expected = std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        match Generations::open(gdir) {
            Ok(g) => {
                let floor = expected.expect("opened a mark that is not one number");
                match rt.block_on(g.issue("vm")) {
                    Ok(n) => assert!(n > floor, "issued {n}, not above the mark {floor}"),
                    Err(GenerationError::Exhausted { .. }) => {
                        assert!(floor > u64::MAX / 2, "exhausted at a mark of {floor}")
                    }
                    // The writer may fail to persist on a full scratch disk;
                    // that is refused, never a generation below the mark.
                    Err(e) => assert!(e.to_string().len() < 1024),
                }
            }
            Err(e) => {
                assert_eq!(expected, None, "refused a valid number: {e}");
                assert!(e.to_string().len() < 1024);
            }
        }
    });
}
