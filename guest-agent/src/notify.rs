//! Readiness towards systemd (`Type=notify`).
//!
//! Services ordered after vmcred-guest expect their credentials to be in
//! place when they start, so READY=1 waits for the first sync with the
//! host, but never longer than the initial-sync timeout: a host that is
//! down must not keep the guest from booting.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

/// Sends READY=1 once and STATUS= lines; a no-op without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Reports READY=1 the first time; later calls only update the status.
    /// Returns whether this call was the one that made the agent ready.
    pub fn ready(&self, status: &str) -> bool {
        let first = !self.ready.swap(true, Ordering::SeqCst);
        if first {
            tracing::info!(status, "ready");
            send(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            self.status(status);
        }
        first
    }

    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
