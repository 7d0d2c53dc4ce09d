//! Man pages and shell completions from the CLI definition itself, so
//! they cannot drift from `--help`. The flake's package runs
//! `vmcred-guest-docs DIR` at build time and installs the result.

use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Writes `DIR/man1/NAME.1` (plus one page per subcommand, NAME-SUB.1) and
/// `DIR/completions/{NAME.bash,_NAME,NAME.fish}`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> Result<()> {
    let man = dir.join("man1");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
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
        let mut out = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
    }
    Ok(())
}

fn write_page(dir: &Path, name: &str, cmd: clap::Command) -> Result<()> {
    let path = dir.join(format!("{name}.1"));
    let mut out = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    clap_mangen::Man::new(cmd)
        .title(name.to_uppercase())
        .render(&mut out)
        .with_context(|| format!("cannot write {}", path.display()))
}
