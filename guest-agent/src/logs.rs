//! Where the guest agent's log events go. Under systemd (stderr is the
//! journal's stream, `logline::under_journald`) each event is one native
//! journal entry: its priority, `MESSAGE`, `SYSLOG_IDENTIFIER=vmcred-guest`,
//! and its fields as journal fields (`GENERATION=`, `CREDENTIAL=`, `UNIT=`,
//! `ERROR=`, …), so `journalctl GENERATION=…` or `-o json` finds them
//! without parsing text, and a multi-line error stays one entry. Otherwise,
//! or when the journal's socket cannot be reached, one line per event on
//! stderr (`<N>` prefixed under systemd). The same choice as the host
//! agent's `logs` module, through `vmcred_proto::loglayer` rather than
//! `tracing-journald` and the `fmt` layer (see "Guest footprint").

use std::path::Path;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use vmcred_proto::loglayer::{LogLayer, Output, JOURNAL_SOCKET};
use vmcred_proto::logline;

/// Installs the global subscriber. No field of the guest's events holds a
/// credential value (they name credentials and units, never their bytes),
/// so sending every field to the journal exposes nothing new.
pub fn init(filter: Targets) {
    let journal = logline::under_journald();
    let mut unreachable = None;
    let output = if journal {
        match Output::journal(Path::new(JOURNAL_SOCKET)) {
            Ok(o) => o,
            Err(e) => {
                unreachable = Some(e);
                Output::Stderr { prefixed: true }
            }
        }
    } else {
        Output::Stderr { prefixed: false }
    };
    tracing_subscriber::registry()
        .with(LogLayer::new("vmcred-guest", output))
        .with(filter)
        .init();
    if let Some(e) = unreachable {
        tracing::warn!(error = %e, "cannot send to journald's socket; logging to stderr with priority prefixes instead (no structured fields)");
    }
}
