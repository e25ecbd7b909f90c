//! The store conformance suite: what every [`JobStore`] backend must do,
//! written against the interface alone (with the `testing` feature).
//!
//! A backend runs the whole suite with one line in its tests:
//!
//! ```text
//! surveil_dispatcher::store_conformance_tests!(MyFactory::new());
//! ```
//!
//! which expands to one `#[tokio::test]` per case, each on fresh stores
//! made by the [`StoreFactory`]. The cases are also public functions, for
//! a backend that needs to run them its own way. Nothing here may depend
//! on a backend's internals (files, SQL, threads): what the suite cannot
//! see through [`JobStore`] is the backend's own tests' business.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{JobStore, RecordOutcome, StoreError};
use crate::domain::{
    Attempt, AttemptStatus, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult, JobStatus,
    LogChunk, LogStream, Origin, PruneRule, Pruned, TaskResult, TaskStatus, TestReport,
};

/// Makes the stores the suite runs on.
pub trait StoreFactory: Sync {
    /// Where one store lives (a directory, a database); dropping it
    /// removes it.
    type Place: Send + Sync;

    /// Why this backend cannot run here (its server cannot start), or
    /// `None`. A case with a reason is skipped, saying so; a factory that
    /// must not skip (under CI) panics here instead.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// A new, empty place of its own.
    fn place(&self) -> impl Future<Output = Self::Place> + Send;

    /// Opens the store at `place`, creating it on first use. Opening a
    /// place again after [`JobStore::close`] must show every write that
    /// was acknowledged before.
    fn open(&self, place: &Self::Place) -> impl Future<Output = Arc<dyn JobStore>> + Send;

    /// The restore step on the (closed) store at `place`: gives it a new
    /// epoch the backend's way, and returns that epoch.
    fn new_epoch(&self, place: &Self::Place) -> impl Future<Output = String> + Send;
}

/// Runs every conformance case as its own `#[tokio::test]`, on stores made
/// by the given [`StoreFactory`] expression (evaluated once per case).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            submit_keeps_order_and_is_idempotent,
            concurrent_submits_get_distinct_ids,
            results_are_fenced_by_attempt,
            assign_checks_attempt_order_and_is_idempotent,
            requeue_needs_the_live_attempt,
            a_hand_back_requeues_and_is_counted_apart,
            finish_is_final,
            started_is_fenced,
            logs_are_idempotent_and_read_up_to_a_gap,
            logs_stop_at_the_cap_and_after_the_result,
            prune_deletes_old_logs_and_keeps_the_jobs,
            a_cancel_request_is_kept_until_a_rerun,
            listing_filters_newest_first,
            jobs_record_their_ref_and_pull_request,
            listing_pages_by_before_without_gaps_or_repeats,
            unfinished_jobs_are_what_recovery_needs,
            branches_show_each_pairs_newest_job,
            rerun_queues_a_new_attempt_and_keeps_the_earlier_ones,
            acknowledged_writes_survive_a_reopen,
            writes_after_close_fail_and_reads_still_work,
            the_epoch_is_kept_for_the_stores_life_and_replaced_by_the_restore_step,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = &$factory;
                if let Some(why) = $crate::store::conformance::StoreFactory::unavailable(factory) {
                    eprintln!("SKIPPED {}: {why}", stringify!($case));
                    return;
                }
                $crate::store::conformance::$case(factory).await;
            }
        )*
    };
}

const REPO: &str = "/srv/git/app";
const NOW: u64 = 1_000;
/// `--max-log-size` in the cases that are not about it.
const NO_CAP: u64 = u64::MAX;

/// The commit id numbered `n`.
fn commit(n: u32) -> CommitId {
    CommitId::parse(&format!("{n:040x}")).expect("40 hex digits")
}

fn commits(ns: &[u32]) -> Vec<CommitId> {
    ns.iter().map(|n| commit(*n)).collect()
}

fn result(status: FinalStatus) -> JobResult {
    JobResult {
        status,
        message: String::new(),
        tasks: vec![
            TaskResult {
                name: "build".into(),
                status: TaskStatus::Passed,
                exit_code: Some(0),
                signal: None,
                duration_ms: 1_200,
                message: String::new(),
                started_at_ms: Some(1_700_000_000_000),
                report: Some(TestReport {
                    passed: 41,
                    failed: 2,
                    skipped: 1,
                    failing: vec!["tests.a".into(), "tests.b".into()],
                    problems: vec!["x.xml: not JUnit XML".into()],
                }),
            },
            TaskResult {
                name: "unit".into(),
                status: TaskStatus::TimedOut,
                exit_code: None,
                signal: Some(9),
                duration_ms: 30,
                message: "killed".into(),
                started_at_ms: None,
                report: Some(TestReport::default()),
            },
        ],
        infrastructure: false,
    }
}

fn chunk(offset: u64, data: &'static [u8]) -> LogChunk {
    LogChunk {
        task: 0,
        stream: LogStream::Stdout,
        offset,
        data: Bytes::from_static(data),
    }
}

async fn fresh<F: StoreFactory>(factory: &F) -> (F::Place, Arc<dyn JobStore>) {
    let place = factory.place().await;
    let store = factory.open(&place).await;
    (place, store)
}

async fn submit(store: &dyn JobStore, ns: &[u32]) -> Vec<JobId> {
    let ids = store
        .submit(REPO, &Origin::branch("main"), &commits(ns), NOW)
        .await
        .expect("submit");
    ids.into_iter().map(|s| s.id).collect()
}

