//! Fail-stop on a failing store: after `--max-store-failures` writes in a
//! row fail to commit (a full disk, a dying device, a database that
//! refuses), or once one write has been in flight past
//! `--store-write-timeout` (a hung fsync), the dispatcher stops serving and
//! exits non-zero, so that its service manager restarts it and start-up
//! recovery runs against the store as it really is, instead of limping on
//! with every write refused or waiting. One successful write resets the
//! count.
//!
//! It is also what the systemd watchdog asks before each keep-alive: a
//! dispatcher whose store stalled past the deadline (or that has tripped)
//! is not kept alive, so that systemd kills one whose exit itself hangs on
//! the wedged disk.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{StoreError, StoreFuture};

/// Consecutive failed writes, stalls, and the switch they trip.
pub(crate) struct StoreHealth {
    limit: u32,
    write_timeout: Duration,
    failures: AtomicU32,
    /// A write has been in flight past `write_timeout`.
    stalled: AtomicBool,
    tripped: CancellationToken,
    last: Mutex<String>,
    reason: Mutex<String>,
}

impl StoreHealth {
    pub(crate) fn new(limit: u32, write_timeout: Duration) -> StoreHealth {
        StoreHealth {
            limit: limit.max(1),
            write_timeout,
            failures: AtomicU32::new(0),
            stalled: AtomicBool::new(false),
            tripped: CancellationToken::new(),
            last: Mutex::new(String::new()),
            reason: Mutex::new(String::new()),
        }
    }

    /// Awaits `write`, tripping the fail-stop if it is still in flight
    /// after `--store-write-timeout`. The write is awaited to its end all
    /// the same: whether it committed is only known from its answer, and
    /// the caller must not act on a guess.
    pub(crate) async fn watch<T>(&self, write: StoreFuture<'_, T>) -> Result<T, StoreError> {
        let mut write = write;
        let answer = match tokio::time::timeout(self.write_timeout, &mut write).await {
            Ok(answer) => answer,
            Err(_) => {
                self.stalled.store(true, Ordering::Relaxed);
                self.trip(format!(
                    "a store write has been in flight for more than {} (--store-write-timeout); \
                     exiting so that the service manager restarts the dispatcher and recovery runs",
                    humantime::format_duration(self.write_timeout)
                ));
                write.await
            }
        };
        self.observe(&answer);
        answer
    }

    /// Counts a write's answer. Refusals that say nothing about the disk
    /// (a conflict, an unknown job, a bad value) do not count either way.
    pub(crate) fn observe<T>(&self, answer: &Result<T, StoreError>) {
        match answer {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(err @ (StoreError::Commit(_) | StoreError::Database { .. })) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                *crate::service::lock(&self.last) = err.to_string();
                if n >= self.limit {
                    self.trip(format!(
                        "the store failed {} writes in a row (--max-store-failures; last: {err}); \
                         exiting so that the service manager restarts the dispatcher and recovery runs",
                        self.limit
                    ));
                }
            }
            Err(_) => {}
        }
    }

    /// Stops the dispatcher for `reason`, once (the first reason is kept).
    pub(crate) fn trip(&self, reason: String) {
        {
            let mut kept = crate::service::lock(&self.reason);
            if !kept.is_empty() {
                return;
            }
            tracing::error!(%reason, "store unhealthy: stopping");
            *kept = reason;
        }
        self.tripped.cancel();
    }

    /// Cancelled once the dispatcher must stop for its store.
    pub(crate) fn tripped(&self) -> &CancellationToken {
        &self.tripped
    }

    /// Store writes that failed in a row.
    pub(crate) fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether the store is healthy as `status` shows it: no failure in a
    /// row, no stall, not tripped.
    pub(crate) fn healthy(&self) -> bool {
        self.failures() == 0 && self.alive()
    }

    /// Whether the watchdog may be fed: no write stalled past the deadline
    /// and no fail-stop under way. A failed write alone does not starve it:
    /// an idle dispatcher would keep that count until its next write, and
    /// the count's own limit already stops the dispatcher.
    pub(crate) fn alive(&self) -> bool {
        !self.stalled.load(Ordering::Relaxed) && !self.tripped.is_cancelled()
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
        crate::service::lock(&self.reason).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_consecutive_commit_failures_trip_it() {
        let health = StoreHealth::new(2, Duration::from_secs(30));
        let failed = || Err::<(), _>(StoreError::Commit("disk full".into()));
        health.observe(&failed());
        assert!(
            !health.healthy() && health.alive(),
            "one failure: unhealthy, still fed"
        );
        health.observe(&Ok(()));
        assert!(health.healthy());
        health.observe(&failed());
        health.observe(&Err::<(), _>(StoreError::NoSuchJob(crate::domain::JobId(
            1,
        ))));
        assert!(!health.tripped().is_cancelled());
        health.observe(&failed());
        assert!(health.tripped().is_cancelled() && !health.alive());
        assert!(health.reason().contains("disk full"), "{}", health.reason());
        assert!(
            health.reason().contains("--max-store-failures"),
            "{}",
            health.reason()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_in_flight_past_the_timeout_trips_it_and_still_gets_its_answer() {
        let health = StoreHealth::new(5, Duration::from_secs(30));
        let quick: StoreFuture<'_, u32> = Box::pin(async { Ok(1) });
        assert_eq!(health.watch(quick).await.unwrap(), 1);
        assert!(health.alive());
        let slow: StoreFuture<'_, u32> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(31)).await;
            Ok(2)
        });
        assert_eq!(health.watch(slow).await.unwrap(), 2, "the answer is kept");
        assert!(!health.alive() && health.tripped().is_cancelled());
        assert!(
            health.reason().contains("--store-write-timeout"),
            "{}",
            health.reason()
        );
    }
}
