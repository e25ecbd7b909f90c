//! The test git smart-HTTP server, checked with the real git CLI: clones
//! with basic auth, a wrong password refused with 401, pushes refused, a
//! TLS clone trusting the test CA, and a black-holed server that git gives
//! up on. The CLI is the client here only because the server is what is
//! under test.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use surveil_common::tls::{ServerTls, test_certs};
use surveil_tests::githttp::{
    GitHttpConfig, REALM, ServedRepo, served_repo, start_server as start,
};

/// Every git command here ends within this, or the test fails.
const GIT_DEADLINE: Duration = Duration::from_secs(60);

/// A scratch directory with a one-commit repository and a root of bare
/// repositories holding `app.git`.
struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    head: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ServedRepo { root, head } = served_repo(dir.path(), &[]).unwrap();
    Fixture { dir, root, head }
}

fn git_sync(dir: &Path, args: &[&str]) -> String {
    surveil_tests::cluster::git(dir, args).unwrap()
}

/// Runs the git CLI with no user config, no prompts and no credential
/// helper, killed if it outlives [`GIT_DEADLINE`].
async fn git(home: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = tokio::process::Command::new("git");
    command
        .args(["-c", "credential.helper=", "-c", "protocol.version=2"])
        .args(args)
        .current_dir(home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(GIT_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("git {args:?} did not end within {GIT_DEADLINE:?}"))
        .expect("the git CLI runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn clone_with_basic_auth_works_and_a_wrong_password_is_refused_with_401() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root).basic_auth("alice", "s3cret")).await;

    let url = server.url_with_credentials("app.git", "alice", "s3cret");
    let cloned = git(f.dir.path(), &["clone", "--quiet", &url, "good"], &[]).await;
    assert!(
        cloned.status.success(),
        "{}\n{}",
        stderr(&cloned),
        server.backend_errors()
    );
    assert_eq!(
        git_sync(&f.dir.path().join("good"), &["rev-parse", "HEAD"]),
        f.head
    );

    let log = server.requests();
    assert_eq!(
        (log[0].authorization, log[0].status),
        (false, 401),
        "git asks without credentials first: {log:#?}"
    );
    assert!(
        log[1..].iter().all(|r| r.authorization && r.status == 200),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|r| r.path == "/app.git/info/refs" && r.query == "service=git-upload-pack")
    );
    assert!(
        log.iter()
            .any(|r| r.method == "POST" && r.path == "/app.git/git-upload-pack")
    );

    let before = server.requests().len();
    let wrong = server.url_with_credentials("app.git", "alice", "guess");
    let refused = git(f.dir.path(), &["clone", "--quiet", &wrong, "bad"], &[]).await;
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("Authentication failed") || message.contains("401"),
        "{message}"
    );
    let log = server.requests();
    assert!(
        log[before..]
            .iter()
            .any(|r| r.authorization && r.status == 401),
        "{log:#?}"
    );
    assert!(
        log[before..].iter().all(|r| r.status == 401),
        "nothing served to a wrong password: {log:#?}"
    );

    let anonymous = git(f.dir.path(), &["ls-remote", &server.url("app.git")], &[]).await;
    assert!(!anonymous.status.success(), "no credentials, no refs");
    assert!(REALM.starts_with("surveil"));
}

#[tokio::test]
async fn pushes_are_refused_and_missing_repositories_are_404() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root)).await;
    let cloned = git(
        f.dir.path(),
        &["clone", "--quiet", &server.url("app.git"), "copy"],
        &[],
    )
    .await;
    assert!(cloned.status.success(), "{}", stderr(&cloned));
    let copy = f.dir.path().join("copy");
    std::fs::write(copy.join("more"), "x").unwrap();
    git_sync(&copy, &["add", "more"]);
    git_sync(
        &copy,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "--quiet",
            "-m",
            "second",
        ],
    );
    let pushed = git(&copy, &["push", "--quiet", "origin", "main"], &[]).await;
    assert!(!pushed.status.success(), "the server is read-only");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.query == "service=git-receive-pack" && r.status == 403)
    );
    assert_eq!(
        git_sync(&f.root.join("app.git"), &["rev-parse", "main"]),
        f.head,
        "nothing pushed"
    );

    let missing = git(f.dir.path(), &["ls-remote", &server.url("nope.git")], &[]).await;
    assert!(!missing.status.success());
    assert_eq!(server.requests().last().map(|r| r.status), Some(404));
}

#[tokio::test]
async fn a_tls_clone_works_with_the_test_ca_and_fails_without_it() {
    let f = fixture();
    let certs = test_certs::write(f.dir.path());
    let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
    let server = start(GitHttpConfig::new(&f.root).tls(tls).basic_auth("bob", "pw")).await;
    let url = server.url_with_credentials("app.git", "bob", "pw");
    assert!(url.starts_with("https://bob:pw@127.0.0.1:"), "{url}");

    let untrusted = git(f.dir.path(), &["ls-remote", &url], &[]).await;
    assert!(
        !untrusted.status.success(),
        "the test CA is not trusted by default"
    );
    assert!(
        server.requests().is_empty(),
        "no request got past the handshake"
    );

    let cloned = git(
        f.dir.path(),
        &["clone", "--quiet", &url, "tls"],
        &[("GIT_SSL_CAINFO", &certs.ca)],
    )
    .await;
    assert!(
        cloned.status.success(),
        "{}\n{}",
        stderr(&cloned),
        server.backend_errors()
    );
    assert_eq!(
        git_sync(&f.dir.path().join("tls"), &["rev-parse", "HEAD"]),
        f.head
    );
    assert!(server.requests().iter().any(|r| r.status == 200));
}

#[tokio::test]
async fn git_gives_up_on_a_black_holed_server() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root)).await;
    server.set_black_hole(true);
    let hung = git(
        f.dir.path(),
        &[
            "-c",
            "http.lowSpeedLimit=1",
            "-c",
            "http.lowSpeedTime=2",
            "ls-remote",
            &server.url("app.git"),
        ],
        &[],
    )
    .await;
    assert!(
        !hung.status.success(),
        "git must give up on a server that never answers"
    );
    let message = stderr(&hung);
    assert!(
        message.contains("too slow") || message.contains("timed out"),
        "{message}"
    );
    assert!(server.requests().is_empty(), "a black hole answers nothing");

    server.set_black_hole(false);
    let served = git(f.dir.path(), &["ls-remote", &server.url("app.git")], &[]).await;
    assert!(served.status.success(), "{}", stderr(&served));
    assert!(String::from_utf8_lossy(&served.stdout).contains(&f.head));
}
