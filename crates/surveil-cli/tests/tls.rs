//! The real `surveil` binary and a real runner against a real dispatcher
//! (both in-process) that requires mutual TLS, with certificates made by
//! the test: the job gets done over TLS, and each way of getting TLS wrong
//! fails with a message that says what to fix.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use surveil_common::tls::test_certs::{self, TestCerts};
use surveil_common::tls::{ClientTls, ServerTls};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The most any one run of the binary may take.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long the job may take to pass.
const JOB_LIMIT: Duration = Duration::from_secs(60);

async fn surveil(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_surveil"))
        .args(args)
        .env_remove("SURVEIL_TOKEN")
        .env_remove("SURVEIL_DISPATCH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("surveil finishes")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// A repository whose one commit has a passing pipeline.
fn repo(dir: &Path) -> (String, String) {
    git(dir, &["init", "-q"]);
    std::fs::write(
        dir.join(".surveil.toml"),
        "[[task]]\nname = \"hello\"\nrun = \"echo over tls\"\n",
    )
    .unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "one"]);
    let commit = git(dir, &["rev-parse", "HEAD"]);
    let repo = std::fs::canonicalize(dir).unwrap();
    (repo.to_str().unwrap().to_owned(), commit)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_runner_get_a_job_done_over_mutual_tls_and_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let certs: TestCerts = test_certs::write(dir.path());
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir(&repo_dir).unwrap();
    let (repo, commit) = repo(&repo_dir);

    let mut config = surveil_dispatcher::Config::for_state_dir(dir.path().join("state"));
    config.tls =
        Some(ServerTls::new(&certs.server_cert, &certs.server_key, Some(&certs.ca)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let dispatcher = tokio::spawn(surveil_dispatcher::run(config, listener, shutdown.clone()));

    let mut runner = surveil_runner::Config::new(dir.path().join("work"), vec![repo.clone()]);
    runner.dispatch = vec![addr.clone()];
    // With mutual TLS a runner is called by a name its certificate
    // carries (the test client certificate's is `runner-1`).
    runner.name = "runner-1".to_owned();
    runner.isolation =
        surveil_runner::sandbox::Isolation::detect(std::env::var_os("PATH").as_deref())
            .unwrap_or_else(|e| {
                eprintln!("NOTE: the runner runs its tasks with --unsandboxed: {e}");
                surveil_runner::sandbox::Isolation::Unsandboxed
            });
    runner.tls = Some(
        ClientTls::new(
            &certs.ca,
            Some((&certs.client_cert, &certs.client_key)),
            "127.0.0.1",
        )
        .unwrap(),
    );
    let runner = tokio::spawn(surveil_runner::run(runner, shutdown.clone()));

    let tls_flags = [
        "--dispatch",
        &addr,
        "--tls-ca",
        path(&certs.ca),
        "--tls-cert",
        path(&certs.client_cert),
        "--tls-key",
        path(&certs.client_key),
    ];
    let mut submit = tls_flags.to_vec();
    submit.extend(["--json", "submit", &repo, &commit]);
    let out = surveil(&submit).await;
    assert!(out.status.success(), "submit: {}", text(&out.stderr));
    let submitted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = submitted["job_ids"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("no job id in {submitted}"));

    // The runner, also over mutual TLS, builds it.
    let id_text = id.to_string();
    let deadline = tokio::time::Instant::now() + JOB_LIMIT;
    let mut job = tls_flags.to_vec();
    job.extend(["--json", "job", &id_text]);
    loop {
        let out = surveil(&job).await;
        assert!(out.status.success(), "job: {}", text(&out.stderr));
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        if shown["status"] == "passed" {
            assert_eq!(shown["runner"], "runner-1", "{shown}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job not passed in time: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Plaintext to the TLS port.
    let out = surveil(&["--dispatch", &addr, "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("the dispatcher speaks TLS; pass --tls-ca"),
        "{err}"
    );

    // TLS, but no client certificate.
    let out = surveil(&["--dispatch", &addr, "--tls-ca", path(&certs.ca), "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("requires a client certificate") && err.contains("--tls-cert"),
        "{err}"
    );

    // The wrong CA for the dispatcher's certificate.
    let out = surveil(&[
        "--dispatch",
        &addr,
        "--tls-ca",
        path(&certs.other_ca),
        "--tls-cert",
        path(&certs.client_cert),
        "--tls-key",
        path(&certs.client_key),
        "status",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("the dispatcher's TLS certificate was not accepted"),
        "{err}"
    );

    shutdown.cancel();
    dispatcher.await.unwrap().unwrap();
    runner.await.unwrap().unwrap();
}

#[tokio::test]
async fn token_on_the_command_line_is_refused_with_exit_2() {
    let out = surveil(&["--token", "s3cret-value", "status"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("visible to every user in `ps`"), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert!(!err.contains("s3cret-value"), "{err}");
}

#[tokio::test]
async fn unusable_tls_files_are_a_usage_error_naming_the_flag() {
    let out = surveil(&["--tls-ca", "/nonexistent/ca.pem", "status"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--tls-ca /nonexistent/ca.pem"), "{err}");
}
