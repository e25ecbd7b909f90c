//! The `custom_runner` example, driven by a scripted dispatcher over an
//! in-memory pipe: its argument parsing, handshake, pings, a passing job,
//! a refused repository and a cancelled job. The example's source is
//! compiled into this test, so what is tested is what users copy.

#[allow(dead_code)] // its `main` is not called here
#[path = "../examples/custom_runner.rs"]
mod custom_runner;

use std::time::Duration;

use custom_runner::{Args, parse_args};
use surveil_proto::*;
use tokio::io::{DuplexStream, duplex};

const TIMEOUT: Duration = Duration::from_secs(10);
const REPO: &str = "/srv/git/app";

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn args(command: &str) -> Args {
    let argv = argv(&[
        "--dispatch",
        "127.0.0.1:9",
        "--name",
        "r1",
        "--run",
        command,
        REPO,
    ]);
    parse_args(argv, Some("tok".into())).unwrap().unwrap()
}

#[test]
fn arguments_are_parsed_by_hand() {
    assert_eq!(parse_args(argv(&["--help"]), None), Ok(None));
    assert_eq!(
        parse_args(argv(&["--dispatch", "h:1", "-h"]), None),
        Ok(None)
    );
    let parsed = parse_args(argv(&["a", "--dispatch", "h:1", "b"]), None)
        .unwrap()
        .unwrap();
    assert_eq!(parsed.dispatch, "h:1");
    assert_eq!(parsed.name, "custom-runner");
    assert_eq!(parsed.token, "");
    assert_eq!(parsed.repos, ["a", "b"]);
    assert_eq!(parsed.command, "echo \"building $COMMIT\"");
    assert_eq!(args("true").token, "tok");

    let err = |a: &[&str]| parse_args(argv(a), None).unwrap_err();
    assert!(err(&["repo"]).contains("--dispatch"));
    assert!(err(&["--dispatch", "h:1"]).contains("REPO"));
    assert!(err(&["--dispatch"]).contains("needs a value"));
    assert!(err(&["--dispatch", "h:1", "--slots", "2", "r"]).contains("unknown flag --slots"));
}

/// Accepts the runner's handshake on `io` and returns the connection.
async fn dispatcher(io: DuplexStream) -> (Connection<DuplexStream>, Hello) {
    let mut conn = Connection::new(io);
    let hello = conn.accept_hello(TIMEOUT).await.unwrap();
    conn.send(Welcome {
        session_id: "s-1".into(),
        heartbeat_interval_ms: 1000,
        runner_timeout_ms: 5000,
        server_version: "test".into(),
        epoch: String::new(),
    })
    .await
    .unwrap();
    (conn, hello)
}

async fn next(conn: &mut Connection<DuplexStream>) -> Msg {
    tokio::time::timeout(TIMEOUT, conn.recv())
        .await
        .expect("the runner answers in time")
        .unwrap()
        .expect("the runner keeps the connection open")
}

fn assign(job_id: u64, repo: &str) -> Assign {
    Assign {
        job_id,
        attempt: 1,
        repo: repo.into(),
        branch: "main".into(),
        commit: "c0ffee".into(),
        r#ref: "refs/heads/main".into(),
    }
}

