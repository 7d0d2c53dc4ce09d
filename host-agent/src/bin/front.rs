//! `vmcred-host`: the command users and units run. It answers `rotate`,
//! `status` and `--version` itself, as the full agent would (the same
//! code: `vmcred_host::cli`), and links little else, so that a `rotate`
//! starts in a fraction of the full agent's start-up (README, "Measured
//! here"). Every other command line (serve, launch, help, any form its
//! parser does not take, see `cli::front`) is handed, unchanged and with the
//! same `argv[0]`, to `vmcred-host-agent` in this binary's own directory by
//! `execve`: same PID (sd_notify's MainPID), same descriptors and
//! environment, and clap's help, errors and exit codes.
//!
//! The agent is found from `/proc/self/exe`, never from `PATH` or the
//! environment, so no one who can set this process's environment can make
//! it run another program. If it cannot be run: a message naming the path,
//! and the shell's codes, 127 (not found) or 126 (found, not executable).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use vmcred_host::cli;
use vmcred_host::cli::front::{self, Front};

/// The full agent's file name, in this binary's directory.
const AGENT: &str = "vmcred-host-agent";

/// The agent does not exist (as a shell's "command not found").
const AGENT_NOT_FOUND: u8 = 127;
/// The agent exists but cannot be executed.
const AGENT_NOT_EXECUTABLE: u8 = 126;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let done = match front::parse(argv.get(1..).unwrap_or_default()) {
        Some(Front::Version) => {
            // As clap: a closed stdout is not an error here.
            let _ = writeln!(std::io::stdout(), "{}", front::version_line());
            return ExitCode::SUCCESS;
        }
        Some(Front::Rotate { config, args }) => cli::rotate(&config, args),
        Some(Front::Status { config, args }) => cli::status(&config, args),
        None => return exec_agent(&argv),
    };
    match done {
        Ok(code) => code,
        Err(e) => cli::fail(&e),
    }
}

/// Replaces this process with the agent, same arguments; returns only if
/// that failed.
fn exec_agent(argv: &[OsString]) -> ExitCode {
    let agent = match agent_path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "vmcred-host: cannot find this program's own path (/proc/self/exe: {e}), so not {AGENT} next to it either; is /proc mounted?"
            );
            return ExitCode::from(AGENT_NOT_FOUND);
        }
    };
    let argv0 = argv
        .first()
        .cloned()
        .unwrap_or_else(|| OsString::from("vmcred-host"));
    let error = Command::new(&agent)
        .arg0(argv0)
        .args(argv.iter().skip(1))
        .exec();
    let code = if error.kind() == std::io::ErrorKind::NotFound {
        AGENT_NOT_FOUND
    } else {
        AGENT_NOT_EXECUTABLE
    };
    eprintln!(
        "vmcred-host: cannot run {}: {error}. It runs every command but rotate and status (serve, launch, --help, ...) and must be installed, executable, next to {}",
        agent.display(),
        agent.with_file_name("vmcred-host").display()
    );
    ExitCode::from(code)
}

/// `vmcred-host-agent` in the directory of the running binary (its real
/// path: symlinks to this binary are resolved by the kernel).
fn agent_path() -> std::io::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name(AGENT))
}