async fn job(store: &dyn JobStore, id: JobId) -> Job {
    store
        .get_job(id)
        .await
        .expect("get_job")
        .unwrap_or_else(|| panic!("job {id} exists"))
}

async fn log(store: &dyn JobStore, id: JobId, attempt: u32, offset: u64, data: &'static [u8]) {
    store
        .append_log(id, Attempt(attempt), chunk(offset, data), NO_CAP)
        .await
        .expect("append_log");
}

async fn read_all(store: &dyn JobStore, id: JobId, attempt: u32) -> Bytes {
    store
        .read_log(id, Attempt(attempt), 0, 1 << 20)
        .await
        .expect("read_log")
}

async fn record(
    store: &dyn JobStore,
    id: JobId,
    attempt: u32,
    status: FinalStatus,
) -> RecordOutcome {
    store
        .record_result(id, Attempt(attempt), &result(status), NOW)
        .await
        .expect("record_result")
}

fn ids(jobs: &[Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

/// `branches` lists every (repository, branch) pair once, with its newest
/// job as it is now, ordered by repository then branch.
pub async fn branches_show_each_pairs_newest_job<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    assert!(store.branches().await.expect("branches").is_empty());
    let old = submit(&*store, &[1, 2]).await;
    let dev = store
        .submit(REPO, &Origin::branch("dev"), &commits(&[3]), NOW)
        .await
        .expect("submit")[0]
        .id;
    let other = store
        .submit("/a/first", &Origin::branch("main"), &commits(&[4]), NOW)
        .await
        .expect("submit")[0]
        .id;
    store
        .assign(old[1], Attempt(1), "r", NOW)
        .await
        .expect("assign");
    record(&*store, old[1], 1, FinalStatus::Failed).await;
    let heads = store.branches().await.expect("branches");
    let seen: Vec<(&str, &str, JobId)> = heads
        .iter()
        .map(|h| (h.repo.as_str(), h.branch.as_str(), h.latest.id))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("/a/first", "main", other),
            (REPO, "dev", dev),
            (REPO, "main", old[1])
        ]
    );
    let main = &heads[2].latest;
    assert_eq!(main.status, JobStatus::Final(FinalStatus::Failed));
    assert_eq!(main.tasks.len(), 2, "the head carries its task results");
}

/// Submit returns one entry per commit in order, says which it created,
/// and leaves known jobs as they are.
pub async fn submit_keeps_order_and_is_idempotent<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let first = store
        .submit(REPO, &Origin::branch("main"), &commits(&[1, 2, 3]), NOW)
        .await
        .unwrap();
    assert_eq!(first.len(), 3);
    assert!(
        first
            .iter()
            .all(|s| s.created && s.status == JobStatus::Queued)
    );
    assert!(
        first
            .iter()
            .all(|s| s.attempt == Attempt(0) && s.branch == "main")
    );
    assert!(
        first[0].id < first[1].id && first[1].id < first[2].id,
        "{first:?}"
    );

    // Known commits keep their ids and state (not re-queued, branch kept);
    // a new one gets a fresh id, in the order given.
    store
        .assign(first[1].id, Attempt(1), "ci-1", 2_000)
        .await
        .unwrap();
    let again = store
        .submit(
            REPO,
            &Origin::branch("other-branch"),
            &commits(&[3, 4, 2]),
            5_000,
        )
        .await
        .unwrap();
    assert_eq!(
        (again[0].id, again[0].created, again[0].branch.as_str()),
        (first[2].id, false, "main")
    );
    assert!(again[1].created && again[1].id > first[2].id);
    assert_eq!(again[1].branch, "other-branch");
    assert_eq!(
        (
            again[2].id,
            again[2].created,
            again[2].status,
            again[2].attempt
        ),
        (first[1].id, false, JobStatus::Running, Attempt(1))
    );
    let old = job(&*store, first[2].id).await;
    assert_eq!((old.branch.as_str(), old.queued_at_ms), ("main", NOW));
    assert_eq!(old.commit, commit(3));

    // The same commit in another repository is another job; within one
    // submit, a repeated commit is one job.
    let other = store
        .submit("/srv/git/lib", &Origin::branch("main"), &commits(&[1]), NOW)
        .await
        .unwrap();
    assert!(other[0].created && first.iter().all(|s| s.id != other[0].id));
    let twice = store
        .submit(REPO, &Origin::branch("main"), &commits(&[9, 9]), NOW)
        .await
        .unwrap();
    assert_eq!(twice[0].id, twice[1].id);
    assert_eq!((twice[0].created, twice[1].created), (true, false));

    let err = store
        .submit("", &Origin::branch("main"), &commits(&[5]), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(
        store
            .submit(REPO, &Origin::branch("main"), &[], NOW)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Concurrent submits each land, with distinct ids.
pub async fn concurrent_submits_get_distinct_ids<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let ids = store
                .submit(REPO, &Origin::branch("main"), &[commit(n)], NOW)
                .await
                .unwrap();
            (ids[0].id, n)
        });
    }
    let mut by_id = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (id, n) = done.unwrap();
        assert!(by_id.insert(id, n).is_none(), "job {id} handed out twice");
    }
    let all = store.list_jobs(&JobFilter::default()).await.unwrap();
    assert_eq!(all.len(), 200);
    for j in all {
        assert_eq!(j.commit, commit(by_id[&j.id]));
    }
}

