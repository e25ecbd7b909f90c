//! The PostgreSQL backend of [`JobStore`], for dispatchers that share one
//! database: the same tables and rules as the SQLite store, plus the
//! leader term that fences every write.
//!
//! Owns the connection pool and every SQL statement run against the
//! database. Writes go to one writer task that commits whatever is pending
//! as one transaction (group commit) after checking the leader term in
//! that same transaction; reads run on pooled connections. Without a term
//! (not elected, or deposed) every write fails with
//! [`StoreError::NotLeader`]: only the elected dispatcher writes.
//!
//! Layout: `schema` holds the migrations, `sql` the statements, `writer`
//! the group-commit task and the fence, `leader` the election.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{ClientWrapper as Conn, Manager, ManagerConfig, Pool, RecyclingMethod};
use surveil_common::Secret;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{JobStore, RecordOutcome, StoreError, StoreFuture};
use crate::domain::{
    Attempt, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult, LogChunk, Origin, PruneRule,
    Pruned, Submitted,
};

mod leader;
mod schema;
mod sql;
#[cfg(test)]
mod tests;
mod writer;

pub use leader::LeaderInfo;

/// How many write requests may wait for the writer.
const WRITE_QUEUE: usize = 4096;
/// How long connecting to PostgreSQL may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Attaches what the store was doing to a PostgreSQL error.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, context: &str) -> Result<T, StoreError> {
        self.map_err(|e| database(context, &e))
    }
}

/// A PostgreSQL error as a `StoreError` whose text carries the server's
/// own message (tokio-postgres' `Display` says only "db error").
fn database(context: &str, e: &tokio_postgres::Error) -> StoreError {
    let text = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            text
        }
    };
    StoreError::Database {
        context: context.to_owned(),
        source: text.into(),
    }
}

fn pool_error(context: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => database(context, &e),
        other => StoreError::Database {
            context: context.to_owned(),
            source: Box::new(other),
        },
    }
}

/// How to reach the database: what `--store postgres://…` and its
/// companion flags say, validated.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The connection URL without a password (`postgres://user@host:port/db`,
    /// with `?sslmode=disable|prefer|require`).
    pub url: String,
    /// The password, from `--store-password-file` or a `PGPASSFILE` entry.
    pub password: Option<Secret>,
    /// CA certificates (PEM) the server's certificate must chain to; TLS
    /// is used only with one.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool (reads, the writer, the election).
    pub pool_size: usize,
    /// How long a leader term lasts without renewal.
    pub leader_ttl: Duration,
}

impl PostgresOptions {
    /// Options with the defaults for `url` (a pool of 16, a 3 s term).
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            password: None,
            ca_file: None,
            pool_size: 16,
            leader_ttl: Duration::from_secs(3),
        }
    }

    /// The parsed connection settings, or what is wrong with the URL.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            StoreError::Invalid(format!(
                "--store {}: not a PostgreSQL URL: {e}",
                redact(&self.url)
            ))
        })?;
        if config.get_password().is_some() {
            return Err(StoreError::Invalid(
                "--store: the URL must not carry the password (it would show in `ps` and logs); \
                 put it in --store-password-file or a PGPASSFILE entry"
                    .into(),
            ));
        }
        if let Some(password) = &self.password {
            config.password(password.expose().as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("surveil-dispatcher");
        Ok(config)
    }
}

