//! `vmcred-guest --check-config`, run as the real binary: it must refuse
//! whatever the agent would refuse at boot (the NixOS module relies on it
//! at build time), and accept what the agent accepts.

use std::process::{Command, Output};

fn check(toml: &str) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmcred-guest"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn accepts_a_valid_config_and_shows_it() {
    let (out, text) = check(
        "initial_sync_timeout = \"30s\"\n[credentials.API_KEY]\nrestart_units = [\"app.service\"]\nmode = \"0440\"\n",
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("credential API_KEY: mode 0440"), "{text}");
}

#[test]
fn refuses_what_the_agent_refuses_at_boot() {
    for (toml, want) in [
        ("[credentials.\".X.vmcred-tmp\"]\n", "temporary files"),
        ("[credentials.\"a:b\"]\n", "':'"),
        ("initial_sync_timeout = \"30\"\n", "initial_sync_timeout"),
        ("[credentials.K]\nmode = \"0644\"\n", "mode"),
        (
            "[credentials.K]\nrestart_units = [\"my app.service\"]\n",
            "my app",
        ),
        ("typo = 1\n", "typo"),
    ] {
        let (out, text) = check(toml);
        assert_eq!(out.status.code(), Some(4), "{toml}: {text}");
        assert!(text.contains(want), "{toml}: {text}");
    }
}

#[test]
fn needs_a_config_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmcred-guest"))
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
