//! A pass-through [`JobStore`] that times every write until the store
//! acknowledges its commit, for `surveil_store_commit_seconds`, and hands
//! every write to the store's health (failures in a row, stalls past
//! `--store-write-timeout`). It changes nothing else: same answers, same
//! errors, same order.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::Metrics;
use crate::domain::{
    Attempt, BranchHead, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult, LogChunk, Origin,
    Submitted,
};
use crate::store::{JobStore, RecordOutcome, StoreFuture};

/// `inner`, with its writes timed into `metrics`.
pub struct MeteredStore {
    inner: Arc<dyn JobStore>,
    metrics: Arc<Metrics>,
    health: Arc<crate::health::StoreHealth>,
}

impl MeteredStore {
    /// Wraps `inner`; every write's answer is also counted by `health`.
    pub(crate) fn new(
        inner: Arc<dyn JobStore>,
        metrics: Arc<Metrics>,
        health: Arc<crate::health::StoreHealth>,
    ) -> MeteredStore {
        MeteredStore {
            inner,
            metrics,
            health,
        }
    }

    fn timed<'a, T: Send + 'a>(&'a self, write: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        let started = Instant::now();
        Box::pin(async move {
            // The health counts the answer, and a stall past the deadline.
            let answer = self.health.watch(write).await;
            if answer.is_ok() {
                self.metrics.store_commit(started);
            }
            answer
        })
    }
}

impl JobStore for MeteredStore {
    fn submit<'a>(
        &'a self,
        repo: &'a str,
        origin: &'a Origin,
        commits: &'a [CommitId],
        now_ms: u64,
    ) -> StoreFuture<'a, Vec<Submitted>> {
        self.timed(self.inner.submit(repo, origin, commits, now_ms))
    }

    fn assign<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        runner: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.timed(self.inner.assign(job, attempt, runner, now_ms))
    }

    fn started(&self, job: JobId, attempt: Attempt, now_ms: u64) -> StoreFuture<'_, ()> {
        self.timed(self.inner.started(job, attempt, now_ms))
    }

    fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
        cap: u64,
    ) -> StoreFuture<'_, ()> {
        self.timed(self.inner.append_log(job, attempt, chunk, cap))
    }

    fn record_result<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        result: &'a JobResult,
        now_ms: u64,
    ) -> StoreFuture<'a, RecordOutcome> {
        self.timed(self.inner.record_result(job, attempt, result, now_ms))
    }

    fn requeue<'a>(&'a self, job: JobId, attempt: Attempt, reason: &'a str) -> StoreFuture<'a, ()> {
        self.timed(self.inner.requeue(job, attempt, reason))
    }

    fn hand_back<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        self.timed(self.inner.hand_back(job, attempt, reason))
    }

    fn finish<'a>(
        &'a self,
        job: JobId,
        status: FinalStatus,
        message: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.timed(self.inner.finish(job, status, message, now_ms))
    }

    fn rerun(&self, job: JobId) -> StoreFuture<'_, ()> {
        self.timed(self.inner.rerun(job))
    }

    fn request_cancel(&self, job: JobId) -> StoreFuture<'_, bool> {
        self.timed(self.inner.request_cancel(job))
    }

    fn prune_logs(
        &self,
        rule: crate::domain::PruneRule,
        batch: u32,
    ) -> StoreFuture<'_, crate::domain::Pruned> {
        self.timed(self.inner.prune_logs(rule, batch))
    }

    fn attempts(&self, job: JobId) -> StoreFuture<'_, Vec<crate::domain::AttemptRecord>> {
        self.inner.attempts(job)
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        self.inner.get_job(id)
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> StoreFuture<'a, Vec<Job>> {
        self.inner.list_jobs(filter)
    }

    fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> StoreFuture<'_, Bytes> {
        self.inner.read_log(job, attempt, offset, max_bytes)
    }

    fn branches(&self) -> StoreFuture<'_, Vec<BranchHead>> {
        self.inner.branches()
    }

    fn unfinished(&self) -> StoreFuture<'_, Vec<Job>> {
        self.inner.unfinished()
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        self.inner.epoch()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        self.inner.close()
    }
}
