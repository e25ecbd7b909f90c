//! `--spawn-runners`: local runners are started when jobs wait and no
//! runner is connected, restarted when they die while needed, and stopped
//! on shutdown.

use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::harness::*;

/// Polls `check` every 20 ms for at most [`WAIT`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn runners_are_spawned_when_jobs_wait_and_killed_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let mut config = fast_config(&dir.path().join("state"));
    config.spawn_runners = 2;
    // Each "runner" notes its pid, the address, name and work dir it was
    // given and whether the dispatcher's environment reached it (cargo sets
    // CARGO_PKG_NAME for this test process), then waits.
    config.runner_command = Some(format!(
        "echo \"$SURVEIL_DISPATCH $SURVEIL_NAME $SURVEIL_WORK_DIR secret=${{CARGO_PKG_NAME:-none}}\" > {m}/$$.tmp \
         && mv {m}/$$.tmp {m}/$$ && exec sleep 600",
        m = marks.display()
    ));
    let d = Dispatcher::start(config).await;
    let addr = d.addr.to_string();

    // Nothing is spawned while no job waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(std::fs::read_dir(&marks).unwrap().count(), 0);

    let mut client = d.client().await;
    client.submit(&[commit(1)]).await;
    let pids: Vec<i32> = eventually("two runners spawned", || {
        let pids: Vec<i32> = std::fs::read_dir(&marks)
            .unwrap()
            // Marks are renamed into place once written; `.tmp` ones are not
            // pids yet.
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        (pids.len() == 2).then_some(pids)
    })
    .await;
    let mut names = Vec::new();
    let mut dirs = Vec::new();
    for pid in &pids {
        let told = std::fs::read_to_string(marks.join(pid.to_string())).unwrap();
        let fields: Vec<&str> = told.split_whitespace().collect();
        let [dispatch, name, work_dir, secret] = fields[..] else {
            panic!("{told}")
        };
        assert_eq!(dispatch, addr, "SURVEIL_DISPATCH is the listen address");
        assert!(name.contains("-spawned-"), "{told}");
        assert!(work_dir.contains("spawned"), "{told}");
        assert_eq!(secret, "secret=none", "the environment is cleared");
        names.push(name.to_owned());
        dirs.push(work_dir.to_owned());
    }
    names.sort();
    names.dedup();
    dirs.sort();
    dirs.dedup();
    assert_eq!((names.len(), dirs.len()), (2, 2), "{names:?} {dirs:?}");
    drop(client);
    d.stop().await;
    for pid in pids {
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "spawned runner {pid} still alive after shutdown"
        );
    }
}

#[tokio::test]
async fn a_spawned_runner_that_dies_is_restarted_while_jobs_wait() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let mut config = fast_config(&dir.path().join("state"));
    config.spawn_runners = 1;
    config.runner_command = Some(format!("echo start >> {}; exit 3", starts.display()));
    let d = Dispatcher::start(config).await;
    let mut client = d.client().await;
    client.submit(&[commit(1)]).await;
    eventually("the runner restarted twice", || {
        let n = std::fs::read_to_string(&starts)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        (n >= 3).then_some(())
    })
    .await;
    // A child that dies at once is restarted after a doubling delay (0.1 s,
    // 0.2 s, 0.4 s… from the 100 ms tick), not on every tick: in 3 s a tight
    // loop would start it 30 times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = std::fs::read_to_string(&starts)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    assert!(n <= 10, "{n} starts in about 3.5 s: no backoff");
    d.stop().await;
}