/// Only the job's live attempt records a result; a resend is a duplicate;
/// anything else is stale and changes nothing.
pub async fn results_are_fenced_by_attempt<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];

    assert_eq!(
        record(store, id, 1, FinalStatus::Passed).await,
        RecordOutcome::Stale
    );
    store.assign(id, Attempt(1), "ci-1", 100).await.unwrap();
    let running = job(store, id).await;
    assert_eq!(running.status, JobStatus::Running);
    assert_eq!(
        (running.attempt, running.runner.as_deref()),
        (Attempt(1), Some("ci-1"))
    );
    assert_eq!(running.started_at_ms, Some(100));

    // ci-1 is lost; the job is requeued and goes to ci-2 as attempt 2.
    store
        .requeue(id, Attempt(1), "runner ci-1 lost")
        .await
        .unwrap();
    let queued = job(store, id).await;
    assert_eq!(queued.status, JobStatus::Queued);
    assert_eq!(
        (queued.attempt, queued.runner, queued.started_at_ms),
        (Attempt(1), None, None)
    );
    store.assign(id, Attempt(2), "ci-2", 200).await.unwrap();

    // ci-1's late result and logs change nothing.
    assert_eq!(
        record(store, id, 1, FinalStatus::Failed).await,
        RecordOutcome::Stale
    );
    log(store, id, 1, 0, b"old").await;
    assert!(read_all(store, id, 1).await.is_empty());
    let still = job(store, id).await;
    assert_eq!(still.status, JobStatus::Running);
    assert_eq!(
        (still.attempt, still.runner.as_deref()),
        (Attempt(2), Some("ci-2"))
    );
    assert!(still.tasks.is_empty());

    // ci-2's result is recorded once; a resend, whatever it says, is a
    // duplicate and changes nothing.
    assert_eq!(
        record(store, id, 2, FinalStatus::Passed).await,
        RecordOutcome::Recorded
    );
    assert_eq!(
        record(store, id, 2, FinalStatus::Failed).await,
        RecordOutcome::Duplicate
    );
    let done = job(store, id).await;
    assert_eq!(done.status, JobStatus::Final(FinalStatus::Passed));
    assert_eq!(done.finished_at_ms, Some(NOW));
    assert_eq!(done.tasks, result(FinalStatus::Passed).tasks);
    assert_eq!(done.message, None, "an empty message is none");
    assert_eq!(
        record(store, id, 1, FinalStatus::Failed).await,
        RecordOutcome::Stale
    );

    // A final job cannot be assigned again, nor requeued.
    let err = store.assign(id, Attempt(3), "ci-3", 700).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    store.requeue(id, Attempt(2), "late loss").await.unwrap();
    assert_eq!(job(store, id).await, done);

    let err = store
        .record_result(JobId(404), Attempt(1), &result(FinalStatus::Passed), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchJob(JobId(404))), "{err}");
}

/// Assignments move forward one attempt at a time; the same one again is
/// a no-op; a newer one fences the older.
pub async fn assign_checks_attempt_order_and_is_idempotent<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    let err = store.assign(id, Attempt(0), "ci-1", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    store.assign(id, Attempt(1), "ci-1", 100).await.unwrap();
    store.assign(id, Attempt(1), "ci-1", 150).await.unwrap();
    assert_eq!(job(store, id).await.started_at_ms, Some(100));
    let err = store.assign(id, Attempt(1), "ci-2", 150).await.unwrap_err();
    assert!(
        err.to_string().contains("already held by runner ci-1"),
        "{err}"
    );
    store.assign(id, Attempt(2), "ci-2", 200).await.unwrap();
    assert_eq!(
        record(store, id, 1, FinalStatus::Passed).await,
        RecordOutcome::Stale
    );
    let err = store.assign(id, Attempt(2), "ci-3", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let err = store
        .assign(JobId(77), Attempt(1), "ci-1", 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchJob(JobId(77))), "{err}");
}

/// A requeue names the attempt it revokes; for any other attempt it is a
/// no-op.
pub async fn requeue_needs_the_live_attempt<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    store.requeue(id, Attempt(0), "not running").await.unwrap();
    assert_eq!(job(store, id).await.status, JobStatus::Queued);
    store.assign(id, Attempt(1), "ci-1", 100).await.unwrap();
    store.requeue(id, Attempt(2), "not this one").await.unwrap();
    let running = job(store, id).await;
    assert_eq!(
        (running.status, running.attempt),
        (JobStatus::Running, Attempt(1))
    );
    store.requeue(id, Attempt(1), "runner lost").await.unwrap();
    assert_eq!(job(store, id).await.status, JobStatus::Queued);
    // The revoked attempt's result is refused after the requeue too.
    assert_eq!(
        record(store, id, 1, FinalStatus::Passed).await,
        RecordOutcome::Stale
    );
}

