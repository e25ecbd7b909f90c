//! Credentials against real processes: a dispatcher with `--tokens-file`
//! whose tokens are issued and revoked by the real `surveil token`, a real
//! runner, and raw peers trying what a thief of each credential would.
//! Also the files at rest: credential files others may read are refused,
//! and state files are 0600 in 0700 directories under umask 000.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use surveil_proto::{Connection, HandshakeError, Hello, Msg, RejectCode, Role};
use tokio::net::TcpStream;

use crate::common::{Scene, bins, run_bounded};

const SHARED: &str = "credentials-story-shared-token";
const LIMIT: Duration = Duration::from_secs(10);

/// `surveil token ARGS --tokens-file FILE`; its stdout.
fn token_cmd(file: &Path, args: &[&str]) -> String {
    let mut argv: Vec<&str> = vec!["token"];
    argv.extend(args);
    let file_arg = file.display().to_string();
    argv.extend(["--tokens-file", &file_arg]);
    let out = run_bounded(&bins().cli, &argv, LIMIT).unwrap();
    assert!(
        out.status.success(),
        "surveil {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn hello(
    addr: &str,
    role: Role,
    name: &str,
    token: &str,
) -> Result<Connection<TcpStream>, HandshakeError> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = Connection::new(stream);
    let mut hello = Hello::new(role, name);
    hello.token = token.to_owned();
    hello.slots = 1;
    conn.client_handshake(hello, LIMIT).await.map(|_| conn)
}

fn rejected(result: Result<Connection<TcpStream>, HandshakeError>) -> (RejectCode, String) {
    match result {
        Err(HandshakeError::Rejected { code, message, .. }) => (code, message),
        Err(other) => panic!("expected a Reject, got {other}"),
        Ok(_) => panic!("expected a Reject, got Welcome"),
    }
}

/// Sends `request` and returns the first frame answered (an `Error` for a
/// refused one), or `None` when the connection closed.
async fn ask(conn: &mut Connection<TcpStream>, request: Msg) -> Option<Msg> {
    conn.send(request).await.unwrap();
    tokio::time::timeout(LIMIT, conn.recv())
        .await
        .expect("an answer within the limit")
        .ok()
        .flatten()
}

fn private(path: &Path, text: &str) {
    surveil_common::private::write_atomic(path, text.as_bytes()).unwrap();
}

struct Story {
    scene: Scene,
    tokens: PathBuf,
    _dir: tempfile::TempDir,
}

/// A dispatcher with the shared token (for the scene's probe) and a tokens
/// file holding runner `ci-1`, runner `ci-2`, a `read` client, an `operate`
/// client and an observer; returns the secrets by name.
fn story() -> (Story, std::collections::HashMap<&'static str, String>) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let mut secrets = std::collections::HashMap::new();
    for (name, role, scope) in [
        ("ci-1", "runner", None),
        ("ci-2", "runner", None),
        ("reader", "client", Some("read")),
        ("operator", "client", Some("operate")),
        ("watcher", "observer", None),
    ] {
        let mut args = vec!["add", name, "--role", role];
        if let Some(scope) = scope {
            args.extend(["--scope", scope]);
        }
        secrets.insert(name, token_cmd(&tokens, &args));
    }
    let text = std::fs::read_to_string(&tokens).unwrap();
    for secret in secrets.values() {
        assert!(secret.starts_with("svt_"), "{secret}");
        assert!(
            !text.contains(secret.as_str()),
            "the file holds a secret:\n{text}"
        );
    }
    assert_eq!(std::fs::metadata(&tokens).unwrap().mode() & 0o777, 0o600);
    let tokens_arg = tokens.display().to_string();
    let scene = Scene::with_token(&["--tokens-file", &tokens_arg], Some(SHARED)).unwrap();
    (
        Story {
            scene,
            tokens,
            _dir: dir,
        },
        secrets,
    )
}

#[test]
fn a_stolen_runner_token_cannot_take_another_runners_name_or_session() {
    let (mut story, secrets) = story();
    let token_file = story.scene.path().join("ci-1.token");
    private(&token_file, &secrets["ci-1"]);
    let token_arg = token_file.display().to_string();
    let addr = story.scene.addr.clone();
    story
        .scene
        .add_runner_with(
            "ci-1",
            &addr,
            &with_isolation(&["--token-file", &token_arg]),
            &[],
        )
        .unwrap();
    story.scene.wait_runners(&["ci-1"]).unwrap();
    let runners = story.scene.probe.runners().unwrap();
    assert_eq!(runners[0].identity, "token:ci-1");

    runtime().block_on(async {
        // ci-2's token, stolen, used to pose as ci-1 (replacing its live
        // session) or as a new name.
        for name in ["ci-1", "ci-9"] {
            let (code, message) =
                rejected(hello(&addr, Role::Runner, name, &secrets["ci-2"]).await);
            assert_eq!(code, RejectCode::NameBound, "{message}");
            assert!(message.contains("belongs to runner \"ci-2\""), "{message}");
        }
        // The shared laptop token cannot take a name bound to a runner token.
        let (code, message) = rejected(hello(&addr, Role::Runner, "ci-1", SHARED).await);
        assert_eq!(code, RejectCode::NameBound, "{message}");
        // A runner token is not a client or observer credential.
        let (code, _) = rejected(hello(&addr, Role::Client, "x", &secrets["ci-2"]).await);
        assert_eq!(code, RejectCode::RoleNotAllowed);
        let (code, _) = rejected(hello(&addr, Role::Client, "x", "svt_guessed").await);
        assert_eq!(code, RejectCode::BadToken);
    });
    // The real ci-1 kept its session all along.
    let runners = story.scene.probe.runners().unwrap();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].identity, "token:ci-1");
}

