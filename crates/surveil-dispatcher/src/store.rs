//! The dispatcher's durable store: jobs, attempts, per-task results and log
//! chunks in SQLite at `STATE_DIR/surveil.db`.
//!
//! Owns the database file and every SQL statement run against it. It makes
//! no scheduling decision of its own beyond the fencing it must re-check
//! inside a transaction (is this attempt still the job's current one?); it
//! never talks to peers and never reads the clock (callers pass `now_ms`).
//!
//! Writes go to one writer thread that owns the only write connection and
//! commits whatever is pending as one transaction (group commit), with
//! `synchronous=FULL`; each write's future resolves only after the commit
//! that holds it, so a caller may ack its peer as soon as the future
//! returns `Ok`. Reads run on separate read-only connections in
//! `spawn_blocking`, so they never wait for the writer nor block the
//! runtime (WAL lets readers and the writer proceed together).
//!
//! Layout: [`migrations`] holds the schema, `sql` the statements, `writer`
//! the group-commit thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};
use surveil_proto::{JobFinished, JobInfo, JobStatus, Stream, TaskResult};
use tokio::sync::{mpsc, oneshot};

pub mod migrations;
mod sql;
#[cfg(test)]
mod tests;
mod writer;

/// A job's id: the `jobs` table's row id, never reused.
pub type JobId = u64;
/// An attempt number: 1 for the first assignment, +1 for each reassignment.
pub type Attempt = u32;

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "surveil.db";

/// How long a connection waits for a lock held by another connection
/// (a checkpoint, another process opening the file) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many write requests may wait for the writer before `submit` and
/// friends wait for room: back-pressure instead of unbounded memory.
const WRITE_QUEUE: usize = 4096;

/// Idle read connections kept for reuse; more are opened under load and
/// closed when returned to a full pool.
const READ_POOL: usize = 4;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused or failed a statement.
    #[error("store: {context}: {source}")]
    Sqlite {
        /// What the store was doing.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
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
        /// The database's `user_version`.
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
    /// commit, a non-final result status, a number beyond SQLite's range).
    #[error("store: invalid request: {0}")]
    Invalid(String),
    /// The transaction holding this write did not commit, so nothing of it
    /// is durable (the disk is full or failing).
    #[error("store: committing the write batch failed: {0}")]
    Commit(String),
    /// The writer thread has stopped: the store was closed, or the thread
    /// died. No write can be made any more.
    #[error("store: the writer is closed")]
    WriterClosed,
    /// A bug: a read or write panicked, or a read task was cancelled.
    #[error("store: internal error: {0}")]
    Internal(String),
}

/// Attaches what the store was doing to a SQLite error.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite {
            context: context.to_owned(),
            source,
        })
    }
}

/// A job as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// The repository, as submitted.
    pub repo: String,
    /// The branch it was first submitted on.
    pub branch: String,
    /// The full commit id.
    pub commit: String,
    /// Its status.
    pub status: JobStatus,
    /// The current (or last) attempt; 0 until first assigned.
    pub attempt: Attempt,
    /// The runner holding it, or the one that produced its result.
    pub runner: Option<String>,
    /// Why it ended error or cancelled (or the runner's message).
    pub message: Option<String>,
    /// When it was first submitted (unix ms).
    pub queued_at_ms: u64,
    /// When its current attempt was assigned (unix ms).
    pub started_at_ms: Option<u64>,
    /// When it reached its final status (unix ms).
    pub finished_at_ms: Option<u64>,
    /// The task results of the recorded result; empty otherwise.
    pub tasks: Vec<TaskResult>,
}

impl JobRecord {
    /// The record as sent in client replies.
    pub fn to_proto(&self) -> JobInfo {
        JobInfo {
            id: self.id,
            repo: self.repo.clone(),
            branch: self.branch.clone(),
            commit: self.commit.clone(),
            status: self.status as i32,
            attempt: self.attempt,
            runner: self.runner.clone(),
            message: self.message.clone(),
            queued_at_ms: self.queued_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            tasks: self.tasks.clone(),
        }
    }
}

/// What [`Store::record_result`] did with a result.
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