/// A hand-back requeues like a loss, and the job counts it apart (so it
/// does not use up `--max-attempts`), across a reopen; a rerun starts the
/// count again. Like `requeue`, only the live attempt can be handed back.
pub async fn a_hand_back_requeues_and_is_counted_apart<F: StoreFactory>(factory: &F) {
    let place = factory.place().await;
    let id;
    {
        let store = factory.open(&place).await;
        let store = &*store;
        id = submit(store, &[1]).await[0];
        assert_eq!(job(store, id).await.handed_back, 0);
        store
            .hand_back(id, Attempt(1), "not running")
            .await
            .unwrap();
        assert_eq!(
            job(store, id).await.handed_back,
            0,
            "a queued job is left alone"
        );
        store.assign(id, Attempt(1), "ci-1", 100).await.unwrap();
        store
            .hand_back(id, Attempt(2), "not this one")
            .await
            .unwrap();
        assert_eq!(job(store, id).await.status, JobStatus::Running);
        store
            .hand_back(id, Attempt(1), "runner ci-1 shutting down: never started")
            .await
            .unwrap();
        let queued = job(store, id).await;
        assert_eq!(
            (queued.status, queued.attempt, queued.handed_back),
            (JobStatus::Queued, Attempt(1), 1)
        );
        assert_eq!(queued.runner, None);
        let attempts = store.attempts(id).await.unwrap();
        assert_eq!(
            (attempts[0].status, attempts[0].message.as_deref()),
            (
                AttemptStatus::Revoked,
                Some("runner ci-1 shutting down: never started")
            )
        );
        assert_eq!(
            record(store, id, 1, FinalStatus::Cancelled).await,
            RecordOutcome::Stale,
            "a result of the handed-back attempt is refused"
        );
        store.assign(id, Attempt(2), "ci-2", 200).await.unwrap();
        store.requeue(id, Attempt(2), "runner lost").await.unwrap();
        assert_eq!(
            job(store, id).await.handed_back,
            1,
            "a loss is not a hand-back"
        );
        store.close().await.unwrap();
    }
    let store = factory.open(&place).await;
    let store = &*store;
    let reopened = store.unfinished().await.unwrap();
    assert_eq!(
        reopened.iter().find(|j| j.id == id).map(|j| j.handed_back),
        Some(1),
        "recovery sees the count"
    );
    store.assign(id, Attempt(3), "ci-1", 300).await.unwrap();
    record(store, id, 3, FinalStatus::Failed).await;
    store.rerun(id).await.unwrap();
    assert_eq!(job(store, id).await.handed_back, 0, "a rerun counts afresh");
}

/// A job ended without a result stays ended; neither its last attempt's
/// late output nor its late result lands.
pub async fn finish_is_final<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let queued = submit(store, &[1]).await[0];
    store
        .finish(queued, FinalStatus::Cancelled, "cancelled by a user", 50)
        .await
        .unwrap();
    let ended = job(store, queued).await;
    assert_eq!(ended.status, JobStatus::Final(FinalStatus::Cancelled));
    assert_eq!(ended.message.as_deref(), Some("cancelled by a user"));
    assert_eq!(ended.finished_at_ms, Some(50));
    store
        .finish(queued, FinalStatus::Error, "other", 60)
        .await
        .unwrap();
    let resubmitted = store
        .submit(REPO, &Origin::branch("main"), &[commit(1)], 70)
        .await
        .unwrap();
    assert_eq!(
        (resubmitted[0].created, resubmitted[0].status),
        (false, JobStatus::Final(FinalStatus::Cancelled))
    );
    store.requeue(queued, Attempt(0), "x").await.unwrap();
    assert_eq!(job(store, queued).await, ended);

    let running = submit(store, &[2]).await[0];
    store
        .assign(running, Attempt(3), "ci-1", 100)
        .await
        .unwrap();
    store
        .finish(running, FinalStatus::Error, "runners lost 3 times", 200)
        .await
        .unwrap();
    log(store, running, 3, 0, b"tail").await;
    assert!(read_all(store, running, 3).await.is_empty());
    assert_eq!(
        record(store, running, 3, FinalStatus::Passed).await,
        RecordOutcome::Stale
    );
    let ended = job(store, running).await;
    assert_eq!(ended.status, JobStatus::Final(FinalStatus::Error));
    assert_eq!(ended.message.as_deref(), Some("runners lost 3 times"));
    assert_eq!(ended.runner.as_deref(), Some("ci-1"));
    assert!(ended.tasks.is_empty());
    store
        .finish(JobId(404), FinalStatus::Error, "", 1)
        .await
        .unwrap_err();
}

/// `Started` is taken from the live attempt only, and changes no job.
pub async fn started_is_fenced<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    store.started(id, Attempt(1), 10).await.unwrap();
    assert_eq!(job(store, id).await.status, JobStatus::Queued);
    store.assign(id, Attempt(1), "ci-1", 100).await.unwrap();
    store.started(id, Attempt(1), 110).await.unwrap();
    store.started(id, Attempt(1), 120).await.unwrap();
    store.started(id, Attempt(7), 130).await.unwrap();
    let running = job(store, id).await;
    assert_eq!(
        (running.status, running.started_at_ms),
        (JobStatus::Running, Some(100))
    );
    let err = store.started(JobId(404), Attempt(1), 1).await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchJob(JobId(404))), "{err}");
}

