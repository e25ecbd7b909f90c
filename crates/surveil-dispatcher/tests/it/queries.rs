//! Client queries: jobs by filter, runners, status, following a log.

use surveil_proto::*;

use crate::harness::*;

#[tokio::test]
async fn list_jobs_filters_runners_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let ids = client.submit(&[commit(1), commit(2), commit(3)]).await;
    let mut runner = d.runner("ci-1", 1).await;
    assert_eq!(runner.expect_assign().await.job_id, ids[0]);

    let list = |status: JobStatus, limit: u32| ListJobs {
        repo: Some(REPO.into()),
        status: status as i32,
        limit,
        ..ListJobs::default()
    };
    match client.call(list(JobStatus::Queued, 0)).await {
        Msg::ListJobsReply(r) => assert_eq!(
            r.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[2], ids[1]]
        ),
        other => panic!("{other:?}"),
    }
    match client.call(list(JobStatus::Unspecified, 1)).await {
        Msg::ListJobsReply(r) => assert_eq!(
            r.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[2]]
        ),
        other => panic!("{other:?}"),
    }
    match client
        .call(ListJobs {
            repo: Some("/other".into()),
            ..ListJobs::default()
        })
        .await
    {
        Msg::ListJobsReply(r) => assert!(r.jobs.is_empty()),
        other => panic!("{other:?}"),
    }
    match client.call(ListRunners {}).await {
        Msg::ListRunnersReply(r) => {
            assert_eq!(r.runners.len(), 1);
            let info = &r.runners[0];
            assert_eq!((info.name.as_str(), info.slots), ("ci-1", 1));
            assert_eq!(info.running, vec![ids[0]]);
            assert!(info.addr.starts_with("127.0.0.1:"));
            assert!(info.last_seen_ms > 0);
        }
        other => panic!("{other:?}"),
    }
    let status = client.status().await;
    assert_eq!((status.runners, status.queued, status.running), (1, 2, 1));
    assert_eq!(status.supervisor_restarts.len(), 4);
    assert!(status.supervisor_restarts.values().all(|n| *n == 0));
    assert_eq!(client.job(9999).await, None);
    d.stop().await;
}

#[tokio::test]
async fn read_log_follow_streams_until_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = Dispatcher::start(fast_config(dir.path())).await;
    let mut client = d.client().await;
    let id = client.submit(&[commit(1)]).await[0];
    let mut runner = d.runner("ci-1", 1).await;
    runner.expect_assign().await;

    let mut follower = d.client().await;
    follower
        .conn
        .send(ReadLog {
            job_id: id,
            offset: 0,
            follow: true,
            ..ReadLog::default()
        })
        .await
        .unwrap();
    let chunk = |offset: u64, data: &'static str| Log {
        job_id: id,
        attempt: 1,
        task: 0,
        stream: Stream::Stdout as i32,
        offset,
        data: data.into(),
    };
    runner.send(chunk(0, "one\n")).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match follower.recv().await {
            Some(Msg::ReadLogReply(r)) => {
                assert!(!r.end, "the job is still running");
                seen.extend_from_slice(&r.data);
            }
            other => panic!("{other:?}"),
        }
    }
    runner.send(chunk(4, "two\n")).await;
    // A resent chunk changes nothing.
    runner.send(chunk(0, "one\n")).await;
    assert!(runner.finish(id, 1, JobStatus::Passed).await.accepted);
    loop {
        match follower.recv().await {
            Some(Msg::ReadLogReply(r)) => {
                seen.extend_from_slice(&r.data);
                if r.end {
                    assert_eq!(r.status(), JobStatus::Passed);
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, b"one\ntwo\n");

    follower
        .conn
        .send(ReadLog {
            job_id: 4242,
            offset: 0,
            follow: true,
            ..ReadLog::default()
        })
        .await
        .unwrap();
    match follower.recv().await {
        Some(Msg::ReadLogReply(r)) => assert!(r.end && r.not_found),
        other => panic!("{other:?}"),
    }
    d.stop().await;
}
