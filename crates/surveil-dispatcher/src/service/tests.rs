//! Tests of the service over a real SQLite store, with runners replaced by
//! recording links and the store wrapped to count what it is asked: no
//! sockets, no supervised tasks (the tests run the passes themselves).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tempfile::TempDir;

use super::*;
use crate::domain::{
    Attempt, CommitId, FinalStatus, JobResult, JobStatus, LogChunk, LogStream, ResultAck,
    RunnerHello, RunnerReport, TaskResult, TaskStatus, ToRunner,
};
use crate::store::{RecordOutcome, SqliteStore, StoreFuture};

const REPO: &str = "/srv/git/app";

/// The SQLite store, counting the reads and writes asked of it (when they
/// are asked, not when they finish).
struct Counting {
    inner: SqliteStore,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Counting {
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
    }

    fn write(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

impl JobStore for Counting {
    fn submit<'a>(
        &'a self,
        repo: &'a str,
        origin: &'a crate::domain::Origin,
        commits: &'a [CommitId],
        now_ms: u64,
    ) -> StoreFuture<'a, Vec<crate::domain::Submitted>> {
        self.write();
        self.inner.submit(repo, origin, commits, now_ms)
    }

    fn assign<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        runner: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.write();
        self.inner.assign(job, attempt, runner, now_ms)
    }

    fn started(&self, job: JobId, attempt: Attempt, now_ms: u64) -> StoreFuture<'_, ()> {
        self.write();
        self.inner.started(job, attempt, now_ms)
    }

    fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
        cap: u64,
    ) -> StoreFuture<'_, ()> {
        self.write();
        self.inner.append_log(job, attempt, chunk, cap)
    }

    fn record_result<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        result: &'a JobResult,
        now_ms: u64,
    ) -> StoreFuture<'a, RecordOutcome> {
        self.write();
        self.inner.record_result(job, attempt, result, now_ms)
    }

    fn requeue<'a>(&'a self, job: JobId, attempt: Attempt, reason: &'a str) -> StoreFuture<'a, ()> {
        self.write();
        self.inner.requeue(job, attempt, reason)
    }

    fn hand_back<'a>(
        &'a self,
        job: JobId,
        attempt: Attempt,
        reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        self.write();
        self.inner.hand_back(job, attempt, reason)
    }

    fn finish<'a>(
        &'a self,
        job: JobId,
        status: FinalStatus,
        message: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        self.write();
        self.inner.finish(job, status, message, now_ms)
    }

    fn rerun(&self, job: JobId) -> StoreFuture<'_, ()> {
        self.write();
        self.inner.rerun(job)
    }

    fn request_cancel(&self, job: JobId) -> StoreFuture<'_, bool> {
        self.write();
        self.inner.request_cancel(job)
    }

    fn prune_logs(
        &self,
        rule: crate::domain::PruneRule,
        batch: u32,
    ) -> StoreFuture<'_, crate::domain::Pruned> {
        self.write();
        self.inner.prune_logs(rule, batch)
    }

    fn attempts(&self, job: JobId) -> StoreFuture<'_, Vec<crate::domain::AttemptRecord>> {
        self.read();
        self.inner.attempts(job)
    }

    fn get_job(&self, id: JobId) -> StoreFuture<'_, Option<Job>> {
        self.read();
        self.inner.get_job(id)
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> StoreFuture<'a, Vec<Job>> {
        self.read();
        self.inner.list_jobs(filter)
    }

    fn read_log(
        &self,
        job: JobId,
        attempt: Attempt,
        offset: u64,
        max_bytes: usize,
    ) -> StoreFuture<'_, Bytes> {
        self.read();
        self.inner.read_log(job, attempt, offset, max_bytes)
    }

    fn branches(&self) -> StoreFuture<'_, Vec<crate::domain::BranchHead>> {
        self.read();
        self.inner.branches()
    }

    fn unfinished(&self) -> StoreFuture<'_, Vec<Job>> {
        self.read();
        self.inner.unfinished()
    }

    fn epoch(&self) -> StoreFuture<'_, String> {
        self.read();
        self.inner.epoch()
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        self.inner.close()
    }
}

