//! Failed infrastructure is not a red build. Two runners build a
//! repository served over HTTP by `git http-backend`; one of them reaches
//! it through an HTTP proxy that is down (`http_proxy` names a port
//! nobody listens on), so every fetch it makes fails for real, with
//! "connection refused". Its jobs run again on the other runner and pass,
//! the broken one is quarantined (`surveil runners --json`, `status`),
//! and a job that then has only it to wait for says so. And a job stuck
//! in a fetch from a server that accepts the connection and never answers
//! is ended by `cancel` without waiting for the fetch's read timeout.

use std::time::Duration;

use serde_json::Value;
use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, Cli};
use surveil_tests::githttp::{GitHttpConfig, GitHttpServer};
use surveil_tests::probe::{describe, status_of};

use crate::common::{POLL, STEP, Scene, bins};

/// A bare repository `app.git` under `DIR/served`, served over plain HTTP,
/// with the scene's repository pushed to it; the scene's jobs and runners
/// then name its URL.
fn serve(s: &mut Scene, runtime: &tokio::runtime::Runtime) -> (GitHttpServer, std::path::PathBuf) {
    let served = s.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let bare = served.join("app.git");
    cluster::git(
        s.path(),
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            bare.to_str().unwrap(),
        ],
    )
    .unwrap();
    let server = runtime
        .block_on(GitHttpServer::start(GitHttpConfig::new(&served)))
        .expect("the test git server needs `git http-backend` (Debian: apt-get install git)");
    s.repo = server.url("app.git");
    (server, bare)
}

fn push(s: &Scene, bare: &std::path::Path) {
    cluster::git(
        &s.repo_dir,
        &["push", "--quiet", bare.to_str().unwrap(), "main"],
    )
    .unwrap();
}

/// A port on 127.0.0.1 that refuses connections: bound, then closed.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn runner<'a>(runners: &'a [Value], name: &str) -> &'a Value {
    runners
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no runner {name} in {runners:?}"))
}

