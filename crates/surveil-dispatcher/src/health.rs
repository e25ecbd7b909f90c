//! Fail-stop on a failing store: after `--max-store-failures` writes in a
//! row fail to commit (a full disk, a dying device, a database that
//! refuses), the dispatcher stops serving and exits non-zero, so that its
//! service manager restarts it and start-up recovery runs against the
//! store as it really is, instead of limping on with every write refused.
//! One successful write resets the count.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_util::sync::CancellationToken;

use crate::store::StoreError;

/// Consecutive failed writes, and the switch they trip.
pub(crate) struct StoreHealth {
    limit: u32,
    failures: AtomicU32,
    tripped: CancellationToken,
    last: Mutex<String>,
}

impl StoreHealth {
    pub(crate) fn new(limit: u32) -> StoreHealth {
        StoreHealth {
            limit: limit.max(1),
            failures: AtomicU32::new(0),
            tripped: CancellationToken::new(),
            last: Mutex::new(String::new()),
        }
    }

    /// Counts a write's answer. Refusals that say nothing about the disk
    /// (a conflict, an unknown job, a bad value) do not count either way.
    pub(crate) fn observe<T>(&self, answer: &Result<T, StoreError>) {
        match answer {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(err @ (StoreError::Commit(_) | StoreError::Database { .. })) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                *crate::service::lock(&self.last) = err.to_string();
                if n >= self.limit && !self.tripped.is_cancelled() {
                    tracing::error!(
                        failures = n,
                        error = %err,
                        "the store failed {n} writes in a row (--max-store-failures): stopping"
                    );
                    self.tripped.cancel();
                }
            }
            Err(_) => {}
        }
    }

    /// Cancelled once the limit is reached.
    pub(crate) fn tripped(&self) -> &CancellationToken {
        &self.tripped
    }

    /// A token cancelled by `shutdown` or by this fail-stop, whichever
    /// comes first.
    pub(crate) fn or(&self, shutdown: CancellationToken) -> CancellationToken {
        let stop = CancellationToken::new();
        let (tripped, linked) = (self.tripped.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tripped.cancelled() => {}
            }
            linked.cancel();
        });
        stop
    }

    /// Why the dispatcher stopped, once tripped.
    pub(crate) fn reason(&self) -> String {
        format!(
            "the store failed {} writes in a row (last: {}); exiting so that the \
             service manager restarts the dispatcher and recovery runs",
            self.limit,
            crate::service::lock(&self.last)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_consecutive_commit_failures_trip_it() {
        let health = StoreHealth::new(2);
        let failed = || Err::<(), _>(StoreError::Commit("disk full".into()));
        health.observe(&failed());
        health.observe(&Ok(()));
        health.observe(&failed());
        health.observe(&Err::<(), _>(StoreError::NoSuchJob(crate::domain::JobId(
            1,
        ))));
        assert!(!health.tripped().is_cancelled());
        health.observe(&failed());
        assert!(health.tripped().is_cancelled());
        assert!(health.reason().contains("disk full"), "{}", health.reason());
    }
}
