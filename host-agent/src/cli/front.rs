//! The front binary's own parse: the plain forms of `rotate`, `status` and
//! `--version`, without clap (whose parser and help are most of what a
//! short-lived `rotate` would otherwise map and relocate at each start).
//!
//! It only has to be sound, not complete: every command line it accepts,
//! clap ([`super::args::Cli`]) accepts with the same meaning (the tests
//! below check that on many forms). Anything else (help, a flag it does not
//! know, `--`, a value that starts with `-`, an empty value, an option
//! given twice, arguments that are not UTF-8, ...) is `None`, and the front
//! execs the full agent with the same arguments, so the help, the error and
//! the exit code are clap's.

use std::ffi::OsString;
use std::path::PathBuf;

use super::args::{RotateArgs, StatusArgs};
use crate::config::DEFAULT_CONFIG;

/// What the front does itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Front {
    /// `--version` or `-V` alone: the same line clap prints.
    Version,
    Rotate {
        config: PathBuf,
        args: RotateArgs,
    },
    Status {
        config: PathBuf,
        args: StatusArgs,
    },
}

/// The line `vmcred-host --version` prints (clap's `{name} {version}`).
pub fn version_line() -> String {
    format!("vmcred-host {}", env!("CARGO_PKG_VERSION"))
}

/// `rotate --timeout`'s default, as clap's `default_value`.
const DEFAULT_TIMEOUT: &str = "30s";

/// Parses argv without its `argv[0]`; `None`: leave it to the agent.
pub fn parse(argv: &[OsString]) -> Option<Front> {
    if let [only] = argv {
        if only == "--version" || only == "-V" {
            return Some(Front::Version);
        }
    }
    let mut words = Vec::with_capacity(argv.len());
    for a in argv {
        words.push(a.to_str()?);
    }
    let mut it = words.into_iter();
    let mut config = None;
    // Before the subcommand, only the global `--config`.
    let sub = loop {
        let w = it.next()?;
        match Token::of(w) {
            Token::Long("config", inline) => once(&mut config, value(inline, &mut it)?)?,
            Token::Word(w) => break w,
            _ => return None,
        }
    };
    match sub {
        "rotate" => {
            let (mut timeout, mut json, mut all) = (None, None, None);
            let (mut vms, mut args) = (Vec::new(), Vec::new());
            while let Some(w) = it.next() {
                match Token::of(w) {
                    Token::Long("config", inline) => once(&mut config, value(inline, &mut it)?)?,
                    Token::Long("timeout", inline) => once(&mut timeout, value(inline, &mut it)?)?,
                    Token::Long("vm", inline) => vms.push(value(inline, &mut it)?.to_string()),
                    Token::Long("json", None) => once(&mut json, true)?,
                    Token::Long("all", None) => once(&mut all, true)?,
                    Token::Word(w) => args.push(w.to_string()),
                    _ => return None,
                }
            }
            let all = all.unwrap_or(false);
            if all && !vms.is_empty() {
                return None;
            }
            let timeout = humantime::parse_duration(timeout.unwrap_or(DEFAULT_TIMEOUT)).ok()?;
            Some(Front::Rotate {
                config: config_path(config),
                args: RotateArgs {
                    timeout,
                    json: json.unwrap_or(false),
                    vms,
                    all,
                    args,
                },
            })
        }
        "status" => {
            let (mut json, mut vms) = (None, Vec::new());
            while let Some(w) = it.next() {
                match Token::of(w) {
                    Token::Long("config", inline) => once(&mut config, value(inline, &mut it)?)?,
                    Token::Long("vm", inline) => vms.push(value(inline, &mut it)?.to_string()),
                    Token::Long("json", None) => once(&mut json, true)?,
                    _ => return None,
                }
            }
            Some(Front::Status {
                config: config_path(config),
                args: StatusArgs {
                    json: json.unwrap_or(false),
                    vms,
                },
            })
        }
        _ => None,
    }
}

/// One argument as the front sees it.
enum Token<'a> {
    /// `--NAME` or `--NAME=VALUE`.
    Long(&'a str, Option<&'a str>),
    /// Not starting with `-`: a subcommand or a positional argument.
    Word(&'a str),
    /// `-`, `--`, a short flag: never the front's.
    Other,
}

impl<'a> Token<'a> {
    fn of(w: &'a str) -> Token<'a> {
        match w.strip_prefix("--") {
            Some("") => Token::Other,
            Some(long) => match long.split_once('=') {
                Some((name, v)) => Token::Long(name, Some(v)),
                None => Token::Long(long, None),
            },
            None if w.starts_with('-') => Token::Other,
            None => Token::Word(w),
        }
    }
}

/// An option's value: inline (`--vm=a`) or the next argument, and neither
/// empty nor starting with `-` (clap's rules there are the agent's).
fn value<'a>(inline: Option<&'a str>, rest: &mut impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let v = match inline {
        Some(v) => v,
        None => rest.next()?,
    };
    (!v.is_empty() && !v.starts_with('-')).then_some(v)
}

/// Sets an option that may be given once; `None` the second time.
fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(v);
            Some(())
        }
    }
}

