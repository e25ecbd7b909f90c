//! The real `surveil` binary against a fake dispatcher: a
//! `surveil_proto::Connection` on 127.0.0.1:0 that checks the token,
//! records each request and answers with canned replies. Each test is one
//! thing a user or script relies on: the JSON fields, the exit codes, the
//! error messages, the streamed log.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use surveil_proto::{
    CancelJobReply, Connection, GetJobReply, GetStatusReply, JobInfo, JobStatus, ListJobsReply,
    ListRunnersReply, Msg, ReadLogReply, RejectCode, RunnerInfo, SubmitAck, TaskResult, TaskStatus,
    Welcome,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::Notify;

/// The most any one run of the binary may take; it normally takes
/// milliseconds.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// 2026-11-28T04:00:00.123Z.
const QUEUED_MS: u64 = 1_795_838_400_123;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the fake dispatcher does in answer to one request.
// A few per test: boxing the message would only add noise.
#[allow(clippy::large_enum_variant)]
enum Step {
    Send(Msg),
    /// Waits until the test says go, so it can watch the CLI's output
    /// before the rest is sent.
    WaitFor(Arc<Notify>),
}

type Answer = Box<dyn Fn(&Msg) -> Vec<Step> + Send + Sync>;

struct FakeDispatcher {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Msg>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDispatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDispatcher {
    /// Listens on 127.0.0.1:0; accepts clients whose token is `token`
    /// (empty: no token) and answers each request with `answer`'s steps.
    async fn start(token: &'static str, answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let answer = Arc::new(answer);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut conn = Connection::new(stream);
                    let Ok(hello) = conn.accept_hello(Duration::from_secs(5)).await else {
                        return;
                    };
                    if hello.token != token {
                        conn.reject(
                            RejectCode::BadToken,
                            "the token does not match the dispatcher's",
                        )
                        .await;
                        return;
                    }
                    let welcome = Welcome {
                        session_id: "s-1".into(),
                        heartbeat_interval_ms: 1000,
                        runner_timeout_ms: 5000,
                        server_version: "fake".into(),
                        epoch: String::new(),
                    };
                    if conn.send(welcome).await.is_err() {
                        return;
                    }
                    while let Ok(Some(msg)) = conn.recv().await {
                        let steps = answer(&msg);
                        seen.lock().unwrap().push(msg);
                        for step in steps {
                            match step {
                                Step::Send(reply) => {
                                    if conn.send(reply).await.is_err() {
                                        return;
                                    }
                                }
                                Step::WaitFor(go) => go.notified().await,
                            }
                        }
                    }
                });
            }
        });
        FakeDispatcher {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<Msg> {
        self.requests.lock().unwrap().clone()
    }
}

