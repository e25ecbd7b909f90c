//! The redistributor: runs the assignment pass whenever work or capacity
//! may have appeared (woken by the service on submits, runner arrivals
//! and departures, freed slots, requeues); the service records each
//! assignment before its runner hears of it.
//!
//! There is no periodic pass: a wake-up is never lost (a pass starts every
//! run, and a wake-up during a pass is kept for the next). The only timed
//! pass is the retry after an assignment the store could not record.
//!
//! It owns nothing: a restart after a panic loses no state.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// After an assignment could not be recorded, the next pass waits this
/// long rather than spin against a failing store.
const ASSIGN_RETRY: Duration = Duration::from_secs(1);

/// Runs until `cancel` fires.
pub(crate) async fn run(service: Arc<Service>, cancel: CancellationToken) {
    loop {
        crate::failpoint!("redistributor-pass");
        let failed = service.assign_pass().await;
        if failed {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(ASSIGN_RETRY) => {}
            }
        } else {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = service.work_may_wait() => {}
            }
        }
    }
}
