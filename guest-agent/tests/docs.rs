//! `vmcred-guest-docs DIR`, as the flake's package runs it.

use std::process::Command;

#[test]
fn man_page_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmcred-guest-docs"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man = std::fs::read_to_string(dir.path().join("man1/vmcred-guest.1")).unwrap();
    // roff escapes '-' as '\-'.
    for flag in [
        "check\\-config",
        "bootstrap",
        "credentials\\-dir",
        "initial\\-sync\\-timeout",
    ] {
        assert!(man.contains(flag), "guest man page lacks {flag}");
    }
    for shell in ["vmcred-guest.bash", "_vmcred-guest", "vmcred-guest.fish"] {
        let text = std::fs::read_to_string(dir.path().join("completions").join(shell)).unwrap();
        assert!(
            text.contains("check-config"),
            "{shell} lacks --check-config"
        );
    }
}
