//! The store fails or stalls under a runner's report: nothing is
//! acknowledged, the runner is asked to resend on the connection it has,
//! its lease stays live, and pings go on; a store that keeps failing or
//! stalls past its deadline stops the dispatcher and starves the watchdog.

use std::sync::Arc;
use std::time::Duration;

use surveil_dispatcher::store::SqliteStore;
use surveil_proto::*;

use crate::harness::*;

fn passed(job_id: u64, attempt: u32) -> JobFinished {
    JobFinished {
        job_id,
        attempt,
        status: JobStatus::Passed.into(),
        message: String::new(),
        tasks: vec![],
        infrastructure: false,
        commit: String::new(),
    }
}

fn chunk(job_id: u64, offset: u64, data: &'static [u8]) -> Log {
    Log {
        job_id,
        attempt: 1,
        task: 0,
        stream: Stream::Stdout.into(),
        offset,
        data: data.into(),
    }
}

async fn expect_resend(runner: &mut FakeRunner) -> Resend {
    match runner.recv().await {
        Some(Msg::Resend(r)) => r,
        other => panic!("expected a Resend, got {other:?}"),
    }
}

/// Polls the job's log until it reads `want` (bounded by [`WAIT`]).
async fn wait_log(client: &mut Client, id: u64, want: &[u8]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = client.read_log(id, 0).await;
        if log == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log never read {want:?}: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_result_the_store_failed_to_record_is_resent_on_the_same_connection_and_recorded_once() {
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
    runner.send(passed(id, 1)).await;
    let resend = expect_resend(&mut runner).await;
    assert_eq!((resend.job_id, resend.attempt), (id, 1));
    assert!(resend.result && !resend.started, "{resend:?}");
    assert_eq!(resend.log_offset, None, "the log needs nothing");
    assert!(resend.retry_after_ms > 0, "{resend:?}");
    assert!(resend.message.contains("could not record"), "{resend:?}");
    let job = client.job(id).await.unwrap();
    assert_eq!(job.status(), JobStatus::Running, "nothing was recorded");
    let status = client.status().await;
    assert_eq!(
        (status.store_healthy, status.store_failures),
        (Some(false), 1)
    );

    // The same connection: no close, no Cancel, the lease still its own.
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    assert!(
        ack.accepted && ack.message.is_empty(),
        "recorded now: {ack:?}"
    );
    let again = runner.finish(id, 1, JobStatus::Passed).await;
    assert_eq!(again.message, "already recorded", "{again:?}");
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    let status = client.status().await;
    assert_eq!((status.reassignments, status.refused_results), (0, 0));
    assert_eq!(
        (status.runners, status.store_healthy, status.store_failures),
        (1, Some(true), 0)
    );
    d.stop().await;
}

#[tokio::test]
async fn a_runner_that_closes_on_a_resend_keeps_its_lease_and_its_resend_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = fast_config(dir.path());
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    runner.expect_assign().await;

    store.fail_next_commits(1);
    runner.send(passed(id, 1)).await;
    expect_resend(&mut runner).await;
    // As a runner that does not know Resend does: it closes on the
    // unknown message, then reconnects listing its lease.
    runner.close();
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
    assert!(
        ack.accepted && ack.message.is_empty(),
        "kept and recorded: {ack:?}"
    );
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    let status = client.status().await;
    assert_eq!((status.reassignments, status.refused_results), (0, 0));
    d.stop().await;
}

#[tokio::test]
async fn a_log_chunk_the_store_failed_is_resent_from_its_offset_and_the_log_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let config = fast_config(dir.path());
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    runner.expect_assign().await;
    runner.send(chunk(id, 0, b"aaa")).await;
    wait_log(&mut client, id, b"aaa").await;

    store.fail_next_commits(1);
    runner.send(chunk(id, 3, b"bbb")).await;
    let resend = expect_resend(&mut runner).await;
    assert_eq!(resend.log_offset, Some(3), "{resend:?}");
    assert!(!resend.result && !resend.started, "{resend:?}");
    // Sent before the runner acted on the Resend: past the gap, dropped.
    runner.send(chunk(id, 6, b"ccc")).await;
    // A Started after it, failing too, shows the chunk was handled (reports
    // are handled in order) and the gap still open at 3.
    store.fail_next_commits(1);
    runner
        .send(Started {
            job_id: id,
            attempt: 1,
        })
        .await;
    let resend = expect_resend(&mut runner).await;
    assert!(resend.started && !resend.result, "{resend:?}");
    assert_eq!(resend.log_offset, Some(3), "the gap is still open");
    assert!(
        client.read_log(id, 6).await.is_empty(),
        "a chunk past the gap waits for the resend"
    );
    assert_eq!(client.read_log(id, 0).await, b"aaa");

    // The resend fills the gap, and what follows is taken again.
    runner.send(chunk(id, 3, b"bbb")).await;
    runner.send(chunk(id, 6, b"ccc")).await;
    runner.send(chunk(id, 9, b"ddd")).await;
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(client.read_log(id, 0).await, b"aaabbbcccddd");
    assert_eq!(client.status().await.reassignments, 0);
    d.stop().await;
}

