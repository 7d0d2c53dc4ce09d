//! systemd's watchdog (`WatchdogSec=`): `WATCHDOG=1` only while the VM
//! tasks' runtime still runs tasks.
//!
//! VM tasks run on a runtime of their own (see `serve_with`). A VM task
//! stuck in a blocking call can stall that runtime's workers, and then every
//! VM's sync stops while the sockets (on the other runtime) still answer. A
//! probe task spawned onto the VM runtime each period detects exactly that:
//! if it has not run within half the watchdog interval, `WATCHDOG=1` is
//! withheld, the agent says why once, and systemd restarts it at the end of
//! the interval. It does not notice a single VM task that awaits forever
//! without blocking a worker; each RPC has its own deadline for that.

use std::time::Duration;

use tracing::{error, info};

/// Pings systemd every half interval while the VM runtime answers a probe.
/// Returns at once when the unit has no watchdog (`WATCHDOG_USEC` unset or
/// meant for another process).
pub async fn run(vm_runtime: tokio::runtime::Handle) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    let mut wedged = false;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probe = vm_runtime.spawn(async {});
        match tokio::time::timeout(period, probe).await {
            Ok(Ok(())) => {
                if wedged {
                    info!("the VM tasks' runtime runs tasks again; watchdog pings resumed");
                    wedged = false;
                }
                super::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            _ => {
                if !wedged {
                    error!(
                        waited_ms = period.as_millis() as u64,
                        "the VM tasks' runtime did not run a probe task (a VM task is blocking its workers); \
                         withholding WATCHDOG=1 so that systemd restarts the agent"
                    );
                    wedged = true;
                }
            }
        }
    }
}
