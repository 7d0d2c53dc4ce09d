//! How the CLI prints `status` and `rotate` replies, and its exit codes.
//! Items are printed as they arrive from the agent, so a host with
//! thousands of VMs needs no buffering and shows progress.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use crate::config::ConfigError;
use crate::control::{CallError, CredState, KeyTrust, Outcome, Reply, RotateReport, VmStatus};
use crate::keyring::{KeyStep, Phase, StepOutcome};
use serde_json::json;

/// Version of the `--json` output of `status` and `rotate`.
pub const JSON_SCHEMA: u32 = 1;

/// The exit codes, documented in `--help` and README.md; kept stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// A VM did not apply or is out of sync, or the command failed.
    Failed = 1,
    /// Bad arguments (clap exits 2 itself for its own usage errors).
    Usage = 2,
    /// The agent is not running or not reachable.
    Unreachable = 3,
    /// The config file cannot be read or is invalid.
    Config = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

impl Exit {
    /// The code for an error that ended the command.
    pub fn of_error(e: &anyhow::Error) -> Exit {
        for cause in e.chain() {
            if cause.downcast_ref::<ConfigError>().is_some() {
                return Exit::Config;
            }
            if let Some(c) = cause.downcast_ref::<CallError>() {
                return match c {
                    CallError::Unreachable { .. } | CallError::ConnectTimeout { .. } => {
                        Exit::Unreachable
                    }
                    CallError::Protocol { .. } => Exit::Failed,
                };
            }
        }
        Exit::Failed
    }
}

/// Prints a usage error and returns its code.
pub fn usage(message: &str) -> ExitCode {
    eprintln!("vmcred-host: {message}");
    Exit::Usage.into()
}

/// The agent refused a VM or credential name its config does not have
/// (nothing was done): a usage error, exit 2.
pub fn unknown_name(message: &str) -> ExitCode {
    usage(&format!(
        "{message} (names are checked against the running agent's config; after editing the file, reload it with SIGHUP)"
    ))
}

/// Whether a VM is fully in sync: connected, the last generation sent is
/// applied, every credential applied, no unit action owed, no error.
pub fn in_sync(s: &VmStatus) -> bool {
    s.connected
        && s.generation_applied >= s.generation_sent
        && s.credentials.iter().all(|c| c.state == CredState::Applied)
        && s.owed_units.is_empty()
        && s.last_error.is_none()
}

/// Terminal width of stdout, if it is a terminal.
fn terminal_width() -> Option<usize> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// `s` cut to `width` characters, with `…` when cut.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

pub struct StatusOutput {
    json: bool,
    width: Option<usize>,
    total: usize,
    synced: usize,
    connected: usize,
    header_done: bool,
}

impl StatusOutput {
    pub fn new(json: bool) -> Self {
        StatusOutput {
            json,
            width: terminal_width(),
            total: 0,
            synced: 0,
            connected: 0,
            header_done: false,
        }
    }

