//! Where the host agent's log events go. Under systemd (stderr is the
//! journal's stream, see `logline::under_journald`) each event is one
//! native journal entry: its priority, `MESSAGE`, and its fields as
//! journal fields (`VM=`, `GENERATION=`, `ERROR=`, …), so `journalctl
//! VM=web1` or `-o json` finds them without parsing text; a multi-line
//! error stays one entry. Otherwise, or when the journal's socket cannot be
//! reached, one line per event on stderr (`<N>` prefixed under systemd).

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use vmcred_proto::logline;

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

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

pub fn init() {
    let journal = logline::under_journald();
    let mut unreachable = None;
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                // No prefix: the fields are named as in the code, upper-cased
                // (`vm` → `VM`). None of ours is a name journald reserves.
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("vmcred-host".into())
                    .with_priority_mappings(priorities());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => unreachable = Some(e),
        }
    }
    // One line per event; under systemd a <N> priority prefix, and no
    // timestamp of our own (the journal has one).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(logline::Stderr { prefix: journal })
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journal {
        logs.without_time().init();
    } else {
        logs.init();
    }
    if let Some(e) = unreachable {
        tracing::warn!(error = %e, "cannot send to journald's socket; logging to stderr with priority prefixes instead (no structured fields)");
    }
}