fn with_isolation(args: &[&str]) -> Vec<&'static str> {
    let mut all: Vec<&'static str> = surveil_tests::cluster::runner_isolation_args()
        .into_iter()
        .map(|a| &*Box::leak(a.into_boxed_str()))
        .collect();
    all.extend(
        args.iter()
            .map(|a| &*Box::leak((*a).to_owned().into_boxed_str())),
    );
    all
}

#[test]
fn scopes_and_roles_limit_what_each_token_may_ask() {
    let (story, secrets) = story();
    let addr = story.scene.addr.clone();
    let cancel = || Msg::CancelJob(surveil_proto::CancelJob { job_id: 1 });
    let submit = || {
        // Field by field: other branches add fields to Submit.
        let mut submit = surveil_proto::Submit::default();
        submit.repo.clone_from(&story.scene.repo);
        submit.branch = "main".into();
        submit.commits = vec!["a".repeat(40)];
        Msg::Submit(submit)
    };
    let read_log = || {
        Msg::ReadLog(surveil_proto::ReadLog {
            job_id: 1,
            ..Default::default()
        })
    };
    let refused = |answer: Option<Msg>, needle: &str| match answer {
        Some(Msg::Error(e)) => assert!(e.message.contains(needle), "{}", e.message),
        other => panic!("expected an Error, got {other:?}"),
    };
    runtime().block_on(async {
        for request in [cancel(), submit()] {
            let mut reader = hello(&addr, Role::Client, "r", &secrets["reader"])
                .await
                .unwrap();
            refused(ask(&mut reader, request).await, "scope read");
        }
        let mut reader = hello(&addr, Role::Client, "r", &secrets["reader"])
            .await
            .unwrap();
        assert!(matches!(
            ask(&mut reader, Msg::GetStatus(Default::default())).await,
            Some(Msg::GetStatusReply(_))
        ));
        // The observer submits, and nothing else.
        let mut watcher = hello(&addr, Role::Observer, "w", &secrets["watcher"])
            .await
            .unwrap();
        assert!(matches!(
            ask(&mut watcher, submit()).await,
            Some(Msg::SubmitAck(_))
        ));
        let (code, _) = rejected(hello(&addr, Role::Client, "w", &secrets["watcher"]).await);
        assert_eq!(
            code,
            RejectCode::RoleNotAllowed,
            "an observer token cannot read logs"
        );
        let (code, _) = rejected(hello(&addr, Role::Runner, "watcher", &secrets["watcher"]).await);
        assert_eq!(code, RejectCode::RoleNotAllowed, "nor act as a runner");
        let mut operator = hello(&addr, Role::Client, "o", &secrets["operator"])
            .await
            .unwrap();
        assert!(matches!(
            ask(&mut operator, read_log()).await,
            Some(Msg::ReadLogReply(_))
        ));
        assert!(matches!(
            ask(&mut operator, cancel()).await,
            Some(Msg::CancelJobReply(_))
        ));
    });
}

