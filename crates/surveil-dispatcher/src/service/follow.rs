//! Reading a job's log, and following it while the job runs: the one
//! implementation behind the protocol's `ReadLog` (with or without
//! `follow`) and an HTTP log or SSE stream resumed from a byte offset.
//!
//! A follower reads only when its own job changed (its watch fired) and
//! never on a timer: every write that changes a job or its log notifies
//! that job's watch after it is durable. This file reads; it never writes
//! and never decides.

use std::sync::Arc;

use bytes::Bytes;

use super::notify::JobWatch;
use crate::domain::{Attempt, JobId, JobStatus};
use crate::store::{JobStore, StoreError};

/// The largest piece of log one [`LogFollow::next`] returns.
pub const LOG_PIECE: usize = 64 * 1024;

/// What [`LogFollow::next`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEvent {
    /// Bytes of the log of `attempt` (the job's latest) from `offset`.
    Bytes {
        /// The attempt whose log this is.
        attempt: Attempt,
        /// Where `data` starts in that attempt's combined log.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// The job's status when they were read.
        status: JobStatus,
    },
    /// No more bytes: the job is final, or the reader does not follow.
    End {
        /// The attempt read.
        attempt: Attempt,
        /// The offset reached (where a later read would resume).
        offset: u64,
        /// The job's status.
        status: JobStatus,
    },
    /// There is no such job.
    NotFound,
}

impl LogEvent {
    /// Whether nothing follows this event.
    pub fn is_last(&self) -> bool {
        !matches!(self, LogEvent::Bytes { .. })
    }
}

/// A reader of one job's log from an offset. The log read is the job's
/// latest attempt's; when a new attempt starts, reading restarts at its
/// offset 0.
pub struct LogFollow {
    store: Arc<dyn JobStore>,
    job: JobId,
    offset: u64,
    attempt: Option<Attempt>,
    /// Reads this attempt's log instead of the latest attempt's.
    fixed: Option<Attempt>,
    /// Present when following: wakes the reader when the job changes.
    watch: Option<JobWatch>,
}

impl LogFollow {
    pub(super) fn new(
        store: Arc<dyn JobStore>,
        job: JobId,
        offset: u64,
        watch: Option<JobWatch>,
    ) -> LogFollow {
        LogFollow {
            store,
            job,
            offset,
            attempt: None,
            fixed: None,
            watch,
        }
    }

    /// Reads `attempt`'s log rather than the latest attempt's (an earlier
    /// attempt's log ends where it is; the current one's is followed).
    pub(super) fn of_attempt(mut self, attempt: Attempt) -> LogFollow {
        self.fixed = Some(attempt);
        self
    }

    /// The next piece of the log; when following and nothing new is
    /// stored, waits until the job changes. After an event that
    /// [`is_last`](LogEvent::is_last), there is nothing more to read.
    pub async fn next(&mut self) -> Result<LogEvent, StoreError> {
        loop {
            // Marked before reading, so a change stored after the reads
            // below wakes the wait at the end.
            if let Some(watch) = &mut self.watch {
                watch.mark_seen();
            }
            let Some(job) = self.store.get_job(self.job).await? else {
                return Ok(LogEvent::NotFound);
            };
            let attempt = self.fixed.unwrap_or(job.attempt);
            if self.attempt.is_some_and(|a| a != attempt) {
                self.offset = 0;
            }
            self.attempt = Some(attempt);
            // An earlier attempt never gets more bytes.
            let done = job.status.is_final() || attempt != job.attempt;
            // The status is read before the bytes: once it is final, this
            // read sees every byte that made it in before the end.
            let data = self
                .store
                .read_log(self.job, attempt, self.offset, LOG_PIECE)
                .await?;
            if !data.is_empty() {
                let offset = self.offset;
                self.offset += data.len() as u64;
                return Ok(LogEvent::Bytes {
                    attempt,
                    offset,
                    data,
                    status: job.status,
                });
            }
            match &mut self.watch {
                Some(watch) if !done => watch.changed().await,
                _ => {
                    return Ok(LogEvent::End {
                        attempt,
                        offset: self.offset,
                        status: job.status,
                    });
                }
            }
        }
    }
}
