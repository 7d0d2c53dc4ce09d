//! Link the agent's binary with packed relative relocations (DT_RELR).
//!
//! A position-independent Rust binary carries one 24-byte `R_X86_64_RELATIVE`
//! entry per pointer in its read-only data (vtables, string tables): about
//! 7 800 of them, 187 KB of `.rela.dyn`, in the guest agent. DT_RELR encodes
//! the same relocations as a bitmap of a few KB. Nothing else changes: the
//! binary stays PIE with full RELRO and BIND_NOW, and the loader applies the
//! same relocations. A dynamic build needs glibc >= 2.36 where the agent
//! runs; an older glibc refuses to start it with "version
//! `GLIBC_ABI_DT_RELR' not found" rather than running it wrongly. A
//! static-pie build carries glibc's own start code, so it needs that glibc
//! only where it is built. Only glibc targets: a musl older than 1.2.4 would not refuse
//! such a binary, it would start it unrelocated. Linkers without the
//! option (GNU ld < 2.38) warn and ignore it. See "Guest footprint" in
//! ARCHITECTURE.md.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=vmcred-guest=-Wl,-z,pack-relative-relocs");
    }
}
