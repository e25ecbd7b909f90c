//! Stories of jobs and the refs they were built for, over real processes:
//! a pull request's head, on no branch, is fetched by its ref and built;
//! `surveil jobs --pr` and `--branch` find the jobs; the Job JSON shows
//! `ref` and `pull_request`.

use serde_json::Value;
use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, Cli};
use surveil_tests::probe::status_of;

use crate::common::{Scene, bins};

/// A pipeline that passes only when the task sees `want` as its ref.
fn pipeline_checking_ref(want: &str) -> String {
    format!(
        "[[task]]\nname = \"ref\"\nrun = \"echo ref=$SURVEIL_REF; test \\\"$SURVEIL_REF\\\" = '{want}'\"\n"
    )
}

#[test]
fn a_pull_request_head_on_no_branch_is_built_and_listed_by_its_number() {
    let mut s = Scene::new(&[]).unwrap();
    let repo = s.repo_dir.clone();
    let main = cluster::commit(
        &repo,
        "main",
        &[(".surveil.toml", &pipeline_checking_ref("refs/heads/main"))],
    )
    .unwrap();
    // The pull request's head: a commit only `refs/pull/7/head` points to,
    // as on a forge (the contributor's branch lives in their fork).
    cluster::git(&repo, &["checkout", "--quiet", "-b", "contrib"]).unwrap();
    let head = cluster::commit(
        &repo,
        "the pull request",
        &[(".surveil.toml", &pipeline_checking_ref("refs/pull/7/head"))],
    )
    .unwrap();
    cluster::git(&repo, &["update-ref", "refs/pull/7/head", &head]).unwrap();
    cluster::git(&repo, &["checkout", "--quiet", "main"]).unwrap();
    cluster::git(&repo, &["branch", "--quiet", "-D", "contrib"]).unwrap();
    s.add_runner("ci-1", &s.addr.clone()).unwrap();

    let main_job = s.submit(&[&main]).unwrap()[0];
    let pr_job = s
        .probe
        .submit_ref(&s.repo, "contrib", "refs/pull/7/head", Some(7), &[&head])
        .unwrap()[0];
    for id in [main_job, pr_job] {
        let job = s.wait_final(id).unwrap();
        assert_eq!(
            status_of(&job),
            JobStatus::Passed,
            "job {id} (its task checks SURVEIL_REF): {job:?}; runner log:\n{}",
            std::fs::read_to_string(s.path().join("ci-1.log")).unwrap_or_default()
        );
    }

    let cli = Cli {
        bin: bins().cli.clone(),
        dispatch: s.addr.clone(),
    };
    let ids = |args: &[&str]| -> Vec<u64> {
        let Value::Array(jobs) = cli.json(args).unwrap() else {
            panic!("not an array");
        };
        jobs.iter().map(|j| j["id"].as_u64().unwrap()).collect()
    };
    assert_eq!(ids(&["jobs", "--pr", "7"]), vec![pr_job]);
    assert_eq!(ids(&["jobs", "--pr", "8"]), Vec::<u64>::new());
    assert_eq!(ids(&["jobs", "--branch", "main"]), vec![main_job]);
    assert_eq!(
        ids(&["jobs", "--branch", "contrib", "--pr", "7"]),
        vec![pr_job]
    );

    let pr = cli.job(pr_job).unwrap();
    assert_eq!(pr["ref"], "refs/pull/7/head");
    assert_eq!(pr["pull_request"], 7);
    assert_eq!(pr["branch"], "contrib");
    let plain = cli.job(main_job).unwrap();
    assert_eq!(plain["ref"], "refs/heads/main");
    assert_eq!(plain["pull_request"], Value::Null);
}
