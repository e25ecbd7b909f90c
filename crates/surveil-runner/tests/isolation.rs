//! The real binary decides how tasks are isolated before it does anything
//! else: without a working sandbox, a task user or `--unsandboxed` it
//! refuses to start (exit 2) and names the three ways out; the decision it
//! takes is in its start-up log.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use surveil_runner::sandbox::Isolation;

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

/// The runner with `args` (work dir, name and a repository added) and
/// exactly `env`; nothing listens on its dispatch port.
fn runner(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_surveil-runner"));
    command
        .args([
            "--dispatch",
            "127.0.0.1:9",
            "--name",
            "iso-test",
            "--work-dir",
        ])
        .arg(dir.join("work"))
        .args(args)
        .arg(dir)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    command
}

fn output(mut command: Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < WAIT, "the runner should have exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Starts the runner with stderr in `log`, waits for its isolation line,
/// then stops it with SIGTERM (exit 0); returns the line.
fn isolation_line(mut command: Command, log: &Path) -> String {
    let file = std::fs::File::create(log).unwrap();
    let mut child: Child = command.stdout(Stdio::null()).stderr(file).spawn().unwrap();
    let start = Instant::now();
    let line = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("isolation: ")) {
            break line.to_owned();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the runner exited ({status}): {text}");
        }
        assert!(start.elapsed() < WAIT, "no isolation line: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < WAIT, "the runner ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    line
}

#[test]
fn without_sandbox_task_user_or_unsandboxed_it_refuses_to_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // No bwrap on this PATH: the machine has no sandbox as far as the
    // runner can tell.
    let bare = dir.path().to_str().unwrap();
    let out = output(runner(dir.path(), &[], &[("PATH", bare)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bwrap is not on the runner's PATH"), "{err}");
    for way in ["install bubblewrap", "--task-user USER", "--unsandboxed"] {
        assert!(err.contains(way), "{way} is not named: {err}");
    }
    assert!(
        !dir.path().join("work").exists(),
        "it refused before preparing anything"
    );

    // The same machine, told so through the environment: it starts, and
    // says loudly what that means.
    let line = isolation_line(
        runner(
            dir.path(),
            &[],
            &[("PATH", bare), ("SURVEIL_UNSANDBOXED", "true")],
        ),
        &dir.path().join("unsandboxed.log"),
    );
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("UNSANDBOXED (--unsandboxed)"), "{line}");
    assert!(line.contains("can read its token"), "{line}");
}

#[test]
fn a_task_user_that_is_root_or_unknown_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    for (user, words) in [
        ("root", "--task-user root: is uid 0"),
        ("surveil-no-such-user", "no such user"),
    ] {
        let out = output(runner(
            dir.path(),
            &[],
            &[("PATH", &path), ("SURVEIL_TASK_USER", user)],
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(words), "{err}");
    }
}

#[test]
fn where_bubblewrap_works_it_is_the_default_and_says_so() {
    let path = std::env::var("PATH").unwrap_or_default();
    if let Err(e) = Isolation::detect(Some(path.as_ref())) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the sandbox tests, but: {e}"
        );
        eprintln!("SKIPPED: the bubblewrap sandbox does not work here: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let line = isolation_line(
        runner(dir.path(), &[], &[("PATH", &path)]),
        &dir.path().join("sandboxed.log"),
    );
    assert!(line.contains("INFO"), "{line}");
    assert!(
        line.contains("isolation: bubblewrap sandbox (bubblewrap "),
        "{line}"
    );
}