/// Log chunks are keyed by offset: resends are ignored, reads follow
/// contiguous bytes up to a gap, and a gap that fills joins the parts.
pub async fn logs_are_idempotent_and_read_up_to_a_gap<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    log(store, id, 1, 0, b"early").await;
    assert!(read_all(store, id, 1).await.is_empty(), "not assigned yet");
    store.assign(id, Attempt(1), "ci-1", 1).await.unwrap();
    log(store, id, 1, 0, b"abcd").await;
    log(store, id, 1, 4, b"efgh").await;
    log(store, id, 1, 4, b"XXXX").await;
    log(store, id, 1, 12, b"mnop").await;
    let read = |offset, max| store.read_log(id, Attempt(1), offset, max);
    assert_eq!(read(0, 100).await.unwrap(), &b"abcdefgh"[..]);
    assert_eq!(read(2, 100).await.unwrap(), &b"cdefgh"[..]);
    assert_eq!(read(3, 3).await.unwrap(), &b"def"[..]);
    assert_eq!(read(8, 100).await.unwrap(), &b""[..]);
    assert_eq!(read(13, 100).await.unwrap(), &b"nop"[..]);
    assert_eq!(read(0, 0).await.unwrap(), &b""[..]);
    assert_eq!(read(99, 10).await.unwrap(), &b""[..]);

    log(store, id, 1, 8, b"ijkl").await;
    assert_eq!(read(0, 100).await.unwrap(), &b"abcdefghijklmnop"[..]);
    // An overlapping resend with other boundaries is read consistently.
    log(store, id, 1, 14, b"opqr").await;
    assert_eq!(read(10, 100).await.unwrap(), &b"klmnopqr"[..]);
    assert_eq!(read(17, 100).await.unwrap(), &b"r"[..]);

    // Empty chunks and other attempts store nothing.
    log(store, id, 1, 18, b"").await;
    log(store, id, 7, 0, b"nope").await;
    assert!(read_all(store, id, 7).await.is_empty());
    assert_eq!(read_all(store, id, 1).await.len(), 18);

    let err = store
        .append_log(id, Attempt(1), chunk(u64::MAX - 1, b"xx"), NO_CAP)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(
        store
            .read_log(JobId(404), Attempt(1), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `--max-log-size`: a chunk crossing the cap keeps its head, later ones
/// are dropped, the attempt is marked truncated and its log ends with one
/// SYSTEM note; once the result is recorded, nothing more is appended.
pub async fn logs_stop_at_the_cap_and_after_the_result<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    store.assign(id, Attempt(1), "ci-1", 1).await.unwrap();
    let capped = |offset, data| store.append_log(id, Attempt(1), chunk(offset, data), 10);
    capped(0, b"abcdef").await.unwrap();
    assert!(!store.attempts(id).await.unwrap()[0].log_truncated);
    capped(6, b"ghijkl").await.unwrap();
    capped(12, b"mnop").await.unwrap();
    // A resend of the crossing chunk changes nothing.
    capped(6, b"ghijkl").await.unwrap();
    let stored = read_all(store, id, 1).await;
    let text = String::from_utf8_lossy(&stored);
    assert!(
        text.starts_with("abcdefghij\n[surveil] log truncated"),
        "{text}"
    );
    assert_eq!(text.matches("log truncated").count(), 1, "{text}");
    assert!(!text.contains("kl") && !text.contains("mnop"), "{text}");
    let attempt = &store.attempts(id).await.unwrap()[0];
    assert!(attempt.log_truncated && !attempt.log_pruned);
    assert_eq!(attempt.log_bytes, stored.len() as u64);

    // Without crossing, a chunk past the cap still marks the log.
    let other = submit(store, &[2]).await[0];
    store.assign(other, Attempt(1), "ci-1", 1).await.unwrap();
    store
        .append_log(other, Attempt(1), chunk(20, b"far"), 10)
        .await
        .unwrap();
    assert!(store.attempts(other).await.unwrap()[0].log_truncated);

    // After the result: refused, whatever the cap.
    let done = submit(store, &[3]).await[0];
    store.assign(done, Attempt(1), "ci-1", 1).await.unwrap();
    log(store, done, 1, 0, b"out").await;
    record(store, done, 1, FinalStatus::Passed).await;
    log(store, done, 1, 3, b"late").await;
    assert_eq!(read_all(store, done, 1).await, &b"out"[..]);
}

/// A prune deletes the logs of finished jobs older than its bounds (by
/// finish time, or beyond the newest N), marks their attempts, keeps every
/// job row and result, never touches an unfinished job, and reports the
/// bytes it freed; a second prune finds nothing.
pub async fn prune_deletes_old_logs_and_keeps_the_jobs<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let ids = submit(store, &[1, 2, 3, 4]).await;
    for (n, id) in ids.iter().enumerate() {
        store.assign(*id, Attempt(1), "ci-1", 1).await.unwrap();
        log(store, *id, 1, 0, b"0123456789").await;
        if n < 3 {
            store
                .record_result(
                    *id,
                    Attempt(1),
                    &result(FinalStatus::Passed),
                    100 * (n as u64 + 1),
                )
                .await
                .unwrap();
        }
    }
    // ids[0..3] finished at 100, 200, 300; ids[3] still runs.
    let by_age = PruneRule {
        finished_before_ms: Some(250),
        keep_jobs: None,
    };
    let pruned = store.prune_logs(by_age, 1).await.unwrap();
    assert_eq!((pruned.attempts, pruned.bytes, pruned.more), (1, 10, true));
    let pruned = store.prune_logs(by_age, 10).await.unwrap();
    assert_eq!((pruned.attempts, pruned.bytes, pruned.more), (1, 10, false));
    assert_eq!(store.prune_logs(by_age, 10).await.unwrap().attempts, 0);
    for id in &ids[..2] {
        assert!(read_all(store, *id, 1).await.is_empty());
        let attempt = &store.attempts(*id).await.unwrap()[0];
        assert!(attempt.log_pruned);
        assert_eq!(
            job(store, *id).await.status,
            JobStatus::Final(FinalStatus::Passed)
        );
        assert_eq!(
            job(store, *id).await.tasks,
            result(FinalStatus::Passed).tasks
        );
    }
    assert_eq!(read_all(store, ids[2], 1).await.len(), 10);

    let keep_one = PruneRule {
        finished_before_ms: None,
        keep_jobs: Some(1),
    };
    assert_eq!(store.prune_logs(keep_one, 10).await.unwrap().attempts, 0);
    let keep_none = PruneRule {
        finished_before_ms: None,
        keep_jobs: Some(0),
    };
    let pruned = store.prune_logs(keep_none, 10).await.unwrap();
    assert_eq!((pruned.attempts, pruned.bytes), (1, 10));
    assert!(read_all(store, ids[2], 1).await.is_empty());
    assert_eq!(read_all(store, ids[3], 1).await.len(), 10, "running: kept");
    assert_eq!(
        store.prune_logs(PruneRule::default(), 10).await.unwrap(),
        Pruned::default()
    );
}