#[tokio::test]
async fn an_assignment_the_store_failed_leaves_the_runner_connected_and_is_made_later() {
    let dir = tempfile::tempdir().unwrap();
    let config = fast_config(dir.path());
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    // The runner's arrival writes nothing: the first write is the Assign.
    store.fail_next_commits(1);
    let mut runner = d.runner("ci-1", 1).await;
    // Retried after the pass's pause, on the same connection, and the
    // failed try did not cost an attempt.
    let assign = runner.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (id, 1));
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    assert!(ack.accepted, "{ack:?}");
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    assert_eq!(client.status().await.reassignments, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_go_on_and_the_runner_stays_while_a_write_stalls() {
    let dir = tempfile::tempdir().unwrap();
    // Pings every 100 ms, silence for 1 s loses a runner: the stall lasts
    // 2.5 runner timeouts.
    let config = fast_config(dir.path());
    let store = SqliteStore::open(&config.state_dir).unwrap();
    let d = Dispatcher::start_on(config, Arc::new(store.clone())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    runner.expect_assign().await;

    store.stall_next_commits(1, Duration::from_millis(2500));
    runner.send(chunk(id, 0, b"slow disk\n")).await;
    let before = runner.pings.load(std::sync::atomic::Ordering::SeqCst);
    // Behind the stalled write in the session's order: answered after it.
    let ack = runner.finish(id, 1, JobStatus::Passed).await;
    let during = runner.pings.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(ack.accepted, "the runner kept its lease: {ack:?}");
    assert!(
        during >= 10,
        "pings stopped while the write stalled ({during} in 2.5 s at 100 ms)"
    );
    let job = client.job(id).await.unwrap();
    assert_eq!((job.status(), job.attempt), (JobStatus::Passed, 1));
    assert_eq!(client.read_log(id, 0).await, b"slow disk\n");
    let status = client.status().await;
    assert_eq!((status.runners, status.reassignments), (1, 0));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stalled_past_the_deadline_stops_the_dispatcher_and_starves_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.store_write_timeout = Duration::from_millis(300);
    let store = SqliteStore::open(&config.state_dir).unwrap();
    // The test plays systemd: it binds the notify socket, and feeds the
    // dispatcher's gate to the keep-alives (every 50 ms).
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let gate = surveil_common::notify::WatchdogGate::default();
    let watching = tokio_util::sync::CancellationToken::new();
    surveil_common::notify::spawn_watchdog_to(
        socket_path,
        Duration::from_millis(100),
        watching.clone(),
        gate.clone(),
    );
    let hooks = surveil_dispatcher::Hooks::default().watchdog(gate);
    let d = Dispatcher::start_hooked(config, Arc::new(store.clone()), hooks).await;
    let mut client = d.client().await;
    client.submit(&[commit(1)]).await;
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("fed while healthy")
            .unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }

    store.stall_next_commits(1, Duration::from_secs(3));
    client
        .conn
        .send(Submit {
            repo: REPO.to_owned(),
            branch: "main".to_owned(),
            commits: vec![commit(2)],
            ..Submit::default()
        })
        .await
        .unwrap();
    // Keep-alives stop once the write passes the deadline: a silence of
    // 20 intervals comes (bounded: each datagram read restarts the wait,
    // and 100 of them at 50 ms would outlast the stall many times).
    let mut starved = false;
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
            Ok(received) => {
                received.unwrap();
            }
            Err(_) => {
                starved = true;
                break;
            }
        }
    }
    assert!(starved, "the watchdog was fed all along");
    let err = format!("{:#}", d.exited().await.unwrap_err());
    assert!(err.contains("--store-write-timeout"), "{err}");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf))
            .await
            .is_err(),
        "fed again after the fail-stop"
    );
    watching.cancel();
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
