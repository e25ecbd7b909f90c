//! The SQLite backend of [`JobStore`]: jobs, attempts, per-task results and
//! log chunks in `STATE_DIR/surveil.db`.
//!
//! Owns the database file and every SQL statement run against it. Writes
//! go to one writer thread that owns the only write connection and commits
//! whatever is pending as one transaction (group commit), with
//! `synchronous=FULL`; each write's future resolves only after the commit
//! that holds it. Reads run on separate read-only connections in
//! `spawn_blocking`, so they never wait for the writer nor block the
//! runtime (WAL lets readers and the writer proceed together).
//!
//! Layout: `migrations` holds the schema, `sql` the statements, `writer`
//! the group-commit thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::{JobStore, RecordOutcome, StoreError, StoreFuture};
use crate::domain::{
    Attempt, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult, LogChunk, Origin, PruneRule,
    Pruned, Submitted,
};

mod migrations;
mod sql;
#[cfg(test)]
mod tests;
mod writer;

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "surveil.db";

/// How long a connection waits for a lock held by another connection
/// (a checkpoint, another process opening the file) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of WAL kept after a checkpoint (`PRAGMA journal_size_limit`).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// How many write requests may wait for the writer before callers wait
/// for room: back-pressure instead of unbounded memory.
const WRITE_QUEUE: usize = 4096;

/// Idle read connections kept for reuse; more are opened under load and
/// closed when returned to a full pool.
const READ_POOL: usize = 4;

/// Attaches what the store was doing to a SQLite error.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database {
            context: context.to_owned(),
            source: Box::new(source),
        })
    }
}