#[tokio::test]
async fn the_example_runs_a_job_refuses_a_foreign_repo_and_ends_with_the_session() {
    let (runner_io, dispatcher_io) = duplex(64 * 1024);
    let args = args("echo \"building $COMMIT of $REPO on $BRANCH\"");
    let runner = tokio::spawn(async move { custom_runner::run(runner_io, &args).await });
    let (mut conn, hello) = dispatcher(dispatcher_io).await;
    assert_eq!(hello.role(), Role::Runner);
    assert_eq!((hello.name.as_str(), hello.token.as_str()), ("r1", "tok"));
    assert_eq!(
        (hello.slots, hello.repos.clone()),
        (1, vec![REPO.to_owned()])
    );

    conn.send(Ping { seq: 41 }).await.unwrap();
    assert_eq!(next(&mut conn).await, Msg::Pong(Pong { seq: 41 }));

    conn.send(assign(7, REPO)).await.unwrap();
    assert_eq!(
        next(&mut conn).await,
        Msg::Started(Started {
            job_id: 7,
            attempt: 1
        })
    );
    match next(&mut conn).await {
        Msg::Log(log) => {
            assert_eq!((log.job_id, log.attempt, log.offset), (7, 1, 0));
            assert_eq!(log.stream(), Stream::Stdout);
            assert_eq!(&log.data[..], b"building c0ffee of /srv/git/app on main\n");
        }
        other => panic!("expected Log, got {other:?}"),
    }
    match next(&mut conn).await {
        Msg::JobFinished(done) => {
            assert_eq!((done.job_id, done.attempt), (7, 1));
            assert_eq!(done.status(), JobStatus::Passed);
            assert_eq!(done.tasks.len(), 1);
            assert_eq!(done.tasks[0].status(), TaskStatus::Passed);
            assert_eq!(done.tasks[0].exit_code, Some(0));
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }
    conn.send(ResultAck {
        job_id: 7,
        attempt: 1,
        accepted: true,
        message: String::new(),
    })
    .await
    .unwrap();

    // A repository it did not list: ERROR at once, nothing started.
    conn.send(assign(8, "/srv/git/other")).await.unwrap();
    match next(&mut conn).await {
        Msg::JobFinished(done) => {
            assert_eq!(done.job_id, 8);
            assert_eq!(done.status(), JobStatus::Error);
            assert!(done.message.contains("/srv/git/other"), "{}", done.message);
            assert!(done.tasks.is_empty());
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }

    drop(conn);
    let outcome = tokio::time::timeout(TIMEOUT, runner)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_failing_command_is_reported_failed_with_its_exit_code() {
    let (runner_io, dispatcher_io) = duplex(64 * 1024);
    let args = args("echo oops >&2; exit 3");
    tokio::spawn(async move { custom_runner::run(runner_io, &args).await });
    let (mut conn, _) = dispatcher(dispatcher_io).await;
    conn.send(assign(1, REPO)).await.unwrap();
    assert!(matches!(next(&mut conn).await, Msg::Started(_)));
    assert!(matches!(next(&mut conn).await, Msg::Log(log) if &log.data[..] == b"oops\n"));
    match next(&mut conn).await {
        Msg::JobFinished(done) => {
            assert_eq!(done.status(), JobStatus::Failed);
            assert_eq!(done.tasks[0].status(), TaskStatus::Failed);
            assert_eq!(done.tasks[0].exit_code, Some(3));
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }
}

#[tokio::test]
async fn a_cancel_stops_the_job_and_pings_are_answered_meanwhile() {
    let (runner_io, dispatcher_io) = duplex(64 * 1024);
    // Long enough never to finish within the test's own timeouts; `exec` so
    // that killing the shell kills the sleep (the example kills only `sh`).
    let args = args("exec sleep 600");
    tokio::spawn(async move { custom_runner::run(runner_io, &args).await });
    let (mut conn, _) = dispatcher(dispatcher_io).await;
    conn.send(assign(5, REPO)).await.unwrap();
    assert!(matches!(next(&mut conn).await, Msg::Started(_)));
    conn.send(Ping { seq: 1 }).await.unwrap();
    assert_eq!(next(&mut conn).await, Msg::Pong(Pong { seq: 1 }));

    conn.send(Cancel {
        job_id: 5,
        attempt: 1,
    })
    .await
    .unwrap();
    match next(&mut conn).await {
        Msg::JobFinished(done) => {
            assert_eq!((done.job_id, done.attempt), (5, 1));
            assert_eq!(done.status(), JobStatus::Cancelled);
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }
    // A Cancel for an attempt it does not hold changes nothing.
    conn.send(Cancel {
        job_id: 5,
        attempt: 1,
    })
    .await
    .unwrap();
    conn.send(Ping { seq: 2 }).await.unwrap();
    assert_eq!(next(&mut conn).await, Msg::Pong(Pong { seq: 2 }));
}

#[tokio::test]
async fn a_protocol_error_from_the_dispatcher_ends_the_runner_with_its_text() {
    let (runner_io, dispatcher_io) = duplex(64 * 1024);
    let args = args("true");
    let runner = tokio::spawn(async move { custom_runner::run(runner_io, &args).await });
    let (mut conn, _) = dispatcher(dispatcher_io).await;
    conn.send(Error {
        message: "runners may not send Submit".into(),
    })
    .await
    .unwrap();
    let err = tokio::time::timeout(TIMEOUT, runner)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("runners may not send Submit"),
        "{err}"
    );
}
