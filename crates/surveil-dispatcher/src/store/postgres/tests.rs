//! Tests of the PostgreSQL store against a real server (started by the
//! `surveil-tests` harness, one per test binary, a database per test): the
//! conformance suite, then what only this backend has (concurrent
//! migrations, the leader term fencing writes).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::domain::{JobStatus, Origin};
use crate::store::conformance::StoreFactory;
use surveil_tests::postgres;

/// A database of its own on the shared server; the store there holds the
/// leader term (as an elected dispatcher's does).
struct Postgres;

pub(crate) fn options(database: &str) -> Option<PostgresOptions> {
    let pg = postgres::require("PostgreSQL store tests")?;
    let mut options = PostgresOptions::new(pg.url(database));
    options.password = Some(Secret::new(pg.password().to_owned()));
    options.pool_size = 4;
    Some(options)
}

impl StoreFactory for Postgres {
    type Place = String;

    fn unavailable(&self) -> Option<String> {
        postgres::require("PostgreSQL store conformance")
            .is_none()
            .then(|| postgres::available().err().unwrap_or_default())
    }

    async fn place(&self) -> String {
        let pg = postgres::shared().expect("checked by unavailable()");
        pg.create_database().expect("create a database")
    }

    async fn open(&self, place: &String) -> Arc<dyn JobStore> {
        let options = options(place).expect("checked by unavailable()");
        let store = PostgresStore::open(&options).await.expect("open store");
        let term = store
            .campaign("test", "127.0.0.1:1")
            .await
            .expect("campaign");
        assert!(
            term.is_some(),
            "a fresh database elects the first campaigner"
        );
        Arc::new(store)
    }

    async fn new_epoch(&self, place: &String) -> String {
        let options = options(place).expect("checked by unavailable()");
        let store = PostgresStore::open(&options).await.expect("open store");
        let epoch = store.new_epoch().await.expect("new epoch");
        store.close().await.expect("close");
        epoch
    }
}

mod conformance {
    use super::Postgres;

    crate::store_conformance_tests!(Postgres);
}

const REPO: &str = "/srv/git/app";

fn commit(n: u32) -> CommitId {
    CommitId::parse(&format!("{n:040x}")).unwrap()
}

