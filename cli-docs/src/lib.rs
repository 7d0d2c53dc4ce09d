//! Man pages and shell completions from a CLI definition itself, so they
//! cannot drift from `--help`. Both agents call [`generate`] from a hidden
//! `generate-docs` option; the flake's package runs it at build time and
//! installs the result. The API is a plain function of a `clap::Command`,
//! so an agent that builds its `Command` some other way can still use it.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// The cause is in the message, not a `source()`, so that `{e:#}`
    /// prints it once (as everywhere in vmcred).
    #[error("cannot create {path}: {error}")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Writes `DIR/man1/NAME.1` (plus one page per visible subcommand,
/// `NAME-SUB.1`) and `DIR/completions/{NAME.bash,_NAME,NAME.fish}`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> Result<(), DocsError> {
    let man = dir.join("man1");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|error| DocsError::Create {
            path: d.clone(),
            error,
        })?;
    }
    cmd.build();
    let name = cmd.get_name().to_string();
    write_page(&man, &name, cmd.clone())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("{name}-{}", sub.get_name());
        write_page(&man, &page, sub.clone())?;
    }
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = completions.join(file);
        let mut out = create(&path)?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
    }
    Ok(())
}

fn create(path: &Path) -> Result<std::fs::File, DocsError> {
    std::fs::File::create(path).map_err(|error| DocsError::Create {
        path: path.to_path_buf(),
        error,
    })
}

fn write_page(dir: &Path, name: &str, cmd: clap::Command) -> Result<(), DocsError> {
    let path = dir.join(format!("{name}.1"));
    let mut out = create(&path)?;
    clap_mangen::Man::new(cmd)
        .title(name.to_uppercase())
        .render(&mut out)
        .map_err(|error| DocsError::Write { path, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_per_visible_subcommand_and_three_shells() {
        let cmd = clap::Command::new("demo")
            .about("a demo")
            .subcommand(clap::Command::new("run").about("runs"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        generate(cmd, dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man1/demo.1")).unwrap();
        assert!(page.contains(".TH DEMO"), "{page}");
        assert!(dir.path().join("man1/demo-run.1").is_file());
        assert!(!dir.path().join("man1/demo-secret.1").exists());
        for f in ["demo.bash", "_demo", "demo.fish"] {
            let c = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(c.contains("run"), "{f}: {c}");
        }
    }

    #[test]
    fn an_unwritable_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let e = generate(clap::Command::new("demo"), &file).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("plain-file"), "{shown}");
        assert_eq!(shown.matches("os error").count(), 1, "{shown}");
    }
}