    pub fn item(&mut self, item: Reply) {
        let Reply::Status(s) = item else { return };
        let ok = in_sync(&s);
        let mut out = std::io::stdout().lock();
        if self.json {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("in_sync".into(), ok.into());
            }
            let sep = if self.total == 0 {
                format!("{{\"schema\":{JSON_SCHEMA},\"vms\":[\n")
            } else {
                ",\n".into()
            };
            let _ = write!(out, "{sep}{v}");
        } else {
            if !self.header_done {
                let _ = writeln!(
                    out,
                    "{:<20} {:<5} {:<7} {:>16}  LAST ERROR",
                    "VM", "LINK", "SYNC", "APPLIED"
                );
                self.header_done = true;
            }
            let sync = SyncState::of(&s, ok);
            let line = format!(
                "{:<20} {:<5} {:<7} {:>16}  {}",
                s.vm,
                if s.connected { "up" } else { "down" },
                sync.as_str(),
                s.generation_applied,
                key_note(&s)
            );
            let line = match self.width {
                Some(w) => fit(&line, w),
                None => line,
            };
            let _ = writeln!(out, "{line}");
        }
        self.total += 1;
        self.synced += usize::from(ok);
        self.connected += usize::from(s.connected);
    }

    pub fn finish(self, end: Reply) -> Exit {
        let mut out = std::io::stdout().lock();
        let failure = match end {
            Reply::Done { .. } => None,
            Reply::Error(e) => Some(format!("the agent answered: {e}")),
            Reply::Busy(e) => Some(format!("the agent is busy: {e}")),
            other => Some(format!("unexpected reply {other:?}")),
        };
        let summary = json!({
            "vms": self.total,
            "in_sync": self.synced,
            "out_of_sync": self.total - self.synced,
            "connected": self.connected,
        });
        if self.json {
            if self.total == 0 {
                let _ = write!(out, "{{\"schema\":{JSON_SCHEMA},\"vms\":[");
            }
            let _ = writeln!(
                out,
                "\n],\"summary\":{summary},\"complete\":{}}}",
                failure.is_none()
            );
        } else if self.total == 0 && failure.is_none() {
            let _ = writeln!(out, "no VMs configured");
        } else {
            let _ = writeln!(
                out,
                "{} VM(s): {} in sync, {} out of sync, {} connected",
                self.total,
                self.synced,
                self.total - self.synced,
                self.connected
            );
        }
        drop(out);
        if let Some(f) = failure {
            eprintln!("vmcred-host: status incomplete: {f}");
            return Exit::Failed;
        }
        if self.synced == self.total {
            Exit::Ok
        } else {
            Exit::Failed
        }
    }
}

pub struct RotateOutput {
    json: bool,
    /// Several VMs: a live count on a terminal and a table at the end.
    many: bool,
    /// VMs asked for, when the CLI knows (not with `--all`: the agent
    /// has the list).
    expected: Option<usize>,
    progress: bool,
    reports: Vec<RotateReport>,
    /// Reports so far that count as success (for the live count, which
    /// would otherwise recount every report on every line).
    applied: usize,
}

/// Whether a report counts as success.
fn succeeded(r: &RotateReport) -> bool {
    r.applied && r.units.iter().all(|u| u.ok)
}

impl RotateOutput {
    pub fn new(json: bool, many: bool, expected: Option<usize>) -> Self {
        RotateOutput {
            json,
            many,
            expected,
            progress: many && std::io::stderr().is_terminal(),
            reports: Vec::new(),
            applied: 0,
        }
    }

    pub fn item(&mut self, item: Reply) {
        let Reply::Rotate(r) = item else { return };
        if !self.json && !self.many {
            print_details(&r);
        }
        self.applied += usize::from(succeeded(&r));
        self.reports.push(r);
        if self.progress {
            let ok = self.applied;
            match self.expected {
                Some(n) => eprint!("\rrotated {}/{n} ({ok} applied)", self.reports.len()),
                None => eprint!("\rrotated {} ({ok} applied)", self.reports.len()),
            }
        }
    }

    pub fn finish(mut self, end: Reply) -> Exit {
        if self.progress {
            eprintln!();
        }
        let failure = match end {
            Reply::Done { .. } => None,
            Reply::Error(e) => Some(e),
            Reply::Busy(e) => Some(format!("the agent is busy: {e}")),
            other => Some(format!("unexpected reply {other:?}")),
        };
        self.reports.sort_by(|a, b| a.vm.cmp(&b.vm));
        let ok = self.reports.iter().filter(|r| succeeded(r)).count();
        let mut out = std::io::stdout().lock();
        if self.json {
            let v = json!({
                "schema": JSON_SCHEMA,
                "rotations": self.reports,
                "summary": {"vms": self.reports.len(), "applied": ok, "failed": self.reports.len() - ok},
                "error": failure,
            });
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        } else if self.many {
            let width = terminal_width();
            let _ = writeln!(
                out,
                "{:<20} {:<11} {:>16}  DETAIL",
                "VM", "RESULT", "GENERATION"
            );
            for r in &self.reports {
                let line = format!(
                    "{:<20} {:<11} {:>16}  {}",
                    r.vm,
                    RotateResult::of(r).as_str(),
                    r.generation,
                    detail(r)
                );
                let _ = writeln!(
                    out,
                    "{}",
                    match width {
                        Some(w) => fit(&line, w),
                        None => line,
                    }
                );
            }
            let _ = writeln!(
                out,
                "{} VM(s): {} applied, {} not",
                self.reports.len(),
                ok,
                self.reports.len() - ok
            );
        }
        drop(out);
        if let Some(f) = failure {
            eprintln!("vmcred-host: NOT applied: {f}");
            return Exit::Failed;
        }
        if ok == self.reports.len() && !self.reports.is_empty() {
            Exit::Ok
        } else {
            Exit::Failed
        }
    }
}

