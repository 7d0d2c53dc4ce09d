//! The host agent's per-VM generation file (`state_dir/generations/<vm>`),
//! read back after a restart or a crash. Invariants: no panic; a file
//! reads as a number only when it holds exactly one (white space around
//! it allowed), never as zero by accident; what `set` writes reads back.

use std::sync::OnceLock;

use vmcred_fuzz::scratch_root;
use vmcred_host::generations::Generations;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let dir = DIR.get_or_init(|| {
            tempfile::Builder::new()
                .prefix("vmcred-fuzz-gen-")
                .tempdir_in(scratch_root())
                .expect("a scratch directory")
        });
        let g = Generations::open(dir.path().join("g")).expect("open generations");
        std::fs::write(dir.path().join("g/vm"), data).expect("write the file");
        let expected = std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        match g.get("vm") {
            Ok(n) => {
                assert_eq!(Some(n), expected, "read {n} from {data:?}");
                let next = n.saturating_add(1);
                g.set("vm", next).expect("set");
                assert_eq!(g.get("vm").expect("read back"), next);
            }
            Err(e) => {
                assert_eq!(expected, None, "refused a valid number: {e}");
                assert!(e.to_string().len() < 1024);
            }
        }
    });
}