/// A cancel asked of a running job is recorded (recovery reads it from
/// `unfinished`); of any other job it changes nothing; a rerun clears it.
pub async fn a_cancel_request_is_kept_until_a_rerun<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    assert!(!store.request_cancel(id).await.unwrap(), "queued: nothing");
    store.assign(id, Attempt(1), "ci-1", 1).await.unwrap();
    assert!(store.request_cancel(id).await.unwrap());
    assert!(job(store, id).await.cancel_requested);
    let unfinished = store.unfinished().await.unwrap();
    assert!(unfinished.iter().any(|j| j.id == id && j.cancel_requested));
    record(store, id, 1, FinalStatus::Cancelled).await;
    assert!(!store.request_cancel(id).await.unwrap(), "final: nothing");
    store.rerun(id).await.unwrap();
    assert!(!job(store, id).await.cancel_requested);
    assert!(!store.request_cancel(JobId(404)).await.unwrap());
}

/// Listing: newest first, filters combine, a limit caps.
pub async fn listing_filters_newest_first<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let app = submit(store, &[1, 2, 3]).await;
    let lib = store
        .submit("/srv/git/lib", &Origin::branch("main"), &commits(&[4]), NOW)
        .await
        .unwrap()[0]
        .id;
    let dev = store
        .submit(REPO, &Origin::branch("dev"), &commits(&[5]), NOW)
        .await
        .unwrap()[0]
        .id;
    store.assign(app[1], Attempt(1), "ci-1", 3).await.unwrap();

    let list = |filter: JobFilter| async move { ids(&store.list_jobs(&filter).await.unwrap()) };
    let repo = || Some(REPO.to_owned());
    assert_eq!(
        list(JobFilter::default()).await,
        vec![dev, lib, app[2], app[1], app[0]]
    );
    assert_eq!(
        list(JobFilter {
            repo: repo(),
            ..JobFilter::default()
        })
        .await,
        vec![dev, app[2], app[1], app[0]]
    );
    assert_eq!(
        list(JobFilter {
            repo: repo(),
            branch: Some("main".into()),
            ..JobFilter::default()
        })
        .await,
        vec![app[2], app[1], app[0]]
    );
    assert_eq!(
        list(JobFilter {
            branch: Some("dev".into()),
            ..JobFilter::default()
        })
        .await,
        vec![dev]
    );
    assert_eq!(
        list(JobFilter {
            status: Some(JobStatus::Running),
            ..JobFilter::default()
        })
        .await,
        vec![app[1]]
    );
    assert_eq!(
        list(JobFilter {
            repo: repo(),
            status: Some(JobStatus::Queued),
            ..JobFilter::default()
        })
        .await,
        vec![dev, app[2], app[0]]
    );
    assert_eq!(
        list(JobFilter {
            limit: Some(2),
            ..JobFilter::default()
        })
        .await,
        vec![dev, lib]
    );
    assert_eq!(
        list(JobFilter {
            limit: Some(0),
            ..JobFilter::default()
        })
        .await,
        vec![]
    );
    assert_eq!(
        list(JobFilter {
            repo: Some("/nope".into()),
            ..JobFilter::default()
        })
        .await,
        vec![]
    );
    assert_eq!(
        list(JobFilter {
            before: Some(JobId(u64::MAX)),
            ..JobFilter::default()
        })
        .await
        .len(),
        5
    );

    assert_eq!(store.get_job(JobId(9_999)).await.unwrap(), None);
}

/// A job keeps the ref and pull request it was first submitted for, and
/// listings filter by pull request (with branch and repository).
pub async fn jobs_record_their_ref_and_pull_request<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let pr = |n: u64| Origin {
        branch: "feature".into(),
        ref_name: format!("refs/pull/{n}/head"),
        pull_request: Some(n),
    };
    let main = store
        .submit(REPO, &Origin::branch("main"), &commits(&[1]), NOW)
        .await
        .unwrap()[0]
        .clone();
    assert_eq!(
        (main.ref_name.as_str(), main.branch.as_str()),
        ("refs/heads/main", "main")
    );
    let seven = store
        .submit(REPO, &pr(7), &commits(&[2, 3]), NOW)
        .await
        .unwrap();
    assert_eq!(seven[0].ref_name, "refs/pull/7/head");
    let eight = store
        .submit("/srv/git/lib", &pr(8), &commits(&[4]), NOW)
        .await
        .unwrap()[0]
        .id;
    // A known commit keeps its first origin: the main job is not moved to
    // pull request 9 (and the answer says where it is recorded).
    let again = store
        .submit(REPO, &pr(9), &commits(&[1]), NOW)
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].created), (main.id, false));
    assert_eq!(again[0].ref_name, "refs/heads/main");

    let got = job(store, seven[1].id).await;
    assert_eq!(
        (got.branch.as_str(), got.ref_name.as_str(), got.pull_request),
        ("feature", "refs/pull/7/head", Some(7))
    );
    let got = job(store, main.id).await;
    assert_eq!(
        (got.ref_name.as_str(), got.pull_request),
        ("refs/heads/main", None)
    );

    let list = |filter: JobFilter| async move { ids(&store.list_jobs(&filter).await.unwrap()) };
    let by_pr = |n: u64| JobFilter {
        pull_request: Some(n),
        ..JobFilter::default()
    };
    assert_eq!(list(by_pr(7)).await, vec![seven[1].id, seven[0].id]);
    assert_eq!(list(by_pr(8)).await, vec![eight]);
    assert_eq!(list(by_pr(9)).await, vec![]);
    assert_eq!(list(by_pr(u64::MAX)).await, vec![]);
    assert_eq!(
        list(JobFilter {
            repo: Some(REPO.into()),
            branch: Some("feature".into()),
            pull_request: Some(8),
            ..JobFilter::default()
        })
        .await,
        vec![]
    );
    // Recovery hands the ref back, so an assignment can name it.
    let unfinished = store.unfinished().await.unwrap();
    assert!(
        unfinished
            .iter()
            .any(|j| j.id == eight && j.ref_name == "refs/pull/8/head"),
        "{unfinished:?}"
    );
}

