//! `HelloReply`, `ApplyReply` and `TrustReply` as the host agent decodes
//! them from a guest (first input byte picks which). Invariants: no panic;
//! every string the guest sent comes out of `vm::guest_text` bounded and
//! with no control, bidi, separator or zero-width character left unescaped
//! (issue 9 point 6); the host's name check never admits an invalid name;
//! prost round trip.
//!
//! The host's use of the decoded reply (generation, held digests, report)
//! lives inside its per-VM task and is exercised by the hostile-guest
//! tests, not here.

use prost::Message;
use vmcred_fuzz::is_dangerous_char;
use vmcred_host::vm::guest_text;
use vmcred_proto::rpc::pb::{ApplyReply, HelloReply, TrustReply};
use vmcred_proto::rules;

/// What `guest_text` writes of a guest string, in characters, escapes
/// included (vm.rs `bound::TEXT`), before its "… N more" marker.
const MAX_SHOWN_CHARS: usize = 300;
/// The marker: "… " and a count of at most 20 digits and " more".
const MAX_MARKER_CHARS: usize = 2 + 20 + 5;

fn check_text(s: &str) {
    let out = guest_text(s);
    assert!(
        out.chars().count() <= MAX_SHOWN_CHARS + MAX_MARKER_CHARS,
        "guest_text output of {} chars",
        out.chars().count()
    );
    if let Some(c) = out.chars().find(|c| is_dangerous_char(*c, true)) {
        panic!("guest_text let {c:?} through");
    }
}

fn check_name_rule(name: &str) {
    if rules::validate_name(name).is_ok() {
        assert!(!name.is_empty() && name.len() <= rules::MAX_NAME_LEN);
        assert!(name
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'/' && b != b':'));
        assert!(name != "." && name != "..");
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&which, body)) = data.split_first() else {
            return;
        };
        if which & 3 == 2 {
            let Ok(r) = TrustReply::decode(body) else {
                return;
            };
            assert_eq!(
                TrustReply::decode(r.encode_to_vec().as_slice()).ok(),
                Some(r)
            );
        } else if which & 1 == 0 {
            let Ok(r) = HelloReply::decode(body) else {
                return;
            };
            assert_eq!(
                HelloReply::decode(r.encode_to_vec().as_slice()).ok(),
                Some(r.clone())
            );
            check_text(&r.guest_version);
            for h in &r.held {
                check_name_rule(&h.name);
                check_text(&h.name);
            }
            for u in &r.owed_units {
                check_text(&u.unit);
                check_text(&u.action);
                check_text(&u.error);
            }
        } else {
            let Ok(r) = ApplyReply::decode(body) else {
                return;
            };
            assert_eq!(
                ApplyReply::decode(r.encode_to_vec().as_slice()).ok(),
                Some(r.clone())
            );
            for c in &r.results {
                check_name_rule(&c.name);
                check_text(&c.name);
                check_text(&c.error);
            }
            for u in r.units.iter().chain(&r.owed_units) {
                check_text(&u.unit);
                check_text(&u.action);
                check_text(&u.error);
            }
        }
    });
}