/// The binary with a clean `SURVEIL_*` environment.
fn surveil(addr: SocketAddr, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surveil"));
    for var in [
        "SURVEIL_DISPATCH",
        "SURVEIL_TOKEN",
        "SURVEIL_TOKEN_FILE",
        "SURVEIL_CONFIG",
        "SURVEIL_JSON",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--dispatch")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command) -> Output {
    tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .expect("surveil finished in time")
        .expect("surveil ran")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn job(id: u64, status: JobStatus) -> JobInfo {
    let finished = status.is_final();
    JobInfo {
        id,
        repo: "/srv/git/app".into(),
        branch: "main".into(),
        commit: COMMIT.into(),
        status: status as i32,
        attempt: 2,
        runner: Some("ci-3".into()),
        message: None,
        queued_at_ms: QUEUED_MS,
        started_at_ms: Some(QUEUED_MS + 1_000),
        finished_at_ms: finished.then_some(QUEUED_MS + 13_000),
        r#ref: "refs/heads/main".into(),
        attempts: Vec::new(),
        tasks: if finished {
            vec![TaskResult {
                name: "unit".into(),
                status: TaskStatus::Passed as i32,
                exit_code: Some(0),
                signal: None,
                duration_ms: 12,
                message: String::new(),
                ..TaskResult::default()
            }]
        } else {
            Vec::new()
        },
        ..JobInfo::default()
    }
}

/// The contract's keys, then the compatible additions (issue 18).
const JOB_KEYS: [&str; 14] = [
    "id",
    "repo",
    "branch",
    "commit",
    "status",
    "attempt",
    "runner",
    "message",
    "queued_at",
    "started_at",
    "finished_at",
    "tasks",
    "ref",
    "pull_request",
];

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn jobs_pages_through_replies_the_dispatcher_cut_short() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            // The first page stops at job 7 and says more follow; the next
            // request must ask below it, with the filters kept.
            Msg::ListJobs(q) if q.before.is_none() => {
                vec![Step::Send(Msg::ListJobsReply(ListJobsReply {
                    jobs: vec![job(8, JobStatus::Running), job(7, JobStatus::Passed)],
                    more: true,
                }))]
            }
            Msg::ListJobs(q)
                if q.before == Some(7) && q.repo.as_deref() == Some("/srv/git/app") =>
            {
                vec![Step::Send(Msg::ListJobsReply(ListJobsReply {
                    jobs: vec![job(6, JobStatus::Failed)],
                    more: false,
                }))]
            }
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(
        fake.addr,
        &["jobs", "--repo", "/srv/git/app", "--limit", "0", "--json"],
    ))
    .await;
    let jobs = stdout_json(&out);
    let ids: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![8, 7, 6]);
}

