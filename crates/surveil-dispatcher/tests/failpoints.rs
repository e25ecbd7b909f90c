//! With the `failpoints` feature: each supervised task is made to panic;
//! the supervisor restarts it, counts it in `GetStatus`, and queued jobs
//! still reach runners.
//!
//! Failpoints are process-global, so this is its own test binary (no
//! other dispatcher in the process can trip them) and the stories run one
//! after another inside a single test. Run with
//! `cargo test -p surveil-dispatcher --features failpoints`.
#![cfg(feature = "failpoints")]

#[path = "it/harness.rs"]
mod harness;

use surveil_proto::*;

use harness::*;

#[tokio::test]
async fn each_supervised_task_restarts_after_a_panic_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let mut runner = d.runner("ci-1", 8).await;
    let mut n = 0;
    for task in ["monitor", "redistributor", "spawner"] {
        let point = match task {
            "monitor" => "monitor-tick",
            "redistributor" => "redistributor-pass",
            _ => "spawner-tick",
        };
        fail::cfg(point, "1*panic(failpoint test)").unwrap();
        // The redistributor runs a pass only when woken, so a submit is
        // what reaches its failpoint; the job must still be assigned by
        // the restarted loop.
        n += 1;
        let id = client.submit(&[commit(n)]).await[0];
        // Wait until the supervisor has counted the restart.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = client.status().await;
            if status.supervisor_restarts.get(task) == Some(&1) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{task} restart never counted: {status:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        fail::remove(point);
        // The service goes on: the job is assigned, and the runner is
        // still considered alive (the monitor's pings resumed).
        assert_eq!(runner.expect_assign().await.job_id, id);
        assert!(runner.finish(id, 1, JobStatus::Passed).await.accepted);
    }
    let status = client.status().await;
    assert_eq!(status.runners, 1);
    d.stop().await;
}

#[tokio::test]
async fn the_pruner_restarts_after_a_panic() {
    // Only a dispatcher with retention on runs pruner passes, so no other
    // test here reaches this failpoint.
    fail::cfg("pruner-pass", "1*panic(failpoint test)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.retain_logs = surveil_dispatcher::config::LogRetention::Jobs(100);
    let d = Dispatcher::start(config).await;
    let mut client = d.client().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = client.status().await;
        if status.supervisor_restarts.get("pruner") == Some(&1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pruner restart never counted: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    fail::remove("pruner-pass");
    d.stop().await;
}
