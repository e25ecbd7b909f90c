//! Tests of the store against real SQLite files in temporary directories.

use std::time::Duration;

use bytes::Bytes;
use surveil_proto::{JobFinished, JobStatus, Stream, TaskResult, TaskStatus};
use tempfile::TempDir;

use super::migrations::MIGRATIONS;
use super::writer::MAX_BATCH;
use super::*;

const REPO: &str = "/srv/git/app";

fn commit(n: u32) -> String {
    format!("{n:040x}")
}

fn open() -> (TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open store");
    (dir, store)
}

fn finished(job: JobId, attempt: Attempt, status: JobStatus) -> JobFinished {
    JobFinished {
        job_id: job,
        attempt,
        status: status as i32,
        message: String::new(),
        tasks: vec![
            TaskResult {
                name: "build".into(),
                status: TaskStatus::Passed as i32,
                exit_code: Some(0),
                signal: None,
                duration_ms: 1200,
                message: String::new(),
            },
            TaskResult {
                name: "unit".into(),
                status: TaskStatus::Failed as i32,
                exit_code: None,
                signal: Some(9),
                duration_ms: 30,
                message: "killed".into(),
            },
        ],
    }
}

async fn one_job(store: &Store, n: u32) -> JobId {
    store
        .submit(REPO, "main", &[commit(n)], 1_000)
        .await
        .expect("submit")[0]
}

async fn job(store: &Store, id: JobId) -> JobRecord {
    store
        .get_job(id)
        .await
        .expect("get_job")
        .expect("job exists")
}

async fn log(store: &Store, job: JobId, attempt: Attempt, offset: u64, data: &'static [u8]) {
    store
        .append_log(
            job,
            attempt,
            0,
            Stream::Stdout,
            offset,
            Bytes::from_static(data),
        )
        .await
        .expect("append_log");
}