#[tokio::test]
async fn jobs_json_is_an_array_of_contract_jobs_and_sends_the_filters() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::ListJobs(_) => vec![Step::Send(Msg::ListJobsReply(ListJobsReply {
                jobs: vec![job(8, JobStatus::Running), job(7, JobStatus::Passed)],
                more: false,
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(
        fake.addr,
        &[
            "jobs",
            "--repo",
            "/srv/git/app",
            "--status",
            "running",
            "--limit",
            "5",
            "--branch",
            "release/2",
            "--pr",
            "31",
            "--json",
        ],
    ))
    .await;
    let jobs = stdout_json(&out);
    let jobs = jobs.as_array().expect("an array");
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        jobs[0]["id"], 8,
        "newest first, as the dispatcher sent them"
    );
    for job in jobs {
        assert_eq!(keys(job), sorted(&JOB_KEYS));
    }
    assert_eq!(jobs[0]["status"], "running");
    assert_eq!(jobs[0]["finished_at"], Value::Null);
    assert_eq!(jobs[1]["finished_at"], "2026-11-28T04:00:13.123Z");
    assert_eq!(jobs[1]["queued_at"], "2026-11-28T04:00:00.123Z");

    let requests = fake.requests();
    let [Msg::ListJobs(query)] = requests.as_slice() else {
        panic!("expected one ListJobs, got {requests:?}");
    };
    assert_eq!(query.repo.as_deref(), Some("/srv/git/app"));
    assert_eq!(query.status(), JobStatus::Running);
    assert_eq!(query.limit, 5);
    assert_eq!(query.branch.as_deref(), Some("release/2"));
    assert_eq!(query.pull_request, Some(31));
}

#[tokio::test]
async fn jobs_without_json_is_an_uncoloured_table_when_piped() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::ListJobs(_) => vec![Step::Send(Msg::ListJobsReply(ListJobsReply {
                jobs: vec![job(8, JobStatus::Running), job(7, JobStatus::Passed)],
                more: false,
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(fake.addr, &["jobs"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("ID  STATUS   ATTEMPT  RUNNER  COMMIT        BRANCH  REPO"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(" 8  running        2  ci-3    0123456789ab  main    /srv/git/app"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour on a pipe: {text:?}");
}

#[tokio::test]
async fn job_json_is_one_contract_job_with_tasks() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::GetJob(get) => vec![Step::Send(Msg::GetJobReply(GetJobReply {
                job: Some(job(get.job_id, JobStatus::Passed)),
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(fake.addr, &["job", "7", "--json"])).await;
    let job = stdout_json(&out);
    // The contract's keys plus `attempts` and `log_truncated` (compatible
    // extensions).
    let mut expected = JOB_KEYS.to_vec();
    expected.extend(["attempts", "log_truncated"]);
    assert_eq!(keys(&job), sorted(&expected));
    assert_eq!(job["attempts"], serde_json::json!([]));
    assert_eq!(job["log_truncated"], false);
    assert_eq!(job["id"], 7);
    assert_eq!(job["commit"], COMMIT);
    assert_eq!(job["runner"], "ci-3");
    assert_eq!(job["message"], Value::Null);
    assert_eq!(job["ref"], "refs/heads/main");
    assert_eq!(job["pull_request"], Value::Null);
    assert_eq!(
        job["tasks"],
        serde_json::json!([{"name": "unit", "status": "passed", "exit_code": 0,
                            "signal": null, "duration_ms": 12, "message": null}])
    );
}

#[tokio::test]
async fn unknown_job_exits_1_saying_no_job() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::GetJob(_) => vec![Step::Send(Msg::GetJobReply(GetJobReply { job: None }))],
            Msg::ReadLog(read) => vec![Step::Send(Msg::ReadLogReply(ReadLogReply {
                job_id: read.job_id,
                end: true,
                not_found: true,
                ..ReadLogReply::default()
            }))],
            _ => vec![],
        }),
    )
    .await;
    for args in [
        &["job", "42"][..],
        &["logs", "42"],
        &["job", "42", "--json"],
    ] {
        let out = output(surveil(fake.addr, args)).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out), "surveil: no job 42\n", "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn status_json_always_has_the_supervisor_restart_keys() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::GetStatus(_) => vec![Step::Send(Msg::GetStatusReply(GetStatusReply {
                version: "0.1.0".into(),
                uptime_s: 12,
                runners: 2,
                queued: 0,
                running: 1,
                reassignments: 1,
                ..GetStatusReply::default()
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(fake.addr, &["--json", "status"])).await;
    let status = stdout_json(&out);
    assert_eq!(
        status,
        serde_json::json!({"version": "0.1.0", "uptime_s": 12, "runners": 2, "queued": 0,
            "running": 1, "supervisor_restarts": {"monitor": 0, "redistributor": 0, "spawner": 0},
            "reassignments": 1, "refused_results": 0, "quarantined": 0})
    );
}

#[tokio::test]
async fn runners_json_has_the_contract_fields() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::ListRunners(_) => vec![Step::Send(Msg::ListRunnersReply(ListRunnersReply {
                runners: vec![RunnerInfo {
                    name: "ci-3".into(),
                    addr: "127.0.0.1:53412".into(),
                    slots: 2,
                    running: vec![7, 9],
                    last_seen_ms: QUEUED_MS,
                    labels: vec!["linux".into()],
                    repos: vec!["/srv/git/app".into()],
                    identity: String::new(),
                    ..RunnerInfo::default()
                }],
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(fake.addr, &["runners", "--json"])).await;
    assert_eq!(
        stdout_json(&out),
        serde_json::json!([{"name": "ci-3", "addr": "127.0.0.1:53412", "slots": 2,
            "running": [7, 9], "last_seen": "2026-11-28T04:00:00.123Z"}])
    );
}

#[tokio::test]
async fn logs_follow_prints_chunks_as_they_arrive_until_the_end() {
    let go = Arc::new(Notify::new());
    let chunk = |attempt: u32, offset: u64, data: &str, end: bool| {
        Step::Send(Msg::ReadLogReply(ReadLogReply {
            job_id: 7,
            attempt,
            offset,
            data: data.as_bytes().to_vec().into(),
            end,
            not_found: false,
            status: if end {
                JobStatus::Passed
            } else {
                JobStatus::Running
            } as i32,
        }))
    };
    let wait = go.clone();
    let fake = FakeDispatcher::start(
        "",
        Box::new(move |msg| match msg {
            Msg::ReadLog(_) => vec![
                chunk(1, 0, "one\n", false),
                Step::WaitFor(wait.clone()),
                chunk(1, 4, "two\n", false),
                chunk(2, 0, "three\n", false),
                chunk(2, 6, "", true),
            ],
            _ => vec![],
        }),
    )
    .await;
    let mut cmd = surveil(fake.addr, &["logs", "7", "--follow"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();

    // The first chunk must reach stdout while the dispatcher still holds
    // the rest back: output is streamed, not collected until the end.
    let mut seen = Vec::new();
    let first = tokio::time::timeout(RUN_LIMIT, async {
        let mut buf = [0u8; 64];
        while !seen.ends_with(b"one\n") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "stdout closed before the first chunk");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(first.is_ok(), "the first chunk never appeared: {seen:?}");
    go.notify_one();

    let rest = tokio::time::timeout(RUN_LIMIT, stdout.read_to_end(&mut seen)).await;
    assert!(rest.is_ok(), "the log did not end");
    let status = tokio::time::timeout(RUN_LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        String::from_utf8(seen).unwrap(),
        "one\ntwo\n--- attempt 2 (job was reassigned) ---\nthree\n"
    );
    let requests = fake.requests();
    let [Msg::ReadLog(read)] = requests.as_slice() else {
        panic!("expected one ReadLog, got {requests:?}");
    };
    assert_eq!((read.job_id, read.offset, read.follow), (7, 0, true));
}

#[tokio::test]
async fn submit_sends_the_canonical_path_of_a_relative_repo() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::Submit(_) => vec![Step::Send(Msg::SubmitAck(SubmitAck {
                job_ids: vec![7],
                created: vec![true],
            }))],
            _ => vec![],
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("app")).unwrap();
    let upper = COMMIT.to_ascii_uppercase();
    let mut cmd = surveil(
        fake.addr,
        &["submit", "./app", &upper, "--branch", "dev", "--json"],
    );
    cmd.current_dir(dir.path());
    let out = output(cmd).await;
    assert_eq!(stdout_json(&out), serde_json::json!({"job_ids": [7]}));

    let canonical = std::fs::canonicalize(dir.path().join("app")).unwrap();
    let requests = fake.requests();
    let [Msg::Submit(submit)] = requests.as_slice() else {
        panic!("expected one Submit, got {requests:?}");
    };
    assert_eq!(Path::new(&submit.repo), canonical);
    assert_eq!(submit.branch, "dev");
    assert_eq!(submit.commits, vec![COMMIT.to_owned()]);
}

#[tokio::test]
async fn submit_refuses_a_short_commit_id_with_exit_2() {
    let fake = FakeDispatcher::start("", Box::new(|_| vec![])).await;
    let out = output(surveil(fake.addr, &["submit", "/", "0123abc"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("full 40-hex commit id"),
        "{}",
        stderr(&out)
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_wrong_token_is_rejected_with_exit_1_and_the_right_one_works() {
    let fake = FakeDispatcher::start(
        "s3cret",
        Box::new(|msg| match msg {
            Msg::GetStatus(_) => vec![Step::Send(Msg::GetStatusReply(GetStatusReply::default()))],
            _ => vec![],
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    surveil_common::private::write_atomic(&token_file, b"wrong\n").unwrap();
    let path = token_file.to_str().unwrap();
    let out = output(surveil(fake.addr, &["--token-file", path, "status"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(
            "surveil: dispatcher rejected the connection (REJECT_CODE_BAD_TOKEN): \
             the token does not match"
        ),
        "{}",
        stderr(&out)
    );

    surveil_common::private::write_atomic(&token_file, b"  s3cret\n").unwrap();
    let mut from_env = surveil(fake.addr, &["status", "--json"]);
    from_env.env("SURVEIL_TOKEN_FILE", &token_file);
    let out = output(from_env).await;
    assert_eq!(stdout_json(&out)["supervisor_restarts"]["monitor"], 0);

    let mut from_token_env = surveil(fake.addr, &["status", "--json"]);
    from_token_env.env("SURVEIL_TOKEN", "s3cret");
    let out = output(from_token_env).await;
    assert_eq!(stdout_json(&out)["version"], "");
}

#[tokio::test]
async fn cancel_prints_the_job_after_the_request_or_fails_with_the_reason() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::CancelJob(cancel) if cancel.job_id == 7 => {
                vec![Step::Send(Msg::CancelJobReply(CancelJobReply {
                    ok: true,
                    message: String::new(),
                    job: Some(job(7, JobStatus::Cancelled)),
                }))]
            }
            Msg::CancelJob(cancel) => vec![Step::Send(Msg::CancelJobReply(CancelJobReply {
                ok: false,
                message: format!("job {} already finished (passed)", cancel.job_id),
                job: Some(job(cancel.job_id, JobStatus::Passed)),
            }))],
            _ => vec![],
        }),
    )
    .await;
    let out = output(surveil(fake.addr, &["cancel", "7", "--json"])).await;
    let job = stdout_json(&out);
    assert_eq!(
        (job["id"].clone(), job["status"].clone()),
        (7.into(), "cancelled".into())
    );

    let out = output(surveil(fake.addr, &["cancel", "8"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "surveil: cannot cancel job 8: job 8 already finished (passed)\n"
    );
}

#[tokio::test]
async fn a_bogus_status_filter_exits_2_naming_the_valid_ones() {
    let fake = FakeDispatcher::start("", Box::new(|_| vec![])).await;
    let out = output(surveil(fake.addr, &["jobs", "--status", "bogus"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("bogus") && err.contains("queued, running, passed, failed, error, cancelled"),
        "{err}"
    );
    assert!(fake.requests().is_empty(), "nothing may be sent");
}

#[tokio::test]
async fn an_unreachable_dispatcher_exits_1_naming_the_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let out = output(surveil(addr, &["status"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("surveil: cannot reach dispatcher at {addr}: ")),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn the_config_file_supplies_the_dispatcher_address() {
    let fake = FakeDispatcher::start(
        "",
        Box::new(|msg| match msg {
            Msg::GetStatus(_) => vec![Step::Send(Msg::GetStatusReply(GetStatusReply {
                version: "from-config".into(),
                ..GetStatusReply::default()
            }))],
            _ => vec![],
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("surveil.toml");
    std::fs::write(
        &config,
        format!("dispatch = \"{}\"\njson = true\n", fake.addr),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surveil"));
    for var in [
        "SURVEIL_DISPATCH",
        "SURVEIL_TOKEN",
        "SURVEIL_TOKEN_FILE",
        "SURVEIL_JSON",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("--config")
        .arg(&config)
        .arg("status")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = output(cmd).await;
    assert_eq!(stdout_json(&out)["version"], "from-config");
}

#[tokio::test]
async fn logs_piped_into_a_reader_that_quits_early_exits_quietly() {
    let go = Arc::new(Notify::new());
    let wait = go.clone();
    let fake = FakeDispatcher::start(
        "",
        Box::new(move |msg| match msg {
            Msg::ReadLog(_) => vec![
                Step::Send(Msg::ReadLogReply(ReadLogReply {
                    job_id: 7,
                    attempt: 1,
                    data: b"first\n".to_vec().into(),
                    ..ReadLogReply::default()
                })),
                Step::WaitFor(wait.clone()),
                Step::Send(Msg::ReadLogReply(ReadLogReply {
                    job_id: 7,
                    attempt: 1,
                    offset: 6,
                    data: b"second\n".to_vec().into(),
                    end: true,
                    ..ReadLogReply::default()
                })),
            ],
            _ => vec![],
        }),
    )
    .await;
    // Like `surveil logs 7 --follow | head -1`.
    let mut cmd = surveil(fake.addr, &["logs", "7", "--follow"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(RUN_LIMIT, stdout.read_exact(&mut buf))
        .await
        .expect("the first chunk arrived in time")
        .unwrap();
    assert_eq!(&buf, b"first\n");
    drop(stdout);
    go.notify_one();
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("surveil finished in time")
        .unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    assert_eq!(stderr(&out), "");
}
