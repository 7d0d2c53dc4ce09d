//! The guest agent's footprint, connected and idle. Not part of the test
//! run (`#[ignore]`): it measures whatever binaries it is pointed at.
//!
//! Build each agent alone (one cargo build would unify vmcred-proto's
//! "host" feature into the guest) and put both in one directory:
//!
//!     cargo build --profile guest -p vmcred-guest
//!     cargo build --release -p vmcred-host
//!     mkdir -p /tmp/fp && cp target/guest/vmcred-guest target/release/vmcred-host target/release/vmcred-host-agent /tmp/fp/
//!     VMCRED_FOOTPRINT_BIN_DIR=/tmp/fp \
//!       cargo test -p vmcred-tests --test footprint -- --ignored --nocapture

use std::path::PathBuf;
use std::time::Duration;

#[test]
#[ignore = "a measurement, not a test; see the module doc"]
fn guest_footprint() {
    let dir = std::env::var_os("VMCRED_FOOTPRINT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release"))
        });
    let dir = std::fs::canonicalize(&dir).expect("binary directory");
    let (fp, size) = vmcred_tests::measure::idle_guest(&dir, Duration::from_secs(2)).unwrap();
    println!(
        "guest footprint ({}): VmRSS {} KiB (file {} KiB, anon {} KiB), threads {}, binary {} bytes",
        dir.display(),
        fp.rss_kib,
        fp.rss_file_kib,
        fp.rss_anon_kib,
        fp.threads,
        size
    );
}
