//! Restarting and reloading the units that use a changed credential.
//!
//! A service gets a private copy of its credentials when it starts, so a
//! new value reaches it only through a restart (or a reload, with
//! `RefreshOnReload=credentials`). `try-restart` and `try-reload-or-restart`
//! leave stopped units stopped: a credential change must not start
//! anything.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use vmcred_proto::rpc::pb::UnitResult;
use vmcred_proto::rules::UNIT_ACTIONS_BUDGET;

use crate::config::GuestConfig;

/// How long one systemctl call may take; a restart waits for the unit to
/// stop and start.
pub const UNIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest error line kept from systemctl's output.
const MAX_ERROR_CHARS: usize = 300;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Restart,
    Reload,
}

impl Action {
    /// The name reported in `UnitResult.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Reload => "reload",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Restart => "try-restart",
            Action::Reload => "try-reload-or-restart",
        }
    }
}

/// The unit actions for a set of changed credentials: each unit once,
/// restarts first, then reloads; a unit that is restarted is not also
/// reloaded (the restart already gives it the new value).
pub fn plan<'a>(
    config: &GuestConfig,
    changed: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Action)> {
    let mut restarts = Vec::new();
    let mut reloads = Vec::new();
    let mut seen_restart = BTreeSet::new();
    let mut seen_reload = BTreeSet::new();
    for name in changed {
        let Some(policy) = config.credentials.get(name) else {
            continue;
        };
        for u in &policy.restart_units {
            if seen_restart.insert(u.clone()) {
                restarts.push(u.clone());
            }
        }
        for u in &policy.reload_units {
            if seen_reload.insert(u.clone()) {
                reloads.push(u.clone());
            }
        }
    }
    let mut out: Vec<_> = restarts.into_iter().map(|u| (u, Action::Restart)).collect();
    out.extend(
        reloads
            .into_iter()
            .filter(|u| !seen_restart.contains(u))
            .map(|u| (u, Action::Reload)),
    );
    out
}

/// Runs systemctl (or a stand-in, in tests).
#[derive(Debug, Clone)]
pub struct UnitRunner {
    systemctl: PathBuf,
    timeout: Duration,
}

impl UnitRunner {
    pub fn new(systemctl: PathBuf) -> Self {
        UnitRunner {
            systemctl,
            timeout: UNIT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the planned actions one after the other, in order, within
    /// [`UNIT_ACTIONS_BUDGET`] in all: the host waits for the `Apply`
    /// reply, which comes after these. An action whose turn comes after
    /// the budget is spent is not run and reported as failed, so it stays
    /// owed and is retried after the reply.
    pub async fn run_all(&self, plan: &[(String, Action)]) -> Vec<UnitResult> {
        self.run_all_within(plan, UNIT_ACTIONS_BUDGET).await
    }

    async fn run_all_within(&self, plan: &[(String, Action)], budget: Duration) -> Vec<UnitResult> {
        let until = tokio::time::Instant::now() + budget;
        let mut out = Vec::with_capacity(plan.len());
        for (unit, action) in plan {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let error = format!(
                    "not run yet: this push's unit actions used their {} (the host waits for \
                     them); owed, and retried shortly",
                    humantime::format_duration(budget)
                );
                tracing::warn!(unit, action = action.as_str(), %error, "unit action deferred");
                out.push(UnitResult {
                    unit: unit.clone(),
                    action: action.as_str().to_string(),
                    ok: false,
                    error,
                });
                continue;
            }
            out.push(self.run_for(unit, *action, self.timeout.min(left)).await);
        }
        out
    }

    pub async fn run(&self, unit: &str, action: Action) -> UnitResult {
        self.run_for(unit, action, self.timeout).await
    }

    async fn run_for(&self, unit: &str, action: Action, timeout: Duration) -> UnitResult {
        let result = |ok: bool, error: String| UnitResult {
            unit: unit.to_string(),
            action: action.as_str().to_string(),
            ok,
            error,
        };
        let child = tokio::process::Command::new(&self.systemctl)
            .arg(action.verb())
            .arg(unit)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // systemctl is not part of our service's notification protocol.
            .env_remove("NOTIFY_SOCKET")
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let error = format!("cannot run {}: {e}", self.systemctl.display());
                tracing::warn!(unit, action = action.as_str(), %error, "unit action failed");
                return result(false, error);
            }
        };
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let error = format!("waiting for systemctl: {e}");
                tracing::warn!(unit, action = action.as_str(), %error, "unit action failed");
                return result(false, error);
            }
            Err(_) => {
                // The future was dropped, and kill_on_drop killed the child.
                let error = format!(
                    "systemctl {} {unit} did not finish within {}",
                    action.verb(),
                    humantime::format_duration(timeout)
                );
                tracing::warn!(unit, action = action.as_str(), %error, "unit action failed");
                return result(false, error);
            }
        };
        if output.status.success() {
            tracing::info!(unit, action = action.as_str(), "unit action done");
            return result(true, String::new());
        }
        let first_line = first_line(&output.stderr)
            .or_else(|| first_line(&output.stdout))
            .unwrap_or_default();
        let error = if first_line.is_empty() {
            format!("systemctl {} {unit}: {}", action.verb(), output.status)
        } else {
            format!(
                "systemctl {} {unit}: {}: {first_line}",
                action.verb(),
                output.status
            )
        };
        tracing::warn!(unit, action = action.as_str(), %error, "unit action failed");
        result(false, error)
    }
}