#[test]
fn a_runner_whose_fetches_fail_is_quarantined_and_its_jobs_pass_elsewhere() {
    let mut s = Scene::new(&["--quarantine-after", "2", "--quarantine-for", "5m"]).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_server, bare) = serve(&mut s, &runtime);
    let commits: Vec<String> = (1..=4)
        .map(|i| s.commit_quick(&format!("commit {i}")).unwrap())
        .collect();
    push(&s, &bare);

    // The broken runner connects first, so it is the first one given work.
    let proxy = format!("http://127.0.0.1:{}", closed_port());
    let isolation = cluster::runner_isolation_args();
    let args: Vec<&str> = isolation.iter().map(String::as_str).collect();
    let dispatch = s.addr.clone();
    s.add_runner_with(
        "broken",
        &dispatch,
        &args,
        &[
            ("http_proxy", &proxy),
            ("HTTP_PROXY", &proxy),
            ("no_proxy", ""),
            ("NO_PROXY", ""),
        ],
    )
    .unwrap();
    s.wait_runners(&["broken"]).unwrap();
    s.add_runner("healthy", &dispatch).unwrap();
    s.wait_runners(&["broken", "healthy"]).unwrap();

    let refs: Vec<&str> = commits.iter().map(String::as_str).collect();
    let ids = s.submit(&refs).unwrap();
    for id in &ids {
        let job = s.wait_final(*id).unwrap();
        assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
        assert_eq!(job.runner.as_deref(), Some("healthy"), "{}", describe(&job));
    }

    let cli = Cli {
        bin: bins().cli.clone(),
        dispatch: dispatch.clone(),
    };
    // The broken runner's attempts are kept, each saying why it ended.
    let mut failed_on_broken = 0;
    for id in &ids {
        let job = cli.job(*id).unwrap();
        for attempt in job["attempts"].as_array().unwrap() {
            if attempt["runner"] == "broken" {
                failed_on_broken += 1;
                assert_eq!(attempt["status"], "revoked", "{job}");
                let message = attempt["message"].as_str().unwrap_or_default();
                assert!(
                    message.starts_with("infrastructure failure on runner broken: repository ")
                        && message.contains(" is unreachable: "),
                    "{job}"
                );
            }
        }
    }
    // Two in a row quarantine it; it got no job after that.
    assert_eq!(failed_on_broken, 2, "the broken runner's attempts");

    let Value::Array(runners) = cli.json(&["runners"]).unwrap() else {
        panic!("`surveil runners --json` is an array");
    };
    let broken = runner(&runners, "broken");
    assert_eq!(broken["infra_failures"], 2, "{broken}");
    assert!(broken["quarantined_until"].is_string(), "{broken}");
    let healthy = runner(&runners, "healthy");
    assert!(healthy.get("quarantined_until").is_none(), "{healthy}");
    assert!(healthy.get("infra_failures").is_none(), "{healthy}");
    let status = cli.json(&["status"]).unwrap();
    assert_eq!(status["quarantined"], 1, "{status}");
    let text = crate::common::ok_stdout(&s.cli(&["runners"]));
    assert!(text.contains("quarantined "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("broken") && l.contains("(2 infra failures)")),
        "{text}"
    );

    // With the healthy runner gone, a new job waits and names the
    // quarantined one.
    s.runner("healthy").unwrap().kill().unwrap();
    s.wait_runners(&["broken"]).unwrap();
    let late = s.commit_quick("after the healthy runner left").unwrap();
    push(&s, &bare);
    let id = s.submit(&[&late]).unwrap()[0];
    let job = cluster::wait_for("the job to say why it waits", STEP, POLL, || {
        let job = cli.job(id)?;
        Ok(job.get("reason").is_some().then_some(job))
    })
    .unwrap();
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(
        job["reason"],
        "the runner that builds it (broken) is quarantined after infrastructure failures",
        "{job}"
    );
    let jobs = cli.jobs().unwrap();
    assert!(
        jobs.iter().all(|j| j["status"] != "error"),
        "no job ended error: {jobs:?}"
    );
}

#[test]
fn cancel_ends_a_job_stuck_in_a_fetch_from_a_silent_server() {
    let mut s = Scene::new(&[]).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, bare) = serve(&mut s, &runtime);
    let commit = s.commit_quick("never fetched").unwrap();
    push(&s, &bare);
    // Accepts every connection, reads it, never answers.
    server.set_black_hole(true);
    let isolation = cluster::runner_isolation_args();
    let mut args: Vec<&str> = isolation.iter().map(String::as_str).collect();
    // Far past this test's bounds: only the cancel can end the fetch.
    args.extend(["--fetch-read-timeout", "600s"]);
    let dispatch = s.addr.clone();
    s.add_runner_with("r1", &dispatch, &args, &[]).unwrap();
    s.wait_runners(&["r1"]).unwrap();

    let id = s.submit(&[&commit]).unwrap()[0];
    s.wait_running(id).unwrap();
    // It is in its checkout: the log says so.
    cluster::wait_for("the checkout to start", STEP, POLL, || {
        let log = s.cli(&["logs", &id.to_string()]);
        Ok(String::from_utf8_lossy(&log.stdout)
            .contains("checking out")
            .then_some(()))
    })
    .unwrap();
    let out = s.cli(&["cancel", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Bounded well below the fetch's own read timeout (600 s): the kill
    // grace (5 s) is what ends it.
    let job = s
        .wait_job(
            id,
            "the cancelled job to end",
            Duration::from_secs(25),
            |j| status_of(j).is_final(),
        )
        .unwrap();
    assert_eq!(status_of(&job), JobStatus::Cancelled, "{}", describe(&job));
    let log = crate::common::ok_stdout(&s.cli(&["logs", &id.to_string()]));
    assert!(
        log.contains("cancelled during checkout") && log.contains("left to its transport timeout"),
        "{log}"
    );
}