#[tokio::test]
async fn submit_keeps_order_and_returns_existing_ids_for_known_commits() {
    let (_dir, store) = open();
    let first = store
        .submit(REPO, "main", &[commit(1), commit(2), commit(3)], 1_000)
        .await
        .unwrap();
    assert_eq!(first.len(), 3);
    assert!(first[0] < first[1] && first[1] < first[2], "{first:?}");

    // Known commits keep their ids and their state (not re-queued), a new
    // one gets a fresh id, in the order given.
    store.assign(first[1], 1, "ci-1", 2_000).await.unwrap();
    let again = store
        .submit(
            REPO,
            "other-branch",
            &[commit(3), commit(4), commit(1)],
            5_000,
        )
        .await
        .unwrap();
    assert_eq!(again[0], first[2]);
    assert_eq!(again[2], first[0]);
    assert!(again[1] > first[2]);
    let kept = job(&store, first[1]).await;
    assert_eq!(kept.status, JobStatus::Running);
    let old = job(&store, first[2]).await;
    assert_eq!((old.branch.as_str(), old.queued_at_ms), ("main", 1_000));

    // The same commit in another repository is another job.
    let other = store
        .submit("/srv/git/lib", "main", &[commit(1)], 6_000)
        .await
        .unwrap();
    assert!(!first.contains(&other[0]));
    // Within one submit, a repeated commit gets the same id twice.
    let twice = store
        .submit(REPO, "main", &[commit(9), commit(9)], 7_000)
        .await
        .unwrap();
    assert_eq!(twice[0], twice[1]);

    let err = store
        .submit(REPO, "main", &[String::new()], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_all_land_with_distinct_ids() {
    let (dir, store) = open();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..500 {
        let store = store.clone();
        tasks.spawn(async move {
            let ids = store
                .submit(REPO, "main", &[commit(n)], 1_000)
                .await
                .unwrap();
            (n, ids[0])
        });
    }
    let mut ids = std::collections::BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (n, id) = done.unwrap();
        ids.insert(id, n);
    }
    assert_eq!(ids.len(), 500, "every submit got its own id");
    assert_eq!(store.write_count(), 500);
    let commits = store.commit_count();
    println!(
        "500 concurrent submits: {commits} commits, largest batch {}",
        store.inner.stats.largest_batch.load(Ordering::Relaxed)
    );
    assert!((1..=500).contains(&commits));
    drop(store);
    let reopened = Store::open(dir.path()).unwrap();
    let all = reopened.list_jobs(None, None, 0).await.unwrap();
    assert_eq!(all.len(), 500);
    for record in all {
        assert_eq!(record.commit, commit(ids[&record.id]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_writes_share_one_commit() {
    let (_dir, store) = open();
    let paused = store.inner.pause.lock().await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..500 {
        let store = store.clone();
        tasks.spawn(async move { store.submit(REPO, "main", &[commit(n)], 1).await });
    }
    // Wait (bounded) until every request is queued: the writer holds the
    // first one and waits for the pause lock; 499 sit in the channel.
    let queued = |s: &Store| s.inner.requests.max_capacity() - s.inner.requests.capacity();
    for _ in 0..1_000 {
        if queued(&store) == 499 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(queued(&store), 499);
    assert_eq!(store.commit_count(), 0, "nothing committed while paused");
    drop(paused);
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    // 500 requests in batches of at most MAX_BATCH: 256 + 244.
    assert_eq!(store.write_count(), 500);
    assert_eq!(store.commit_count(), 500_u64.div_ceil(MAX_BATCH as u64));
    assert_eq!(
        store.inner.stats.largest_batch.load(Ordering::Relaxed),
        MAX_BATCH as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_does_not_fail_its_batch() {
    let (_dir, store) = open();
    let paused = store.inner.pause.lock().await;
    let good = {
        let store = store.clone();
        tokio::spawn(async move { store.submit(REPO, "main", &[commit(1)], 1).await })
    };
    let bad = {
        let store = store.clone();
        tokio::spawn(async move { store.assign(999, 1, "ci-1", 1).await })
    };
    let good2 = {
        let store = store.clone();
        tokio::spawn(async move { store.submit(REPO, "main", &[commit(2)], 1).await })
    };
    let queued = |s: &Store| s.inner.requests.max_capacity() - s.inner.requests.capacity();
    for _ in 0..1_000 {
        if queued(&store) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(paused);
    let ids = good.await.unwrap().unwrap();
    let err = bad.await.unwrap().unwrap_err();
    let ids2 = good2.await.unwrap().unwrap();
    assert_eq!(err.to_string(), "no such job 999");
    assert_eq!(store.commit_count(), 1, "one batch, one commit");
    assert!(job(&store, ids[0]).await.status == JobStatus::Queued);
    assert!(job(&store, ids2[0]).await.status == JobStatus::Queued);
}

#[tokio::test]
async fn reopening_keeps_schema_version_and_every_acked_write() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let store = Store::open(dir.path()).unwrap();
        let ids = store
            .submit(REPO, "main", &[commit(1), commit(2)], 1_000)
            .await
            .unwrap();
        (a, b) = (ids[0], ids[1]);
        store.assign(a, 1, "ci-1", 2_000).await.unwrap();
        log(&store, a, 1, 0, b"hello ").await;
        log(&store, a, 1, 6, b"world").await;
        let outcome = store
            .record_result(a, 1, &finished(a, 1, JobStatus::Failed), 3_000)
            .await
            .unwrap();
        assert_eq!(outcome, RecordOutcome::Recorded);
        // Dropped without close(): every awaited write was committed.
    }
    let version = || {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0))
            .unwrap()
    };
    assert_eq!(version() as usize, MIGRATIONS.len());

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(version() as usize, MIGRATIONS.len());
    let done = job(&store, a).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.tasks, finished(a, 1, JobStatus::Failed).tasks);
    assert_eq!(done.finished_at_ms, Some(3_000));
    assert_eq!(job(&store, b).await.status, JobStatus::Queued);
    assert_eq!(
        store.read_log(a, 1, 0, 1024).await.unwrap(),
        &b"hello world"[..]
    );
    assert_eq!(store.log_len(a, 1).await.unwrap(), 11);
    // Ids keep growing across restarts.
    let c = one_job(&store, 3).await;
    assert!(c > b);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
        .unwrap();
    drop(conn);
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    assert!(
        err.to_string().contains("newer than this dispatcher knows"),
        "{err}"
    );
}

#[tokio::test]
async fn open_uses_wal_and_creates_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    let store = Store::open(&nested).unwrap();
    assert_eq!(store.path(), nested.join(DB_FILE));
    one_job(&store, 1).await;
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn writes_after_close_fail_and_reads_still_work() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    store.close().await.unwrap();
    let err = store
        .submit(REPO, "main", &[commit(2)], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::WriterClosed), "{err}");
    assert_eq!(job(&store, id).await.status, JobStatus::Queued);
    store.close().await.unwrap();
}

#[tokio::test]
async fn results_are_fenced_by_attempt() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    let passed = finished(id, 1, JobStatus::Passed);

    // Not yet assigned: any result is stale.
    assert_eq!(
        store.record_result(id, 1, &passed, 10).await.unwrap(),
        RecordOutcome::Stale
    );
    store.assign(id, 1, "ci-1", 100).await.unwrap();
    store.started(id, 1, 110).await.unwrap();
    let running = job(&store, id).await;
    assert_eq!(running.status, JobStatus::Running);
    assert_eq!(
        (running.attempt, running.runner.as_deref()),
        (1, Some("ci-1"))
    );
    assert_eq!(running.started_at_ms, Some(100));

    // ci-1 is lost; the job is requeued and goes to ci-2 as attempt 2.
    store.requeue(id, "runner ci-1 lost").await.unwrap();
    let queued = job(&store, id).await;
    assert_eq!(queued.status, JobStatus::Queued);
    assert_eq!(
        (queued.attempt, queued.runner, queued.started_at_ms),
        (1, None, None)
    );
    store.assign(id, 2, "ci-2", 200).await.unwrap();

    // ci-1's late result, Started and logs change nothing.
    let stale = finished(id, 1, JobStatus::Failed);
    assert_eq!(
        store.record_result(id, 1, &stale, 300).await.unwrap(),
        RecordOutcome::Stale
    );
    log(&store, id, 1, 0, b"old").await;
    assert_eq!(store.log_len(id, 1).await.unwrap(), 0);
    let still = job(&store, id).await;
    assert_eq!(still.status, JobStatus::Running);
    assert_eq!((still.attempt, still.runner.as_deref()), (2, Some("ci-2")));
    assert!(still.tasks.is_empty());

    // ci-2's result is recorded once; a resend is a duplicate.
    assert_eq!(
        store
            .record_result(id, 2, &finished(id, 2, JobStatus::Passed), 400)
            .await
            .unwrap(),
        RecordOutcome::Recorded
    );
    let resend = finished(id, 2, JobStatus::Failed);
    assert_eq!(
        store.record_result(id, 2, &resend, 500).await.unwrap(),
        RecordOutcome::Duplicate
    );
    let done = job(&store, id).await;
    assert_eq!(done.status, JobStatus::Passed);
    assert_eq!(done.finished_at_ms, Some(400));
    assert_eq!(done.tasks.len(), 2);
    // And the stale attempt is still stale after the job ended.
    assert_eq!(
        store.record_result(id, 1, &stale, 600).await.unwrap(),
        RecordOutcome::Stale
    );

    // A final job cannot be assigned again, nor requeued.
    let err = store.assign(id, 3, "ci-3", 700).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    store.requeue(id, "late loss").await.unwrap();
    assert_eq!(job(&store, id).await, done);

    let err = store.record_result(404, 1, &passed, 1).await.unwrap_err();
    assert_eq!(err.to_string(), "no such job 404");
}

#[tokio::test]
async fn assign_checks_attempt_order_and_is_idempotent() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    let err = store.assign(id, 0, "ci-1", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    store.assign(id, 1, "ci-1", 100).await.unwrap();
    // The same assignment again (a retried call) is a no-op...
    store.assign(id, 1, "ci-1", 150).await.unwrap();
    assert_eq!(job(&store, id).await.started_at_ms, Some(100));
    // ...to another runner it is a conflict.
    let err = store.assign(id, 1, "ci-2", 150).await.unwrap_err();
    assert!(
        err.to_string().contains("already held by runner ci-1"),
        "{err}"
    );
    // A newer attempt supersedes a running one: the old one is fenced.
    store.assign(id, 2, "ci-2", 200).await.unwrap();
    assert_eq!(
        store
            .record_result(id, 1, &finished(id, 1, JobStatus::Passed), 300)
            .await
            .unwrap(),
        RecordOutcome::Stale
    );
    let err = store.assign(id, 2, "ci-3", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let err = store.assign(77, 1, "ci-1", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchJob(77)), "{err}");
}

#[tokio::test]
async fn invalid_result_statuses_are_refused() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    store.assign(id, 1, "ci-1", 1).await.unwrap();
    let err = store
        .record_result(id, 1, &finished(id, 1, JobStatus::Running), 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    let err = store
        .finish(id, JobStatus::Queued, "", 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(job(&store, id).await.status, JobStatus::Running);
}

#[tokio::test]
async fn finish_is_final() {
    let (_dir, store) = open();
    let queued = one_job(&store, 1).await;
    store
        .finish(queued, JobStatus::Cancelled, "cancelled by a user", 50)
        .await
        .unwrap();
    let record = job(&store, queued).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_eq!(record.message.as_deref(), Some("cancelled by a user"));
    assert_eq!(record.finished_at_ms, Some(50));
    // Already final: a later finish, submit or requeue changes nothing.
    store
        .finish(queued, JobStatus::Error, "other", 60)
        .await
        .unwrap();
    store.submit(REPO, "main", &[commit(1)], 70).await.unwrap();
    store.requeue(queued, "x").await.unwrap();
    assert_eq!(job(&store, queued).await, record);

    // A running job ended without a result: its runner's late result is
    // stale, its output still lands in its log.
    let running = one_job(&store, 2).await;
    store.assign(running, 3, "ci-1", 100).await.unwrap();
    store
        .finish(running, JobStatus::Error, "runners lost 3 times", 200)
        .await
        .unwrap();
    log(&store, running, 3, 0, b"tail").await;
    assert_eq!(store.log_len(running, 3).await.unwrap(), 4);
    assert_eq!(
        store
            .record_result(running, 3, &finished(running, 3, JobStatus::Passed), 300)
            .await
            .unwrap(),
        RecordOutcome::Stale
    );
    let record = job(&store, running).await;
    assert_eq!(record.status, JobStatus::Error);
    assert_eq!(record.message.as_deref(), Some("runners lost 3 times"));
    assert_eq!(record.runner.as_deref(), Some("ci-1"));
    assert!(record.tasks.is_empty());
}

#[tokio::test]
async fn logs_are_idempotent_and_read_across_chunks_up_to_a_gap() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    store.assign(id, 1, "ci-1", 1).await.unwrap();
    log(&store, id, 1, 0, b"abcd").await;
    log(&store, id, 1, 4, b"efgh").await;
    // A resent chunk is ignored, even with other bytes.
    log(&store, id, 1, 4, b"XXXX").await;
    // Out of order: 12.. arrives before 8..
    log(&store, id, 1, 12, b"mnop").await;
    assert_eq!(store.log_len(id, 1).await.unwrap(), 8);
    assert_eq!(
        store.read_log(id, 1, 0, 100).await.unwrap(),
        &b"abcdefgh"[..]
    );
    // Sliced inside a chunk and across the boundary, capped by max_bytes.
    assert_eq!(store.read_log(id, 1, 2, 100).await.unwrap(), &b"cdefgh"[..]);
    assert_eq!(store.read_log(id, 1, 3, 3).await.unwrap(), &b"def"[..]);
    assert_eq!(store.read_log(id, 1, 8, 100).await.unwrap(), &b""[..]);
    assert_eq!(store.read_log(id, 1, 13, 100).await.unwrap(), &b"nop"[..]);
    assert_eq!(store.read_log(id, 1, 0, 0).await.unwrap(), &b""[..]);

    // The gap fills: the contiguous end jumps over the early chunk.
    log(&store, id, 1, 8, b"ijkl").await;
    assert_eq!(store.log_len(id, 1).await.unwrap(), 16);
    assert_eq!(
        store.read_log(id, 1, 0, 100).await.unwrap(),
        &b"abcdefghijklmnop"[..]
    );
    // An overlapping resend with other boundaries is read consistently.
    log(&store, id, 1, 14, b"opqr").await;
    assert_eq!(store.log_len(id, 1).await.unwrap(), 18);
    assert_eq!(
        store.read_log(id, 1, 10, 100).await.unwrap(),
        &b"klmnopqr"[..]
    );
    // Empty chunks and unknown attempts store nothing.
    log(&store, id, 1, 18, b"").await;
    log(&store, id, 7, 0, b"nope").await;
    assert_eq!(store.log_len(id, 7).await.unwrap(), 0);
    assert_eq!(store.read_log(id, 7, 0, 100).await.unwrap(), &b""[..]);
    assert_eq!(store.log_len(id, 1).await.unwrap(), 18);

    let err = store
        .append_log(
            id,
            1,
            0,
            Stream::Stdout,
            u64::MAX - 1,
            Bytes::from_static(b"xx"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn list_jobs_filters_newest_first_with_limit() {
    let (_dir, store) = open();
    let app = store
        .submit(REPO, "main", &[commit(1), commit(2), commit(3)], 1)
        .await
        .unwrap();
    let lib = store
        .submit("/srv/git/lib", "main", &[commit(4)], 2)
        .await
        .unwrap();
    store.assign(app[1], 1, "ci-1", 3).await.unwrap();

    let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_jobs(None, None, 0).await.unwrap()),
        vec![lib[0], app[2], app[1], app[0]]
    );
    assert_eq!(
        ids(store.list_jobs(Some(REPO.into()), None, 0).await.unwrap()),
        vec![app[2], app[1], app[0]]
    );
    assert_eq!(
        ids(store.list_jobs(Some(REPO.into()), None, 2).await.unwrap()),
        vec![app[2], app[1]]
    );
    assert_eq!(
        ids(store
            .list_jobs(None, Some(JobStatus::Running), 0)
            .await
            .unwrap()),
        vec![app[1]]
    );
    assert_eq!(
        ids(store
            .list_jobs(Some(REPO.into()), Some(JobStatus::Queued), 0)
            .await
            .unwrap()),
        vec![app[2], app[0]]
    );
    assert_eq!(
        ids(store
            .list_jobs(None, Some(JobStatus::Unspecified), 1)
            .await
            .unwrap()),
        vec![lib[0]]
    );
    assert!(
        store
            .list_jobs(Some("/nope".into()), None, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.get_job(9_999).await.unwrap(), None);
}

#[tokio::test]
async fn unfinished_and_counts_for_recovery() {
    let (_dir, store) = open();
    let ids = store
        .submit(
            REPO,
            "main",
            &[commit(1), commit(2), commit(3), commit(4)],
            1,
        )
        .await
        .unwrap();
    store.assign(ids[0], 1, "ci-1", 2).await.unwrap();
    store.assign(ids[2], 1, "ci-2", 2).await.unwrap();
    store
        .record_result(ids[2], 1, &finished(ids[2], 1, JobStatus::Passed), 3)
        .await
        .unwrap();
    store
        .finish(ids[3], JobStatus::Cancelled, "", 3)
        .await
        .unwrap();

    let open_jobs = store.unfinished().await.unwrap();
    let summary: Vec<_> = open_jobs
        .iter()
        .map(|j| (j.id, j.status, j.attempt, j.runner.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (ids[0], JobStatus::Running, 1, Some("ci-1".to_owned())),
            (ids[1], JobStatus::Queued, 0, None),
        ]
    );
    assert_eq!(store.counts().await.unwrap(), (1, 1));
    // Empty message means none.
    assert_eq!(job(&store, ids[3]).await.message, None);
}

#[test]
fn to_proto_maps_every_field() {
    let record = JobRecord {
        id: 7,
        repo: REPO.into(),
        branch: "main".into(),
        commit: commit(7),
        status: JobStatus::Failed,
        attempt: 2,
        runner: Some("ci-3".into()),
        message: Some("unit failed".into()),
        queued_at_ms: 10,
        started_at_ms: Some(20),
        finished_at_ms: Some(30),
        tasks: finished(7, 2, JobStatus::Failed).tasks,
    };
    let info = record.to_proto();
    assert_eq!(
        info,
        surveil_proto::JobInfo {
            id: 7,
            repo: REPO.into(),
            branch: "main".into(),
            commit: commit(7),
            status: JobStatus::Failed as i32,
            attempt: 2,
            runner: Some("ci-3".into()),
            message: Some("unit failed".into()),
            queued_at_ms: 10,
            started_at_ms: Some(20),
            finished_at_ms: Some(30),
            tasks: record.tasks.clone(),
        }
    );
    let fresh = JobRecord {
        status: JobStatus::Queued,
        attempt: 0,
        runner: None,
        message: None,
        started_at_ms: None,
        finished_at_ms: None,
        tasks: Vec::new(),
        ..record
    };
    let info = fresh.to_proto();
    assert_eq!(info.status(), JobStatus::Queued);
    assert_eq!(
        (info.runner, info.message, info.started_at_ms),
        (None, None, None)
    );
}

#[tokio::test]
async fn acked_writes_survive_a_store_that_never_ran_its_destructors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let id = one_job(&store, 1).await;
    store.assign(id, 1, "ci-1", 5).await.unwrap();
    log(&store, id, 1, 0, b"partial").await;
    // As if the process stopped here: no drop, no close, no checkpoint; the
    // old writer still holds its connection open.
    std::mem::forget(store);

    let reopened = Store::open(dir.path()).unwrap();
    let record = job(&reopened, id).await;
    assert_eq!(record.status, JobStatus::Running);
    assert_eq!(
        (record.attempt, record.runner.as_deref()),
        (1, Some("ci-1"))
    );
    assert_eq!(
        reopened.read_log(id, 1, 0, 100).await.unwrap(),
        &b"partial"[..]
    );
    assert_eq!(reopened.unfinished().await.unwrap(), vec![record]);
}

#[tokio::test]
async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
    let (_dir, store) = open();
    let err = store
        .write(|_| -> Result<(), StoreError> { panic!("boom") })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    let id = one_job(&store, 1).await;
    assert_eq!(job(&store, id).await.status, JobStatus::Queued);
}
