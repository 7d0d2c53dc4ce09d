//! The guest's TOML config (`vmcred_guest::config::GuestConfig::parse`).
//! Invariants: no panic; an accepted config names only valid, non-reserved
//! credentials other than the bootstrap, unit names that systemctl can
//! never take for an option, and modes within 0444 that the owner can read.

use vmcred_guest::config::{validate_unit, GuestConfig};
use vmcred_guest::store::reserved_name;
use vmcred_proto::rules;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(cfg) = GuestConfig::parse(text) else {
            return;
        };
        for (name, p) in &cfg.credentials {
            assert!(rules::validate_name(name).is_ok(), "{name:?}");
            assert_ne!(name, rules::BOOTSTRAP_CREDENTIAL);
            assert!(reserved_name(name).is_none(), "{name:?}");
            assert_eq!(p.mode & !0o444, 0, "mode {:o}", p.mode);
            assert_ne!(p.mode & 0o400, 0, "mode {:o}", p.mode);
            assert_eq!(cfg.mode(name), p.mode);
            for u in p.restart_units.iter().chain(&p.reload_units) {
                assert!(validate_unit(u).is_ok(), "{u:?}");
                assert!(!u.starts_with('-') && !u.contains('/'), "{u:?}");
            }
        }
    });
}
