//! Fault stories over real processes: SIGKILL, SIGSTOP and restarts of the
//! real daemons, and a silent network partition made by an in-test relay.
//! Each story checks the promise of DESIGN.md: no commit lost, no result
//! recorded twice, a revoked attempt's result refused. The store itself is
//! read at the end to count recorded results per job.

use std::time::{Duration, Instant};

use surveil_proto::JobStatus;
use surveil_tests::probe::{describe, status_of};
use surveil_tests::record;
use surveil_tests::relay::Relay;

use crate::common::{POLL, STEP, Scene};
use surveil_tests::cluster::wait_for;

const HEARTBEAT: &str = "200ms";
const HEARTBEAT_MS: u64 = 200;
const RUNNER_TIMEOUT: &str = "1s";
const RUNNER_TIMEOUT_MS: u64 = 1000;
/// Added to "runner timeout + one heartbeat" for the time a stopped or cut
/// off runner's job takes to move: polling, scheduling on a loaded machine.
const SLACK: Duration = Duration::from_secs(3);

fn fast_dispatcher() -> Scene {
    Scene::new(&[
        "--heartbeat-interval",
        HEARTBEAT,
        "--runner-timeout",
        RUNNER_TIMEOUT,
    ])
    .expect("starting the dispatcher")
}

/// Stops the dispatcher and asserts the store holds exactly one recorded
/// result for `job_id`, that of `attempt`, with `status`.
fn assert_one_result(scene: &mut Scene, job_id: u64, attempt: u32, status: &str) {
    scene
        .dispatcher
        .terminate(Duration::from_secs(20))
        .expect("stopping the dispatcher");
    let attempts = record::attempts(&scene.state).expect("reading the store");
    let results = record::results_of(&attempts, job_id);
    assert_eq!(
        results.len(),
        1,
        "job {job_id} must have exactly one recorded result; attempts: {attempts:#?}"
    );
    assert_eq!(results[0].attempt, attempt, "{attempts:#?}");
    assert_eq!(
        results[0].result_status.as_deref(),
        Some(status),
        "{attempts:#?}"
    );
}