/// Paging by `before`: every job is seen exactly once, newest first, even
/// while new jobs arrive between pages (they are after the first page).
pub async fn listing_pages_by_before_without_gaps_or_repeats<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let mut existing = submit(store, &[1, 2, 3, 4, 5]).await;
    existing.reverse();
    let mut seen = Vec::new();
    let mut before = None;
    let mut n = 100;
    loop {
        let filter = JobFilter {
            before,
            limit: Some(2),
            ..JobFilter::default()
        };
        let page = ids(&store.list_jobs(&filter).await.unwrap());
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        seen.extend_from_slice(&page);
        before = page.last().copied();
        n += 1;
        submit(store, &[n]).await;
    }
    assert_eq!(seen, existing);
    let filter = JobFilter {
        before: Some(existing[0]),
        ..JobFilter::default()
    };
    assert_eq!(ids(&store.list_jobs(&filter).await.unwrap()), existing[1..]);
}

/// `unfinished` returns queued and running jobs, oldest first, with what
/// the scheduler needs to take them back.
pub async fn unfinished_jobs_are_what_recovery_needs<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let ids = submit(store, &[1, 2, 3, 4, 5]).await;
    store.assign(ids[0], Attempt(1), "ci-1", 2).await.unwrap();
    store.assign(ids[2], Attempt(1), "ci-2", 2).await.unwrap();
    record(store, ids[2], 1, FinalStatus::Passed).await;
    store
        .finish(ids[3], FinalStatus::Cancelled, "", 3)
        .await
        .unwrap();
    store.assign(ids[4], Attempt(1), "ci-2", 2).await.unwrap();
    store.requeue(ids[4], Attempt(1), "lost").await.unwrap();

    let open: Vec<_> = store
        .unfinished()
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.id, j.status, j.attempt, j.runner, j.commit))
        .collect();
    assert_eq!(
        open,
        vec![
            (
                ids[0],
                JobStatus::Running,
                Attempt(1),
                Some("ci-1".to_owned()),
                commit(1)
            ),
            (ids[1], JobStatus::Queued, Attempt(0), None, commit(2)),
            (ids[4], JobStatus::Queued, Attempt(1), None, commit(5)),
        ]
    );
    assert_eq!(job(store, ids[3]).await.message, None);
}

/// Every acknowledged write is there after the store is closed and opened
/// again, and ids keep growing.
pub async fn acknowledged_writes_survive_a_reopen<F: StoreFactory>(factory: &F) {
    let place = factory.place().await;
    let (a, b, before);
    {
        let store = factory.open(&place).await;
        let ids = submit(&*store, &[1, 2]).await;
        (a, b) = (ids[0], ids[1]);
        store.assign(a, Attempt(1), "ci-1", 2_000).await.unwrap();
        log(&*store, a, 1, 0, b"hello ").await;
        log(&*store, a, 1, 6, b"world").await;
        assert_eq!(
            record(&*store, a, 1, FinalStatus::Failed).await,
            RecordOutcome::Recorded
        );
        before = job(&*store, a).await;
        store.close().await.unwrap();
    }
    let store = factory.open(&place).await;
    let store = &*store;
    assert_eq!(job(store, a).await, before);
    assert_eq!(before.tasks, result(FinalStatus::Failed).tasks);
    assert_eq!(job(store, b).await.status, JobStatus::Queued);
    assert_eq!(read_all(store, a, 1).await, &b"hello world"[..]);
    assert_eq!(
        record(store, a, 1, FinalStatus::Failed).await,
        RecordOutcome::Duplicate
    );
    let c = submit(store, &[3]).await[0];
    assert!(c > b, "ids are never handed out again");
    store.close().await.unwrap();
}

/// After `close`, writes fail with [`StoreError::Closed`]; reads work.
pub async fn writes_after_close_fail_and_reads_still_work<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let id = submit(&*store, &[1]).await[0];
    store.close().await.unwrap();
    let err = store
        .submit(REPO, &Origin::branch("main"), &[commit(2)], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err}");
    assert_eq!(job(&*store, id).await.status, JobStatus::Queued);
    store.close().await.unwrap();
}