/// The first non-empty line of `bytes`, shortened and stripped of control
/// characters so it is safe in a log line and a reply.
fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut s: String = line
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR_CHARS)
        .collect();
    if line.chars().count() > MAX_ERROR_CHARS {
        s.push('…');
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialPolicy;
    use std::os::unix::fs::PermissionsExt;

    fn config() -> GuestConfig {
        let mut c = GuestConfig::default();
        c.credentials.insert(
            "A".into(),
            CredentialPolicy {
                restart_units: vec!["a.service".into(), "both.service".into()],
                reload_units: vec!["r.service".into()],
                mode: 0o400,
                ..Default::default()
            },
        );
        c.credentials.insert(
            "B".into(),
            CredentialPolicy {
                restart_units: vec!["a.service".into()],
                reload_units: vec!["both.service".into(), "r.service".into()],
                mode: 0o400,
                ..Default::default()
            },
        );
        c
    }

    #[test]
    fn plan_dedups_and_orders() {
        let p = plan(&config(), ["A", "B", "UNCONFIGURED"]);
        assert_eq!(
            p,
            vec![
                ("a.service".to_string(), Action::Restart),
                ("both.service".to_string(), Action::Restart),
                ("r.service".to_string(), Action::Reload),
            ]
        );
        assert!(plan(&config(), ["UNCONFIGURED"]).is_empty());
    }

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("systemctl");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn runs_systemctl_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let sc = script(
            dir.path(),
            &format!(
                "echo \"$@\" >> {}\ncase \"$2\" in bad*) echo 'Failed to restart bad.service: Unit bad.service not loaded.' >&2; echo second >&2; exit 5;; esac",
                log.display()
            ),
        );
        let r = UnitRunner::new(sc);
        let ok = r.run("a.service", Action::Restart).await;
        assert!(ok.ok && ok.error.is_empty() && ok.action == "restart");
        let reload = r.run("r.service", Action::Reload).await;
        assert!(reload.ok && reload.action == "reload");
        let bad = r.run("bad.service", Action::Restart).await;
        assert!(!bad.ok);
        assert!(bad.error.contains("not loaded"), "{}", bad.error);
        assert!(!bad.error.contains("second"), "{}", bad.error);
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls,
            "try-restart a.service\ntry-reload-or-restart r.service\ntry-restart bad.service\n"
        );
    }

    #[tokio::test]
    async fn missing_binary_and_timeout_are_reported() {
        let r = UnitRunner::new("/nonexistent/systemctl".into());
        let res = r.run("a.service", Action::Restart).await;
        assert!(!res.ok && res.error.contains("/nonexistent/systemctl"));
        let dir = tempfile::tempdir().unwrap();
        let sc = script(dir.path(), "sleep 30");
        let r = UnitRunner::new(sc).with_timeout(Duration::from_millis(200));
        let t = std::time::Instant::now();
        let res = r.run("slow.service", Action::Reload).await;
        assert!(
            !res.ok && res.error.contains("did not finish"),
            "{}",
            res.error
        );
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// The actions of one push share one budget: what does not fit is
    /// not run (so it stays owed) and the reply is not held past it. A
    /// unit slow to restart used to hold the reply for 60 s per action,
    /// past the host's deadline, which then dropped the session.
    #[tokio::test]
    async fn actions_share_one_budget_and_the_rest_wait() {
        let dir = tempfile::tempdir().unwrap();
        let sc = script(dir.path(), "sleep 30");
        let r = UnitRunner::new(sc);
        let plan = vec![
            ("slow.service".to_string(), Action::Restart),
            ("next.service".to_string(), Action::Restart),
        ];
        let out = r.run_all_within(&plan, Duration::from_millis(300)).await;
        assert_eq!(out.len(), 2);
        assert!(
            !out[0].ok && out[0].error.contains("did not finish"),
            "{out:?}"
        );
        assert!(
            !out[1].ok && out[1].error.contains("not run yet"),
            "{out:?}"
        );
    }

    #[test]
    fn first_line_is_safe() {
        assert_eq!(
            first_line(b"\n  x\x1b[1m y \nz"),
            Some("x[1m y".to_string())
        );
        assert_eq!(first_line(b""), None);
        assert!(first_line(&[b'a'; 1000]).unwrap().chars().count() <= MAX_ERROR_CHARS + 1);
    }
}