/// A fresh database's options with a short term, or `None` (skipped).
fn fresh(ttl: Duration) -> Option<PostgresOptions> {
    let pg = postgres::require("PostgreSQL store tests")?;
    let mut options = options(&pg.create_database().expect("create a database"))?;
    options.leader_ttl = ttl;
    Some(options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_migrating_at_once_both_open_one_schema() {
    let Some(options) = fresh(Duration::from_secs(3)) else {
        return;
    };
    let (a, b) = tokio::join!(PostgresStore::open(&options), PostgresStore::open(&options));
    let (a, b) = (a.expect("first opens"), b.expect("second opens"));
    let pg = postgres::shared().unwrap();
    let db = options.url.rsplit('/').next().unwrap();
    assert_eq!(
        pg.psql(db, "SELECT version FROM surveil_schema").unwrap(),
        schema::MIGRATIONS.len().to_string()
    );
    assert_eq!(
        pg.psql(db, "SELECT count(*) FROM surveil_schema").unwrap(),
        "1"
    );
    assert!(a.campaign("a", "127.0.0.1:1").await.unwrap().is_some());
    assert_eq!(
        b.campaign("b", "127.0.0.1:2").await.unwrap(),
        None,
        "one leader at a time"
    );
    let info = b.leader().await.unwrap();
    assert_eq!(
        (info.holder.as_str(), info.addr.as_str(), info.live),
        ("a", "127.0.0.1:1", true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_the_term_cannot_write() {
    let Some(options) = fresh(Duration::from_secs(3)) else {
        return;
    };
    let store = PostgresStore::open(&options).await.unwrap();
    let err = store
        .submit(REPO, &Origin::branch("main"), &[commit(1)], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotLeader), "{err}");
    assert!(
        store
            .list_jobs(&JobFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_writes_are_refused_by_the_database() {
    let ttl = Duration::from_millis(600);
    let Some(options) = fresh(ttl) else { return };
    let old = PostgresStore::open(&options).await.unwrap();
    let new = PostgresStore::open(&options).await.unwrap();
    let first = old
        .campaign("old", "127.0.0.1:1")
        .await
        .unwrap()
        .expect("elected");
    let id = old
        .submit(REPO, &Origin::branch("main"), &[commit(1)], 1)
        .await
        .unwrap()[0]
        .id;
    // The old leader stalls past its term (it does not renew) and the
    // standby takes over; the old one has not noticed.
    let mut second = None;
    for _ in 0..50 {
        second = new.campaign("new", "127.0.0.1:2").await.unwrap();
        if second.is_some() {
            break;
        }
        tokio::time::sleep(ttl / 4).await;
    }
    let second = second.expect("the standby takes over an expired term");
    assert!(second > first, "a takeover starts a new term");
    assert_eq!(
        old.term(),
        Some(first),
        "the old leader has not noticed yet"
    );
    let err = old.assign(id, Attempt(1), "ci-1", 2).await.unwrap_err();
    assert!(matches!(err, StoreError::NotLeader), "{err}");
    let err = old
        .submit(REPO, &Origin::branch("main"), &[commit(2)], 3)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotLeader), "{err}");
    tokio::time::timeout(Duration::from_secs(5), old.deposed())
        .await
        .expect("the refusal deposes it");
    assert_eq!(old.term(), None);
    assert!(
        !old.renew().await.unwrap(),
        "a deposed term cannot be renewed"
    );
    // Nothing of the late writes is in the rows.
    let jobs = new.list_jobs(&JobFilter::default()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].status, jobs[0].attempt),
        (JobStatus::Queued, Attempt(0))
    );
    // The new leader writes.
    new.assign(id, Attempt(1), "ci-2", 4).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_keeps_the_term_and_resigning_hands_it_over_at_once() {
    let ttl = Duration::from_millis(900);
    let Some(options) = fresh(ttl) else { return };
    let a = PostgresStore::open(&options).await.unwrap();
    let b = PostgresStore::open(&options).await.unwrap();
    let term = a
        .campaign("a", "127.0.0.1:1")
        .await
        .unwrap()
        .expect("elected");
    for _ in 0..4 {
        tokio::time::sleep(ttl / 3).await;
        assert!(a.renew().await.unwrap(), "the leader renews its live term");
        assert_eq!(b.campaign("b", "127.0.0.1:2").await.unwrap(), None);
    }
    a.submit(REPO, &Origin::branch("main"), &[commit(1)], 1)
        .await
        .unwrap();
    a.close().await.unwrap();
    let next = b.campaign("b", "127.0.0.1:2").await.unwrap();
    assert_eq!(
        next,
        Some(term + 1),
        "a closed leader resigned: no wait for expiry"
    );
}

#[tokio::test]
async fn credentials_are_checked_and_never_taken_from_the_url() {
    let Some(mut options) = fresh(Duration::from_secs(3)) else {
        return;
    };
    options.password = Some(Secret::new("wrong".into()));
    let err = PostgresStore::open(&options).await.err().expect("refused");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err:#}"
    );
    options.password = None;
    options.url = options.url.replace("surveil@", "surveil:hunter2@");
    let err = PostgresStore::open(&options).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("must not carry the password"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// The restore step is for a database no dispatcher serves: while one
/// holds an unexpired term it is refused (that leader would go on handing
/// out the old epoch), and once the term is given up it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_is_refused_while_a_dispatcher_leads() {
    let Some(options) = fresh(Duration::from_secs(30)) else {
        return;
    };
    let leader = PostgresStore::open(&options).await.unwrap();
    assert!(leader.campaign("a", "127.0.0.1:1").await.unwrap().is_some());
    let before = leader.epoch().await.unwrap();
    let operator = PostgresStore::open(&options).await.unwrap();
    let err = operator.new_epoch().await.unwrap_err();
    assert!(err.to_string().contains("stop every dispatcher"), "{err}");
    assert_eq!(operator.epoch().await.unwrap(), before, "unchanged");
    leader.close().await.unwrap();
    let after = operator.new_epoch().await.unwrap();
    assert_ne!(after, before);
    assert_eq!(operator.epoch().await.unwrap(), after);
}