/// A runner as the service sees it: what it was sent, whether it was
/// closed.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<ToRunner>>,
    closed: Mutex<Option<String>>,
}

struct Link(Arc<Recorder>);

impl RunnerLink for Link {
    fn send(&self, msg: ToRunner) -> bool {
        self.0.sent.lock().unwrap().push(msg);
        true
    }

    fn close(&self, reason: &str) {
        *self.0.closed.lock().unwrap() = Some(reason.to_owned());
    }
}

impl Recorder {
    /// The jobs and attempts assigned so far.
    fn assigned(&self) -> Vec<(JobId, Attempt)> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                ToRunner::Assign(a) => Some((a.job, a.attempt)),
                _ => None,
            })
            .collect()
    }
}

struct Harness {
    _dir: TempDir,
    sqlite: SqliteStore,
    store: Arc<Counting>,
    service: Service,
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(dir.path()).unwrap();
        let store = Arc::new(Counting {
            inner: sqlite.clone(),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let config = SchedulerConfig {
            runner_timeout: Duration::from_secs(5),
            disconnect_grace: Duration::from_millis(200),
            max_attempts: 3,
            job_timeout: Duration::from_secs(24 * 3600),
            quarantine_after: 3,
            quarantine_for: Duration::from_secs(300),
        };
        let service = Service::open(store.clone(), config).await.unwrap();
        Harness {
            _dir: dir,
            sqlite,
            store,
            service,
        }
    }

    fn reads(&self) -> u64 {
        self.store.reads.load(Ordering::SeqCst)
    }

    fn writes(&self) -> u64 {
        self.store.writes.load(Ordering::SeqCst)
    }

    async fn submit(&self, from: u32, n: u32) -> Vec<JobId> {
        let submission = Submission {
            repo: REPO.to_owned(),
            origin: crate::domain::Origin::branch("main"),
            commits: (from..from + n)
                .map(|i| CommitId::parse(&format!("{i:040x}")).unwrap())
                .collect(),
        };
        let rows = self.service.submit(&submission).await.unwrap();
        rows.into_iter().map(|row| row.id).collect()
    }

    /// Connects a runner and runs the assignment pass.
    async fn runner(
        &self,
        name: &str,
        slots: u32,
        leases: Vec<(JobId, Attempt)>,
    ) -> (SessionId, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let session = self.service.new_session();
        let hello = RunnerHello {
            name: name.to_owned(),
            addr: "127.0.0.1:1".to_owned(),
            slots,
            repos: vec![REPO.to_owned()],
            labels: vec![],
            leases,
        };
        self.service
            .runner_connected(session, hello, Box::new(Link(recorder.clone())))
            .await;
        assert!(!self.service.assign_pass().await, "assignments recorded");
        (session, recorder)
    }

    async fn job(&self, id: JobId) -> Job {
        self.service.get_job(id).await.unwrap().unwrap()
    }

    /// How many results the store holds for `job`, read from the file.
    fn results_of(&self, job: JobId) -> i64 {
        let conn = rusqlite::Connection::open(self.sqlite.path()).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM attempts WHERE job_id = ?1 AND result_status IS NOT NULL",
            [i64::try_from(job.0).unwrap()],
            |row| row.get(0),
        )
        .unwrap()
    }
}

fn finished(job: JobId, attempt: Attempt) -> RunnerReport {
    RunnerReport::Finished {
        job,
        attempt,
        result: JobResult {
            status: FinalStatus::Passed,
            message: String::new(),
            infrastructure: false,
            tasks: vec![TaskResult {
                name: "unit".into(),
                status: TaskStatus::Passed,
                exit_code: Some(0),
                signal: None,
                duration_ms: 3,
                message: String::new(),
                started_at_ms: None,
                report: None,
            }],
        },
        commit: String::new(),
    }
}

fn log(job: JobId, offset: u64, data: &'static [u8]) -> RunnerReport {
    RunnerReport::Log {
        job,
        attempt: Attempt(1),
        chunk: LogChunk {
            task: 0,
            stream: LogStream::Stdout,
            offset,
            data: Bytes::from_static(data),
        },
    }
}