fn config_path(given: Option<&str>) -> PathBuf {
    PathBuf::from(given.unwrap_or(DEFAULT_CONFIG))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Cmd};
    use clap::Parser;

    fn argv(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    /// What clap makes of the same line, in the front's terms (`None`:
    /// clap refused it, or it is a command the front leaves alone).
    fn clap(argv: &[OsString]) -> Option<Front> {
        let cli = Cli::try_parse_from(
            std::iter::once(OsString::from("vmcred-host")).chain(argv.iter().cloned()),
        )
        .ok()?;
        match cli.command {
            Cmd::Rotate(args) => Some(Front::Rotate {
                config: cli.config,
                args,
            }),
            Cmd::Status(args) => Some(Front::Status {
                config: cli.config,
                args,
            }),
            _ => None,
        }
    }

    /// Lines the front must take itself, and clap must read the same way.
    const TAKEN: &[&str] = &[
        "rotate vm1",
        "rotate vm1 API_KEY DB_PASS",
        "rotate --config /etc/x.toml vm1",
        "--config /etc/x.toml rotate vm1",
        "--config=/etc/x.toml rotate vm1 A",
        "rotate vm1 --config=/c.toml A --json",
        "rotate --timeout 2m vm1",
        "rotate --timeout=1500ms vm1 --json",
        "rotate --vm a --vm=b A B",
        "rotate --vm a --json --timeout 10s",
        "rotate --all",
        "rotate --all A --json",
        "rotate",
        "rotate help",
        "rotate --timeout 0s vm1",
        "status",
        "status --json",
        "status --vm a --vm=b --json",
        "--config /c.toml status --vm a",
        "status --config=/c.toml",
    ];

    /// Lines the front must leave to the agent (clap may accept some, with
    /// a meaning the front does not take on).
    const LEFT: &[&str] = &[
        "",
        "--help",
        "-h",
        "help",
        "help rotate",
        "rotate --help",
        "rotate -h vm1",
        "rotate --version",
        "status --help",
        "serve",
        "launch --vm a -- qemu",
        "check-config",
        "pin",
        "rotate-key show",
        "generate-docs /tmp/x",
        "--version --version",
        "-V rotate",
        "rotate --bogus vm1",
        "rotate --json --json vm1",
        "rotate --json=true vm1",
        "rotate --all --all",
        "rotate --all --vm a",
        "rotate --vm a --all",
        "rotate --timeout 10s --timeout 20s vm1",
        "rotate --timeout 30 vm1",
        "rotate --timeout soon vm1",
        "rotate --timeout",
        "rotate --vm",
        "rotate --vm --json",
        "rotate --vm= x",
        "rotate --vm -x",
        "rotate -- vm1",
        "rotate vm1 -- A",
        "rotate - A",
        "rotate -x",
        "rotate --config",
        "rotate --config= vm1",
        "--config /a rotate --config /b vm1",
        "--config /a --config /b rotate vm1",
        "--json rotate vm1",
        "--timeout 1s rotate vm1",
        "rotate --Vm a",
        "rotate --all=1",
        "status vm1",
        "status --all",
        "status --timeout 1s",
        "status --json --json",
        "status --vm",
        "status -- --json",
        "Rotate vm1",
        "rot vm1",
        "statu",
    ];

    #[test]
    fn what_the_front_takes_clap_reads_the_same() {
        for line in TAKEN {
            let a = argv(line);
            let front = parse(&a);
            assert!(front.is_some(), "the front should take {line:?}");
            assert_eq!(front, clap(&a), "{line:?}");
        }
    }

    #[test]
    fn the_rest_goes_to_the_agent() {
        for line in LEFT {
            assert_eq!(parse(&argv(line)), None, "{line:?}");
        }
    }

    /// Whatever the front takes, clap takes the same way: every line made
    /// of up to four of these words.
    #[test]
    fn every_short_line_the_front_takes_clap_reads_the_same() {
        let words = [
            "rotate",
            "status",
            "vm1",
            "A",
            "--json",
            "--all",
            "--vm",
            "--vm=b",
            "--config",
            "/c.toml",
            "--config=/d.toml",
            "--timeout",
            "5s",
            "--timeout=7s",
            "-",
            "--",
            "-h",
            "--help",
            "-V",
            "--version",
            "help",
            "--json=1",
            "--x",
        ];
        let mut taken = 0;
        let mut line = Vec::new();
        fn walk(words: &[&str], line: &mut Vec<OsString>, depth: usize, taken: &mut usize) {
            if let Some(front) = parse(line) {
                *taken += 1;
                if front != Front::Version {
                    assert_eq!(Some(front), clap(line), "{line:?}");
                }
            }
            if depth == 0 {
                return;
            }
            for w in words {
                line.push(OsString::from(w));
                walk(words, line, depth - 1, taken);
                line.pop();
            }
        }
        walk(&words, &mut line, 4, &mut taken);
        assert!(taken > 1000, "only {taken} lines taken");
    }

    #[test]
    fn arguments_that_are_not_utf8_go_to_the_agent() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff, b'x']);
        assert_eq!(parse(&[OsString::from("rotate"), bad.clone()]), None);
        assert_eq!(
            parse(&[OsString::from("--config"), bad, OsString::from("status")]),
            None
        );
    }

    #[test]
    fn the_version_line_is_clap_s() {
        let cmd = <Cli as clap::CommandFactory>::command();
        assert_eq!(cmd.render_version(), format!("{}\n", version_line()));
        assert_eq!(parse(&argv("--version")), Some(Front::Version));
        assert_eq!(parse(&argv("-V")), Some(Front::Version));
    }
}
