//! Bounded logs over real processes: a task printing three times
//! `--max-log-size` still passes, its stored log stops at the cap with a
//! note saying so, and `surveil job --json` says it was truncated; `surveil
//! prune` deletes finished jobs' logs and keeps the jobs; `--retain-logs`
//! prunes by itself when the dispatcher starts.

use std::process::{Command, Stdio};

use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, wait_for};
use surveil_tests::probe::{describe, status_of};

use crate::common::*;

const CAP: usize = 1 << 20;

fn job_json(s: &Scene, id: u64) -> serde_json::Value {
    serde_json::from_str(&ok_stdout(&s.cli(&["--json", "job", &id.to_string()]))).unwrap()
}

#[test]
fn a_task_printing_past_the_cap_passes_with_a_truncated_log_that_prune_deletes() {
    let mut s = Scene::new(&["--max-log-size", "1MiB"]).expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    // 3 MiB of x in lines, then a marker line that must not be stored.
    let pipeline = "[[task]]\nname = \"chatty\"\n\
                    run = \"head -c 3145728 /dev/zero | tr '\\\\0' x | fold -w 1024; echo; echo after-the-flood\"\n";
    let commit = cluster::commit(&s.repo_dir, "chatty", &[(".surveil.toml", pipeline)]).unwrap();
    let id = s.submit(&[&commit]).unwrap()[0];
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));

    let id_text = id.to_string();
    let log = s.cli(&["logs", &id_text]);
    assert!(log.status.success());
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(
        text.len() >= CAP && text.len() < CAP + 1024,
        "{} bytes",
        text.len()
    );
    assert!(
        text.contains("[surveil] log truncated"),
        "{}",
        &text[text.len() - 300..]
    );
    // The log echoes the command too: only the printed line counts.
    assert!(!text.lines().any(|l| l.trim() == "after-the-flood"));

    let json = job_json(&s, id);
    assert_eq!(json["log_truncated"], true, "{json}");
    assert_eq!(json["attempts"][0]["log_truncated"], true, "{json}");
    assert_eq!(json["attempts"][0]["log_pruned"], false, "{json}");
    let human = ok_stdout(&s.cli(&["job", &id_text]));
    assert!(human.contains("truncated at --max-log-size"), "{human}");

    // Without a bound, and with retention off, a prune is refused by name.
    let out = s.cli(&["prune"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--retain-logs off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pruned: serde_json::Value =
        serde_json::from_str(&ok_stdout(&s.cli(&["--json", "prune", "--keep-jobs", "0"]))).unwrap();
    assert_eq!(pruned["attempts"], 1, "{pruned}");
    assert!(pruned["bytes"].as_u64().unwrap() >= CAP as u64, "{pruned}");
    let json = job_json(&s, id);
    assert_eq!(json["status"], "passed", "{json}");
    assert_eq!(json["tasks"][0]["name"], "chatty", "{json}");
    assert_eq!(json["attempts"][0]["log_pruned"], true, "{json}");
    let log = ok_stdout(&s.cli(&["logs", &id_text]));
    assert!(!log.contains("xxxx"), "{log}");
    let human = ok_stdout(&s.cli(&["job", &id_text]));
    assert!(human.contains("deleted by retention"), "{human}");
    let again = ok_stdout(&s.cli(&["prune", "--keep-jobs", "0"]));
    assert!(again.contains("deleted the logs of 0 attempts"), "{again}");
}

#[test]
fn retain_logs_prunes_all_but_the_newest_jobs_at_start() {
    let mut s = Scene::new(&["--retain-logs", "1jobs"]).expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let old = s.commit_quick("old").unwrap();
    let old = s.submit(&[&old]).unwrap()[0];
    s.wait_final(old).unwrap();
    let new = s.commit_quick("new").unwrap();
    let new = s.submit(&[&new]).unwrap()[0];
    s.wait_final(new).unwrap();
    assert_eq!(job_json(&s, old)["attempts"][0]["log_pruned"], false);

    // The pass at start sees two finished jobs and keeps the newest's log.
    s.dispatcher.restart().unwrap();
    s.wait_answering().unwrap();
    let pruned = |id: u64| {
        s.probe
            .job(id)
            .ok()
            .flatten()
            .map(|j| j.attempts.first().is_some_and(|a| a.log_pruned))
    };
    wait_for("the old job's log to be pruned", STEP, POLL, || {
        Ok((pruned(old) == Some(true)).then_some(()))
    })
    .unwrap();
    assert_eq!(pruned(new), Some(false));
    let log = ok_stdout(&s.cli(&["logs", &new.to_string()]));
    assert!(log.contains("quick"), "{log}");
}

/// Open sockets of process `pid` (its store's read connections, which a
/// burst of readers leaves pooled, are files and do not count).
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn followers_killed_mid_follow_release_their_connections_while_the_job_runs() {
    let mut s = Scene::new(&[]).expect("starting the dispatcher");
    s.add_runner("r1", &s.addr.clone()).unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let gate = s.gate("hold");
    let commit = s.commit_gated("held", &gate).unwrap();
    let id = s.submit(&[&commit]).unwrap()[0];
    s.wait_running(id).unwrap();
    let pid = s.dispatcher.pid().unwrap();

    let id_text = id.to_string();
    let outputs: Vec<std::path::PathBuf> = (0..20)
        .map(|n| s.path().join(format!("follower-{n}.out")))
        .collect();
    let mut followers: Vec<std::process::Child> = outputs
        .iter()
        .map(|out| {
            Command::new(&bins().cli)
                .args(["--dispatch", &s.addr, "logs", &id_text, "--follow"])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(out).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Each has printed the log so far (the task's echoed command): all 20
    // are following.
    wait_for("20 followers to print the log so far", STEP, POLL, || {
        Ok(outputs
            .iter()
            .all(|out| std::fs::metadata(out).is_ok_and(|m| m.len() > 0))
            .then_some(()))
    })
    .unwrap();
    let following = fds(pid);
    assert!(following >= 20, "{following} sockets open while 20 follow");
    // Killed as Ctrl-C would: nothing is said, the sockets just close.
    for follower in &mut followers {
        follower.kill().unwrap();
        follower.wait().unwrap();
    }
    wait_for(
        "the followers' connections to be released",
        STEP,
        POLL,
        || Ok((fds(pid) + 18 <= following).then_some(())),
    )
    .unwrap();
    let job = s.probe.job(id).unwrap().unwrap();
    assert_eq!(status_of(&job), JobStatus::Running, "the job still runs");
    s.open(&gate).unwrap();
    let done = s.wait_final(id).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
}