/// A VM's SYNC column in the `status` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    InSync,
    /// Not yet synced, and nothing has gone wrong.
    Pending,
    OutOfSync,
}

impl SyncState {
    fn of(s: &VmStatus, in_sync: bool) -> SyncState {
        if in_sync {
            SyncState::InSync
        } else if s.credentials.iter().any(|c| c.state == CredState::Pending)
            && s.last_error.is_none()
        {
            SyncState::Pending
        } else {
            SyncState::OutOfSync
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            SyncState::InSync => "ok",
            SyncState::Pending => "pending",
            SyncState::OutOfSync => "OUT",
        }
    }
}

/// A rotation's RESULT column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RotateResult {
    Applied,
    UnitFailed,
    NotApplied,
}

impl RotateResult {
    fn of(r: &RotateReport) -> RotateResult {
        if succeeded(r) {
            RotateResult::Applied
        } else if r.applied {
            RotateResult::UnitFailed
        } else {
            RotateResult::NotApplied
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RotateResult::Applied => "applied",
            RotateResult::UnitFailed => "UNIT-FAILED",
            RotateResult::NotApplied => "NOT-APPLIED",
        }
    }
}

fn detail(r: &RotateReport) -> String {
    if let Some(e) = &r.error {
        return e.clone();
    }
    let failed: Vec<String> = r
        .credentials
        .iter()
        .filter(|c| c.error.is_some())
        .map(|c| format!("{}: {}", c.name, c.outcome))
        .chain(
            r.units
                .iter()
                .filter(|u| !u.ok)
                .map(|u| format!("unit {} {}: FAILED", u.unit, u.action)),
        )
        .collect();
    if failed.is_empty() {
        let written = r
            .credentials
            .iter()
            .filter(|c| c.outcome == Outcome::Written)
            .count();
        format!("{written} written")
    } else {
        failed.join("; ")
    }
}

/// The one-VM form: a line per credential and unit, then the verdict.
fn print_details(r: &RotateReport) {
    let vm = &r.vm;
    for c in &r.credentials {
        match &c.error {
            Some(e) => println!("{vm} {}: {} ({e})", c.name, c.outcome),
            None => println!("{vm} {}: {}", c.name, c.outcome),
        }
    }
    for u in &r.units {
        let word = if u.ok { "ok" } else { "FAILED" };
        match &u.error {
            Some(e) => println!("{vm} unit {} {}: {word} ({e})", u.unit, u.action),
            None => println!("{vm} unit {} {}: {word}", u.unit, u.action),
        }
    }
    if succeeded(r) {
        println!("{vm}: generation {} applied", r.generation);
    } else if r.applied {
        println!(
            "{vm}: generation {} applied, but a unit action failed",
            r.generation
        );
    } else {
        println!(
            "{vm}: NOT applied: {}",
            r.error.as_deref().unwrap_or("see the credentials above")
        );
    }
}

/// The LAST ERROR column, led by the key trust when a rollover concerns
/// this guest.
fn key_note(s: &VmStatus) -> String {
    let err = s.last_error.as_deref().unwrap_or("-");
    match s.key_trust {
        KeyTrust::Unknown | KeyTrust::Current => err.to_string(),
        KeyTrust::Untrusted => KeyTrust::Untrusted.as_str().to_string(),
        t => format!("key: {}; {err}", t.as_str()),
    }
}

