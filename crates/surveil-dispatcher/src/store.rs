//! The job store's interface: [`JobStore`], in domain types, and the
//! errors and outcomes every backend shares. The SQLite backend
//! ([`SqliteStore`]) lives in `store/sqlite`, the PostgreSQL one
//! ([`PostgresStore`], fenced by a leader term) in `store/postgres`; with the `testing` feature,
//! `conformance` is the suite any backend must pass.
//!
//! The rules every backend keeps, whatever its engine:
//! - **durable before answered**: a write's future resolves `Ok` only
//!   after its transaction has committed, so the caller may acknowledge a
//!   peer at once; `Err` means nothing of that write is durable;
//! - **one write, one transaction**: each method is atomic on its own, and
//!   anything written alongside a state change (a later outbox row) goes
//!   in the same transaction;
//! - **fencing is re-checked inside the transaction**: a result, log chunk
//!   or `Started` for an attempt that is not the job's current one changes
//!   nothing, whatever the caller believed;
//! - no scheduling decisions, no clock (callers pass `now_ms`), no peers.
//!
//! The interface is object safe (`Arc<dyn JobStore>`): the backend is
//! chosen at start-up from the configuration, and the service, the
//! sessions and an HTTP layer are compiled once for all of them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;

use crate::domain::{
    Attempt, AttemptRecord, BranchHead, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult,
    LogChunk, Origin, PruneRule, Pruned, Submitted,
};

mod columns;
#[cfg(feature = "testing")]
pub mod conformance;
mod fencing;
mod postgres;
mod sqlite;

pub use postgres::{LeaderInfo, PostgresOptions, PostgresStore};
pub use sqlite::{DB_FILE, SqliteStore};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement.
    #[error("store: {context}: {source}")]
    Database {
        /// What the store was doing.
        context: String,
        /// The database's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The state directory could not be created.
    #[error("store: creating the state directory {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer dispatcher.
    #[error(
        "store: the database's schema version {found} is newer than this dispatcher knows ({known}); \
         run a newer surveil-dispatcher or use another --state-dir"
    )]
    SchemaTooNew {
        /// The database's schema version.
        found: u32,
        /// The newest version this binary knows.
        known: u32,
    },
    /// The job id is unknown.
    #[error("no such job {0}")]
    NoSuchJob(JobId),
    /// The request contradicts the job's recorded state (for example an
    /// assignment whose attempt is not newer than the job's current one).
    #[error("store: job {job}: {reason}")]
    Conflict {
        /// The job.
        job: JobId,
        /// What was wrong.
        reason: String,
    },
    /// The request carries a value the store cannot record (an empty
    /// repository, a number beyond the database's range), or a stored row
    /// cannot be read back (the file was edited or damaged).
    #[error("store: invalid request: {0}")]
    Invalid(String),
    /// The transaction holding this write did not commit, so nothing of it
    /// is durable (the disk is full or failing).
    #[error("store: committing the write batch failed: {0}")]
    Commit(String),
    /// The store was closed (or its writer died): no write can be made any
    /// more.
    #[error("store: the store is closed for writing")]
    Closed,
    /// This dispatcher does not hold the leader term (a standby, or a
    /// leader deposed by a takeover): the database refused the write.
    #[error("store: this dispatcher is not the leader; the write was refused")]
    NotLeader,
    /// A bug: a read or write panicked, or a read task was cancelled.
    #[error("store: internal error: {0}")]
    Internal(String),
}