/// The URL with anything after `:` in its user part hidden.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if url[scheme + 3..at].contains(':') => {
            let user_end = scheme + 3 + url[scheme + 3..at].find(':').unwrap_or(0);
            format!("{}:<redacted>{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The leader-term fence the writer checks: the term this store holds (0
/// for none), and the signal that a write found it gone.
pub(crate) struct Fence {
    term: AtomicU64,
    lost: AtomicBool,
    lost_notify: Notify,
    ttl: Duration,
}

impl Fence {
    fn term(&self) -> Option<u64> {
        match self.term.load(Ordering::SeqCst) {
            0 => None,
            term => Some(term),
        }
    }

    fn deposed(&self) {
        if self.term.swap(0, Ordering::SeqCst) != 0 {
            tracing::error!(
                "a write found this dispatcher's leader term gone: refused by the database"
            );
        }
        self.lost.store(true, Ordering::SeqCst);
        self.lost_notify.notify_waiters();
    }

    /// A healthy batch is never idle inside its transaction for long, but
    /// a loaded machine can pause it; a stalled one delays a takeover by
    /// at most this much past the term's expiry.
    fn idle_in_transaction_ms(&self) -> u128 {
        self.ttl.as_millis().max(1000)
    }
}

/// The PostgreSQL store. Cheap to clone; clones share the pool, the writer
/// and the term.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    requests: mpsc::Sender<writer::Request>,
    fence: Arc<Fence>,
    stats: Arc<writer::Stats>,
    writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    ttl: Duration,
}

impl PostgresStore {
    /// Connects, applies pending migrations (serialised with any other
    /// dispatcher starting at the same time) and starts the writer. The
    /// store holds no term yet: see [`campaign`](Self::campaign).
    pub async fn open(options: &PostgresOptions) -> Result<PostgresStore, StoreError> {
        let pool = make_pool(options)?;
        let mut client = pool
            .get()
            .await
            .map_err(|e| pool_error(&format!("connecting to {}", redact(&options.url)), e))?;
        schema::migrate(&mut client).await?;
        drop(client);
        let fence = Arc::new(Fence {
            term: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            lost_notify: Notify::new(),
            ttl: options.leader_ttl,
        });
        let stats = Arc::new(writer::Stats::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let task = tokio::spawn(writer::run(
            pool.clone(),
            rx,
            Arc::clone(&fence),
            Arc::clone(&stats),
        ));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                requests: tx,
                fence,
                stats,
                writer_task: Mutex::new(Some(task)),
                ttl: options.leader_ttl,
            }),
        })
    }

    /// Replaces the database's epoch with a new random one and returns it:
    /// the restore step (`surveil-dispatcher --store URL --new-epoch`),
    /// refused with [`StoreError::Invalid`]
    /// while any dispatcher holds an unexpired leader term on it. Not
    /// fenced by a term: it is for a database no dispatcher serves.
    pub async fn new_epoch(&self) -> Result<String, StoreError> {
        sql::new_epoch(&*self.conn().await?).await?.ok_or_else(|| {
            StoreError::Invalid(
                "a dispatcher holds the leader term on this database; stop every dispatcher \
                 using it before giving the store a new epoch"
                    .into(),
            )
        })
    }

    /// How many write transactions the writer has committed.
    pub fn commit_count(&self) -> u64 {
        self.inner.stats.commits.load(Ordering::Relaxed)
    }

    /// How many write requests the writer has handled.
    pub fn write_count(&self) -> u64 {
        self.inner.stats.requests.load(Ordering::Relaxed)
    }

    async fn write<T: Send + 'static>(&self, op: writer::WriteFn<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .requests
            .send(writer::Request::Write(writer::Op::boxed(op, reply)))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error("taking a pooled PostgreSQL connection", e))
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
            let _ = done.await;
        }
        if let Some(task) = self.inner.writer_task.lock().await.take() {
            task.await
                .map_err(|e| StoreError::Internal(format!("the store writer task failed: {e}")))?;
        }
        // Hand the term over at once rather than after its expiry.
        self.resign().await
    }
}

fn make_pool(options: &PostgresOptions) -> Result<Pool, StoreError> {
    let config = options.pg_config()?;
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &options.ca_file {
        Some(ca) => {
            let tls = surveil_common::tls::client_config_for_ca("--store-ca", ca)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            Manager::from_config(config, tls, manager_config)
        }
        None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
    };
    let wait = (options.leader_ttl / 3).max(Duration::from_millis(100));
    Pool::builder(manager)
        .max_size(options.pool_size.max(2))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Internal(format!("building the PostgreSQL pool: {e}")))
}

