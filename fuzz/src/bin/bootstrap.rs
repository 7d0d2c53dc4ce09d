//! The `vmcred.bootstrap` credential as the guest reads it at start.
//! Invariants: no panic; an accepted bootstrap re-encodes to one line
//! without commas (cloud-hypervisor splits OEM strings on them) that parses
//! back to the same value; its port is neither 0 nor `u32::MAX`; errors are
//! bounded (a hostile value is never echoed whole).

use vmcred_proto::bootstrap::{Bootstrap, MAX_BOOTSTRAP_BYTES};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        match Bootstrap::parse(data) {
            Ok(b) => {
                assert!(data.len() <= MAX_BOOTSTRAP_BYTES);
                assert!(b.port != 0 && b.port != u32::MAX);
                let line = b.encode();
                assert!(!line.contains(',') && !line.contains('\n'), "{line:?}");
                assert!(line.len() <= MAX_BOOTSTRAP_BYTES);
                assert_eq!(Bootstrap::parse(line.as_bytes()), Ok(b), "round trip");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.len() < 1024, "error of {} bytes", msg.len());
            }
        }
    });
}