#[test]
fn runner_sigkill_mid_job_the_job_finishes_elsewhere_with_one_result() {
    let mut s = fast_dispatcher();
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.add_runner("r2", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();
    let gate = s.gate("job");
    let commit = s.commit_gated("slow job", &gate).unwrap();
    let [id] = s.submit(&[&commit]).unwrap()[..] else {
        panic!("one job id expected")
    };

    let running = s.wait_running(id).unwrap();
    assert_eq!(running.attempt, 1, "{}", describe(&running));
    let victim = running.runner.clone().unwrap();
    s.runner(&victim).unwrap().kill().unwrap();

    let moved = s
        .wait_job(id, "the job to run again on the other runner", STEP, |j| {
            j.attempt == 2 && status_of(j) == JobStatus::Running
        })
        .unwrap();
    assert_ne!(moved.runner.as_deref(), Some(victim.as_str()));

    s.open(&gate).unwrap();
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
    assert_eq!(done.attempt, 2, "{}", describe(&done));
    assert_eq!(done.runner, moved.runner);
    let jobs = s.probe.jobs().unwrap();
    assert_eq!(
        jobs.iter().filter(|j| j.commit == commit).count(),
        1,
        "one job per commit"
    );
    assert!(s.probe.status().unwrap().reassignments >= 1);
    assert_one_result(&mut s, id, 2, "passed");
}

#[test]
fn runner_sigstop_its_job_moves_in_time_and_its_stale_result_is_refused() {
    let mut s = fast_dispatcher();
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.add_runner("r2", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();
    let gate = s.gate("job");
    let commit = s.commit_gated("slow job", &gate).unwrap();
    let [id] = s.submit(&[&commit]).unwrap()[..] else {
        panic!("one job id expected")
    };
    let running = s.wait_running(id).unwrap();
    let victim = running.runner.clone().unwrap();
    let refused_before = s.probe.status().unwrap().refused_results;

    let stopped_at = Instant::now();
    s.runner(&victim).unwrap().signal("STOP").unwrap();
    let bound = Duration::from_millis(RUNNER_TIMEOUT_MS + HEARTBEAT_MS) + SLACK;
    let moved = s.wait_job(id, "the job to leave the stopped runner", bound, |j| {
        j.attempt == 2 && status_of(j) == JobStatus::Running
    });
    let took = stopped_at.elapsed();
    let moved = moved.unwrap_or_else(|e| {
        s.runner(&victim).unwrap().signal("CONT").ok();
        panic!("{e:#}")
    });
    assert_ne!(moved.runner.as_deref(), Some(victim.as_str()));
    eprintln!("runner SIGSTOP: job {id} moved in {took:.2?} (bound {bound:?})");

    // The stopped runner's task is in its own process group and not
    // stopped: it ends too, so attempt 1 has a result waiting in a frozen
    // runner. Attempt 2 finishes first.
    s.open(&gate).unwrap();
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
    assert_eq!(done.attempt, 2);

    s.runner(&victim).unwrap().signal("CONT").unwrap();
    let other = done.runner.clone().unwrap();
    // The resumed runner still holds attempt 1's result (its task ended
    // while it was stopped, or it is cancelled now): whichever, it reports
    // it, the dispatcher refuses it (the lease was revoked), and the runner
    // drops it from its outbox.
    let stale = format!("{id}-1.pb");
    let refused = wait_for(
        "the stale result to be refused and dropped",
        STEP,
        POLL,
        || {
            let refused = s.probe.status()?.refused_results - refused_before;
            let idle = s
                .probe
                .runners()?
                .iter()
                .any(|r| r.name == victim && r.running.is_empty());
            Ok((refused >= 1 && idle && !s.outbox(&victim).contains(&stale)).then_some(refused))
        },
    )
    .unwrap();
    eprintln!("runner SIGSTOP: refused results after SIGCONT: {refused}");
    let after = s.probe.job(id).unwrap().unwrap();
    assert_eq!(after.attempt, 2, "{}", describe(&after));
    assert_eq!(status_of(&after), JobStatus::Passed, "{}", describe(&after));
    assert_eq!(after.runner.as_deref(), Some(other.as_str()));
    assert_eq!(
        after.finished_at_ms, done.finished_at_ms,
        "nothing overwritten"
    );
    assert_one_result(&mut s, id, 2, "passed");
}

#[test]
fn dispatcher_sigkill_every_job_finishes_once_and_reattached_jobs_are_not_rerun() {
    // The runners' reconnect backoff is capped at 3 s (surveil-runner's
    // DEFAULT_RECONNECT_MAX) and starts at 100 ms: a 10 s runner timeout
    // leaves them ample time to reattach to the restarted dispatcher.
    let mut s = Scene::new(&["--heartbeat-interval", HEARTBEAT, "--runner-timeout", "10s"])
        .expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.add_runner("r2", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();
    let gate = s.gate("all");
    let commits: Vec<String> = (1..=4)
        .map(|n| s.commit_gated(&format!("job {n}"), &gate).unwrap())
        .collect();
    let refs: Vec<&str> = commits.iter().map(String::as_str).collect();
    let ids = s.submit(&refs).unwrap();
    assert_eq!(ids.len(), 4);
    // Two run (one per runner), two wait in the queue.
    let running = wait_for("two jobs running, two queued", STEP, POLL, || {
        let jobs = s.probe.jobs()?;
        let running: Vec<_> = jobs
            .iter()
            .filter(|j| status_of(j) == JobStatus::Running && j.runner.is_some())
            .map(|j| j.id)
            .collect();
        let queued = jobs
            .iter()
            .filter(|j| status_of(j) == JobStatus::Queued)
            .count();
        Ok((running.len() == 2 && queued == 2).then_some(running))
    })
    .unwrap();

    s.dispatcher.kill().unwrap();
    s.dispatcher.restart().unwrap();
    s.wait_answering().unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();
    // Both runners are back and still hold their attempts.
    for &id in &running {
        let job = s.probe.job(id).unwrap().unwrap();
        assert_eq!(status_of(&job), JobStatus::Running, "{}", describe(&job));
        assert_eq!(job.attempt, 1, "reattached, not rerun: {}", describe(&job));
    }

    s.open(&gate).unwrap();
    for &id in &ids {
        let job = s.wait_final(id).unwrap();
        assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
        assert_eq!(job.attempt, 1, "each job ran once: {}", describe(&job));
    }
    let status = s.probe.status().unwrap();
    assert_eq!(status.reassignments, 0, "no job moved after the restart");
    let jobs = s.probe.jobs().unwrap();
    assert_eq!(jobs.len(), 4, "one job per commit: {jobs:#?}");
    for &id in &ids {
        let attempts = record::attempts(&s.state).unwrap();
        let results = record::results_of(&attempts, id);
        assert_eq!(results.len(), 1, "job {id}: {attempts:#?}");
        assert_eq!(results[0].attempt, 1, "job {id}: {attempts:#?}");
    }
    assert_one_result(&mut s, ids[0], 1, "passed");
}

#[test]
fn observer_sigkill_between_commits_skips_nothing() {
    let mut s = fast_dispatcher();
    s.add_runner("r1", &s.addr.clone()).unwrap();
    let first = s.commit_quick("first").unwrap();
    let observer_state = s.path().join("observer");
    std::fs::create_dir_all(&observer_state).unwrap();
    let mut observer = surveil_tests::cluster::Daemon::start(
        "observer",
        &crate::common::bins().observer,
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
    let job_of =
        |commit: &str| wait_for("the commit's job", STEP, POLL, || s.probe.job_of(commit)).unwrap();
    job_of(&first);
    let second = s.commit_quick("second").unwrap();
    job_of(&second);

    observer.kill().unwrap();
    let later: Vec<String> = (3..=5)
        .map(|n| s.commit_quick(&format!("commit {n}")).unwrap())
        .collect();
    observer.restart().unwrap();

    let all: Vec<&str> = [first.as_str(), second.as_str()]
        .into_iter()
        .chain(later.iter().map(String::as_str))
        .collect();
    for commit in &all {
        let job = job_of(commit);
        let job = s.wait_final(job.id).unwrap();
        assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
    }
    let jobs = s.probe.jobs().unwrap();
    for commit in &all {
        assert_eq!(
            jobs.iter().filter(|j| j.commit == *commit).count(),
            1,
            "commit {commit} has exactly one job"
        );
    }
    assert_eq!(jobs.len(), all.len(), "no job for anything else: {jobs:#?}");
    // Submitted oldest first: job ids follow commit order.
    let ids: Vec<u64> = all
        .iter()
        .map(|c| jobs.iter().find(|j| j.commit == *c).unwrap().id)
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in commit order: {ids:?}"
    );
    observer.terminate(Duration::from_secs(20)).unwrap();
}

#[test]
fn silent_partition_is_detected_by_the_timeout_and_the_stale_result_refused() {
    let mut s = fast_dispatcher();
    let relay = Relay::start(s.addr.parse().unwrap()).unwrap();
    // r1 reaches the dispatcher only through the relay; it is alone at
    // first, so it gets the job.
    s.add_runner("r1", &relay.addr().to_string()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let gate = s.gate("job");
    let commit = s.commit_gated("slow job", &gate).unwrap();
    let [id] = s.submit(&[&commit]).unwrap()[..] else {
        panic!("one job id expected")
    };
    let running = s.wait_running(id).unwrap();
    assert_eq!(running.runner.as_deref(), Some("r1"));
    s.add_runner("r2", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();
    let refused_before = s.probe.status().unwrap().refused_results;

    let cut_at = Instant::now();
    relay.partition();
    let bound = Duration::from_millis(RUNNER_TIMEOUT_MS + HEARTBEAT_MS) + SLACK;
    let moved = s
        .wait_job(id, "the job to leave the cut-off runner", bound, |j| {
            j.attempt == 2 && status_of(j) == JobStatus::Running
        })
        .unwrap();
    let took = cut_at.elapsed();
    assert_eq!(moved.runner.as_deref(), Some("r2"), "{}", describe(&moved));
    eprintln!("silent partition: job {id} moved in {took:.2?} (bound {bound:?})");
    // No FIN or RST can have reached the dispatcher: the relay closes
    // nothing while partitioned. Only the timeout can have found it.
    let names: Vec<String> = s
        .probe
        .runners()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["r2"], "the cut-off runner is declared gone");

    // Both attempts' tasks see the gate; attempt 2's result lands first
    // because r1's cannot cross the partition.
    s.open(&gate).unwrap();
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
    assert_eq!(done.attempt, 2);

    relay.heal();
    s.wait_runners(&["r1", "r2"]).unwrap();
    // r1 reconnects through the healed relay still holding attempt 1's
    // result; the dispatcher refuses it and r1 drops it.
    let stale = format!("{id}-1.pb");
    let refused = wait_for(
        "r1's stale result to be refused and dropped",
        STEP,
        POLL,
        || {
            let refused = s.probe.status()?.refused_results - refused_before;
            let idle = s
                .probe
                .runners()?
                .iter()
                .any(|r| r.name == "r1" && r.running.is_empty());
            Ok((refused >= 1 && idle && !s.outbox("r1").contains(&stale)).then_some(refused))
        },
    )
    .unwrap();
    eprintln!(
        "silent partition: refused results after healing: {refused}; relay connections: {}",
        relay.connections()
    );
    assert!(relay.connections() >= 2, "r1 reconnected through the relay");
    let after = s.probe.job(id).unwrap().unwrap();
    assert_eq!(after.attempt, 2, "{}", describe(&after));
    assert_eq!(after.runner.as_deref(), Some("r2"));
    assert_eq!(
        after.finished_at_ms, done.finished_at_ms,
        "nothing overwritten"
    );

    // After healing, r1 is a working runner again.
    s.runner("r2").unwrap().kill().unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let next = s.commit_quick("after healing").unwrap();
    let [next_id] = s.submit(&[&next]).unwrap()[..] else {
        panic!("one job id expected")
    };
    let job = s.wait_final(next_id).unwrap();
    assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
    assert_eq!(job.runner.as_deref(), Some("r1"));
    assert_one_result(&mut s, id, 2, "passed");
}

#[test]
fn a_runner_whose_connection_is_reset_keeps_its_job_by_reconnecting_within_the_grace() {
    // A grace well above a runner's redial (50–100 ms), so a loaded machine
    // cannot make the story flaky; the default is the benchmarks' matter.
    let mut s = Scene::new(&[
        "--heartbeat-interval",
        HEARTBEAT,
        "--runner-timeout",
        "5s",
        "--disconnect-grace",
        "3s",
    ])
    .expect("starting the dispatcher");
    let relay = Relay::start(s.addr.parse().unwrap()).unwrap();
    s.add_runner("r1", &relay.addr().to_string()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let gate = s.gate("job");
    let commit = s.commit_gated("slow job", &gate).unwrap();
    let [id] = s.submit(&[&commit]).unwrap()[..] else {
        panic!("one job id expected")
    };
    let running = s.wait_running(id).unwrap();
    assert_eq!(running.runner.as_deref(), Some("r1"));
    // r2 is idle and builds the repository: were the reset to revoke the
    // lease, the job would move to it at once.
    s.add_runner("r2", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1", "r2"]).unwrap();

    relay.reset();
    wait_for("r1 to reconnect through the relay", STEP, POLL, || {
        let back = relay.connections() >= 2
            && s.probe
                .runners()?
                .iter()
                .any(|r| r.name == "r1" && r.running == [id]);
        Ok(back.then_some(()))
    })
    .unwrap();
    let kept = s.probe.job(id).unwrap().unwrap();
    assert_eq!(kept.attempt, 1, "kept, not moved: {}", describe(&kept));
    assert_eq!(kept.runner.as_deref(), Some("r1"));

    s.open(&gate).unwrap();
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
    assert_eq!(done.attempt, 1, "{}", describe(&done));
    assert_eq!(s.probe.status().unwrap().reassignments, 0);
    assert_one_result(&mut s, id, 1, "passed");
}
