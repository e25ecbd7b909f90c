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
    // Each "runner" notes its pid and the address it was given, then waits.
    config.runner_command = Some(format!(
        "echo \"$SURVEIL_DISPATCH\" > {m}/$$ && exec sleep 600",
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
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        // A child creates its mark before it writes the address into it.
        let written = pids.iter().all(|pid| {
            std::fs::read_to_string(marks.join(pid.to_string()))
                .is_ok_and(|told| !told.trim().is_empty())
        });
        (pids.len() == 2 && written).then_some(pids)
    })
    .await;
    for pid in &pids {
        let told = std::fs::read_to_string(marks.join(pid.to_string())).unwrap();
        assert_eq!(told.trim(), addr, "SURVEIL_DISPATCH is the listen address");
    }
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
    d.stop().await;
}
