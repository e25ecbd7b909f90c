//! A submitted commit reaches a runner, and its result and log are recorded.

use surveil_proto::*;

use crate::harness::*;

#[tokio::test]
async fn submitted_commit_is_assigned_run_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut runner = d.runner("ci-1", 1).await;
    let mut client = d.client().await;
    let ids = client.submit(&[commit(1)]).await;
    assert_eq!(ids.len(), 1);

    let assign = runner.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (ids[0], 1));
    assert_eq!(assign.repo, REPO);
    assert_eq!(assign.commit, commit(1));
    assert_eq!(assign.branch, "main");

    runner
        .send(Started {
            job_id: ids[0],
            attempt: 1,
        })
        .await;
    runner
        .send(Log {
            job_id: ids[0],
            attempt: 1,
            task: 0,
            stream: Stream::Stdout as i32,
            offset: 0,
            data: "hello\n".into(),
        })
        .await;
    let ack = runner.finish(ids[0], 1, JobStatus::Passed).await;
    assert!(ack.accepted, "{ack:?}");

    let job = client.job(ids[0]).await.unwrap();
    assert_eq!(job.status(), JobStatus::Passed);
    assert_eq!(job.attempt, 1);
    assert_eq!(job.runner.as_deref(), Some("ci-1"));
    assert_eq!(job.tasks.len(), 1);
    assert!(job.finished_at_ms.is_some());

    client
        .conn
        .send(ReadLog {
            job_id: ids[0],
            offset: 0,
            follow: false,
            ..ReadLog::default()
        })
        .await
        .unwrap();
    let mut log = Vec::new();
    loop {
        match client.recv().await {
            Some(Msg::ReadLogReply(r)) => {
                log.extend_from_slice(&r.data);
                if r.end {
                    assert!(!r.not_found);
                    break;
                }
            }
            other => panic!("expected ReadLogReply, got {other:?}"),
        }
    }
    assert_eq!(log, b"hello\n");
    d.stop().await;
}

#[tokio::test]
async fn submit_is_deduplicated_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let first = client.submit(&[commit(1), commit(2)]).await;
    let again = client.submit(&[commit(2), commit(3)]).await;
    assert_eq!(first[1], again[0], "a known (repo, commit) returns its job");
    assert_ne!(again[1], first[0]);
    assert_ne!(again[1], first[1]);

    let reply = client
        .call(Submit {
            repo: REPO.into(),
            branch: "main".into(),
            commits: vec!["abc123".into()],
            ..Submit::default()
        })
        .await;
    match reply {
        Msg::Error(e) => assert!(
            e.message.contains("not a full 40-hex commit id"),
            "{}",
            e.message
        ),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(
        client.recv().await,
        None,
        "connection closed after the Error"
    );
    d.stop().await;
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let queued = client.submit(&[commit(1)]).await[0];
    match client.call(CancelJob { job_id: queued }).await {
        Msg::CancelJobReply(r) => {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.job.unwrap().status(), JobStatus::Cancelled);
        }
        other => panic!("expected CancelJobReply, got {other:?}"),
    }
    match client.call(CancelJob { job_id: queued }).await {
        Msg::CancelJobReply(r) => assert!(
            !r.ok && r.message.contains("already ended cancelled"),
            "{r:?}"
        ),
        other => panic!("expected CancelJobReply, got {other:?}"),
    }

    let running = client.submit(&[commit(2)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    let assign = runner.expect_assign().await;
    assert_eq!(assign.job_id, running);
    match client.call(CancelJob { job_id: running }).await {
        Msg::CancelJobReply(r) => assert!(r.ok, "{r:?}"),
        other => panic!("expected CancelJobReply, got {other:?}"),
    }
    match runner.recv().await {
        Some(Msg::Cancel(c)) => assert_eq!((c.job_id, c.attempt), (running, 1)),
        other => panic!("expected Cancel, got {other:?}"),
    }
    let ack = runner.finish(running, 1, JobStatus::Cancelled).await;
    assert!(ack.accepted);
    let job = client.job(running).await.unwrap();
    assert_eq!(job.status(), JobStatus::Cancelled);
    d.stop().await;
}

#[tokio::test]
async fn results_from_a_non_holder_or_for_an_unknown_job_are_refused_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut holder = d.runner("ci-1", 1).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    assert_eq!(holder.expect_assign().await.job_id, id);

    // Another runner cannot finish ci-1's lease, even with the right
    // (job, attempt).
    let mut other = d.runner("ci-2", 1).await;
    let ack = other.finish(id, 1, JobStatus::Failed).await;
    assert!(!ack.accepted);
    assert!(
        ack.message.contains("held by runner ci-1"),
        "{}",
        ack.message
    );

    // A result for a job this store never had is refused, not a reason to
    // close the connection: the runner drops it and carries on.
    let ack = other.finish(9_999, 1, JobStatus::Passed).await;
    assert!(!ack.accepted);
    assert!(ack.message.contains("no job 9999"), "{}", ack.message);
    let next = client.submit(&[commit(2)]).await[0];
    assert_eq!(other.expect_assign().await.job_id, next);
    assert!(other.finish(next, 1, JobStatus::Passed).await.accepted);

    // Even the holder cannot finish the job with a result naming another
    // commit (one issued under another life of a restored store); the
    // lease stays its own.
    let ack = holder
        .finish_commit(id, 1, JobStatus::Failed, &commit(77))
        .await;
    assert!(!ack.accepted);
    assert!(
        ack.message
            .contains(&format!("is a build of commit {}", commit(77))),
        "{}",
        ack.message
    );

    // The holder's own result still lands, naming the job's commit.
    assert!(
        holder
            .finish_commit(id, 1, JobStatus::Passed, &commit(1))
            .await
            .accepted
    );
    assert_eq!(client.job(id).await.unwrap().status(), JobStatus::Passed);
    d.stop().await;
}
