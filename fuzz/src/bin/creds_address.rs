//! The abstract socket address a peer of the guest's credential socket
//! (`creds.sock`) is bound to, as `creds_socket::parse_address` reads it:
//! systemd's `LoadCredential=` binds `<random hex>/unit/<unit>/<credential>`,
//! and any process in the guest can bind any address. Invariants: no
//! panic; an accepted address names a unit the config rules accept and a
//! credential the name rules accept; it is exactly `random/unit/U/C`
//! rebuilt from what was parsed (nothing dropped or invented); errors are
//! bounded.

use vmcred_guest::config::validate_unit;
use vmcred_guest::creds_socket::parse_address;
use vmcred_proto::rules::validate_name;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        match parse_address(data) {
            Ok(req) => {
                assert!(validate_unit(&req.unit).is_ok(), "unit {:?}", req.unit);
                assert!(
                    validate_name(&req.credential).is_ok(),
                    "credential {:?}",
                    req.credential
                );
                let text = std::str::from_utf8(data).expect("accepted only as UTF-8");
                let (random, rest) = text.split_once('/').expect("a random prefix");
                assert!(!random.is_empty() && random.len() <= 16);
                assert!(random.bytes().all(|b| b.is_ascii_hexdigit()), "{random:?}");
                assert_eq!(rest, format!("unit/{}/{}", req.unit, req.credential));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() < 2048, "error of {} bytes", msg.len());
            }
        }
    });
}
