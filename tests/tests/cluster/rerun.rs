//! Rerunning a job over real processes: a job whose task fails is rerun
//! with `surveil rerun` once the cause is fixed (a gate the task checks),
//! passes on its second attempt, and `surveil logs --attempt` still reads
//! the first attempt's log while `surveil job --json` lists both attempts.

use surveil_proto::JobStatus;
use surveil_tests::cluster;
use surveil_tests::probe::{describe, status_of};

use crate::common::*;

#[test]
fn a_failed_job_rerun_after_the_fix_passes_and_both_attempts_logs_stay_readable() {
    let mut s = Scene::new(&[]).expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let fixed = s.gate("fixed");
    let gate = fixed.display().to_string();
    let pipeline = format!(
        "[[task]]\nname = \"check\"\nrun = \"if [ -e '{gate}' ]; then echo now-fixed; else echo still-broken; exit 1; fi\"\n"
    );
    let commit = cluster::commit(&s.repo_dir, "flaky", &[(".surveil.toml", &pipeline)]).unwrap();
    let id = s.submit(&[&commit]).unwrap()[0];
    let first = s.wait_final(id).unwrap();
    assert_eq!(status_of(&first), JobStatus::Failed, "{}", describe(&first));
    let id_text = id.to_string();

    // The fix lands; the failed job is rerun as it is.
    s.open(&fixed).unwrap();
    let out = ok_stdout(&s.cli(&["rerun", &id_text]));
    assert!(out.starts_with(&format!("job {id}: {commit}")), "{out}");
    let second = s.wait_final(id).unwrap();
    assert_eq!(
        status_of(&second),
        JobStatus::Passed,
        "{}",
        describe(&second)
    );
    assert_eq!(second.attempt, first.attempt + 1);

    // The task's own output lines (the log also echoes the command).
    let printed = |log: &str, line: &str| log.lines().any(|l| l.trim() == line);
    let latest = ok_stdout(&s.cli(&["logs", &id_text]));
    assert!(
        printed(&latest, "now-fixed") && !printed(&latest, "still-broken"),
        "{latest}"
    );
    let attempt = first.attempt.to_string();
    let earlier = ok_stdout(&s.cli(&["logs", &id_text, "--attempt", &attempt]));
    assert!(
        printed(&earlier, "still-broken") && !printed(&earlier, "now-fixed"),
        "{earlier}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok_stdout(&s.cli(&["--json", "job", &id_text]))).unwrap();
    let attempts: Vec<(u64, &str)> = json["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("no attempts: {json}"))
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        vec![
            (u64::from(first.attempt), "failed"),
            (u64::from(second.attempt), "passed")
        ],
        "{json}"
    );
    assert_eq!(json["status"], "passed", "{json}");

    // An unknown job is a clear refusal.
    let out = s.cli(&["rerun", "4242"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job 4242"));
}
