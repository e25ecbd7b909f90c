//! Restoring the store from a backup, as an operator would: the
//! dispatcher stopped, `STATE_DIR` copied aside mid-stream, more commits
//! built, then the copy put back (with the restore step,
//! `surveil-dispatcher --new-epoch`, or without it) and the dispatcher
//! started again. Job ids after the backup point are handed out again, to
//! other commits; a runner still holds a result of one of them, and the
//! observer's cursor is past them. Asserted: no result lands on the wrong
//! commit (each job's log is its own commit's build) and no commit is
//! skipped (every commit has a job that passes).

use std::path::Path;
use std::time::Duration;

use surveil_proto::JobStatus;
use surveil_tests::cluster::{Daemon, wait_for};
use surveil_tests::probe::{describe, status_of};

use crate::common::{POLL, STEP, Scene, bins, ok_stdout};

/// Copies the files of `from` (the store: `surveil.db` and its WAL, if
/// any) into `to`, replacing what is there.
fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(to).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A pipeline echoing the commit it builds, so a job's log shows whose
/// build its result came from; the task waits for `gate` when given.
fn commit_echoing(s: &Scene, message: &str, gate: Option<&Path>) -> String {
    let wait = gate.map_or(String::new(), |g| {
        format!(
            "i=0; while [ ! -e '{}' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; ",
            g.display()
        )
    });
    let pipeline = format!(
        "[[task]]\nname = \"build\"\nrun = \"{wait}echo built $SURVEIL_COMMIT\"\ntimeout = \"60s\"\n"
    );
    surveil_tests::cluster::commit(&s.repo_dir, message, &[(".surveil.toml", &pipeline)]).unwrap()
}

fn restore_story(with_restore_step: bool) {
    let mut s = Scene::new(&["--heartbeat-interval", "200ms", "--runner-timeout", "1s"])
        .expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    let observer_state = s.path().join("observer");
    std::fs::create_dir_all(&observer_state).unwrap();
    let mut observer = Daemon::start(
        "observer",
        &bins().observer,
        vec![
            "--dispatch".into(),
            s.addr.clone(),
            "--state-dir".into(),
            observer_state.display().to_string(),
            "--every-commit".into(),
            "--interval".into(),
            "100ms".into(),
            s.repo.clone(),
        ],
        vec![],
        s.path().join("observer.log"),
    )
    .unwrap();
    let job_of = |s: &Scene, commit: &str| {
        wait_for("the commit's job", STEP, POLL, || s.probe.job_of(commit)).unwrap()
    };
    let passed = |s: &Scene, commit: &str| {
        let job = s.wait_final(job_of(s, commit).id).unwrap();
        assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
        job
    };

    let mut commits = Vec::new();
    for n in 1..=2 {
        commits.push(commit_echoing(&s, &format!("before the backup {n}"), None));
        passed(&s, commits.last().unwrap());
    }
    let epoch_before = s.probe.status().unwrap().epoch;

    // The backup, as the docs say: the dispatcher stopped, STATE_DIR copied.
    s.dispatcher.terminate(Duration::from_secs(20)).unwrap();
    let backup = s.path().join("backup");
    copy_store(&s.state, &backup);
    s.dispatcher.restart().unwrap();
    s.wait_answering().unwrap();

    for n in 3..=4 {
        commits.push(commit_echoing(&s, &format!("after the backup {n}"), None));
        passed(&s, commits.last().unwrap());
    }
    // The last one finishes while the dispatcher is down: its result waits
    // in r1's outbox, under a job id the restored store will give to
    // another commit.
    let gate = s.gate("last");
    commits.push(commit_echoing(&s, "after the backup 5", Some(&gate)));
    let held = s
        .wait_running(job_of(&s, commits.last().unwrap()).id)
        .unwrap();
    s.dispatcher.kill().unwrap();
    s.open(&gate).unwrap();
    let outbox = format!("{}-1.pb", held.id);
    wait_for("the result in the outbox", STEP, POLL, || {
        Ok(s.outbox("r1").contains(&outbox).then_some(()))
    })
    .unwrap();

    copy_store(&backup, &s.state);
    if with_restore_step {
        let out = std::process::Command::new(&bins().dispatcher)
            .args(["--state-dir", &s.state.display().to_string(), "--new-epoch"])
            .output()
            .unwrap();
        let printed = ok_stdout(&out);
        assert!(printed.contains(&epoch_before), "{printed}");
    }
    s.dispatcher.restart().unwrap();
    s.wait_answering().unwrap();
    let epoch_after = s.probe.status().unwrap().epoch;
    assert_eq!(epoch_after.len(), 32, "{epoch_after:?}");
    assert_eq!(epoch_after != epoch_before, with_restore_step);

    // Nothing skipped: every commit ends with a job that passed; and each
    // job's result is its own commit's build.
    for commit in &commits {
        let job = passed(&s, commit);
        let log = ok_stdout(&s.cli(&["logs", &job.id.to_string()]));
        assert!(
            log.contains(&format!("built {commit}")),
            "job {} (commit {commit}) shows another build:\n{log}",
            job.id
        );
    }
    let jobs = s.probe.jobs().unwrap();
    assert_eq!(jobs.len(), commits.len(), "one job per commit: {jobs:#?}");
    wait_for("r1's outbox emptied", STEP, POLL, || {
        Ok(s.outbox("r1").is_empty().then_some(()))
    })
    .unwrap();
    let runner_log = std::fs::read_to_string(s.path().join("r1.log")).unwrap();
    if with_restore_step {
        assert!(
            runner_log.contains("store epoch changed"),
            "r1 names the new epoch:\n{runner_log}"
        );
    }
    let observer_log = std::fs::read_to_string(s.path().join("observer.log")).unwrap();
    assert!(
        observer_log.contains("had lost commits already acknowledged"),
        "{observer_log}"
    );
    observer.terminate(Duration::from_secs(20)).unwrap();
}

/// The documented restore: the backup put back, then `--new-epoch`. The
/// runner drops its result of the old epoch (its job id now names another
/// commit), the observer resubmits the three commits the backup lacks.
#[test]
fn a_store_restored_with_a_new_epoch_loses_no_commit_and_takes_no_stale_result() {
    restore_story(true);
}

/// The restore step forgotten: the epoch is the backup's, so nothing tells
/// the peers at once. What still holds: the observer's check of its cursor
/// on every connection resubmits what the store lost, and the stale result
/// is refused because it names another commit (or, when its job id is
/// assigned to the runner anew for another commit, dropped by the runner).
#[test]
fn a_store_restored_without_the_step_still_loses_no_commit_and_takes_no_stale_result() {
    restore_story(false);
}
