//! Credential names, sizes and digests (`proto::rules`), which both agents
//! apply. Input: a flag byte, then a name, a NUL, then a value.
//! Invariants: `validate_name` accepts exactly systemd's rules as
//! ARCHITECTURE.md states them (1–255 bytes of printable ASCII without
//! space, `/`, `:`, and not `.`/`..`, nor a name the guest reserves for its
//! temporary files: `*.vmcred-tmp`, `.vmcred-tmp.*`); errors and display names are
//! bounded; `verify_digest` accepts exactly the SHA-256 of the value;
//! size checks never overflow.

use vmcred_proto::rules::{
    digest, display_name, validate_name, validate_size, validate_total, verify_digest,
    MAX_CREDENTIAL_BYTES, MAX_NAME_LEN, MAX_TOTAL_BYTES,
};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&flags, rest)) = data.split_first() else {
            return;
        };
        let (name_bytes, value) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let name = String::from_utf8_lossy(name_bytes);
        let expected = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'/' && b != b':')
            // The guest's temporary-file names are reserved on both sides.
            && !name.ends_with(".vmcred-tmp")
            && !name.starts_with(".vmcred-tmp.");
        match validate_name(&name) {
            Ok(()) => assert!(expected, "accepted {name:?}"),
            Err(e) => {
                assert!(!expected, "refused {name:?}: {e}");
                assert!(e.to_string().len() < 1024, "unbounded error");
            }
        }
        assert!(display_name(&name).chars().count() <= 65);

        // Sizes: scale the value's length up by the flag byte so the
        // limits themselves are crossed without megabytes of input.
        let len = value.len().saturating_mul(usize::from(flags) << 12);
        assert_eq!(
            validate_size(&name, len).is_ok(),
            len <= MAX_CREDENTIAL_BYTES
        );
        let parts = [len, value.len(), usize::MAX >> (flags % 64)];
        let total = parts.iter().fold(0usize, |a, b| a.saturating_add(*b));
        assert_eq!(validate_total(parts).is_ok(), total <= MAX_TOTAL_BYTES);

        // Digests: the claim is either the true digest or the value's own
        // first bytes, which must be refused unless they happen to match.
        let real = digest(value);
        let claimed: Vec<u8> = if flags & 1 == 0 {
            real.to_vec()
        } else {
            value.iter().copied().take(32).collect()
        };
        match verify_digest(&name, value, &claimed) {
            Ok(d) => {
                assert_eq!(d, real);
                assert_eq!(claimed.as_slice(), real.as_slice());
            }
            Err(_) => assert_ne!(claimed.as_slice(), real.as_slice()),
        }
    });
}
