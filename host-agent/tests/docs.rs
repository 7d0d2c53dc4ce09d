//! `vmcred-host generate-docs`, as the flake's package runs it: a man page
//! naming every subcommand, a page per subcommand, and completions for
//! bash, zsh and fish.

use std::process::Command;

#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmcred-host"))
        .arg("generate-docs")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // roff writes '-' as '\-'.
    let man = std::fs::read_to_string(dir.path().join("man1/vmcred-host.1"))
        .unwrap()
        .replace("\\-", "-");
    assert!(
        man.starts_with(".ie") || man.contains(".TH"),
        "not roff: {man}"
    );
    for sub in ["serve", "rotate", "status", "launch", "check-config", "pin"] {
        assert!(man.contains(sub), "man page does not mention {sub}");
        let page = dir.path().join(format!("man1/vmcred-host-{sub}.1"));
        assert!(page.is_file(), "no page {}", page.display());
        for shell in ["vmcred-host.bash", "_vmcred-host", "vmcred-host.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(shell)).unwrap();
            assert!(text.contains(sub), "{shell} does not complete {sub}");
        }
    }
    // The packaging command itself is hidden.
    assert!(!man.contains("generate-docs"));
    // The exit codes from --help reach the man page.
    assert!(man.contains("not running"), "exit codes missing");
}