/// The store. Cheap to clone; all clones share one writer thread and one
/// read pool. Dropping the last clone lets the writer finish what it was
/// given and stop; every write whose future returned `Ok` is durable
/// regardless.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    requests: mpsc::Sender<writer::Request>,
    readers: Mutex<Vec<Connection>>,
    stats: Arc<writer::Stats>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    #[cfg(test)]
    pause: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Opens (creating) `STATE_DIR/surveil.db`: WAL journal, migrations up
    /// to the newest schema, then starts the writer thread. Creates the
    /// state directory when it is missing.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let mut conn = Connection::open(&path).ctx(&format!("opening {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .ctx("setting busy_timeout")?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .ctx("switching to WAL")?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!(
                "{} cannot use WAL journaling (journal_mode is {mode}); \
                 put --state-dir on a local file system",
                path.display()
            )));
        }
        // FULL: a commit is on disk (WAL fsynced) before it returns, which
        // is what lets a future resolve into a peer's ack.
        conn.pragma_update(None, "synchronous", "FULL")
            .ctx("setting synchronous=FULL")?;
        conn.pragma_update(None, "foreign_keys", true)
            .ctx("enabling foreign keys")?;
        migrations::migrate(&mut conn)?;

        let stats = Arc::new(writer::Stats::default());
        #[cfg(test)]
        let pause = Arc::new(tokio::sync::Mutex::new(()));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let thread = writer::spawn(
            conn,
            rx,
            Arc::clone(&stats),
            #[cfg(test)]
            Arc::clone(&pause),
        )
        .map_err(|e| StoreError::Invalid(format!("cannot start the store writer thread: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                requests: tx,
                readers: Mutex::new(Vec::new()),
                stats,
                writer_thread: Mutex::new(Some(thread)),
                #[cfg(test)]
                pause,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many write transactions the writer has committed since open.
    /// With [`write_count`](Self::write_count) it shows how well group
    /// commit batches (figures for `GetStatus` or benchmarks).
    pub fn commit_count(&self) -> u64 {
        self.inner.stats.commits.load(Ordering::Relaxed)
    }

    /// How many write requests the writer has handled since open.
    pub fn write_count(&self) -> u64 {
        self.inner.stats.requests.load(Ordering::Relaxed)
    }

    /// Stops the writer after everything queued before this call has been
    /// committed and answered, then waits for its thread. Later writes fail
    /// with [`StoreError::WriterClosed`]; reads keep working. Calling it
    /// again is harmless.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        if self
            .inner
            .requests
            .send(writer::Request::Close(reply))
            .await
            .is_ok()
        {
            // An error here means the writer died before reaching Close;
            // joining below is all that is left to do either way.
            let _ = done.await;
        }
        let handle = self
            .inner
            .writer_thread
            .lock()
            .map_err(|_| StoreError::Internal("the writer handle lock is poisoned".into()))?
            .take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))?
                .map_err(|_| StoreError::Internal("the store writer thread panicked".into()))?;
        }
        Ok(())
    }

    // ---- writes ----

    /// Records submitted commits as queued jobs and returns their ids in the
    /// same order. A (repo, commit) already known returns its existing id
    /// and is left as it is (not re-queued, branch unchanged).
    pub async fn submit(
        &self,
        repo: &str,
        branch: &str,
        commits: &[String],
        now_ms: u64,
    ) -> Result<Vec<JobId>, StoreError> {
        let (repo, branch, commits) = (repo.to_owned(), branch.to_owned(), commits.to_vec());
        self.write(move |c| sql::submit(c, &repo, &branch, &commits, now_ms))
            .await
    }

    /// Records that `runner` holds `attempt` of `job` from `now_ms`: the job
    /// becomes running and an attempts row (job, attempt) is written.
    /// `attempt` must be newer than the job's current one (a still-running
    /// older attempt is marked superseded); repeating the same assignment
    /// to the same runner is a no-op. Fails with
    /// [`StoreError::Conflict`] for a final job or an older attempt.
    pub async fn assign(
        &self,
        job: JobId,
        attempt: Attempt,
        runner: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let runner = runner.to_owned();
        self.write(move |c| sql::assign(c, job, attempt, &runner, now_ms))
            .await
    }

    /// Records the runner's `Started` on the attempt row; ignored unless
    /// `attempt` is the job's current, running attempt.
    pub async fn started(
        &self,
        job: JobId,
        attempt: Attempt,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(move |c| sql::started(c, job, attempt, now_ms))
            .await
    }

    /// Stores a log chunk of (job, attempt) at `offset` of the attempt's
    /// combined log. Idempotent: a chunk already stored at that offset is
    /// kept as it is. Ignored (not an error) when the attempt is unknown or
    /// was revoked (requeued, superseded, or its job ended without its
    /// result), so a fenced runner cannot write into a job's log.
    pub async fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        task: u32,
        stream: Stream,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        self.write(move |c| sql::append_log(c, job, attempt, task, stream, offset, &data))
            .await
    }

    /// Records a runner's result. The fencing is re-checked inside the
    /// transaction: only the job's current attempt, while the job is
    /// running, is [`Recorded`](RecordOutcome::Recorded); the same
    /// (job, attempt) again is a [`Duplicate`](RecordOutcome::Duplicate);
    /// anything else is [`Stale`](RecordOutcome::Stale) and changes
    /// nothing. The status must be final.
    pub async fn record_result(
        &self,
        job: JobId,
        attempt: Attempt,
        result: &JobFinished,
        now_ms: u64,
    ) -> Result<RecordOutcome, StoreError> {
        let result = result.clone();
        self.write(move |c| sql::record_result(c, job, attempt, &result, now_ms))
            .await
    }

    /// Puts a running job back in the queue: status queued, runner and
    /// start time cleared, attempt kept (the next [`assign`](Self::assign)
    /// uses attempt + 1); `reason` is recorded on the revoked attempt's
    /// row. A no-op for a job that is not running (already requeued, or
    /// finished meanwhile).
    pub async fn requeue(&self, job: JobId, reason: &str) -> Result<(), StoreError> {
        let reason = reason.to_owned();
        self.write(move |c| sql::requeue(c, job, &reason)).await
    }

    /// Ends a job without a runner result (`error` after too many lost
    /// runners, `cancelled`). A no-op if the job is already final. A live
    /// attempt is marked ended with `message`, so its late result is
    /// [`Stale`](RecordOutcome::Stale). `status` must be final.
    pub async fn finish(
        &self,
        job: JobId,
        status: JobStatus,
        message: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let message = message.to_owned();
        self.write(move |c| sql::finish(c, job, status, &message, now_ms))
            .await
    }

    /// Sends one write to the writer and waits until the transaction that
    /// holds it has committed.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.inner
            .requests
            .send(writer::Request::Write(writer::Op::boxed(op, reply)))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        answer.await.map_err(|_| StoreError::WriterClosed)?
    }

    // ---- reads ----

    /// One job, with the task results of its recorded result.
    pub async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(move |c| sql::get_job(c, id)).await
    }

    /// Jobs, newest first (id descending), of `repo` and with `status` when
    /// given (`Some(JobStatus::Unspecified)` means any), at most `limit`
    /// (0 = all).
    pub async fn list_jobs(
        &self,
        repo: Option<String>,
        status: Option<JobStatus>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let status = status.filter(|s| *s != JobStatus::Unspecified);
        self.read(move |c| sql::list_jobs(c, repo.as_deref(), status, limit))
            .await
    }

    /// The bytes of (job, attempt)'s combined log from `offset`, following
    /// contiguous chunks until a gap, the end, or `max_bytes`. Empty when
    /// nothing is stored at `offset` yet.
    pub async fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Bytes, StoreError> {
        self.read(move |c| sql::read_log(c, job, attempt, offset, max_bytes))
            .await
    }

    /// The end of the contiguous log of (job, attempt) from offset 0: the
    /// offset the next expected chunk starts at. 0 for an unknown attempt.
    pub async fn log_len(&self, job: JobId, attempt: Attempt) -> Result<u64, StoreError> {
        self.read(move |c| sql::log_len(c, job, attempt)).await
    }

    /// Queued and running jobs, oldest first: what start-up recovery
    /// rebuilds the scheduler from.
    pub async fn unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(sql::unfinished).await
    }

    /// How many jobs are (queued, running).
    pub async fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.read(sql::counts).await
    }

    /// Runs a read on a pooled read-only connection in `spawn_blocking`.
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = match inner.take_reader() {
                Some(conn) => conn,
                None => open_reader(&inner.path)?,
            };
            let result = op(&conn);
            inner.return_reader(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?
    }
}

impl Inner {
    fn take_reader(&self) -> Option<Connection> {
        self.readers.lock().ok()?.pop()
    }

    fn return_reader(&self, conn: Connection) {
        // A poisoned pool only costs reuse: the connection is closed.
        if let Ok(mut pool) = self.readers.lock()
            && pool.len() < READ_POOL
        {
            pool.push(conn);
        }
    }
}

/// A read-only connection: it can never take the write lock, so readers
/// cannot stall the writer, and a bug in a read cannot change data.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ctx(&format!("opening {} for reading", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .ctx("setting busy_timeout")?;
    Ok(conn)
}
