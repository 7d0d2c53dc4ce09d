//! Link the agent's binary with packed relative relocations (DT_RELR).
//!
//! A position-independent Rust binary carries one 24-byte `R_X86_64_RELATIVE`
//! entry per pointer in its read-only data (vtables, string tables): about
//! 7 800 of them, 187 KB of `.rela.dyn`, in the guest agent. DT_RELR encodes
//! the same relocations as a bitmap of a few KB. Nothing else changes: the
//! binary stays PIE with full RELRO and BIND_NOW, and the loader applies the
//! same relocations. A dynamic build needs glibc >= 2.36 where the agent
//! runs (in practice the glibc it was built against, which is newer); an
//! older glibc refuses to start it with "version `GLIBC_ABI_DT_RELR' not
//! found" rather than running it wrongly. Only glibc targets: a musl older than 1.2.4 would not refuse
//! such a binary, it would start it unrelocated. Linkers without the
//! option (GNU ld < 2.38) warn and ignore it. See "Guest footprint" in
//! ARCHITECTURE.md.
///
/// Dynamic builds only: a static-pie carries the build machine's start
/// code, and glibc's before 2.36 ignores DT_RELR, so a static binary built
/// on an older machine would link cleanly and crash at start, with no
/// version check to refuse it. The static binary (the one for guests with
/// an older glibc) is therefore linked as before.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let static_crt = features.split(',').any(|f| f == "crt-static");
    if os == "linux" && env == "gnu" && !static_crt {
        println!("cargo:rustc-link-arg-bin=vmcred-guest=-Wl,-z,pack-relative-relocs");
    }
}
