//! A dispatcher restarted on the same state directory loses nothing, and
//! runners that kept working reattach to their leases.

use std::time::Duration;

use surveil_proto::*;

use crate::harness::*;

#[tokio::test]
async fn restart_keeps_queued_and_finished_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let done = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    assert_eq!(runner.expect_assign().await.job_id, done);
    assert!(runner.finish(done, 1, JobStatus::Passed).await.accepted);
    runner.close();
    // Give the closing runner's session time to be noticed, then queue more
    // with no runner connected.
    client
        .wait_job(done, "passed", |j| j.status() == JobStatus::Passed)
        .await;
    let waiting = client.submit(&[commit(2), commit(3)]).await;
    drop(client);
    d.stop().await;

    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let jobs = match client.call(ListJobs::default()).await {
        Msg::ListJobsReply(r) => r.jobs,
        other => panic!("expected ListJobsReply, got {other:?}"),
    };
    let summary: Vec<(u64, JobStatus)> = jobs.iter().map(|j| (j.id, j.status())).collect();
    assert_eq!(
        summary,
        vec![
            (waiting[1], JobStatus::Queued),
            (waiting[0], JobStatus::Queued),
            (done, JobStatus::Passed),
        ],
        "newest first, nothing lost"
    );
    // The recovered queue is served, oldest first.
    let mut runner = d.runner("ci-1", 2).await;
    let first = runner.expect_assign().await;
    let second = runner.expect_assign().await;
    assert_eq!((first.job_id, second.job_id), (waiting[0], waiting[1]));
    // A resubmitted finished commit is not run again.
    assert_eq!(client.submit(&[commit(1)]).await, vec![done]);
    assert_eq!(runner.recv_within(Duration::from_millis(300)).await, None);
    d.stop().await;
}

#[tokio::test]
async fn a_runner_reconnecting_within_the_timeout_after_restart_keeps_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let ids = client.submit(&[commit(1), commit(2)]).await;
    let mut runner = d.runner("ci-1", 2).await;
    let a = runner.expect_assign().await;
    let b = runner.expect_assign().await;
    assert_eq!((a.job_id, b.job_id), (ids[0], ids[1]));
    drop(client);
    d.stop().await;
    drop(runner);

    let d = Dispatcher::start(fast_config(dir.path())).await;
    // Only job 1 is listed: it is kept; job 2's orphaned lease expires after
    // the runner timeout and the job is assigned again as attempt 2.
    let mut runner = d
        .runner_with_leases(
            "ci-1",
            2,
            vec![Lease {
                job_id: ids[0],
                attempt: 1,
            }],
        )
        .await;
    let again = runner.expect_assign().await;
    assert_eq!((again.job_id, again.attempt), (ids[1], 2));
    assert!(runner.finish(ids[0], 1, JobStatus::Passed).await.accepted);
    assert!(runner.finish(ids[1], 2, JobStatus::Passed).await.accepted);
    let mut client = d.client().await;
    let first = client.job(ids[0]).await.unwrap();
    assert_eq!((first.status(), first.attempt), (JobStatus::Passed, 1));
    d.stop().await;
}

#[tokio::test]
async fn a_cancel_acknowledged_before_a_restart_still_cancels_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    assert_eq!(runner.expect_assign().await.job_id, id);
    match client.call(CancelJob { job_id: id }).await {
        Msg::CancelJobReply(r) => assert!(r.ok, "{r:?}"),
        other => panic!("expected CancelJobReply, got {other:?}"),
    }
    // The dispatcher goes down before the runner acts on its Cancel.
    drop(client);
    d.stop().await;
    drop(runner);

    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut runner = d
        .runner_with_leases(
            "ci-1",
            1,
            vec![Lease {
                job_id: id,
                attempt: 1,
            }],
        )
        .await;
    match runner.recv().await {
        Some(Msg::Cancel(c)) => assert_eq!((c.job_id, c.attempt), (id, 1)),
        other => panic!("expected Cancel after the restart, got {other:?}"),
    }
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    assert!(ack.accepted);
    let mut client = d.client().await;
    let job = client.job(id).await.unwrap();
    assert_eq!(job.status(), JobStatus::Cancelled, "the cancel wins");
    d.stop().await;
}
