//! Stories of reaching a repository on a forge: observer and runner, as
//! real processes, watch and build a repository served over HTTPS by
//! `git http-backend` (basic auth, a certificate from the test CA), and
//! the password shows in no log and reaches no task.

use std::time::Duration;

use surveil_common::tls::{ServerTls, test_certs};
use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, Daemon, wait_for};
use surveil_tests::githttp::{GitHttpConfig, GitHttpServer};
use surveil_tests::probe::{describe, status_of};

use crate::common::{POLL, STEP, Scene, bins};

const PASSWORD: &str = "pw-for-the-forge-7f3a";

#[test]
fn an_https_repository_with_basic_auth_is_watched_and_built() {
    let mut s = Scene::new(&[]).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let certs = test_certs::write(s.path());
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
    let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
    let config = GitHttpConfig::new(&served)
        .tls(tls)
        .basic_auth("ci-bot", PASSWORD);
    let server = runtime
        .block_on(GitHttpServer::start(config))
        .expect("the test git server needs `git http-backend` (Debian: apt-get install git)");
    let url = server.url("app.git");
    let password_file = s.path().join("forge-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();

    // The pipeline prints its environment: the password must not be in it.
    let push = |s: &Scene, message: &str| -> String {
        let commit = cluster::commit(
            &s.repo_dir,
            message,
            &[(".surveil.toml", "[[task]]\nname = \"env\"\nrun = \"env\"\n")],
        )
        .unwrap();
        cluster::git(
            &s.repo_dir,
            &["push", "--quiet", bare.to_str().unwrap(), "main"],
        )
        .unwrap();
        commit
    };
    let first = push(&s, "first");

    let fetch_flags = [
        "--fetch-user",
        "ci-bot",
        "--fetch-password-file",
        password_file.to_str().unwrap(),
        "--fetch-ca",
        certs.ca.to_str().unwrap(),
    ];
    s.repo = url.clone();
    let mut args = cluster::runner_isolation_args();
    args.extend(fetch_flags.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.add_runner_with("r1", &s.addr.clone(), &args, &[])
        .unwrap();

    let observer_state = s.path().join("observer");
    let mut argv: Vec<String> = vec![
        "--dispatch".into(),
        s.addr.clone(),
        "--state-dir".into(),
        observer_state.display().to_string(),
        "--interval".into(),
        "200ms".into(),
    ];
    argv.extend(fetch_flags.iter().map(|a| (*a).to_owned()));
    argv.push(url.clone());
    let observer_log = s.path().join("observer.log");
    let mut observer = Daemon::start(
        "observer",
        &bins().observer,
        argv,
        vec![],
        observer_log.clone(),
    )
    .unwrap();

    let job_of = |commit: &str| {
        wait_for("the commit's job", STEP, POLL, || s.probe.job_of(commit)).unwrap_or_else(|e| {
            panic!(
                "{e:#}\nobserver log:\n{}\nserver: {}",
                std::fs::read_to_string(&observer_log).unwrap_or_default(),
                server.backend_errors()
            )
        })
    };
    let job = s.wait_final(job_of(&first).id).unwrap();
    assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
    assert_eq!(job.repo, url, "submitted and built as the URL");

    let second = push(&s, "second");
    let job = s.wait_final(job_of(&second).id).unwrap();
    assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
    let logs = std::process::Command::new(&bins().cli)
        .args(["--dispatch", &s.addr, "logs", &job.id.to_string()])
        .output()
        .unwrap();
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let log = String::from_utf8_lossy(&logs.stdout);
    assert!(
        log.contains("PATH="),
        "the task printed its environment:\n{log}"
    );
    assert!(!log.contains(PASSWORD), "the task saw the password:\n{log}");

    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.authorization && r.status == 200),
        "{requests:#?}"
    );
    observer.terminate(Duration::from_secs(20)).unwrap();
    s.runner("r1")
        .unwrap()
        .terminate(Duration::from_secs(20))
        .unwrap();
    for name in ["observer.log", "r1.log", "dispatcher.log"] {
        let text = std::fs::read_to_string(s.path().join(name)).unwrap_or_default();
        assert!(
            !text.contains(PASSWORD),
            "{name} shows the password:\n{text}"
        );
    }
}
