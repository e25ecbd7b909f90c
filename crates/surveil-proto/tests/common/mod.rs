//! Sample messages shared by the test binaries: one of every `Envelope`
//! arm, each with every field set to a non-default value so a field that
//! fails to round-trip cannot hide behind its zero value.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use surveil_proto::*;
use tokio_util::codec::Encoder;

/// Every arm of [`Msg`], in tag order.
pub fn every_message() -> Vec<Msg> {
    let msgs = vec![
        Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Runner as i32,
            name: "ci-1".into(),
            token: "s3cret".into(),
            slots: 4,
            labels: vec!["linux".into(), "x86_64".into()],
            repos: vec!["/srv/git/app".into(), "https://example.org/lib.git".into()],
            leases: vec![
                Lease {
                    job_id: 7,
                    attempt: 2,
                },
                Lease {
                    job_id: u64::MAX,
                    attempt: u32::MAX,
                },
            ],
            client_version: "0.1.0".into(),
            epoch: "0123456789abcdef0123456789abcdef".into(),
        }),
        Msg::Welcome(Welcome {
            session_id: "s-42".into(),
            heartbeat_interval_ms: 1000,
            runner_timeout_ms: 5000,
            server_version: "0.1.0".into(),
            epoch: "0123456789abcdef0123456789abcdef".into(),
        }),
        Msg::Reject(Reject {
            code: RejectCode::ShuttingDown as i32,
            message: "shutting down, retry later".into(),
            leader_addr: String::new(),
        }),
        Msg::Reject(Reject {
            code: RejectCode::NotLeader as i32,
            message: "this dispatcher is a standby".into(),
            leader_addr: "10.0.0.2:9000".into(),
        }),
        Msg::Error(Error {
            message: "a runner may not send Submit".into(),
        }),
        Msg::Submit(Submit {
            repo: "/srv/git/app".into(),
            branch: "main".into(),
            commits: vec![commit('a'), commit('b')],
            r#ref: "refs/pull/12/head".into(),
            pull_request: Some(12),
        }),
        Msg::SubmitAck(SubmitAck {
            job_ids: vec![1, 2, 1 << 40],
            created: vec![true, false, true],
        }),
        Msg::Assign(Assign {
            job_id: 9,
            attempt: 3,
            repo: "/srv/git/app".into(),
            branch: "feature/x".into(),
            commit: commit('c'),
            r#ref: "refs/heads/feature/x".into(),
        }),
        Msg::Ping(Ping { seq: 12345 }),
        Msg::Pong(Pong { seq: 12345 }),
        Msg::Cancel(Cancel {
            job_id: 9,
            attempt: 3,
        }),
        Msg::Started(Started {
            job_id: 9,
            attempt: 3,
        }),
        Msg::Log(Log {
            job_id: 9,
            attempt: 3,
            task: 1,
            stream: Stream::Stderr as i32,
            offset: 4096,
            data: Bytes::from_static(b"error: \xff not utf-8\n"),
        }),
        Msg::JobFinished(JobFinished {
            job_id: 9,
            attempt: 3,
            status: JobStatus::Failed as i32,
            message: "task unit failed".into(),
            tasks: vec![task_result(), {
                let mut skipped = task_result();
                skipped.name = "lint".into();
                skipped.status = TaskStatus::Skipped as i32;
                skipped.exit_code = None;
                skipped.signal = Some(9);
                skipped
            }],
            infrastructure: false,
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
        }),
        Msg::ResultAck(ResultAck {
            job_id: 9,
            attempt: 3,
            accepted: true,
            message: "recorded".into(),
        }),
        Msg::Resend(Resend {
            job_id: 9,
            attempt: 3,
            log_offset: Some(4096),
            result: true,
            retry_after_ms: 1000,
            message: "store: committing the write batch failed: disk full".into(),
            started: false,
        }),
        Msg::Drain(Drain {
            deadline_ms: 300_000,
        }),
        Msg::HandBack(HandBack {
            job_id: 9,
            attempt: 3,
            started: true,
            reason: "runner ci-3 draining: cut off by its drain timeout".into(),
        }),
        Msg::ListJobs(ListJobs {
            repo: Some("/srv/git/app".into()),
            status: JobStatus::Running as i32,
            limit: 100,
            branch: Some("main".into()),
            pull_request: Some(3),
            before: Some(9),
        }),
        Msg::ListJobsReply(ListJobsReply {
            jobs: vec![job_info(7), job_info(8)],
            more: true,
        }),
        Msg::GetJob(GetJob { job_id: 7 }),
        Msg::GetJobReply(GetJobReply {
            job: Some(job_info(7)),
        }),
        Msg::ReadLog(ReadLog {
            job_id: 7,
            offset: 10,
            follow: true,
            attempt: 2,
        }),
        Msg::ReadLogReply(ReadLogReply {
            job_id: 7,
            attempt: 2,
            offset: 10,
            data: Bytes::from_static(b"building\n"),
            end: true,
            not_found: true,
            status: JobStatus::Passed as i32,
        }),
        Msg::ListRunners(ListRunners {}),
        Msg::ListRunnersReply(ListRunnersReply {
            runners: vec![RunnerInfo {
                name: "ci-1".into(),
                addr: "127.0.0.1:53412".into(),
                slots: 2,
                running: vec![7, 8],
                last_seen_ms: 1_764_300_000_123,
                labels: vec!["linux".into()],
                repos: vec!["/srv/git/app".into()],
                identity: "token:ci-1".into(),
                quarantined_until_ms: 1_764_300_300_000,
                infra_failures: 3,
                draining: true,
            }],
        }),
        Msg::GetStatus(GetStatus {}),
        Msg::GetStatusReply(GetStatusReply {
            version: "0.1.0".into(),
            uptime_s: 12,
            runners: 2,
            queued: 3,
            running: 1,
            supervisor_restarts: BTreeMap::from([
                ("monitor".to_owned(), 1),
                ("redistributor".to_owned(), 0),
                ("spawner".to_owned(), 2),
            ]),
            reassignments: 4,
            refused_results: 5,
            quarantined: 1,
            draining: 1,
            leader_addr: "10.0.0.1:9000".into(),
            standby: false,
            leader_term: 3,
            epoch: "0123456789abcdef0123456789abcdef".into(),
            store_healthy: Some(false),
            store_failures: 2,
        }),
        Msg::CancelJob(CancelJob { job_id: 7 }),
        Msg::CancelJobReply(CancelJobReply {
            ok: false,
            message: "job 7 already finished".into(),
            job: Some(job_info(7)),
        }),
        Msg::RerunJob(RerunJob { job_id: 7 }),
        Msg::RerunJobReply(RerunJobReply {
            ok: true,
            message: "job 7 queued again (attempt 3 next)".into(),
            job: Some(JobInfo {
                attempts: vec![AttemptInfo {
                    attempt: 2,
                    runner: "ci-1".into(),
                    status: JobStatus::Failed as i32,
                    message: Some("a task failed".into()),
                    assigned_at_ms: 1_700_000_000_000,
                    started_at_ms: Some(1_700_000_000_100),
                    finished_at_ms: Some(1_700_000_001_000),
                    tasks: Vec::new(),
                    log_bytes: 4_096,
                    log_truncated: false,
                    log_pruned: true,
                }],
                ..job_info(7)
            }),
        }),
        Msg::Prune(Prune {
            older_than_ms: Some(30 * 86_400_000),
            keep_jobs: None,
        }),
        Msg::PruneReply(PruneReply {
            ok: true,
            message: "deleted the logs of 3 attempts (12288 bytes)".into(),
            attempts: 3,
            bytes: 12_288,
        }),
    ];
    // Exhaustive on purpose: a new arm in the .proto stops this compiling
    // until a sample of it is added above.
    let mut seen = [false; 33];
    for msg in &msgs {
        let index = match msg {
            Msg::Hello(_) => 0,
            Msg::Welcome(_) => 1,
            Msg::Reject(_) => 2,
            Msg::Error(_) => 3,
            Msg::Submit(_) => 4,
            Msg::SubmitAck(_) => 5,
            Msg::Assign(_) => 6,
            Msg::Ping(_) => 7,
            Msg::Pong(_) => 8,
            Msg::Cancel(_) => 9,
            Msg::Started(_) => 10,
            Msg::Log(_) => 11,
            Msg::JobFinished(_) => 12,
            Msg::ResultAck(_) => 13,
            Msg::ListJobs(_) => 14,
            Msg::ListJobsReply(_) => 15,
            Msg::GetJob(_) => 16,
            Msg::GetJobReply(_) => 17,
            Msg::ReadLog(_) => 18,
            Msg::ReadLogReply(_) => 19,
            Msg::ListRunners(_) => 20,
            Msg::ListRunnersReply(_) => 21,
            Msg::GetStatus(_) => 22,
            Msg::GetStatusReply(_) => 23,
            Msg::CancelJob(_) => 24,
            Msg::CancelJobReply(_) => 25,
            Msg::RerunJob(_) => 26,
            Msg::RerunJobReply(_) => 27,
            Msg::Prune(_) => 28,
            Msg::PruneReply(_) => 29,
            Msg::Resend(_) => 30,
            Msg::Drain(_) => 31,
            Msg::HandBack(_) => 32,
        };
        seen[index] = true;
    }
    assert!(seen.iter().all(|s| *s), "a Msg arm has no sample");
    msgs
}

