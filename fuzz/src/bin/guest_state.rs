//! The guest agent's state file (`state.json`: applied generation and the
//! names vmcred manages) as `Store::open` loads it after a restart; it
//! lives on `/run` and a crash can leave anything there. Invariants: no
//! panic; a file that loads names only valid credentials; the store it
//! opens answers `Hello` (`held`) with a subset of those names.

use std::sync::OnceLock;

use vmcred_fuzz::scratch_dir;
use vmcred_guest::store::{Limits, Store};
use vmcred_proto::rules;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let dir = DIR.get_or_init(|| {
            let d = scratch_dir("vmcred-fuzz-state-");
            std::fs::create_dir(d.path().join("creds")).expect("creds dir");
            std::fs::write(d.path().join("creds/API_KEY"), b"v").expect("a credential");
            d
        });
        let creds = dir.path().join("creds");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::write(state.join("state.json"), data).expect("write the state file");
        let Ok(store) = Store::open(&creds, &state, Limits::default()) else {
            return;
        };
        let st = store.state();
        for name in &st.managed {
            assert!(rules::validate_name(name).is_ok(), "loaded {name:?}");
        }
        let held = store.held().expect("held() on a loaded store");
        for (name, _) in &held {
            assert!(st.managed.contains(name), "held {name:?} is not managed");
        }
    });
}