fn accepted(message: &str) -> ReportReply {
    ReportReply::Ack(ResultAck {
        accepted: true,
        message: message.to_owned(),
    })
}

#[tokio::test]
async fn a_result_whose_write_fails_is_not_acked_and_its_resend_is_recorded_once() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    let (session, runner) = h.runner("ci-1", 1, vec![]).await;
    assert_eq!(runner.assigned(), vec![(id, Attempt(1))]);

    h.sqlite.fail_next_commits(1);
    let reply = h
        .service
        .runner_report(session, finished(id, Attempt(1)))
        .await;
    let ReportReply::Resend(resend) = reply else {
        panic!("expected a Resend, got {reply:?}");
    };
    assert!(resend.result && !resend.started, "{resend:?}");
    assert_eq!(resend.log_offset, None, "the log needs nothing");
    assert!(resend.message.contains("committing"), "{resend:?}");
    // Memory and disk agree: the job still runs, on the same runner.
    let job = h.job(id).await;
    assert_eq!((job.status, job.tasks.len()), (JobStatus::Running, 0));
    assert_eq!((h.service.status().running, h.results_of(id)), (1, 0));

    let ack = h
        .service
        .runner_report(session, finished(id, Attempt(1)))
        .await;
    assert_eq!(ack, accepted(""));
    let job = h.job(id).await;
    assert_eq!(job.status, JobStatus::Final(FinalStatus::Passed));
    assert_eq!(job.tasks.len(), 1);
    let again = h
        .service
        .runner_report(session, finished(id, Attempt(1)))
        .await;
    assert_eq!(again, accepted("already recorded"));
    assert_eq!(h.results_of(id), 1, "recorded once");
    assert_eq!(h.service.status().refused_results, 0);

    // Its slot is free again: the next job goes to the same runner.
    let next = h.submit(2, 1).await[0];
    assert!(!h.service.assign_pass().await);
    assert_eq!(
        runner.assigned(),
        vec![(id, Attempt(1)), (next, Attempt(1))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_while_the_first_write_is_in_flight_waits_for_it() {
    let h = Arc::new(Harness::new().await);
    let id = h.submit(1, 1).await[0];
    let (first, _) = h.runner("ci-1", 1, vec![]).await;
    let paused = h.sqlite.pause_writer().await;
    let writing = {
        let h = Arc::clone(&h);
        tokio::spawn(async move {
            h.service
                .runner_report(first, finished(id, Attempt(1)))
                .await
        })
    };
    // The connection is lost meanwhile; the runner comes back with the
    // lease and resends.
    for _ in 0..1_000 {
        if h.writes() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(h.writes(), 3, "submit, assign and the result were asked");
    h.service
        .runner_disconnected(first, "connection reset")
        .await;
    let (second, runner) = h.runner("ci-1", 1, vec![(id, Attempt(1))]).await;
    assert!(
        runner.sent.lock().unwrap().is_empty(),
        "lease kept, no Cancel"
    );
    let resend = {
        let h = Arc::clone(&h);
        tokio::spawn(async move {
            h.service
                .runner_report(second, finished(id, Attempt(1)))
                .await
        })
    };
    // The resend waits on the job's watch for the first write's answer.
    for _ in 0..1_000 {
        if h.service.notifier.watched_jobs() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        h.service.notifier.watched_jobs(),
        1,
        "the resend is waiting"
    );
    drop(paused);
    assert_eq!(writing.await.unwrap(), accepted(""));
    assert_eq!(resend.await.unwrap(), accepted("already recorded"));
    assert_eq!(h.results_of(id), 1);
    assert_eq!(h.service.status().running, 0);
}

#[tokio::test]
async fn an_assignment_the_store_refuses_is_not_sent_and_is_tried_again() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    h.sqlite.fail_next_commits(1);
    let recorder = Arc::new(Recorder::default());
    let session = h.service.new_session();
    let hello = RunnerHello {
        name: "ci-1".into(),
        addr: "127.0.0.1:1".into(),
        slots: 1,
        repos: vec![REPO.into()],
        labels: vec![],
        leases: vec![],
    };
    h.service
        .runner_connected(session, hello, Box::new(Link(recorder.clone())))
        .await;
    assert!(
        h.service.assign_pass().await,
        "the pass reports the failure"
    );
    assert!(recorder.sent.lock().unwrap().is_empty(), "nothing sent");
    assert_eq!(
        recorder.closed.lock().unwrap().as_deref(),
        None,
        "not disconnected"
    );
    let status = h.service.status();
    assert_eq!((status.queued, status.running), (1, 0));
    assert_eq!(h.job(id).await.status, JobStatus::Queued);
    assert!(!h.service.assign_pass().await);
    assert_eq!(recorder.assigned(), vec![(id, Attempt(1))]);
}

#[tokio::test]
async fn a_submit_of_many_commits_is_one_store_write_and_no_reads() {
    let h = Harness::new().await;
    let (reads, writes, commits) = (h.reads(), h.writes(), h.sqlite.write_count());
    let ids = h.submit(1, 1_000).await;
    assert_eq!(ids.len(), 1_000);
    assert_eq!(h.writes() - writes, 1);
    assert_eq!(h.sqlite.write_count() - commits, 1);
    assert_eq!(h.reads() - reads, 0);
    assert_eq!(h.service.status().queued, 1_000);
    // Known commits again: still one write, nothing queued twice.
    let again = h.submit(1, 1_000).await;
    assert_eq!(again, ids);
    assert_eq!((h.writes() - writes, h.reads() - reads), (2, 0));
    assert_eq!(h.service.status().queued, 1_000);
}

/// Polls `follow` until `h` has seen `reads` reads, keeping `follow`
/// polled so it can park; bounded.
async fn park<F: std::future::Future + Unpin>(h: &Harness, follow: &mut F, reads: u64) {
    for _ in 0..100_000 {
        if h.reads() >= reads {
            break;
        }
        tokio::select! {
            biased;
            _ = &mut *follow => panic!("the follower returned before parking"),
            () = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(h.reads(), reads, "the follower read its job and log once");
}

#[tokio::test]
async fn a_follower_is_not_woken_by_another_jobs_log() {
    let h = Harness::new().await;
    let ids = h.submit(1, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let (session, _) = h.runner("ci-1", 2, vec![]).await;
    let mut follow = h.service.follow_log(a, 0, true);
    let start = h.reads();
    {
        let next = follow.next();
        tokio::pin!(next);
        park(&h, &mut next, start + 2).await;
        for n in 0..50 {
            let report = log(b, n, b"x");
            tokio::select! {
                biased;
                _ = &mut next => panic!("job A's follower returned for job B's log"),
                r = h.service.runner_report(session, report) => {
                    assert_eq!(r, ReportReply::Nothing);
                }
            }
        }
        // A follower woken by mistake would read again: give it the chance.
        tokio::select! {
            _ = &mut next => panic!("job A's follower returned for job B's log"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert_eq!(h.reads(), start + 2, "job B's chunks woke job A's follower");
        assert!(!matches!(
            h.service.runner_report(session, log(a, 0, b"mine")).await,
            ReportReply::Resend(_)
        ));
        let event = next.await.unwrap();
        assert!(
            matches!(&event, LogEvent::Bytes { offset: 0, data, .. } if data == &b"mine"[..]),
            "{event:?}"
        );
        assert_eq!(h.reads(), start + 4);
    }
    drop(follow);
    assert_eq!(
        h.service.notifier.watched_jobs(),
        0,
        "the watch went with its follower"
    );
}

#[tokio::test(start_paused = true)]
async fn a_follower_sees_the_final_status_without_a_timed_recheck() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    let (session, _) = h.runner("ci-1", 1, vec![]).await;
    assert!(!matches!(
        h.service
            .runner_report(session, log(id, 0, b"hello\n"))
            .await,
        ReportReply::Resend(_)
    ));
    let mut follow = h.service.follow_log(id, 0, true);
    let event = follow.next().await.unwrap();
    assert!(
        matches!(
            event,
            LogEvent::Bytes {
                status: JobStatus::Running,
                ..
            }
        ),
        "{event:?}"
    );

    let start = h.reads();
    let next = follow.next();
    tokio::pin!(next);
    park(&h, &mut next, start + 2).await;
    // Ten idle seconds (of paused, auto-advanced time): nothing changed, so
    // nothing is read.
    tokio::select! {
        _ = &mut next => panic!("the follower returned with nothing new"),
        () = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
    assert_eq!(
        h.reads(),
        start + 2,
        "the follower read the store on a timer"
    );

    // No timer may be pending while the store writes (its writer is a
    // thread the paused clock cannot see): the result is recorded first,
    // then the follower is polled.
    let ack = h
        .service
        .runner_report(session, finished(id, Attempt(1)))
        .await;
    assert_eq!(ack, accepted(""));
    let end = tokio::time::timeout(Duration::from_secs(60), next)
        .await
        .expect("the follower woke for the result")
        .unwrap();
    assert_eq!(
        end,
        LogEvent::End {
            attempt: Attempt(1),
            offset: 6,
            status: JobStatus::Final(FinalStatus::Passed),
        }
    );
}

#[tokio::test]
async fn events_tell_a_jobs_story_in_order() {
    let h = Harness::new().await;
    let mut events = h.service.events();
    let id = h.submit(1, 1).await[0];
    let (session, _) = h.runner("ci-1", 1, vec![]).await;
    assert!(!matches!(
        h.service
            .runner_report(
                session,
                RunnerReport::Started {
                    job: id,
                    attempt: Attempt(1),
                },
            )
            .await,
        ReportReply::Resend(_)
    ));
    assert!(!matches!(
        h.service
            .runner_report(session, finished(id, Attempt(1)))
            .await,
        ReportReply::Resend(_)
    ));
    h.service.runner_disconnected(session, "bye").await;
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let job = |change| Event::Job { id, change };
    let runner = |change| Event::Runner {
        name: "ci-1".into(),
        session,
        change,
    };
    assert_eq!(
        seen,
        vec![
            job(JobChange::Queued),
            runner(RunnerChange::Connected),
            job(JobChange::Assigned {
                attempt: Attempt(1),
                runner: "ci-1".into()
            }),
            job(JobChange::Started {
                attempt: Attempt(1)
            }),
            job(JobChange::Finished {
                status: FinalStatus::Passed
            }),
            runner(RunnerChange::Disconnected),
        ]
    );
}

#[tokio::test]
async fn a_requeue_the_store_refuses_is_tried_again_until_it_is_recorded() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    let (session, runner) = h.runner("ci-1", 1, vec![]).await;
    assert_eq!(runner.assigned(), vec![(id, Attempt(1))]);
    h.sqlite.fail_next_commits(2);
    h.service
        .runner_disconnected(session, "connection reset")
        .await;
    // Memory says queued; after two failed tries, so does the store.
    assert_eq!(h.service.status().queued, 1);
    assert_eq!(h.job(id).await.status, JobStatus::Queued);
}

#[tokio::test]
async fn a_requeue_the_store_keeps_refusing_stops_the_dispatcher() {
    let h = Harness::new().await;
    let health = Arc::new(crate::health::StoreHealth::new(
        100,
        Duration::from_secs(30),
    ));
    h.service.set_health(Arc::clone(&health));
    let id = h.submit(1, 1).await[0];
    let (session, _) = h.runner("ci-1", 1, vec![]).await;
    h.sqlite.fail_next_commits(5);
    h.service
        .runner_disconnected(session, "connection reset")
        .await;
    assert!(
        health.tripped().is_cancelled(),
        "memory and disk would disagree"
    );
    assert!(
        health.reason().contains("cannot record the requeue"),
        "{}",
        health.reason()
    );
    assert_eq!(
        h.job(id).await.status,
        JobStatus::Running,
        "the disk as it is"
    );
}

fn infra_failed(job: JobId, attempt: Attempt) -> RunnerReport {
    RunnerReport::Finished {
        job,
        attempt,
        result: JobResult {
            status: FinalStatus::Error,
            message: "repository /srv/git/app is unreachable: connection refused".to_owned(),
            infrastructure: true,
            tasks: vec![],
        },
        commit: String::new(),
    }
}

#[tokio::test]
async fn an_infrastructure_failure_is_acked_recorded_on_its_attempt_and_run_on_another_runner() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    let (bad, bad_runner) = h.runner("bad", 1, vec![]).await;
    let (_, good_runner) = h.runner("good", 1, vec![]).await;
    assert_eq!(bad_runner.assigned(), vec![(id, Attempt(1))]);

    let ReportReply::Ack(ack) = h
        .service
        .runner_report(bad, infra_failed(id, Attempt(1)))
        .await
    else {
        panic!("a result is answered");
    };
    assert!(ack.accepted, "the runner drops it from its outbox: {ack:?}");
    assert!(ack.message.contains("queued again"), "{ack:?}");
    assert_eq!(h.results_of(id), 0, "no result recorded");
    let attempts = h.service.attempts(id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status.label(), "revoked");
    assert_eq!(
        attempts[0].message.as_deref(),
        Some(
            "infrastructure failure on runner bad: repository /srv/git/app is unreachable: connection refused"
        )
    );
    assert_eq!(h.job(id).await.status, JobStatus::Queued);

    assert!(!h.service.assign_pass().await);
    assert_eq!(good_runner.assigned(), vec![(id, Attempt(2))]);
    let runners = h.service.runners();
    let bad_view = runners.iter().find(|r| r.name == "bad").unwrap();
    assert_eq!(
        (bad_view.infra_failures, bad_view.quarantined_until_ms),
        (1, None)
    );
    // A runner cannot dress a red build up as infrastructure: a result
    // with task results is what it says it is.
    let good = h.service.runners().into_iter().find(|r| r.name == "good");
    let good = good.map(|r| r.running).unwrap_or_default();
    assert_eq!(good, vec![id]);
    let mut red = finished(id, Attempt(2));
    if let RunnerReport::Finished { result, .. } = &mut red {
        result.status = FinalStatus::Failed;
        result.infrastructure = true;
    }
    let session = h
        .service
        .with_sched(|s| s.lease_holder(id, Attempt(2)))
        .unwrap();
    let ack = h.service.runner_report(session, red).await;
    assert_eq!(ack, accepted(""));
    assert_eq!(
        h.job(id).await.status,
        JobStatus::Final(FinalStatus::Failed)
    );
}

#[tokio::test]
async fn an_infrastructure_failure_whose_requeue_fails_once_is_acked_after_it_is_recorded() {
    let h = Harness::new().await;
    let id = h.submit(1, 1).await[0];
    let (session, _) = h.runner("bad", 1, vec![]).await;
    h.sqlite.fail_next_commits(1);
    let reply = h
        .service
        .runner_report(session, infra_failed(id, Attempt(1)))
        .await;
    let ReportReply::Ack(ack) = reply else {
        panic!("the requeue was recorded at its second try: {reply:?}");
    };
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(h.job(id).await.status, JobStatus::Queued, "on disk");
}

#[tokio::test]
async fn an_infrastructure_failure_whose_requeue_the_store_keeps_refusing_is_not_acked() {
    let h = Harness::new().await;
    let health = Arc::new(crate::health::StoreHealth::new(
        100,
        Duration::from_secs(30),
    ));
    h.service.set_health(Arc::clone(&health));
    let id = h.submit(1, 1).await[0];
    let (session, _) = h.runner("bad", 1, vec![]).await;
    h.sqlite.fail_next_commits(5);
    let reply = h
        .service
        .runner_report(session, infra_failed(id, Attempt(1)))
        .await;
    // The requeue is not on disk: the runner keeps its result and sends
    // it again (to the restarted dispatcher, which finds the attempt
    // still running); the connection is not closed for it.
    let ReportReply::Resend(resend) = reply else {
        panic!("expected a Resend, got {reply:?}");
    };
    assert!(resend.result && !resend.started, "{resend:?}");
    assert_eq!((resend.job, resend.attempt), (id, Attempt(1)));
    assert!(health.tripped().is_cancelled(), "the dispatcher stops");
    assert!(
        health.reason().contains("cannot record the requeue"),
        "{}",
        health.reason()
    );
    assert_eq!(
        h.job(id).await.status,
        JobStatus::Running,
        "the disk as it is"
    );
    assert_eq!(h.results_of(id), 0);
}
