//! `vmcred-guest-docs DIR`: the guest agent's man page and shell
//! completions, rendered from its own CLI definition (`vmcred_guest::cli`).
//! A separate binary so that the agent, which runs in every VM, does not
//! carry a man-page and completion generator; packaging runs this once at
//! build time.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use vmcred_guest::cli::Cli;

const USAGE: &str = "usage: vmcred-guest-docs DIR";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if dir.to_str().is_some_and(|d| d.starts_with('-')) {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    match vmcred_docs::generate(Cli::command(), &PathBuf::from(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmcred-guest-docs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
