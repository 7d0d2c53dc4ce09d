//! `vmcred-demo` as a user other than root, as a new user runs it: the
//! harness's guest must admit the muxer stand-in, which runs as that user.
//! Runs the built demo binary (cargo builds it for this test) as `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn demo_runs_as_an_unprivileged_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP-REASON: needs root to switch to the user nobody");
        return;
    }
    let demo = std::path::PathBuf::from(env!("CARGO_BIN_EXE_vmcred-demo"));
    let reachable = Command::new("runuser")
        .args(["-u", "nobody", "--", "test", "-x"])
        .arg(&demo)
        .status()
        .is_ok_and(|s| s.success());
    if !reachable {
        eprintln!(
            "SKIP-REASON: nobody cannot execute {} (a checkout under a private home)",
            demo.display()
        );
        return;
    }
    let home = tempfile::Builder::new()
        .prefix("vmcred-demo-nobody")
        .tempdir()
        .unwrap();
    // nobody's own home, as a user's is: `launch` refuses a runtime
    // directory under a parent that others may write to (0777 was that).
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a user named nobody");
    nix::unistd::chown(home.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin"])
        .arg(format!("HOME={}", home.path().display()))
        .arg(format!("TMPDIR={}", home.path().display()))
        .arg(&demo)
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("DEMO OK"), "{shown}");
    assert!(shown.contains("not root"), "{shown}");
}
