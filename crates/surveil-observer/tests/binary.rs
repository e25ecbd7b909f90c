//! The real `surveil-observer` binary: exit codes, readiness, SIGTERM.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{FakeDispatcher, TestRepo, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_surveil-observer");

/// Kills the child if the test fails before it exits on its own.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn observer(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SURVEIL_CONFIG")
        .env_remove("SURVEIL_TOKEN")
        .env_remove("SURVEIL_DISPATCH")
        .env_remove("NOTIFY_SOCKET");
    cmd
}

#[test]
fn configuration_errors_exit_2_naming_the_flag() {
    let repo = TestRepo::new();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let repo_path = repo.name();
    let missing = state.path().join("missing");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--state-dir", state_dir, "--max-backlog", "0", &repo_path],
            "--max-backlog",
        ),
        (
            vec![
                "--state-dir",
                state_dir,
                "--max-backlog",
                "100001",
                &repo_path,
            ],
            "--max-backlog",
        ),
        (
            vec!["--state-dir", state_dir, "--interval", "0s", &repo_path],
            "--interval",
        ),
        (
            vec!["--state-dir", state_dir, missing.to_str().unwrap()],
            "REPO",
        ),
    ];
    for (args, named) in cases {
        let out = observer(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_the_cursor_loads_and_sigterm_exits_0() {
    let repo = TestRepo::new();
    let tip = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let socket_path = state.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(support::WAIT)).unwrap();
    let state_dir = state.path().join("state");

    let child = observer(&[
        "--dispatch",
        &dispatcher.addr.to_string(),
        "--state-dir",
        state_dir.to_str().unwrap(),
        &repo.name(),
    ])
    .env("NOTIFY_SOCKET", &socket_path)
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut child = Guard(child);

    let mut ready = false;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        let n = socket
            .recv(&mut buf)
            .expect("a notification before the timeout");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            ready = true;
            break;
        }
    }
    assert!(ready, "READY=1 was sent");

    wait_for("the tip submitted", || {
        dispatcher.submitted_commits().contains(&tip).then_some(())
    })
    .await;
    wait_for("the cursor written", || {
        (support::cursor(&state_dir, &repo) == Some(tip.clone())).then_some(())
    })
    .await;

    let pid = Pid::from_raw(i32::try_from(child.0.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_for("the observer to exit", || child.0.try_wait().unwrap()).await;
    assert_eq!(status.code(), Some(0));
    // And it said STOPPING=1 on the way out.
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 was sent");
}
