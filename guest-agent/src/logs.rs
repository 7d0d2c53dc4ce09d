//! Where the guest agent's log events go. Under systemd (stderr is the
//! journal's stream, `logline::under_journald`) each event is one native
//! journal entry: its priority, `MESSAGE`, `SYSLOG_IDENTIFIER=vmcred-guest`,
//! and its fields as journal fields (`GENERATION=`, `CREDENTIAL=`, `UNIT=`,
//! `ERROR=`, …), so `journalctl GENERATION=…` or `-o json` finds them
//! without parsing text, and a multi-line error stays one entry. Otherwise,
//! or when the journal's socket cannot be reached, one line per event on
//! stderr (`<N>` prefixed under systemd). The same choice as the host
//! agent's `logs` module; only the filter type differs (`Targets` here, see
//! "Guest footprint" in ARCHITECTURE.md).

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use vmcred_proto::logline;

/// The same priorities as the `<N>` prefixes (`logline::priority`).
fn priorities() -> PriorityMappings {
    PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Installs the global subscriber. No field of the guest's events holds a
/// credential value (they name credentials and units, never their bytes),
/// so sending every field to the journal exposes nothing new.
pub fn init(filter: Targets) {
    let journal = logline::under_journald();
    let mut unreachable = None;
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                // No prefix: fields keep their names, upper-cased
                // (`generation` → `GENERATION`); none is a name journald
                // reserves (those start with `_`).
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("vmcred-guest".into())
                    .with_priority_mappings(priorities());
                tracing_subscriber::registry()
                    .with(layer)
                    .with(filter)
                    .init();
                return;
            }
            Err(e) => unreachable = Some(e),
        }
    }
    // One line per event; under systemd a <N> priority prefix and no
    // timestamp of our own (the journal has one). No colour: the agent is
    // started by systemd, not watched on a terminal (see "Guest footprint").
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(logline::Stderr { prefix: journal })
        .with_ansi(false);
    if journal {
        tracing_subscriber::registry()
            .with(layer.without_time())
            .with(filter)
            .init();
    } else {
        tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init();
    }
    if let Some(e) = unreachable {
        tracing::warn!(error = %e, "cannot send to journald's socket; logging to stderr with priority prefixes instead (no structured fields)");
    }
}
