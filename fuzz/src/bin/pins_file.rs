//! The guest's host key pin set (`pins.json` in its state directory) as
//! `PinStore::open` reads it at every start: after a crash or a hostile
//! write it can hold anything. The bootstrap pin is fixed; seeds name it as
//! the root, or another root (a relaunched VM). Invariants: no panic; a
//! file that is refused is left exactly as it was (the operator decides);
//! an accepted set holds 1 or 2 pins, holds exactly the file's pins when the
//! file's root is the bootstrap's and only the bootstrap pin otherwise;
//! `accepts` agrees with the set; what it keeps reads back the same after a
//! restart; a `Trust` from a pinned session gives `[session, next]`, which a
//! restart keeps too, and a session with an unpinned key changes nothing.

use std::sync::OnceLock;

use vmcred_fuzz::scratch_dir;
use vmcred_guest::pins::{PinError, PinStore, MAX_PINS};
use vmcred_proto::tls::{Pin, PinPolicy};

/// The bootstrap pin every open uses (the seeds' root).
const BOOTSTRAP: Pin = Pin([0xb0; 32]);
/// A pin no seed holds.
const NEXT: Pin = Pin([0x4e; 32]);

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

#[derive(serde::Deserialize)]
struct PinFile {
    root: String,
    pins: Vec<String>,
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let dir = DIR.get_or_init(|| scratch_dir("vmcred-fuzz-pins-")).path();
        let file = dir.join("pins.json");
        std::fs::write(&file, data).expect("write pins.json");
        let store = match PinStore::open(dir, BOOTSTRAP) {
            Ok(s) => s,
            Err(e) => {
                assert!(matches!(e, PinError::Corrupt { .. }), "{e}");
                assert_eq!(
                    std::fs::read(&file).expect("read pins.json"),
                    data,
                    "a refused pin file was changed"
                );
                return;
            }
        };
        let pins = store.pins();
        assert!(
            !pins.is_empty() && pins.len() <= MAX_PINS,
            "{} pins",
            pins.len()
        );
        let parsed: PinFile = serde_json::from_slice(data).expect("accepted, so it is JSON");
        let root: Pin = parsed.root.parse().expect("accepted, so the root is a pin");
        if root == BOOTSTRAP {
            let want: Vec<Pin> = parsed
                .pins
                .iter()
                .map(|p| p.parse().expect("accepted, so every pin parses"))
                .collect();
            assert_eq!(pins, want, "the stored set of the same bootstrap");
        } else {
            assert_eq!(pins, vec![BOOTSTRAP], "a new bootstrap is the only pin");
        }
        for p in &pins {
            assert!(store.accepts(p));
        }
        assert!(!store.accepts(&NEXT) || pins.contains(&NEXT));

        let again = PinStore::open(dir, BOOTSTRAP).expect("what was kept reopens");
        assert_eq!(again.pins(), pins, "the set survives a restart");

        let unpinned = Pin([0x55; 32]);
        if !pins.contains(&unpinned) {
            assert!(matches!(
                again.add_next(unpinned, NEXT),
                Err(PinError::NotPinned)
            ));
            assert_eq!(again.pins(), pins, "an unpinned session changed the set");
        }
        let session = pins[pins.len() - 1];
        let after = again
            .add_next(session, NEXT)
            .expect("Trust from a pinned session");
        if pins.contains(&NEXT) {
            assert_eq!(after, pins);
        } else {
            assert_eq!(after, vec![session, NEXT]);
        }
        let reopened = PinStore::open(dir, BOOTSTRAP).expect("reopen after Trust");
        assert_eq!(reopened.pins(), after, "Trust survives a restart");
    });
}
