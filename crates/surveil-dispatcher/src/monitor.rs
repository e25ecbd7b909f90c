//! The monitor: every heartbeat interval it pings each runner over its
//! connection and lets the scheduler expire runners silent for a runner
//! timeout (and orphaned leases past their grace), then applies the
//! resulting requeues and disconnects.
//!
//! It owns nothing: a restart after a panic loses no state.

use surveil_proto::Ping;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::state::{SharedRef, now};

/// Runs until `cancel` fires.
pub(crate) async fn run(shared: SharedRef, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        crate::failpoint!("monitor-tick");
        seq += 1;
        let (sessions, lost) = shared.with_sched(|s| {
            let before = s.effects_emitted();
            s.handle_tick(now());
            (s.sessions(), s.effects_emitted() != before)
        });
        for session in sessions {
            shared.send_to(session, Ping { seq });
        }
        if lost {
            shared.apply_effects().await;
            shared.wake.notify_one();
        }
    }
}
