//! The store's writer thread: the only owner of the write connection, and
//! group commit.
//!
//! It takes whatever writes are waiting (up to [`MAX_BATCH`]), applies each
//! inside its own SAVEPOINT of one transaction, commits that transaction
//! once, and only then answers every request in it. A request that fails
//! rolls back its own savepoint and gets its own error; the others commit.
//! If the commit itself fails, nothing in the batch is durable and every
//! request is answered with the failure: no answer ever precedes the
//! commit. This file must not know what the writes do (that is `sql.rs`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
#[cfg(feature = "testing")]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// The most requests committed together. Bounds a transaction's size, and
/// so the latency of the first request in it and the WAL growth per commit.
pub const MAX_BATCH: usize = 256;

/// What the writer shares with the store's handle: counters read by
/// `SqliteStore::commit_count` and friends, and with the `testing`
/// feature, the hooks that hold it or make its commits fail.
#[derive(Default)]
pub struct Stats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write requests handled (committed or not).
    pub requests: AtomicU64,
    /// The most requests seen in one transaction.
    pub largest_batch: AtomicU64,
    /// Held by tests to let requests pile up before the next batch.
    #[cfg(feature = "testing")]
    pub pause: tokio::sync::Mutex<()>,
    /// How many batches still to roll back instead of committing.
    #[cfg(feature = "testing")]
    pub fail_commits: AtomicU32,
    /// Batches still to hold before their commit, as a hung fsync does.
    #[cfg(feature = "testing")]
    pub stall_commits: AtomicU32,
    /// How long each of those is held, in milliseconds.
    #[cfg(feature = "testing")]
    pub stall_ms: AtomicU64,
}

/// What the writer receives.
pub enum Request {
    /// A write to apply and commit.
    Write(Box<dyn Pending>),
    /// Stop after committing what came before; answered once done.
    Close(oneshot::Sender<()>),
}

/// One queued write with its typed reply channel, type-erased so requests
/// of every kind share a batch.
pub trait Pending: Send {
    /// Runs the write inside the current savepoint and keeps its result.
    fn apply(&mut self, conn: &Connection);
    /// Whether [`apply`](Self::apply) succeeded (its savepoint is kept).
    fn succeeded(&self) -> bool;
    /// Answers the caller once the batch's fate is known: `Ok` when it
    /// committed, `Err(reason)` when nothing of it is durable.
    fn answer(self: Box<Self>, committed: Result<(), String>);
}

/// A write closure and where its result goes.
pub struct Op<T, F> {
    op: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    /// Wraps `op`; its result is sent on `reply` after the commit.
    pub fn boxed(op: F, reply: oneshot::Sender<Result<T, StoreError>>) -> Box<dyn Pending> {
        Box::new(Op {
            op: Some(op),
            result: None,
            reply,
        })
    }
}

impl<T, F> Pending for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn apply(&mut self, conn: &Connection) {
        if let Some(op) = self.op.take() {
            // A panicking write is a bug, but it must cost only its own
            // request: the thread serves every other session too.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| op(conn)))
                .unwrap_or_else(|panic| Err(StoreError::Internal(panic_text(&*panic))));
            self.result = Some(result);
        }
    }

    fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn answer(self: Box<Self>, committed: Result<(), String>) {
        let reply = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(reason)) => Err(StoreError::Commit(reason)),
            (None, Ok(())) => Err(StoreError::Internal("a write was never applied".into())),
        };
        // The caller may have given up waiting (its task was cancelled);
        // the write is committed all the same.
        let _ = self.reply.send(reply);
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("a store write panicked: {text}")
}

/// Starts the writer thread on `conn`. It stops when every sender is
/// dropped or after a [`Request::Close`].
pub fn spawn(
    conn: Connection,
    requests: mpsc::Receiver<Request>,
    stats: Arc<Stats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("surveil-store-writer".into())
        .spawn(move || run(conn, requests, &stats))
}

fn run(mut conn: Connection, mut requests: mpsc::Receiver<Request>, stats: &Stats) {
    let mut batch: Vec<Box<dyn Pending>> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while let Some(first) = requests.blocking_recv() {
        #[cfg(feature = "testing")]
        let _paused = stats.pause.blocking_lock();
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
            commit_batch(&mut conn, &mut batch, stats);
        }
        if let Some(done) = closing.take() {
            let _ = done.send(());
            break;
        }
    }
    // Requests still queued are dropped with their reply channels, so their
    // callers see WriterClosed; none of them was applied.
    requests.close();
    tracing::debug!("store writer stopped");
}

fn commit_batch(conn: &mut Connection, batch: &mut Vec<Box<dyn Pending>>, stats: &Stats) {
    let size = batch.len() as u64;
    stats.requests.fetch_add(size, Ordering::Relaxed);
    stats.largest_batch.fetch_max(size, Ordering::Relaxed);
    // The testing hook makes a batch fail at its commit, as a full disk does.
    #[cfg(feature = "testing")]
    let fail_commit = || {
        stats
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    };
    #[cfg(not(feature = "testing"))]
    let fail_commit = || false;
    // The testing hook holds the batch before its commit, as a hung fsync
    // does; its callers wait for the answer all the while.
    #[cfg(feature = "testing")]
    if stats
        .stall_commits
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        std::thread::sleep(std::time::Duration::from_millis(
            stats.stall_ms.load(Ordering::SeqCst),
        ));
    }
    let outcome = apply_all(conn, batch, fail_commit);
    match &outcome {
        Ok(()) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        Err(reason) => tracing::error!(requests = size, %reason, "store write batch failed"),
    }
    for op in batch.drain(..) {
        op.answer(outcome.clone());
    }
}

/// Applies every request in its own savepoint and commits the whole; an
/// error here means the batch did not commit.
fn apply_all(
    conn: &mut Connection,
    batch: &mut [Box<dyn Pending>],
    fail_commit: impl FnOnce() -> bool,
) -> Result<(), String> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| format!("beginning a transaction: {e}"))?;
    for op in batch.iter_mut() {
        let savepoint = tx
            .savepoint()
            .map_err(|e| format!("opening a savepoint: {e}"))?;
        op.apply(&savepoint);
        if op.succeeded() {
            savepoint.commit()
        } else {
            // The default drop behaviour: roll back to the savepoint, then
            // release it, keeping the others' work.
            savepoint.finish()
        }
        .map_err(|e| format!("closing a savepoint: {e}"))?;
    }
    if fail_commit() {
        // Dropping the transaction rolls it back, as a failed COMMIT does.
        return Err("committing: failure injected by the testing hook".to_owned());
    }
    tx.commit().map_err(|e| format!("committing: {e}"))
}
