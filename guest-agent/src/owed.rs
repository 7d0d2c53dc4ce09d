//! Unit actions the guest owes: planned for a change, not yet succeeded.
//! They live in state.json (see `store::Owed`) so that neither a failure
//! nor a crash forgets one; these are the rules for adding, dropping and
//! reporting them. Running them is the service's.

use std::collections::BTreeSet;

use vmcred_proto::rpc::pb::UnitResult;

use crate::config::GuestConfig;
use crate::store::Owed;
use crate::units::{plan, Action};

/// Adds the actions `plan` makes for `changed` to `owed` (a restart
/// covers a reload of the same unit), and drops what is owed only for
/// credentials no longer managed or no longer mapped to the unit.
pub fn merge_owed(
    config: &GuestConfig,
    owed: &mut Vec<Owed>,
    managed: &BTreeSet<String>,
    changed: &[String],
) {
    for (unit, action) in plan(config, changed.iter().map(String::as_str)) {
        let causes: BTreeSet<String> = changed
            .iter()
            .filter(|n| {
                config.credentials.get(n.as_str()).is_some_and(|p| {
                    p.restart_units.contains(&unit) || p.reload_units.contains(&unit)
                })
            })
            .cloned()
            .collect();
        match owed
            .iter_mut()
            .find(|o| o.unit == unit && o.action == action)
        {
            Some(o) => o.credentials.extend(causes),
            None => owed.push(Owed {
                unit,
                action,
                credentials: causes,
                error: String::new(),
            }),
        }
    }
    prune_owed(config, owed, managed, changed);
}

/// Keeps only owed actions some managed (or just removed) credential
/// still maps to; a restart owed makes a reload of the same unit moot.
pub fn prune_owed(
    config: &GuestConfig,
    owed: &mut Vec<Owed>,
    managed: &BTreeSet<String>,
    just_removed: &[String],
) {
    for o in owed.iter_mut() {
        o.credentials.retain(|n| {
            (managed.contains(n) || just_removed.contains(n))
                && config.credentials.get(n).is_some_and(|p| match o.action {
                    Action::Restart => p.restart_units.contains(&o.unit),
                    Action::Reload => p.reload_units.contains(&o.unit),
                })
        });
    }
    let restarts: BTreeSet<String> = owed
        .iter()
        .filter(|o| o.action == Action::Restart && !o.credentials.is_empty())
        .map(|o| o.unit.clone())
        .collect();
    owed.retain(|o| {
        let moot = o.action == Action::Reload && restarts.contains(&o.unit);
        !o.credentials.is_empty() && !moot
    });
    // Restarts first, as `plan` orders them.
    owed.sort_by_key(|o| o.action);
}

/// Owed actions as the replies carry them.
pub fn owed_reply(owed: &[Owed]) -> Vec<UnitResult> {
    owed.iter()
        .map(|o| UnitResult {
            unit: o.unit.clone(),
            action: o.action.as_str().to_string(),
            ok: false,
            error: if o.error.is_empty() {
                "pending".to_string()
            } else {
                o.error.clone()
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialPolicy;

    fn config() -> GuestConfig {
        let mut c = GuestConfig::default();
        c.credentials.insert(
            "A".into(),
            CredentialPolicy {
                restart_units: vec!["a.service".into()],
                reload_units: vec!["r.service".into()],
                ..Default::default()
            },
        );
        c.credentials.insert(
            "B".into(),
            CredentialPolicy {
                reload_units: vec!["a.service".into(), "r.service".into()],
                ..Default::default()
            },
        );
        c
    }

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn units(owed: &[Owed]) -> Vec<(&str, Action, Vec<&str>)> {
        owed.iter()
            .map(|o| {
                (
                    o.unit.as_str(),
                    o.action,
                    o.credentials.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn merged_once_per_unit_and_a_restart_covers_a_reload() {
        let c = config();
        let mut owed = Vec::new();
        let managed = names(&["A", "B"]);
        merge_owed(&c, &mut owed, &managed, &["B".to_string()]);
        assert_eq!(
            units(&owed),
            vec![
                ("a.service", Action::Reload, vec!["B"]),
                ("r.service", Action::Reload, vec!["B"]),
            ]
        );
        merge_owed(&c, &mut owed, &managed, &["A".to_string()]);
        // a.service is now owed a restart, which makes its reload moot.
        assert_eq!(
            units(&owed),
            vec![
                ("a.service", Action::Restart, vec!["A"]),
                ("r.service", Action::Reload, vec!["A", "B"]),
            ]
        );
    }

    #[test]
    fn dropped_when_removed_or_unmapped() {
        let c = config();
        let mut owed = vec![
            Owed {
                unit: "r.service".into(),
                action: Action::Reload,
                credentials: names(&["A", "B"]),
                error: "failed".into(),
            },
            Owed {
                unit: "gone.service".into(),
                action: Action::Restart,
                credentials: names(&["A"]),
                error: String::new(),
            },
        ];
        prune_owed(&c, &mut owed, &names(&["B"]), &[]);
        assert_eq!(units(&owed), vec![("r.service", Action::Reload, vec!["B"])]);
        prune_owed(&c, &mut owed, &names(&[]), &["B".to_string()]);
        assert_eq!(owed.len(), 1, "kept while its removal's action runs");
        prune_owed(&c, &mut owed, &names(&[]), &[]);
        assert!(owed.is_empty());
    }

    #[test]
    fn reported_as_not_ok_with_the_last_error() {
        let owed = vec![
            Owed {
                unit: "a.service".into(),
                action: Action::Restart,
                credentials: names(&["A"]),
                error: String::new(),
            },
            Owed {
                unit: "r.service".into(),
                action: Action::Reload,
                credentials: names(&["A"]),
                error: "Job for r.service failed.".into(),
            },
        ];
        let r = owed_reply(&owed);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|u| !u.ok));
        assert_eq!(
            (r[0].action.as_str(), r[0].error.as_str()),
            ("restart", "pending")
        );
        assert_eq!(r[1].error, "Job for r.service failed.");
    }
}