#[test]
fn revocation_and_new_tokens_take_effect_without_a_restart() {
    let (mut story, secrets) = story();
    let addr = story.scene.addr.clone();
    let token_file = story.scene.path().join("ci-1.token");
    private(&token_file, &secrets["ci-1"]);
    let token_arg = token_file.display().to_string();
    story
        .scene
        .add_runner_with(
            "ci-1",
            &addr,
            &with_isolation(&["--token-file", &token_arg]),
            &[],
        )
        .unwrap();
    story.scene.wait_runners(&["ci-1"]).unwrap();
    let pid = story.scene.dispatcher.pid();

    let rt = runtime();
    let mut reader = rt
        .block_on(hello(&addr, Role::Client, "r", &secrets["reader"]))
        .unwrap();
    // Issued after the dispatcher started: works at once, no restart.
    let late = token_cmd(
        &story.tokens,
        &["add", "late", "--role", "client", "--scope", "read"],
    );
    rt.block_on(async {
        let deadline = Instant::now() + LIMIT;
        while hello(&addr, Role::Client, "l", &late).await.is_err() {
            assert!(Instant::now() < deadline, "a new token never worked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    token_cmd(&story.tokens, &["revoke", "reader"]);
    let revoked_at = Instant::now();
    token_cmd(&story.tokens, &["revoke", "ci-1"]);
    // The reader's live session ends within a second, told why.
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match reader.recv().await {
                    Ok(Some(Msg::Error(e))) => break Some(e.message),
                    Ok(Some(_)) => continue,
                    _ => break None,
                }
            }
        })
        .await
    });
    let message = ended.expect("the revoked session was still open a second later");
    let message = message.expect("an Error before the close");
    assert!(message.contains("token:reader was revoked"), "{message}");
    // The runner's too: it is gone from `runners` (and cannot come back).
    let deadline = revoked_at + Duration::from_secs(1);
    loop {
        let runners = story.scene.probe.runners().unwrap();
        if runners.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked runner is still connected: {runners:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.block_on(async {
        let (code, _) = rejected(hello(&addr, Role::Client, "r", &secrets["reader"]).await);
        assert_eq!(code, RejectCode::BadToken);
    });
    assert_eq!(story.scene.dispatcher.pid(), pid, "no restart");
}

#[test]
fn credential_files_others_may_read_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    token_cmd(&tokens, &["add", "ci-1", "--role", "runner"]);
    let token = dir.path().join("token");
    private(&token, "a-token");
    for (flag, file) in [("--tokens-file", &tokens), ("--token-file", &token)] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let state = dir.path().join("state").display().to_string();
        let file_arg = file.display().to_string();
        let out = run_bounded(
            &bins().dispatcher,
            &[
                "--state-dir",
                &state,
                "--listen",
                "127.0.0.1:0",
                flag,
                &file_arg,
            ],
            LIMIT,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permissions 0644"), "{err}");
        assert!(err.contains(&format!("chmod 600 {file_arg}")), "{err}");
        assert!(!err.contains("a-token"), "{err}");
    }
    // The runner refuses its token file the same way.
    let work = dir.path().join("work").display().to_string();
    let token_arg = token.display().to_string();
    let out = run_bounded(
        &bins().runner,
        &[
            "--dispatch",
            "127.0.0.1:9",
            "--work-dir",
            &work,
            "--token-file",
            &token_arg,
            "--unsandboxed",
            "/tmp",
        ],
        LIMIT,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn state_files_are_private_under_umask_000() {
    // The dispatcher and a runner started by a shell with umask 000.
    let sh = Path::new("/bin/sh");
    let umask_exec = "umask 000; exec \"$0\" \"$@\"";
    let mut scene = Scene::new(&[]).unwrap();
    scene.dispatcher.kill().unwrap();
    let state = scene.state.clone();
    let db = state.join("surveil.db");
    let _ = std::fs::remove_file(&db);
    let args = vec![
        "-c".to_owned(),
        umask_exec.to_owned(),
        bins().dispatcher.display().to_string(),
        "--listen".to_owned(),
        scene.addr.clone(),
        "--state-dir".to_owned(),
        state.join("fresh").display().to_string(),
    ];
    scene.dispatcher = surveil_tests::cluster::Daemon::start(
        "dispatcher-umask",
        sh,
        args,
        Vec::new(),
        scene.path().join("dispatcher-umask.log"),
    )
    .unwrap();
    scene.wait_answering().unwrap();
    let work = scene.path().join("runner-umask");
    let mut argv = vec![
        "-c".to_owned(),
        umask_exec.to_owned(),
        bins().runner.display().to_string(),
        "--dispatch".to_owned(),
        scene.addr.clone(),
        "--work-dir".to_owned(),
        work.display().to_string(),
        "--name".to_owned(),
        "umask".to_owned(),
    ];
    argv.extend(surveil_tests::cluster::runner_isolation_args());
    argv.push(scene.repo.clone());
    let mut runner = surveil_tests::cluster::Daemon::start(
        "runner-umask",
        sh,
        argv,
        Vec::new(),
        scene.path().join("runner-umask.log"),
    )
    .unwrap();
    scene.wait_runners(&["umask"]).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    let fresh = state.join("fresh");
    assert_eq!(mode(&fresh), 0o700);
    for file in ["surveil.db", "surveil.db-wal", "surveil.db-shm"] {
        let path = fresh.join(file);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{file}");
        } else {
            assert_ne!(file, "surveil.db", "no database");
        }
    }
    for dir in ["outbox", "mirrors"] {
        assert_eq!(mode(&work.join(dir)), 0o700, "{dir}");
    }
    // A job's checkout is made by the runner under the same umask; its task
    // sees the mode, and fails the job if anyone else could enter it.
    let commit = surveil_tests::cluster::commit(
        &scene.repo_dir,
        "report the checkout's mode",
        &[(
            ".surveil.toml",
            "[[task]]\nname = \"mode\"\nrun = \"mkdir -p kept; echo x > kept/f; m=$(stat -c %a .); echo checkout mode $m; test $m = 700\"\ncache = { key = \"k\", paths = [\"kept\"] }\n",
        )],
    )
    .unwrap();
    let id = scene.submit(&[&commit]).unwrap()[0];
    let job = scene.wait_final(id).unwrap();
    assert_eq!(
        surveil_tests::probe::status_of(&job),
        surveil_proto::JobStatus::Passed,
        "{}",
        surveil_tests::probe::describe(&job)
    );
    assert_eq!(mode(&work.join("cache")), 0o700, "cache");
    runner.kill().unwrap();
}
