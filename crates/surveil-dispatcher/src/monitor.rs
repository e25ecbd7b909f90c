//! The monitor: every heartbeat interval it pings each runner over its
//! connection and lets the service expire runners silent for a runner
//! timeout, and expires orphaned leases at their own deadline (between
//! beats). It only decides: the redistributor's pass, which it wakes,
//! applies the requeues and disconnects that follow, so that nothing here
//! waits on the store and a stalled write cannot delay the next ping.
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
        // An orphan's grace (a runner whose connection broke) is shorter
        // than a beat: it is expired at its deadline, not up to a beat late.
        let next_expiry = daemon.service.next_expiry();
        let expiry = async {
            match next_expiry {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {
                crate::failpoint!("monitor-tick");
                seq += 1;
                daemon.service.heartbeat(seq);
            }
            () = expiry => daemon.service.expire(),
            () = daemon.service.expiry_may_change() => {}
        }
    }
}
