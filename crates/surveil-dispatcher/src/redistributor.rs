//! The redistributor: runs the scheduler's assignment pass whenever work or
//! capacity may have appeared (woken through `Shared::wake` by submits,
//! runner arrivals and departures, freed slots, requeues) and on a fallback
//! tick, then applies the assignments: recorded in the store first, then
//! sent to the runners.
//!
//! It owns nothing: a restart after a panic loses no state.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::{SharedRef, now};

/// A pass also runs this often without a wake-up, in case one was missed
/// (e.g. while the task was being restarted).
const FALLBACK_PASS: Duration = Duration::from_secs(1);

/// Runs until `cancel` fires.
pub(crate) async fn run(shared: SharedRef, cancel: CancellationToken) {
    loop {
        crate::failpoint!("redistributor-pass");
        shared.with_sched(|s| s.schedule(now()));
        shared.apply_effects().await;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(FALLBACK_PASS) => {}
        }
    }
}