/// The SQLite store. Cheap to clone; all clones share one writer thread and
/// one read pool. Dropping the last clone lets the writer finish what it
/// was given and stop; every write whose future returned `Ok` is durable
/// regardless.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    requests: mpsc::Sender<writer::Request>,
    readers: Mutex<Vec<Connection>>,
    stats: Arc<writer::Stats>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SqliteStore {
    /// Opens (creating) `STATE_DIR/surveil.db`: WAL journal, migrations up
    /// to the newest schema, then starts the writer thread. Creates the
    /// state directory when it is missing.
    pub fn open(state_dir: &Path) -> Result<SqliteStore, StoreError> {
        let dir_error = |source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source,
        };
        surveil_common::private::create_dir(state_dir).map_err(dir_error)?;
        let path = state_dir.join(DB_FILE);
        // SQLite creates the database 0644 less the umask, and its WAL and
        // shared-memory files with the database's mode: make the database
        // 0600 first, then the others once they exist.
        if !path.exists() {
            surveil_common::private::create_file(&path).map_err(dir_error)?;
        }
        surveil_common::private::restrict_file(&path).map_err(dir_error)?;
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
        // A burst of log output (or a prune) grows the WAL; without a limit
        // it keeps its peak size on disk after every checkpoint.
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .ctx("setting journal_size_limit")?;
        migrations::migrate(&mut conn)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            let side = PathBuf::from(side);
            if side.exists() {
                surveil_common::private::restrict_file(&side).map_err(dir_error)?;
            }
        }

        let stats = Arc::new(writer::Stats::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let thread = writer::spawn(conn, rx, Arc::clone(&stats)).map_err(|e| {
            StoreError::Internal(format!("cannot start the store writer thread: {e}"))
        })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                requests: tx,
                readers: Mutex::new(Vec::new()),
                stats,
                writer_thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Replaces the store's epoch with a new random one and returns it:
    /// the restore step, for a store put back from a backup while no
    /// dispatcher runs on it (`surveil-dispatcher --new-epoch`). Runners
    /// and observers welcomed with the new epoch drop what they hold from
    /// the old one and re-verify their cursors.
    pub async fn new_epoch(&self) -> Result<String, StoreError> {
        self.write(sql::new_epoch).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many write transactions the writer has committed since open.
    /// With [`write_count`](Self::write_count) it shows how well group
    /// commit batches.
    pub fn commit_count(&self) -> u64 {
        self.inner.stats.commits.load(Ordering::Relaxed)
    }

    /// How many write requests the writer has handled since open.
    pub fn write_count(&self) -> u64 {
        self.inner.stats.requests.load(Ordering::Relaxed)
    }

    /// Test hook: the next `n` batches roll back instead of committing, as
    /// a full or failing disk makes them, so every write in them fails
    /// with [`StoreError::Commit`] and nothing of them is durable.
    #[cfg(feature = "testing")]
    pub fn fail_next_commits(&self, n: u32) {
        self.inner.stats.fail_commits.store(n, Ordering::SeqCst);
    }

    /// Test hook: the next `n` batches are each held for `stall` before
    /// they commit, as a hung fsync holds them; their writes answer only
    /// afterwards (and then succeed).
    #[cfg(feature = "testing")]
    pub fn stall_next_commits(&self, n: u32, stall: Duration) {
        let ms = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
        self.inner.stats.stall_ms.store(ms, Ordering::SeqCst);
        self.inner.stats.stall_commits.store(n, Ordering::SeqCst);
    }

    /// Test hook: holds the writer before its next batch while the guard
    /// lives, so that requests pile up deterministically.
    #[cfg(feature = "testing")]
    pub async fn pause_writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.stats.pause.lock().await
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
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
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

    async fn close_writer(&self) -> Result<(), StoreError> {
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
}

impl JobStore for SqliteStore {
    fn submit<'a>(
        &'a self,
        repo: &'a str,
        origin: &'a Origin,
        commits: &'a [CommitId],
        now_ms: u64,
    ) -> StoreFuture<'a, Vec<Submitted>> {
        let (repo, origin, commits) = (repo.to_owned(), origin.clone(), commits.to_vec());
        Box::pin(self.write(move |c| sql::submit(c, &repo, &origin, &commits, now_ms)))
    }

    fn assign<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        runner: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let runner = runner.to_owned();
        Box::pin(self.write(move |c| sql::assign(c, job, attempt, &runner, now_ms)))
    }

    fn started(&self, job: JobId, attempt: Attempt, now_ms: u64) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| sql::started(c, job, attempt, now_ms)))
    }

    fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
        cap: u64,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| sql::append_log(c, job, attempt, &chunk, cap)))
    }

    fn request_cancel(&self, job: JobId) -> StoreFuture<'_, bool> {
        Box::pin(self.write(move |c| sql::request_cancel(c, job)))
    }

    fn prune_logs(&self, rule: PruneRule, batch: u32) -> StoreFuture<'_, Pruned> {
        Box::pin(self.write(move |c| sql::prune_logs(c, rule, batch)))
    }

    fn record_result<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        result: &'a JobResult,
        now_ms: u64,
    ) -> StoreFuture<'a, RecordOutcome> {
        let result = result.clone();
        Box::pin(self.write(move |c| sql::record_result(c, job, attempt, &result, now_ms)))
    }

    fn requeue<'a>(&'a self, job: JobId, attempt: Attempt, reason: &'a str) -> StoreFuture<'a, ()> {
        let reason = reason.to_owned();
        Box::pin(self.write(move |c| sql::requeue(c, job, attempt, &reason)))
    }

    fn hand_back<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        let reason = reason.to_owned();
        Box::pin(self.write(move |c| sql::hand_back(c, job, attempt, &reason)))
    }

    fn finish<'a>(
        &'a self,
        job: JobId,
        status: FinalStatus,
        message: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let message = message.to_owned();
        Box::pin(self.write(move |c| sql::finish(c, job, status, &message, now_ms)))
    }

    fn rerun(&self, job: JobId) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| sql::rerun(c, job)))
    }

    fn attempts(&self, job: JobId) -> StoreFuture<'_, Vec<crate::domain::AttemptRecord>> {
        Box::pin(self.read(move |c| sql::attempts(c, job)))
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        Box::pin(self.read(move |c| sql::get_job(c, id)))
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> StoreFuture<'a, Vec<Job>> {
        let filter = filter.clone();
        Box::pin(self.read(move |c| sql::list_jobs(c, &filter)))
    }

    fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> StoreFuture<'_, Bytes> {
        Box::pin(self.read(move |c| sql::read_log(c, job, attempt, offset, max_bytes)))
    }

    fn branches(&self) -> StoreFuture<'_, Vec<crate::domain::BranchHead>> {
        Box::pin(self.read(sql::branches))
    }

    fn unfinished(&self) -> StoreFuture<'_, Vec<Job>> {
        Box::pin(self.read(sql::unfinished))
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        Box::pin(self.read(sql::epoch))
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.close_writer())
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
