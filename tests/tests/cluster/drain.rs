//! Drains over real processes: a rolling restart of the runners (SIGTERM,
//! wait for the exit, start again, one runner after the other) while jobs
//! queue up costs no job an attempt and ends none `cancelled`. The runner
//! says it drains, so the dispatcher gives it nothing more and tells the
//! waiting jobs why; the job its drain timeout cuts off is handed back and
//! runs again elsewhere. The dispatcher allows one attempt per job, so an
//! attempt counted as lost would end its job `error`.

use std::time::Duration;

use surveil_proto::JobStatus;
use surveil_tests::cluster;
use surveil_tests::probe::{describe, status_of};

use crate::common::*;

const RUNNERS: [&str; 2] = ["r1", "r2"];

#[test]
fn a_rolling_drain_burns_no_attempt_and_cancels_no_job() {
    let mut s = Scene::new(&["--max-attempts", "1"]).expect("starting the dispatcher");
    let addr = s.addr.clone();
    let isolation = cluster::runner_isolation_args();
    let mut args: Vec<&str> = isolation.iter().map(String::as_str).collect();
    args.extend(["--slots", "1", "--drain-timeout", "2s"]);
    for name in RUNNERS {
        s.add_runner_with(name, &addr, &args, &[]).unwrap();
    }
    s.wait_runners(&RUNNERS).unwrap();

    // Two long jobs take both slots; a stream of quick ones queues behind.
    let long_gate = s.gate("long");
    let mut commits = vec![
        s.commit_gated("long 1", &long_gate).unwrap(),
        s.commit_gated("long 2", &long_gate).unwrap(),
    ];
    for i in 0..4 {
        commits.push(s.commit_quick(&format!("quick {i}")).unwrap());
    }
    let refs: Vec<&str> = commits.iter().map(String::as_str).collect();
    let ids = s.submit(&refs).unwrap();
    let (long, quick) = ids.split_at(2);
    for id in long {
        s.wait_running(*id).unwrap();
    }

    for name in RUNNERS {
        let holding = long
            .iter()
            .copied()
            .find(|id| s.probe.job(*id).unwrap().and_then(|j| j.runner).as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} runs one of the long jobs"));
        s.runner(name).unwrap().signal("TERM").unwrap();

        // Draining: shown, and named as why the queue waits.
        let runners = cluster::wait_for(&format!("{name} to show draining"), STEP, POLL, || {
            let runners = s.probe.runners()?;
            Ok(runners
                .iter()
                .any(|r| r.name == name && r.draining)
                .then_some(runners))
        })
        .unwrap();
        assert!(
            runners.iter().filter(|r| r.draining).count() == 1,
            "{runners:?}"
        );
        assert_eq!(s.probe.status().unwrap().draining, 1);
        let reason = s.probe.job(quick[0]).unwrap().unwrap().reason;
        let reason = reason.unwrap_or_default();
        assert!(
            reason.contains(&format!("runner {name} is draining (shutting down)")),
            "{reason}"
        );

        // Its drain timeout cuts the long job off: handed back, not cancelled.
        let runner = s.runner(name).unwrap();
        cluster::wait_for(&format!("{name} to exit"), STEP, POLL, || runner.exited()).unwrap();
        let back = s
            .wait_job(
                holding,
                &format!("job {holding} to be queued again or run elsewhere"),
                STEP,
                |j| status_of(j) == JobStatus::Queued || j.runner.as_deref() != Some(name),
            )
            .unwrap();
        assert!(!status_of(&back).is_final(), "{}", describe(&back));
        s.runner(name).unwrap().restart().unwrap();
        s.wait_runners(&RUNNERS).unwrap();
        s.wait_running(holding).unwrap();
    }

    s.open(&long_gate).unwrap();
    for id in &ids {
        let job = s
            .wait_job(
                *id,
                &format!("job {id} to pass"),
                Duration::from_secs(60),
                |j| status_of(j).is_final(),
            )
            .unwrap();
        assert_eq!(status_of(&job), JobStatus::Passed, "{}", describe(&job));
    }
    for id in long {
        let json: serde_json::Value =
            serde_json::from_str(&ok_stdout(&s.cli(&["--json", "job", &id.to_string()]))).unwrap();
        let attempts = json["attempts"].as_array().expect("attempts listed");
        let first = &attempts[0];
        assert_eq!(first["status"], "revoked", "{json}");
        let why = first["message"].as_str().unwrap_or_default();
        assert!(
            why.contains("shutting down") && why.contains("drain timeout"),
            "the cut-off attempt says why: {json}"
        );
        assert_eq!(attempts.last().unwrap()["status"], "passed", "{json}");
    }
    assert_eq!(s.probe.status().unwrap().draining, 0);
}
