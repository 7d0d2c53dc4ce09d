//! Readiness towards systemd (`Type=notify`).
//!
//! Services ordered after vmcred-guest expect their credentials to be in
//! place when they start, so READY=1 waits for the first sync with the
//! host, but never longer than the initial-sync timeout: a host that is
//! down must not keep the guest from booting.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;
use tokio::sync::Notify;

/// Sends READY=1 once and STATUS= lines; a no-op without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    became_ready: Notify,
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
            self.became_ready.notify_waiters();
            tracing::info!(status, "ready");
            send(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            self.status(status);
        }
        first
    }

    /// Returns once the agent is ready (at once if it already is), so
    /// that the initial-sync timeout can stop waiting: its timer would
    /// otherwise fire long after the first sync, a wake-up of an agent
    /// that is idle by then.
    pub async fn until_ready(&self) {
        let notified = self.became_ready.notified();
        tokio::pin!(notified);
        // Registered before the check, so a `ready` in between is not lost.
        notified.as_mut().enable();
        if self.is_ready() {
            return;
        }
        notified.await;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// The initial-sync timeout's task ends when the first sync makes the
    /// agent ready, instead of sleeping on to its deadline.
    #[tokio::test]
    async fn until_ready_returns_when_ready_and_at_once_after() {
        let r = Arc::new(Readiness::new());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.until_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(r.ready("synced"));
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("until_ready returned once ready")
            .expect("task");
        tokio::time::timeout(Duration::from_secs(30), r.until_ready())
            .await
            .expect("until_ready returns at once when already ready");
    }
}
