//! The PostgreSQL store's writer task: group commit on one connection, and
//! the leader-term fence.
//!
//! It takes whatever writes are waiting (up to [`MAX_BATCH`]) and runs them
//! in one transaction that first checks, under a share lock on the leader
//! row, that this store's term still holds (`term = mine AND expires_at >
//! clock_timestamp()`, the database's clock). A takeover updates that row,
//! so it waits for a batch already past the check and every later batch
//! of the old term is refused by the database itself. Each write runs in
//! its own savepoint (a failing one rolls back alone); answers go out only
//! after COMMIT. This file must not know what the writes do (`sql.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{ClientWrapper as Conn, Object, Pool};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::Fence;
use crate::store::StoreError;

/// The most requests committed together.
pub const MAX_BATCH: usize = 256;

/// Counters shared with the store's handle.
#[derive(Default)]
pub struct Stats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write requests handled (committed or not).
    pub requests: AtomicU64,
}

/// A write: an async function of the batch's connection.
pub type WriteFn<T> =
    Box<dyn for<'c> FnOnce(&'c Conn) -> BoxFuture<'c, Result<T, StoreError>> + Send>;

/// What the writer receives.
pub enum Request {
    /// A write to apply and commit.
    Write(Box<dyn Pending>),
    /// Stop after committing what came before; answered once done.
    Close(oneshot::Sender<()>),
}

/// Why a whole batch did not commit; every write in it gets this.
#[derive(Clone, Debug)]
pub enum BatchFailure {
    /// The term check found another leader (or none): refused by the
    /// database.
    NotLeader,
    /// The transaction failed or its outcome is unknown.
    Commit(String),
}

/// One queued write with its typed reply, type-erased for batching.
pub trait Pending: Send {
    /// Runs the write on the batch's connection, keeping its result.
    fn apply<'a>(&'a mut self, conn: &'a Conn) -> BoxFuture<'a, ()>;
    /// Whether [`apply`](Self::apply) succeeded.
    fn succeeded(&self) -> bool;
    /// Answers once the batch's fate is known.
    fn answer(self: Box<Self>, committed: Result<(), BatchFailure>);
}

/// A write function and where its result goes.
pub struct Op<T> {
    op: Option<WriteFn<T>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> Op<T> {
    /// Wraps `op`; its result is sent on `reply` after the commit.
    pub fn boxed(
        op: WriteFn<T>,
        reply: oneshot::Sender<Result<T, StoreError>>,
    ) -> Box<dyn Pending> {
        Box::new(Op {
            op: Some(op),
            result: None,
            reply,
        })
    }
}

impl<T: Send + 'static> Pending for Op<T> {
    fn apply<'a>(&'a mut self, conn: &'a Conn) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(op) = self.op.take() {
                self.result = Some(op(conn).await);
            }
        })
    }

    fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn answer(self: Box<Self>, committed: Result<(), BatchFailure>) {
        let reply = match (self.result, committed) {
            (_, Err(BatchFailure::NotLeader)) => Err(StoreError::NotLeader),
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(BatchFailure::Commit(reason))) => Err(StoreError::Commit(reason)),
            (None, Ok(())) => Err(StoreError::Internal("a write was never applied".into())),
        };
        let _ = self.reply.send(reply);
    }
}

/// The writer's loop: until every sender is gone or a Close arrives.
pub async fn run(
    pool: Pool,
    mut requests: mpsc::Receiver<Request>,
    fence: Arc<Fence>,
    stats: Arc<Stats>,
) {
    let mut conn: Option<Object> = None;
    let mut batch: Vec<Box<dyn Pending>> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while let Some(first) = requests.recv().await {
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Write(op) => batch.push(op),
                Request::Close(done) => {
                    closing = Some(done);
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = requests.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            stats
                .requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let outcome = commit_batch(&pool, &mut conn, &mut batch, &fence).await;
            match &outcome {
                Ok(()) => {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(BatchFailure::NotLeader) => fence.deposed(),
                Err(BatchFailure::Commit(reason)) => {
                    tracing::error!(requests = batch.len(), %reason, "store write batch failed");
                    // The connection may be broken: the next batch takes
                    // a fresh one.
                    conn = None;
                }
            }
            for op in batch.drain(..) {
                op.answer(outcome.clone());
            }
        }
        if let Some(done) = closing.take() {
            let _ = done.send(());
            break;
        }
    }
    requests.close();
    tracing::debug!("store writer stopped");
}

async fn commit_batch(
    pool: &Pool,
    conn: &mut Option<Object>,
    batch: &mut [Box<dyn Pending>],
    fence: &Fence,
) -> Result<(), BatchFailure> {
    let Some(term) = fence.term() else {
        return Err(BatchFailure::NotLeader);
    };
    if conn.is_none() {
        let fresh = pool
            .get()
            .await
            .map_err(|e| BatchFailure::Commit(format!("connecting to PostgreSQL: {e}")))?;
        // A writer stalled inside a transaction (SIGSTOP, a partition)
        // holds the leader row's share lock; the server ends such a
        // session so a takeover is not held up past the term's expiry.
        let idle = fence.idle_in_transaction_ms();
        fresh
            .batch_execute(&format!("SET idle_in_transaction_session_timeout = {idle}"))
            .await
            .map_err(|e| BatchFailure::Commit(format!("configuring the writer: {e}")))?;
        *conn = Some(fresh);
    }
    let Some(c) = conn.as_ref() else {
        return Err(BatchFailure::Commit("no connection".into()));
    };
    let outcome = apply_all(c, batch, term).await;
    if outcome.is_err() {
        // Best effort: a broken connection rolls back on its own.
        let _ = c.batch_execute("ROLLBACK").await;
    }
    outcome
}

async fn apply_all(
    c: &Conn,
    batch: &mut [Box<dyn Pending>],
    term: u64,
) -> Result<(), BatchFailure> {
    let failed =
        |what: &str, e: tokio_postgres::Error| BatchFailure::Commit(format!("{what}: {e}"));
    c.batch_execute("BEGIN")
        .await
        .map_err(|e| failed("beginning a transaction", e))?;
    let term = i64::try_from(term).unwrap_or(-1);
    let holds = c
        .query_opt(
            "SELECT 1 FROM leader WHERE id = 1 AND term = $1 \
             AND expires_at > clock_timestamp() FOR SHARE",
            &[&term],
        )
        .await
        .map_err(|e| failed("checking the leader term", e))?;
    if holds.is_none() {
        return Err(BatchFailure::NotLeader);
    }
    for op in batch.iter_mut() {
        c.batch_execute("SAVEPOINT w")
            .await
            .map_err(|e| failed("opening a savepoint", e))?;
        op.apply(c).await;
        let close = if op.succeeded() {
            "RELEASE SAVEPOINT w"
        } else {
            "ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w"
        };
        c.batch_execute(close)
            .await
            .map_err(|e| failed("closing a savepoint", e))?;
    }
    // An error here leaves the outcome unknown to us (the connection may
    // have dropped after the server committed); callers treat it as not
    // durable, and every write is idempotent for the peer's resend.
    c.batch_execute("COMMIT")
        .await
        .map_err(|e| failed("committing", e))
}
