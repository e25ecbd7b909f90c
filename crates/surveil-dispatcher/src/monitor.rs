//! The monitor: every heartbeat interval it pings each runner over its
//! connection and lets the service expire runners silent for a runner
//! timeout (and orphaned leases past their grace); the redistributor's
//! pass applies the requeues and disconnects that follow, so that nothing
//! here waits on the store.
//!
//! It owns nothing: a restart after a panic loses no state.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::Daemon;

/// Runs until `cancel` fires.
pub(crate) async fn run(daemon: Arc<Daemon>, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(daemon.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        crate::failpoint!("monitor-tick");
        seq += 1;
        daemon.service.heartbeat(seq);
    }
}