/// What [`JobStore::record_result`] did with a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    /// The result is now the job's final result.
    Recorded,
    /// This (job, attempt)'s result was already recorded: ack it again
    /// (accepted), the runner is resending after a lost ack.
    Duplicate,
    /// The attempt is not the job's current one, or the job already ended
    /// from another cause: refuse it (`ResultAck{accepted: false}`).
    Stale,
}

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The durable record of jobs, attempts, results and logs. See the module
/// documentation for the rules every implementation keeps; the
/// `conformance` suite checks them.
pub trait JobStore: Send + Sync + 'static {
    /// Records submitted commits as queued jobs, in one transaction, and
    /// says per commit (in the same order) which job it is and whether
    /// this call created it. A (repo, commit) already known keeps its id
    /// and its state (not re-queued, branch, ref and pull request
    /// unchanged); a commit repeated within one call gets the same id
    /// twice. Fails with [`StoreError::Invalid`] for an empty repository.
    fn submit<'a>(
        &'a self,
        repo: &'a str,
        origin: &'a Origin,
        commits: &'a [CommitId],
        now_ms: u64,
    ) -> StoreFuture<'a, Vec<Submitted>>;

    /// Records that `runner` holds `attempt` of `job` from `now_ms`: the job
    /// becomes running. `attempt` must be newer than the job's current one
    /// (a still-running older attempt is superseded and fenced); repeating
    /// the same assignment to the same runner is a no-op. Fails with
    /// [`StoreError::Conflict`] for a final job or an older attempt, and
    /// [`StoreError::NoSuchJob`] for an unknown one.
    fn assign<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        runner: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()>;

    /// Records the runner's `Started`; the first one wins. Ignored unless
    /// `attempt` is the job's current, running attempt.
    fn started(&self, job: JobId, attempt: Attempt, now_ms: u64) -> StoreFuture<'_, ()>;

    /// Stores a chunk of (job, attempt)'s combined log, keeping the log
    /// within `cap` bytes: a chunk crossing it keeps its head, one past it
    /// is dropped, and the first such chunk marks the attempt
    /// `log_truncated` and stores a SYSTEM line saying so at offset `cap`.
    /// Idempotent: a chunk already stored at that offset is kept as it is.
    /// Ignored unless `attempt` is the job's current, running attempt, so
    /// neither a fenced runner nor a late sender can grow a log. Fails with
    /// [`StoreError::Invalid`] when the chunk would end beyond the store's
    /// range.
    fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
        cap: u64,
    ) -> StoreFuture<'_, ()>;

    /// Records a runner's result: only the job's current attempt, while
    /// the job is running, is [`Recorded`](RecordOutcome::Recorded); the
    /// same (job, attempt) again is a [`Duplicate`](RecordOutcome::Duplicate)
    /// whatever it says; anything else is [`Stale`](RecordOutcome::Stale)
    /// and changes nothing.
    fn record_result<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        result: &'a JobResult,
        now_ms: u64,
    ) -> StoreFuture<'a, RecordOutcome>;

    /// Puts a running job back in the queue after `attempt` was lost:
    /// status queued, runner and start time cleared, attempt kept (the next
    /// assignment uses one more), `reason` recorded on the attempt. A no-op
    /// unless the job is running at `attempt`.
    fn requeue<'a>(&'a self, job: JobId, attempt: Attempt, reason: &'a str) -> StoreFuture<'a, ()>;

    /// [`requeue`](Self::requeue) for an attempt its runner handed back
    /// without a result (it drained): the job's `handed_back` count grows
    /// by one, so the attempt does not count against `--max-attempts`. A
    /// no-op unless the job is running at `attempt`.
    fn hand_back<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        reason: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// Ends a job without a runner's result (`error` after too many lost
    /// runners, `cancelled`). A no-op if the job is already final. A live
    /// attempt is ended with `message`, so its late result is
    /// [`Stale`](RecordOutcome::Stale).
    fn finish<'a>(
        &'a self,
        job: JobId,
        status: FinalStatus,
        message: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()>;

    /// One job, with the task results of its recorded result.
    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>>;

    /// Jobs matching `filter`, newest first.
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> StoreFuture<'a, Vec<Job>>;

    /// Up to `max_bytes` of (job, attempt)'s combined log from `offset`,
    /// following contiguous chunks until a gap or the end. Empty when
    /// nothing is stored at `offset` yet.
    fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> StoreFuture<'_, Bytes>;

    /// Queues a new run of a finished job: its status becomes `queued`, the
    /// next assignment is a new attempt, and the earlier attempts' results,
    /// tasks and logs stay readable. `Conflict` for a queued or running
    /// job; `NoSuchJob` for an unknown one.
    fn rerun(&self, job: JobId) -> StoreFuture<'_, ()>;

    /// Records that a cancel was asked of a running job, so a restarted
    /// dispatcher still cancels it (`Job::cancel_requested`; cleared by a
    /// rerun). `false`, changing nothing, when the job is not running.
    fn request_cancel(&self, job: JobId) -> StoreFuture<'_, bool>;

    /// Deletes the stored logs of up to `batch` attempts of finished jobs
    /// that `rule` selects, marking them `log_pruned` (the job and attempt
    /// rows, results and tasks stay). One transaction per call, so a large
    /// prune never holds the writer long; `more` says whether another call
    /// may find more.
    fn prune_logs(&self, rule: PruneRule, batch: u32) -> StoreFuture<'_, Pruned>;

    /// Every attempt of `job`, oldest first, with its tasks; empty for an
    /// unknown job or one never assigned.
    fn attempts(&self, job: JobId) -> StoreFuture<'_, Vec<AttemptRecord>>;

    /// The newest job of every (repository, branch) pair, ordered by
    /// repository then branch: the repositories page and badges.
    fn branches(&self) -> StoreFuture<'_, Vec<BranchHead>>;

    /// Queued and running jobs, oldest first: what start-up recovery
    /// rebuilds the scheduler from.
    fn unfinished(&self) -> StoreFuture<'_, Vec<Job>>;

    /// The store's epoch: 32 lower-case hex digits (128 random bits) made
    /// with the store and kept for its life, so that what a peer holds
    /// across connections (a runner's leases and results, an observer's
    /// cursor) can be told apart from another store's. A store restored
    /// from a backup shows the backup's epoch until the restore step
    /// replaces it (`SqliteStore::new_epoch`, `PostgresStore::new_epoch`).
    fn epoch(&self) -> StoreFuture<'_, String>;

    /// Finishes every write given before this call, then refuses writes
    /// ([`StoreError::Closed`]); reads keep working. Calling it again is
    /// harmless.
    fn close(&self) -> StoreFuture<'_, ()>;
}
