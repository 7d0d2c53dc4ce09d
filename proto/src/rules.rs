//! Credential rules shared by both agents, so that the host refuses at
//! config time exactly what the guest would refuse on the wire.
//!
//! The limits mirror systemd: `/run/credentials/@system` is a 1 MiB,
//! 1024-inode mount and a single credential may be at most 1 MiB
//! (`CREDENTIAL_SIZE_MAX`). Names follow `credential_name_valid()`:
//! a valid file name (no `/`, not `.` or `..`, at most 255 bytes) that is
//! printable ASCII and carries no `:` (which `LoadCredential=ID:PATH` would
//! split on).

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Largest single credential systemd accepts.
pub const MAX_CREDENTIAL_BYTES: usize = 1024 * 1024;
/// Budget for all of one VM's credentials together: the size of the
/// credentials mount in the guest.
pub const MAX_TOTAL_BYTES: usize = 1024 * 1024;
/// Inodes in the guest's credentials mount.
pub const MAX_FILES: usize = 1024;
/// Longest credential name (a file name).
pub const MAX_NAME_LEN: usize = 255;
/// Most credentials in one message; well under `MAX_FILES`, and a bound on
/// the per-request work either side will do.
pub const MAX_CREDENTIALS_PER_MESSAGE: usize = 1000;
/// Largest gRPC message either side decodes: a full set plus framing.
pub const MAX_MESSAGE_BYTES: usize = MAX_TOTAL_BYTES + 256 * 1024;
/// How long the guest spends at most on unit actions (restarts, reloads)
/// before it answers an `Apply`: actions it did not reach stay owed and
/// are retried after the reply. The host waits this much longer for an
/// `Apply` than for other calls, so a unit that is slow to restart does
/// not look like a lost guest.
pub const UNIT_ACTIONS_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);
/// Name of the bootstrap credential the guest reads at start.
pub const BOOTSTRAP_CREDENTIAL: &str = "vmcred.bootstrap";
/// Name of the launch key credential: the per-VM secret that `launch`
/// passes through a private carrier and the guest returns in `HelloReply`
/// (see ARCHITECTURE.md, "Launch key").
pub const LAUNCH_KEY_CREDENTIAL: &str = "vmcred.launch-key";
/// Longest launch key either side reads or accepts. The host makes 64
/// hex digits (32 random bytes); the bound keeps a hostile file or peer
/// from making anyone read or hold more.
pub const MAX_LAUNCH_KEY_BYTES: usize = 128;
/// Suffix of the guest store's temporary files (`.NAME.vmcred-tmp`).
pub const TMP_SUFFIX: &str = ".vmcred-tmp";
/// Prefix of the guest store's hashed temporary names, used when
/// `.NAME.vmcred-tmp` would be longer than a file name may be.
pub const TMP_HASHED_PREFIX: &str = ".vmcred-tmp.";
/// Characters a credential carried at boot may not contain: `=` ends the
/// name in an SMBIOS `io.systemd.credential:NAME=VALUE` string; `,` `[` `]`
/// are cloud-hypervisor's option syntax; `"` ends the quoted kernel
/// command line form `"systemd.set_credential=NAME:VALUE"`.
pub const BOOT_FORBIDDEN_CHARS: &[char] = &['=', ',', '[', ']', '"'];

/// Why a credential name or value was refused. Never carries a value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RuleError {
    #[error("credential name is empty")]
    EmptyName,
    #[error("credential name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    NameTooLong { len: usize },
    #[error("credential name {name:?} is not allowed: {why}")]
    BadName { name: String, why: &'static str },
    #[error("credential {name:?} is {len} bytes; the limit for one credential is {MAX_CREDENTIAL_BYTES} bytes (1 MiB)")]
    TooLarge { name: String, len: usize },
    #[error("credentials total {total} bytes; the limit for one VM is {MAX_TOTAL_BYTES} bytes (1 MiB, the size of the guest's credentials mount)")]
    TotalTooLarge { total: usize },
    #[error("{count} credentials in one message; the limit is {MAX_CREDENTIALS_PER_MESSAGE}")]
    TooMany { count: usize },
    #[error("credential {name:?}: digest does not match its value")]
    DigestMismatch { name: String },
    #[error("credential {name:?}: digest must be 32 bytes of SHA-256, got {len}")]
    DigestLength { name: String, len: usize },
    #[error("credential name {name:?} cannot be carried at boot (boot = true): it contains {ch:?}, which the SMBIOS, fw_cfg or kernel command line form cannot express; rename it or drop boot = true")]
    BadBootName { name: String, ch: char },
    #[error("credential {name:?} appears more than once")]
    Duplicate { name: String },
}

