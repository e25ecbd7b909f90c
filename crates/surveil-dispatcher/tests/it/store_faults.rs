//! The store fails under a runner's report: nothing is acknowledged, the
//! runner is sent away to resend, and its lease waits for it.

use std::sync::Arc;

use surveil_dispatcher::store::SqliteStore;
use surveil_proto::*;

use crate::harness::*;

#[tokio::test]
async fn a_result_the_store_failed_to_record_is_resent_after_reconnecting_and_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = fast_config(dir.path());
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    let assign = runner.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (id, 1));

    store.fail_next_commits(1);
    runner
        .send(JobFinished {
            job_id: id,
            attempt: 1,
            status: JobStatus::Passed.into(),
            message: String::new(),
            tasks: vec![],
            infrastructure: false,
            commit: String::new(),
        })
        .await;
    match runner.recv().await {
        Some(Msg::Error(e)) => assert!(e.message.contains("reconnect and resend"), "{e:?}"),
        other => panic!("expected an Error, no ResultAck; got {other:?}"),
    }
    assert_eq!(
        runner.recv().await,
        None,
        "the dispatcher closed the connection"
    );
    drop(runner);
    let job = client.job(id).await.unwrap();
    assert_eq!(job.status(), JobStatus::Running, "nothing was recorded");

    // Back with its lease: kept (no Cancel, no new Assign), and the resend
    // is recorded.
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
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    assert!(ack.accepted, "{ack:?}");
    assert!(ack.message.is_empty(), "recorded now, not before: {ack:?}");
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    let status = client.status().await;
    assert_eq!((status.reassignments, status.refused_results), (0, 0));
    d.stop().await;
}

#[tokio::test]
async fn writes_failing_in_a_row_make_the_dispatcher_stop_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.max_store_failures = 2;
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    store.fail_next_commits(10);
    // Each failed submit closes its client's connection; two in a row trip
    // the fail-stop.
    for n in 1..=2 {
        let mut client = d.client().await;
        client
            .conn
            .send(Submit {
                repo: REPO.to_owned(),
                branch: "main".to_owned(),
                commits: vec![commit(n)],
                ..Submit::default()
            })
            .await
            .unwrap();
        match client.recv().await {
            Some(Msg::Error(e)) => assert!(e.message.contains("could not store"), "{e:?}"),
            other => panic!("expected an Error, got {other:?}"),
        }
    }
    let err = d.exited().await.unwrap_err().to_string();
    assert!(
        err.contains("failed 2 writes in a row") && err.contains("restarts the dispatcher"),
        "{err}"
    );
}
