//! Tests of the SQLite store against real files in temporary directories:
//! the conformance suite, then what only this backend has (group commit,
//! the schema version, WAL, crash safety without destructors).

use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::migrations::MIGRATIONS;
use super::writer::MAX_BATCH;
use super::*;
use crate::domain::{JobStatus, LogStream, Origin};
use crate::store::conformance::StoreFactory;

/// SQLite stores in temporary directories.
struct Sqlite;

impl StoreFactory for Sqlite {
    type Place = TempDir;

    async fn place(&self) -> TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    async fn open(&self, place: &TempDir) -> Arc<dyn JobStore> {
        Arc::new(SqliteStore::open(place.path()).expect("open store"))
    }

    async fn new_epoch(&self, place: &TempDir) -> String {
        let store = SqliteStore::open(place.path()).expect("open store");
        let epoch = store.new_epoch().await.expect("new epoch");
        store.close().await.expect("close");
        epoch
    }
}

mod conformance {
    use super::Sqlite;

    crate::store_conformance_tests!(Sqlite);
}

const REPO: &str = "/srv/git/app";

fn commit(n: u32) -> CommitId {
    CommitId::parse(&format!("{n:040x}")).unwrap()
}

fn open() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("open store");
    (dir, store)
}

async fn one_job(store: &SqliteStore, n: u32) -> JobId {
    store
        .submit(REPO, &Origin::branch("main"), &[commit(n)], 1_000)
        .await
        .expect("submit")[0]
        .id
}

async fn status(store: &SqliteStore, id: JobId) -> JobStatus {
    store.get_job(id).await.unwrap().expect("job exists").status
}

/// Requests waiting in the writer's channel.
fn queued(store: &SqliteStore) -> usize {
    store.inner.requests.max_capacity() - store.inner.requests.capacity()
}

async fn wait_queued(store: &SqliteStore, n: usize) {
    for _ in 0..1_000 {
        if queued(store) == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(queued(store), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_writes_share_one_commit() {
    let (_dir, store) = open();
    let paused = store.pause_writer().await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..500 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .submit(REPO, &Origin::branch("main"), &[commit(n)], 1)
                .await
        });
    }
    // The writer holds the first request and waits for the pause lock;
    // 499 sit in the channel.
    wait_queued(&store, 499).await;
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
    let paused = store.pause_writer().await;
    let spawn_submit = |n| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .submit(REPO, &Origin::branch("main"), &[commit(n)], 1)
                .await
        })
    };
    let good = spawn_submit(1);
    let bad = {
        let store = store.clone();
        tokio::spawn(async move { store.assign(JobId(999), Attempt(1), "ci-1", 1).await })
    };
    let good2 = spawn_submit(2);
    wait_queued(&store, 2).await;
    drop(paused);
    let ids = good.await.unwrap().unwrap();
    let err = bad.await.unwrap().unwrap_err();
    let ids2 = good2.await.unwrap().unwrap();
    assert_eq!(err.to_string(), "no such job 999");
    assert_eq!(store.commit_count(), 1, "one batch, one commit");
    assert_eq!(status(&store, ids[0].id).await, JobStatus::Queued);
    assert_eq!(status(&store, ids2[0].id).await, JobStatus::Queued);
}

#[tokio::test]
async fn a_failed_commit_answers_an_error_and_keeps_nothing() {
    let (_dir, store) = open();
    let kept = one_job(&store, 1).await;
    store.fail_next_commits(2);
    let err = store
        .submit(REPO, &Origin::branch("main"), &[commit(2)], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Commit(_)), "{err}");
    let err = store.assign(kept, Attempt(1), "ci-1", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Commit(_)), "{err}");
    // The hook is spent: writes commit again, and none of the failed ones
    // left a trace.
    assert_eq!(status(&store, kept).await, JobStatus::Queued);
    assert!(
        store
            .submit(REPO, &Origin::branch("main"), &[commit(2)], 1)
            .await
            .unwrap()[0]
            .created
    );
}

#[tokio::test]
async fn reopening_keeps_the_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let version = || {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0))
            .unwrap()
    };
    assert_eq!(version() as usize, MIGRATIONS.len());
    drop(SqliteStore::open(dir.path()).unwrap());
    assert_eq!(version() as usize, MIGRATIONS.len());
}

/// A database made before jobs recorded refs (two scripts applied) keeps
/// its jobs, which read back with the ref of their branch.
#[tokio::test]
async fn jobs_from_before_refs_get_their_branch_ref() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let tx = conn.transaction().unwrap();
        for script in &MIGRATIONS[..2] {
            tx.execute_batch(script).unwrap();
        }
        tx.execute(
            "INSERT INTO jobs (repo, branch, commit_id, status, queued_at_ms) \
             VALUES (?1, 'release/1', ?2, 'queued', 5)",
            rusqlite::params![REPO, commit(1).as_str()],
        )
        .unwrap();
        tx.pragma_update(None, "user_version", 2).unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    let jobs = store.unfinished().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].ref_name.as_str(), jobs[0].pull_request),
        ("refs/heads/release/1", None)
    );
}

/// A store made before epochs (schema version 6) gets one when it is
/// migrated, and keeps it from then on.
#[tokio::test]
async fn a_store_from_before_epochs_gets_one_at_migration() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let tx = conn.transaction().unwrap();
        for script in &MIGRATIONS[..6] {
            tx.execute_batch(script).unwrap();
        }
        tx.pragma_update(None, "user_version", 6).unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    let epoch = store.epoch().await.unwrap();
    assert_eq!(epoch.len(), 32);
    assert!(
        epoch
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    store.close().await.unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.epoch().await.unwrap(), epoch);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
        .unwrap();
    drop(conn);
    let err = SqliteStore::open(dir.path()).err().expect("refused");
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
    let store = SqliteStore::open(&nested).unwrap();
    assert_eq!(store.path(), nested.join(DB_FILE));
    one_job(&store, 1).await;
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_damaged_row_is_a_clear_error_not_a_panic() {
    let (_dir, store) = open();
    let id = one_job(&store, 1).await;
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.execute("UPDATE jobs SET status = 'lost'", []).unwrap();
    drop(conn);
    let err = store.get_job(id).await.unwrap_err();
    assert!(err.to_string().contains("unknown status \"lost\""), "{err}");
}

#[tokio::test]
async fn acked_writes_survive_a_store_that_never_ran_its_destructors() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let id = one_job(&store, 1).await;
    store.assign(id, Attempt(1), "ci-1", 5).await.unwrap();
    let chunk = LogChunk {
        task: 0,
        stream: LogStream::Stdout,
        offset: 0,
        data: Bytes::from_static(b"partial"),
    };
    store
        .append_log(id, Attempt(1), chunk, u64::MAX)
        .await
        .unwrap();
    // As if the process stopped here: no drop, no close, no checkpoint; the
    // old writer still holds its connection open.
    std::mem::forget(store);

    let reopened = SqliteStore::open(dir.path()).unwrap();
    let record = reopened.get_job(id).await.unwrap().unwrap();
    assert_eq!(record.status, JobStatus::Running);
    assert_eq!(
        (record.attempt, record.runner.as_deref()),
        (Attempt(1), Some("ci-1"))
    );
    assert_eq!(
        reopened.read_log(id, Attempt(1), 0, 100).await.unwrap(),
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
    assert_eq!(status(&store, id).await, JobStatus::Queued);
}