/// Checks a credential name against systemd's rules.
///
/// The name in an error is shown with `{:?}` escaping so that a hostile
/// name cannot inject control characters into a log line; it is capped at
/// 64 characters.
pub fn validate_name(name: &str) -> Result<(), RuleError> {
    let bad = |why| RuleError::BadName {
        name: display_name(name),
        why,
    };
    if name.is_empty() {
        return Err(RuleError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(RuleError::NameTooLong { len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(bad("'.' and '..' are not file names"));
    }
    for b in name.bytes() {
        match b {
            b'/' => return Err(bad("contains '/'")),
            b':' => return Err(bad("contains ':'")),
            0x21..=0x7e => {}
            b' ' => return Err(bad("contains a space")),
            _ => return Err(bad("must be printable ASCII")),
        }
    }
    if name.ends_with(TMP_SUFFIX) || name.starts_with(TMP_HASHED_PREFIX) {
        return Err(bad(
            "names ending in '.vmcred-tmp' or starting with '.vmcred-tmp.' are reserved for the guest's temporary files",
        ));
    }
    Ok(())
}

/// Checks a credential that is also carried at boot (`boot = true`): the
/// ordinary rules, plus what the boot carriers cannot express. Called by
/// the host's config validation so that `check-config`, `serve` and reload
/// refuse it, not `launch` at the VM's next start.
pub fn validate_boot_name(name: &str) -> Result<(), RuleError> {
    validate_name(name)?;
    if let Some(c) = name.chars().find(|c| BOOT_FORBIDDEN_CHARS.contains(c)) {
        return Err(RuleError::BadBootName {
            name: display_name(name),
            ch: c,
        });
    }
    Ok(())
}

/// A name shortened and safe to put into an error message.
pub fn display_name(name: &str) -> String {
    let mut s: String = name.chars().take(64).collect();
    if name.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Checks one value's size.
pub fn validate_size(name: &str, len: usize) -> Result<(), RuleError> {
    if len > MAX_CREDENTIAL_BYTES {
        return Err(RuleError::TooLarge {
            name: display_name(name),
            len,
        });
    }
    Ok(())
}

/// Checks a whole set's total size.
pub fn validate_total(sizes: impl IntoIterator<Item = usize>) -> Result<(), RuleError> {
    let total = sizes.into_iter().fold(0usize, usize::saturating_add);
    if total > MAX_TOTAL_BYTES {
        return Err(RuleError::TotalTooLarge { total });
    }
    Ok(())
}

/// SHA-256 of a value: what both sides compare to decide whether a write is
/// needed, and what the guest checks a received value against.
pub fn digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// Checks that `claimed` is the SHA-256 of `value`.
pub fn verify_digest(name: &str, value: &[u8], claimed: &[u8]) -> Result<[u8; 32], RuleError> {
    if claimed.len() != 32 {
        return Err(RuleError::DigestLength {
            name: display_name(name),
            len: claimed.len(),
        });
    }
    let actual = digest(value);
    // Not secret-dependent timing that matters: the digest of a value the
    // peer itself sent. A plain comparison is fine.
    if actual.as_slice() != claimed {
        return Err(RuleError::DigestMismatch {
            name: display_name(name),
        });
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["API_KEY", "vmcred.bootstrap", "a", "db-password", "x~y"] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
        assert!(validate_name(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_bad_names_with_reasons() {
        let cases = [
            ("", "empty"),
            ("../x", "'/'"),
            ("a/b", "'/'"),
            ("a:b", "':'"),
            (".", "'.'"),
            ("..", "'.'"),
            ("héllo", "printable ASCII"),
            ("a b", "space"),
            ("a\nb", "printable ASCII"),
        ];
        for (name, why) in cases {
            let err = validate_name(name).expect_err(name).to_string();
            assert!(err.contains(why), "{name:?}: {err}");
        }
        let err = validate_name(&"a".repeat(256)).unwrap_err().to_string();
        assert!(err.contains("256 bytes"), "{err}");
    }

    #[test]
    fn temp_file_names_are_reserved() {
        for n in [
            ".A.vmcred-tmp",
            "A.vmcred-tmp",
            ".vmcred-tmp",
            ".vmcred-tmp.0123abcd",
        ] {
            let err = validate_name(n).expect_err(n).to_string();
            assert!(
                err.contains("reserved for the guest's temporary files"),
                "{n}: {err}"
            );
        }
        for n in ["vmcred-tmp", "A.vmcred-tmpX", ".vmcred", "x.vmcred-tmp.y"] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn boot_names_refuse_carrier_syntax() {
        assert_eq!(validate_boot_name("ENVIRONMENT"), Ok(()));
        for (n, ch) in [
            ("x=y", '='),
            ("a,b", ','),
            ("a[b", '['),
            ("a]b", ']'),
            ("a\"b", '"'),
        ] {
            assert_eq!(validate_name(n), Ok(()), "{n} is fine for vsock delivery");
            let err = validate_boot_name(n).expect_err(n);
            assert_eq!(err, RuleError::BadBootName { name: n.into(), ch }, "{n}");
            assert!(err.to_string().contains("boot = true"), "{err}");
        }
        // The ordinary rules still apply.
        assert!(validate_boot_name("a/b").is_err());
        assert!(validate_boot_name(".A.vmcred-tmp").is_err());
    }

    #[test]
    fn sizes() {
        assert!(validate_size("x", MAX_CREDENTIAL_BYTES).is_ok());
        let err = validate_size("x", MAX_CREDENTIAL_BYTES + 1).unwrap_err();
        assert!(err.to_string().contains("1 MiB"));
        assert!(validate_total([MAX_TOTAL_BYTES / 2, MAX_TOTAL_BYTES / 2]).is_ok());
        assert!(validate_total([MAX_TOTAL_BYTES, 1]).is_err());
        assert!(validate_total([usize::MAX, usize::MAX]).is_err());
    }

    #[test]
    fn digests() {
        let d = digest(b"v");
        assert_eq!(verify_digest("n", b"v", &d), Ok(d));
        assert!(matches!(
            verify_digest("n", b"w", &d),
            Err(RuleError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_digest("n", b"v", &d[..31]),
            Err(RuleError::DigestLength { len: 31, .. })
        ));
    }

    #[test]
    fn errors_never_echo_long_names() {
        let long = "z".repeat(200);
        let err = validate_name(&format!("{long}/")).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }
}