pub fn commit(c: char) -> String {
    std::iter::repeat_n(c, 40).collect()
}

pub fn task_result() -> TaskResult {
    TaskResult {
        name: "unit".into(),
        status: TaskStatus::Failed as i32,
        exit_code: Some(101),
        signal: None,
        duration_ms: 1234,
        message: "exited with 101".into(),
        started_at_ms: Some(1_700_000_000_000),
        report: Some(surveil_proto::TestReport {
            passed: 3,
            failed: 1,
            skipped: 0,
            failing: vec!["m.bad".into()],
            problems: vec![],
        }),
    }
}

pub fn job_info(id: u64) -> JobInfo {
    JobInfo {
        id,
        repo: "/srv/git/app".into(),
        branch: "main".into(),
        commit: commit('d'),
        status: JobStatus::Error as i32,
        attempt: 2,
        runner: Some("ci-1".into()),
        message: Some("runners lost too often".into()),
        queued_at_ms: 1_764_300_000_000,
        started_at_ms: Some(1_764_300_001_000),
        finished_at_ms: Some(1_764_300_002_000),
        tasks: vec![task_result()],
        r#ref: "refs/merge-requests/4/head".into(),
        pull_request: Some(4),
        log_truncated: true,
        attempts: Vec::new(),
        reason: None,
    }
}

/// `msgs` encoded back to back as one byte stream.
pub fn encode_stream(msgs: &[Msg]) -> BytesMut {
    let mut codec = Codec::new();
    let mut buf = BytesMut::new();
    for msg in msgs {
        codec
            .encode(Envelope::from(msg.clone()), &mut buf)
            .expect("sample encodes");
    }
    buf
}

/// One frame with a hand-made body: for bytes the encoder would never write.
pub fn raw_frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("test body fits a frame");
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}
