//! Runners that die, go quiet, come back, or report too late.

use std::time::Duration;

use surveil_proto::*;

use crate::harness::*;

#[tokio::test]
async fn closed_connection_requeues_to_the_other_runner_as_attempt_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut a = d.runner("ci-a", 1).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    assert_eq!(a.expect_assign().await.attempt, 1);

    let mut b = d.runner("ci-b", 1).await;
    a.close();
    let assign = b.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (id, 2));
    let job = client.job(id).await.unwrap();
    assert_eq!(job.runner.as_deref(), Some("ci-b"));
    assert_eq!(client.status().await.reassignments, 1);
    d.stop().await;
}

#[tokio::test]
async fn silent_runner_is_declared_dead_after_the_timeout_and_its_result_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut quiet = d.runner("ci-quiet", 1).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    assert_eq!(quiet.expect_assign().await.attempt, 1);
    let mut alive = d.runner("ci-alive", 1).await;
    quiet.go_silent();

    // The alive runner keeps answering pings; the quiet one is dropped after
    // the runner timeout and its job moves over as attempt 2.
    let assign = alive.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (id, 2));
    match quiet.recv().await {
        Some(Msg::Error(e)) => assert!(e.message.contains("runner timeout"), "{}", e.message),
        other => panic!("expected an Error before the close, got {other:?}"),
    }

    // The quiet runner's late result (over a new connection) is refused and
    // overwrites nothing; the live attempt's result is recorded.
    let mut late = d.runner("ci-quiet", 1).await;
    let ack = late.finish(id, 1, JobStatus::Passed).await;
    assert!(!ack.accepted, "{ack:?}");
    assert!(ack.message.contains("revoked"), "{}", ack.message);
    let job = client.job(id).await.unwrap();
    assert_eq!(job.status(), JobStatus::Running);
    assert_eq!(job.attempt, 2);

    let ack = alive.finish(id, 2, JobStatus::Failed).await;
    assert!(ack.accepted);
    let job = client.job(id).await.unwrap();
    assert_eq!(
        job.status(),
        JobStatus::Failed,
        "a test failure is recorded, not retried"
    );
    assert_eq!(job.runner.as_deref(), Some("ci-alive"));

    // A resend of the recorded result is acknowledged again; the stale one
    // is still refused.
    assert!(alive.finish(id, 2, JobStatus::Failed).await.accepted);
    assert!(!late.finish(id, 1, JobStatus::Passed).await.accepted);
    assert_eq!(client.job(id).await.unwrap().status(), JobStatus::Failed);
    assert_eq!(client.status().await.refused_results, 2);
    d.stop().await;
}

#[tokio::test]
async fn reconnect_listing_the_lease_while_the_old_session_lives_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut old = d.runner("ci-1", 1).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    assert_eq!(old.expect_assign().await.attempt, 1);

    let mut new = d
        .runner_with_leases(
            "ci-1",
            1,
            vec![Lease {
                job_id: id,
                attempt: 1,
            }],
        )
        .await;
    match old.recv().await {
        Some(Msg::Error(e)) => assert!(e.message.contains("replaced"), "{}", e.message),
        other => panic!("expected the old session to be closed, got {other:?}"),
    }
    // No reassignment: nothing but pings for a few heartbeats.
    assert_eq!(new.recv_within(Duration::from_millis(500)).await, None);
    assert!(new.finish(id, 1, JobStatus::Passed).await.accepted);
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    d.stop().await;
}

#[tokio::test]
async fn a_job_whose_runners_keep_dying_ends_error_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.max_attempts = 2;
    let d = Dispatcher::start(config).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    for attempt in 1..=2 {
        let mut r = d.runner("ci-1", 1).await;
        assert_eq!(r.expect_assign().await.attempt, attempt);
        r.close();
    }
    let job = client
        .wait_job(id, "error", |j| j.status() == JobStatus::Error)
        .await;
    let message = job.message.unwrap_or_default();
    assert!(message.contains("runners were lost"), "{message}");
    d.stop().await;
}
