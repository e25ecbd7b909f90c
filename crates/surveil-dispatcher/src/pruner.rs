//! The pruner: deletes the logs `--retain-logs` no longer keeps, at start
//! and then every [`PRUNE_EVERY`], in short store transactions (see
//! [`Service::prune_logs`]). Job rows, attempts and results stay.
//!
//! It owns nothing: a restart after a panic, or a pass cut short by a
//! failing store, only delays the deletion to the next pass.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::LogRetention;
use crate::service::Service;

/// How often retention runs after the pass at start.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(10 * 60);

/// Runs until `cancel` fires; idle when retention is off.
pub(crate) async fn run(service: Arc<Service>, cancel: CancellationToken) {
    if service.retention() == LogRetention::Off {
        cancel.cancelled().await;
        return;
    }
    loop {
        crate::failpoint!("pruner-pass");
        pass(&service).await;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

async fn pass(service: &Service) {
    if let Err(err) = service.prune_by_retention().await {
        tracing::warn!(error = %err, "pruning old logs failed; trying again at the next pass");
    }
}