/// `rerun` queues a finished job again (a new attempt follows the last),
/// refuses an active or unknown job, and keeps every earlier attempt's
/// result, tasks and log readable; `attempts` lists them all.
pub async fn rerun_queues_a_new_attempt_and_keeps_the_earlier_ones<F: StoreFactory>(factory: &F) {
    let (_place, store) = fresh(factory).await;
    let store = &*store;
    let id = submit(store, &[1]).await[0];
    assert!(store.attempts(id).await.unwrap().is_empty());
    assert!(matches!(
        store.rerun(id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.rerun(JobId(id.0 + 100)).await,
        Err(StoreError::NoSuchJob(_))
    ));
    // Attempt 1 is lost, attempt 2 fails.
    store.assign(id, Attempt(1), "ci-1", 10).await.unwrap();
    store.requeue(id, Attempt(1), "runner lost").await.unwrap();
    store.assign(id, Attempt(2), "ci-2", 20).await.unwrap();
    store.started(id, Attempt(2), 21).await.unwrap();
    log(store, id, 2, 0, b"first run").await;
    assert!(matches!(
        store.rerun(id).await,
        Err(StoreError::Conflict { .. })
    ));
    record(store, id, 2, FinalStatus::Failed).await;
    let failed = job(store, id).await;
    assert_eq!(failed.rerun_base, Attempt(0));

    store.rerun(id).await.unwrap();
    let queued = job(store, id).await;
    assert_eq!(queued.status, JobStatus::Queued);
    assert_eq!(
        (queued.attempt, queued.rerun_base),
        (Attempt(2), Attempt(2))
    );
    assert_eq!(
        (queued.runner.as_deref(), queued.finished_at_ms),
        (None, None)
    );
    assert!(queued.tasks.is_empty(), "a queued job shows no result");
    assert_eq!(queued.queued_at_ms, failed.queued_at_ms);
    assert!(store.unfinished().await.unwrap().iter().any(|j| j.id == id));
    // A late result of the old attempt is not the new run's.
    assert_ne!(
        record(store, id, 2, FinalStatus::Passed).await,
        RecordOutcome::Recorded
    );
    assert_eq!(job(store, id).await, queued);

    store.assign(id, Attempt(3), "ci-1", 30).await.unwrap();
    log(store, id, 3, 0, b"second run").await;
    assert_eq!(
        record(store, id, 3, FinalStatus::Passed).await,
        RecordOutcome::Recorded
    );
    let passed = job(store, id).await;
    assert_eq!(passed.status, JobStatus::Final(FinalStatus::Passed));
    assert_eq!(
        (passed.attempt, passed.rerun_base),
        (Attempt(3), Attempt(2))
    );
    assert_eq!(&read_all(store, id, 2).await[..], b"first run");
    assert_eq!(&read_all(store, id, 3).await[..], b"second run");

    let attempts = store.attempts(id).await.unwrap();
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.runner.as_str(), a.status))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Attempt(1), "ci-1", AttemptStatus::Revoked),
            (
                Attempt(2),
                "ci-2",
                AttemptStatus::Ended(FinalStatus::Failed)
            ),
            (
                Attempt(3),
                "ci-1",
                AttemptStatus::Ended(FinalStatus::Passed)
            ),
        ]
    );
    assert_eq!(attempts[0].message.as_deref(), Some("runner lost"));
    assert!(attempts[0].tasks.is_empty());
    assert_eq!(attempts[1].assigned_at_ms, 20);
    assert_eq!(attempts[1].started_at_ms, Some(21));
    assert_eq!(attempts[1].tasks, result(FinalStatus::Failed).tasks);
    assert_eq!(attempts[2].tasks, passed.tasks);
    assert!(store.attempts(JobId(id.0 + 100)).await.unwrap().is_empty());
}

/// Whether `epoch` looks like one: 128 bits as 32 lower-case hex digits.
fn is_epoch(epoch: &str) -> bool {
    epoch.len() == 32
        && epoch
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A store has an epoch from its creation (128 random bits, as hex); it
/// is the same after every reopen, another store's differs, and the
/// restore step replaces it with a new one that is kept in turn, jobs and
/// results untouched. A backup copied before the step carries the old
/// epoch, so this is what tells runners and observers that the store's
/// history changed.
pub async fn the_epoch_is_kept_for_the_stores_life_and_replaced_by_the_restore_step<
    F: StoreFactory,
>(
    factory: &F,
) {
    let place = factory.place().await;
    let (first, id);
    {
        let store = factory.open(&place).await;
        first = store.epoch().await.unwrap();
        assert!(is_epoch(&first), "{first:?} is not 32 hex digits");
        id = submit(&*store, &[1]).await[0];
        store.assign(id, Attempt(1), "ci-1", 10).await.unwrap();
        record(&*store, id, 1, FinalStatus::Passed).await;
        assert_eq!(store.epoch().await.unwrap(), first, "read twice");
        store.close().await.unwrap();
    }
    {
        let store = factory.open(&place).await;
        assert_eq!(store.epoch().await.unwrap(), first, "kept across a reopen");
        store.close().await.unwrap();
    }
    let (_other_place, other) = fresh(factory).await;
    let other_epoch = other.epoch().await.unwrap();
    assert!(is_epoch(&other_epoch));
    assert_ne!(other_epoch, first, "each store has its own");
    other.close().await.unwrap();

    let rotated = factory.new_epoch(&place).await;
    assert!(is_epoch(&rotated), "{rotated:?} is not 32 hex digits");
    assert_ne!(rotated, first, "the restore step gives a new epoch");
    let store = factory.open(&place).await;
    assert_eq!(store.epoch().await.unwrap(), rotated, "the new one is kept");
    let kept = job(&*store, id).await;
    assert_eq!(kept.status, JobStatus::Final(FinalStatus::Passed));
    assert_eq!(
        record(&*store, id, 1, FinalStatus::Passed).await,
        RecordOutcome::Duplicate,
        "results stay recorded"
    );
    store.close().await.unwrap();
}