/// Prints a `rotate-key` reply: the step's outcome, then one line per VM
/// with what it trusts.
pub struct KeyOutput {
    json: bool,
    step: KeyStep,
    phase: Option<Phase>,
    total: usize,
    /// VMs in the state the step aims at (see [`KeyOutput::finish`]).
    good: usize,
    vms: Vec<serde_json::Value>,
    key: Option<serde_json::Value>,
}

impl KeyOutput {
    pub fn new(json: bool, step: KeyStep) -> Self {
        KeyOutput {
            json,
            step,
            phase: None,
            total: 0,
            good: 0,
            vms: Vec::new(),
            key: None,
        }
    }

    pub fn item(&mut self, item: Reply) {
        match item {
            Reply::Key(k) => {
                self.phase = Some(k.phase);
                if self.json {
                    self.key = serde_json::to_value(&k).ok();
                } else {
                    let what = match k.outcome {
                        StepOutcome::Done => "done",
                        StepOutcome::AlreadyDone => "already done; nothing changed",
                        StepOutcome::Shown => "no change",
                    };
                    println!("{}: {what}", step_name(k.step));
                    println!("phase: {:?}", k.phase);
                    println!("current key: {}", k.current_pin);
                    if let Some(n) = &k.next_pin {
                        println!("next key:    {n}");
                    }
                    if let Some(p) = &k.previous_pin {
                        println!("previous:    {p} (kept until `rotate-key retire`)");
                    }
                    println!("{:<20} {:<5} {:<16} GUEST PINS", "VM", "LINK", "KEY");
                }
            }
            Reply::Status(s) => {
                let good = match self.phase {
                    Some(Phase::Prepared) => s.key_trust == KeyTrust::HasNext,
                    _ => s.key_trust == KeyTrust::Current,
                };
                self.total += 1;
                self.good += usize::from(good);
                if self.json {
                    self.vms.push(json!({
                        "vm": s.vm,
                        "connected": s.connected,
                        "key_trust": s.key_trust,
                        "guest_pins": s.guest_pins,
                        "last_error": s.last_error,
                    }));
                } else {
                    println!(
                        "{:<20} {:<5} {:<16} {}",
                        s.vm,
                        if s.connected { "up" } else { "down" },
                        match s.key_trust {
                            KeyTrust::Untrusted => "UNTRUSTED",
                            t => t.as_str(),
                        },
                        if s.guest_pins.is_empty() {
                            "-".to_string()
                        } else {
                            s.guest_pins.join(" ")
                        }
                    );
                    if s.key_trust == KeyTrust::Untrusted {
                        println!("  {}: {}", s.vm, KeyTrust::Untrusted.as_str());
                    }
                }
            }
            _ => {}
        }
    }

    /// 0 when every VM is where the step leads: after `prepare`, each holds
    /// the next pin; after any other step, each trusts the current key.
    pub fn finish(self, end: Reply) -> Exit {
        let failure = match end {
            Reply::Done { .. } => None,
            Reply::Error(e) => Some(e),
            Reply::Busy(e) => Some(format!("the agent is busy: {e}")),
            other => Some(format!("unexpected reply {other:?}")),
        };
        if self.json {
            println!(
                "{}",
                json!({
                    "schema": JSON_SCHEMA,
                    "key": self.key,
                    "vms": self.vms,
                    "error": failure,
                })
            );
        } else if let Some(f) = &failure {
            eprintln!("vmcred-host: rotate-key {}: {f}", step_name(self.step));
        } else {
            println!(
                "{} VM(s): {} ready, {} not",
                self.total,
                self.good,
                self.total - self.good
            );
        }
        if failure.is_some() || self.good != self.total {
            Exit::Failed
        } else {
            Exit::Ok
        }
    }
}

fn step_name(s: KeyStep) -> &'static str {
    match s {
        KeyStep::Show => "show",
        KeyStep::Prepare => "prepare",
        KeyStep::Switch => "switch",
        KeyStep::Retire => "retire",
        KeyStep::RevokeOld => "revoke-old",
    }
}