/// Boxes a write closure with the signature the writer needs (the
/// expected type lets the closure's lifetimes be inferred).
fn op<T>(f: writer::WriteFn<T>) -> writer::WriteFn<T> {
    f
}

impl JobStore for PostgresStore {
    fn submit<'a>(
        &'a self,
        repo: &'a str,
        origin: &'a Origin,
        commits: &'a [CommitId],
        now_ms: u64,
    ) -> StoreFuture<'a, Vec<Submitted>> {
        let (repo, origin, commits) = (repo.to_owned(), origin.clone(), commits.to_vec());
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::submit(c, &repo, &origin, &commits, now_ms).await })
        }))))
    }

    fn assign<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        runner: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let runner = runner.to_owned();
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::assign(c, job, attempt, &runner, now_ms).await })
        }))))
    }

    fn started(&self, job: JobId, attempt: Attempt, now_ms: u64) -> StoreFuture<'_, ()> {
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(sql::started(c, job, attempt, now_ms))
        }))))
    }

    fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
        cap: u64,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::append_log(c, job, attempt, &chunk, cap).await })
        }))))
    }

    fn request_cancel(&self, job: JobId) -> StoreFuture<'_, bool> {
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(sql::request_cancel(c, job))
        }))))
    }

    fn prune_logs(&self, rule: PruneRule, batch: u32) -> StoreFuture<'_, Pruned> {
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(sql::prune_logs(c, rule, batch))
        }))))
    }

    fn record_result<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        result: &'a JobResult,
        now_ms: u64,
    ) -> StoreFuture<'a, RecordOutcome> {
        let result = result.clone();
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::record_result(c, job, attempt, &result, now_ms).await })
        }))))
    }

    fn requeue<'a>(&'a self, job: JobId, attempt: Attempt, reason: &'a str) -> StoreFuture<'a, ()> {
        let reason = reason.to_owned();
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::requeue(c, job, attempt, &reason).await })
        }))))
    }

    fn hand_back<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        let reason = reason.to_owned();
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::hand_back(c, job, attempt, &reason).await })
        }))))
    }

    fn finish<'a>(
        &'a self,
        job: JobId,
        status: FinalStatus,
        message: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let message = message.to_owned();
        Box::pin(self.write(op(Box::new(move |c: &Conn| {
            Box::pin(async move { sql::finish(c, job, status, &message, now_ms).await })
        }))))
    }

    fn rerun(&self, job: JobId) -> StoreFuture<'_, ()> {
        Box::pin(self.write(op(Box::new(move |c: &Conn| Box::pin(sql::rerun(c, job))))))
    }

    fn attempts(&self, job: JobId) -> StoreFuture<'_, Vec<crate::domain::AttemptRecord>> {
        Box::pin(async move { sql::attempts(&*self.conn().await?, job).await })
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        Box::pin(async move { sql::get_job(&*self.conn().await?, id).await })
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> StoreFuture<'a, Vec<Job>> {
        Box::pin(async move { sql::list_jobs(&*self.conn().await?, filter).await })
    }

    fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> StoreFuture<'_, Bytes> {
        Box::pin(async move {
            sql::read_log(&*self.conn().await?, job, attempt, offset, max_bytes).await
        })
    }

    fn branches(&self) -> StoreFuture<'_, Vec<crate::domain::BranchHead>> {
        Box::pin(async move { sql::branches(&*self.conn().await?).await })
    }

    fn unfinished(&self) -> StoreFuture<'_, Vec<Job>> {
        Box::pin(async move { sql::unfinished(&*self.conn().await?).await })
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        Box::pin(async move { sql::epoch(&*self.conn().await?).await })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.close_writer())
    }
}
