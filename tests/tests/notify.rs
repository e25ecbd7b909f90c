//! Each daemon speaks systemd's notify protocol: READY=1 once serving,
//! WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM, then exit 0.
//! The test plays systemd: it binds the datagram socket and reads what the
//! real binary sends.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use surveil_tests::cluster;

/// Reads datagrams until one contains `wanted` or `deadline` passes.
fn wait_for_state(socket: &UnixDatagram, wanted: &str, deadline: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.lines().any(|l| l == wanted);
            seen.push(text);
            if done {
                return seen;
            }
        }
    }
    panic!("no {wanted} within {deadline:?}; received: {seen:?}");
}

fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().ok();
    panic!("process did not exit within {deadline:?} of SIGTERM");
}

fn check_daemon(program: &Path, args: &[String], dir: &Path) {
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(program)
        .args(args)
        .env("NOTIFY_SOCKET", &socket_path)
        // 400 ms: keep-alives every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let name = program.file_name().unwrap().to_string_lossy().into_owned();

    wait_for_state(&socket, "READY=1", Duration::from_secs(20));
    wait_for_state(&socket, "WATCHDOG=1", Duration::from_secs(5));
    wait_for_state(&socket, "WATCHDOG=1", Duration::from_secs(5));

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for_state(&socket, "STOPPING=1", Duration::from_secs(10));
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{name} exit status after SIGTERM");
}

#[test]
fn daemons_notify_ready_watchdog_and_stopping() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bins = cluster::build(root, false).expect("building the daemons");
    // Short path: a Unix socket path is limited to ~108 bytes.
    let scratch_dir = tempfile::tempdir().unwrap();
    let scratch = scratch_dir.path().to_path_buf();

    let dispatcher_dir = scratch.join("dispatcher");
    std::fs::create_dir_all(&dispatcher_dir).unwrap();
    check_daemon(
        &bins.dispatcher,
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            dispatcher_dir.display().to_string(),
        ],
        &dispatcher_dir,
    );

    let repo = scratch.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    cluster::git(&repo, &["init", "--quiet", "--initial-branch=main"]).unwrap();
    cluster::commit(&repo, "first", &[("README", "hi\n")]).unwrap();
    // Nothing listens on this port: the runner and observer must still
    // report readiness (their own state is ready) and keep retrying.
    let port = cluster::free_port().unwrap();
    let dispatch = format!("127.0.0.1:{port}");

    let runner_dir = scratch.join("runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    check_daemon(
        &bins.runner,
        &[
            "--dispatch".into(),
            dispatch.clone(),
            "--work-dir".into(),
            runner_dir.display().to_string(),
            "--name".into(),
            "notify-test".into(),
        ]
        .into_iter()
        .chain(cluster::runner_isolation_args())
        .chain([repo.display().to_string()])
        .collect::<Vec<_>>(),
        &runner_dir,
    );

    let observer_dir = scratch.join("observer");
    std::fs::create_dir_all(&observer_dir).unwrap();
    check_daemon(
        &bins.observer,
        &[
            "--dispatch".into(),
            dispatch,
            "--state-dir".into(),
            observer_dir.display().to_string(),
            repo.display().to_string(),
        ],
        &observer_dir,
    );
}
