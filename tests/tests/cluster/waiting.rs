//! A queued job says why it waits: a commit submitted for a repository no
//! connected runner lists is accepted, and `surveil jobs` / `surveil job`
//! show the dispatcher's reason, until a runner that lists it connects and
//! the job runs.

use serde_json::Value;
use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, Cli, Daemon, wait_for};
use surveil_tests::probe::status_of;

use crate::common::{POLL, STEP, Scene, bins, run_bounded};

const NO_RUNNER: &str =
    "no connected runner lists this repository (1 connected build other repositories)";

#[test]
fn a_job_no_runner_lists_waits_with_a_reason_until_one_connects() {
    let mut s = Scene::new(&[]).unwrap();
    // A runner for another repository only: connected, but no help.
    let other = s.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    cluster::git(&other, &["init", "--quiet", "--initial-branch=main"]).unwrap();
    let other_work = s.work_dir("elsewhere");
    let mut argv = vec![
        "--dispatch".to_owned(),
        s.addr.clone(),
        "--work-dir".to_owned(),
        other_work.display().to_string(),
        "--name".to_owned(),
        "elsewhere".to_owned(),
    ];
    argv.extend(cluster::runner_isolation_args());
    argv.push(other.canonicalize().unwrap().display().to_string());
    let mut elsewhere = Daemon::start(
        "elsewhere",
        &bins().runner,
        argv,
        Vec::new(),
        s.path().join("elsewhere.log"),
    )
    .unwrap();
    s.wait_runners(&["elsewhere"]).unwrap();

    let commit = s.commit_quick("nobody builds this yet").unwrap();
    let id = s.submit(&[&commit]).unwrap()[0];
    let cli = Cli {
        bin: bins().cli.clone(),
        dispatch: s.addr.clone(),
    };
    let listed = wait_for("the job listed with its reason", STEP, POLL, || {
        let jobs = cli.jobs()?;
        Ok(jobs
            .into_iter()
            .find(|j| j["id"].as_u64() == Some(id) && j.get("reason").is_some()))
    })
    .unwrap();
    assert_eq!(listed["status"], "queued", "{listed}");
    assert_eq!(listed["reason"], NO_RUNNER, "{listed}");
    let shown = cli.job(id).unwrap();
    assert_eq!(shown["reason"], NO_RUNNER, "{shown}");
    let dispatch = s.addr.clone();
    let text = run_bounded(&bins().cli, &["--dispatch", &dispatch, "jobs"], STEP).unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("job {id} waits: {NO_RUNNER}")),
        "{text}"
    );

    s.add_runner("builder", &dispatch).unwrap();
    let job = s.wait_final(id).unwrap();
    assert_eq!(status_of(&job), JobStatus::Passed, "{job:?}");
    let done = cli.job(id).unwrap();
    assert_eq!(done["runner"], "builder", "{done}");
    assert_eq!(
        done.get("reason"),
        None::<&Value>,
        "no reason once it ran: {done}"
    );
    elsewhere.kill().unwrap();
}
