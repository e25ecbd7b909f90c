//! `cargo xtask e2e`: the local cluster story. A dispatcher, two runners and
//! an observer run as real processes over a scratch repository under
//! `target/e2e/`; commits are built, then runners and the dispatcher are
//! killed and stopped, and every expectation about what was recorded is
//! checked. Exits non-zero if any expectation failed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use surveil_tests::cluster::{self, Bins, Cli, Daemon, wait_for};

use crate::story::{
    POLL, STEP_DEADLINE, Story, short, shut_down, status, wait_final, wait_running,
};

/// Short liveness settings so the story's faults resolve in seconds.
const HEARTBEAT: &str = "500ms";
const RUNNER_TIMEOUT: &str = "2s";
const RUNNER_TIMEOUT_S: f64 = 2.0;
const HEARTBEAT_S: f64 = 0.5;

pub(crate) const PIPELINE: &str = r#"# Written by cargo xtask e2e.
[[task]]
name = "build"
run = "echo building $SURVEIL_COMMIT; sleep $(cat delay)"
timeout = "1m"

[[task]]
name = "test"
run = "sh test.sh"
"#;

pub(crate) const TEST_SCRIPT: &str = "echo \"verdict: $(cat verdict)\"\ngrep -q pass verdict\n";

pub struct Options {
    pub keep: bool,
}

struct Cluster {
    dir: PathBuf,
    repo: PathBuf,
    cli: Cli,
    /// The HTTP side's address.
    pages: String,
    dispatcher: Daemon,
    runners: Vec<Daemon>,
    observer: Daemon,
}

pub fn run(root: &Path, options: Options) -> Result<()> {
    let mut story = Story::new();
    story.step("building the binaries");
    let bins = cluster::build(root, false)?;

    let dir = cluster::target_dir(root).join("e2e");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    story.step(&format!("cluster directory {}", dir.display()));

    let repo = dir.join("repo");
    fs::create_dir_all(&repo)?;
    cluster::git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
    let mut cluster = start(&dir, repo, bins, &mut story)?;
    let result = tell(&mut cluster, &mut story);
    let daemons = std::iter::once(&mut cluster.observer)
        .chain(cluster.runners.iter_mut())
        .chain(std::iter::once(&mut cluster.dispatcher));
    let shutdown = shut_down(daemons, &mut story);
    story.verdict([result, shutdown], &cluster.dir)?;
    if options.keep {
        println!("\ncluster directory kept: {}", cluster.dir.display());
        keep_serving(&mut cluster)?;
    } else {
        fs::remove_dir_all(&cluster.dir).ok();
    }
    story.step("all expectations held");
    Ok(())
}

fn start(dir: &Path, repo: PathBuf, bins: Bins, story: &mut Story) -> Result<Cluster> {
    // The first commit exists before the observer starts: with no cursor it
    // submits the current tip.
    let first = cluster::commit(
        &repo,
        "first: passes",
        &[
            (".surveil.toml", PIPELINE),
            ("test.sh", TEST_SCRIPT),
            ("verdict", "pass\n"),
            ("delay", "0\n"),
        ],
    )?;
    let port = cluster::free_port()?;
    let dispatch = format!("127.0.0.1:{port}");
    let pages = format!("127.0.0.1:{}", cluster::stable_port()?);
    let state = dir.join("dispatcher");
    fs::create_dir_all(&state)?;
    let dispatcher = Daemon::start(
        "dispatcher",
        &bins.dispatcher,
        vec![
            "--listen".into(),
            dispatch.clone(),
            "--http-listen".into(),
            pages.clone(),
            "--state-dir".into(),
            state.display().to_string(),
            "--heartbeat-interval".into(),
            HEARTBEAT.into(),
            "--runner-timeout".into(),
            RUNNER_TIMEOUT.into(),
        ],
        vec![],
        dir.join("dispatcher.log"),
    )?;
    let cli = Cli {
        bin: bins.cli.clone(),
        dispatch: dispatch.clone(),
    };
    story.step(&format!(
        "dispatcher started on {dispatch}, waiting for it to answer"
    ));
    wait_for(
        "the dispatcher to answer `surveil status`",
        STEP_DEADLINE,
        POLL,
        || Ok(cli.json(&["status"]).ok()),
    )?;

    let mut runners = Vec::new();
    for name in ["runner-1", "runner-2"] {
        let work = dir.join(name);
        fs::create_dir_all(&work)?;
        runners.push(Daemon::start(
            name,
            &bins.runner,
            vec![
                "--dispatch".into(),
                dispatch.clone(),
                "--work-dir".into(),
                work.display().to_string(),
                "--name".into(),
                name.into(),
            ]
            .into_iter()
            .chain(cluster::runner_isolation_args())
            .chain([repo.display().to_string()])
            .collect(),
            vec![],
            dir.join(format!("{name}.log")),
        )?);
    }
    let observer_state = dir.join("observer");
    fs::create_dir_all(&observer_state)?;
    let observer = Daemon::start(
        "observer",
        &bins.observer,
        vec![
            "--dispatch".into(),
            dispatch.clone(),
            "--state-dir".into(),
            observer_state.display().to_string(),
            "--every-commit".into(),
            "--interval".into(),
            "1s".into(),
            repo.display().to_string(),
        ],
        vec![],
        dir.join("observer.log"),
    )?;
    let home = http_get(&pages, "/")?;
    story.expect(
        home.starts_with("HTTP/1.1 200") && home.contains("<h1>Builds</h1>"),
        format!("the pages answer at http://{pages}/"),
    );
    println!("pages: http://{pages}/");
    let cluster = Cluster {
        dir: dir.to_owned(),
        repo,
        cli,
        pages,
        dispatcher,
        runners,
        observer,
    };
    wait_runners(&cluster, 2)?;
    story.step("two runners and the observer are up");
    let job = wait_final(&cluster.cli, &first)?;
    story.expect(
        status(&job) == "passed",
        format!(
            "the first commit {} passed (got {})",
            short(&first),
            status(&job)
        ),
    );
    Ok(cluster)
}

fn tell(c: &mut Cluster, story: &mut Story) -> Result<()> {
    let mut expected: BTreeMap<String, &str> = BTreeMap::new();
    let mut reassignments: Vec<(String, f64)> = Vec::new();
    let first = cluster::git(&c.repo, &["rev-list", "--max-parents=0", "HEAD"])?;
    expected.insert(first, "passed");

    story.step("a failing commit is reported as failed");
    let failing = cluster::commit(&c.repo, "second: fails", &[("verdict", "fail\n")])?;
    let job = wait_final(&c.cli, &failing)?;
    story.expect(
        status(&job) == "failed",
        format!("commit {} failed (got {})", short(&failing), status(&job)),
    );
    let tasks = job["tasks"].as_array().cloned().unwrap_or_default();
    story.expect(
        tasks.len() == 2 && tasks[1]["status"] == "failed" && tasks[1]["exit_code"] == 1,
        "its `test` task is recorded failed with exit code 1",
    );
    expected.insert(failing, "failed");

    story.step("a runner is SIGKILLed mid-job; the job finishes on the other");
    let commit = cluster::commit(
        &c.repo,
        "third: slow",
        &[("verdict", "pass\n"), ("delay", "3\n")],
    )?;
    let (id, victim) = wait_running(&c.cli, &commit)?;
    let index = runner_index(c, &victim)?;
    let killed_at = Instant::now();
    c.runners[index].kill()?;
    let moved = wait_for(
        "the job to move to the other runner",
        STEP_DEADLINE,
        POLL,
        || {
            let job = c.cli.job(id)?;
            Ok((job["attempt"].as_u64() >= Some(2)).then_some(job))
        },
    )?;
    let secs = killed_at.elapsed().as_secs_f64();
    reassignments.push(("runner SIGKILL".into(), secs));
    story.expect(
        moved["runner"].as_str() != Some(victim.as_str()),
        format!("job {id} reassigned from {victim} in {secs:.2}s"),
    );
    let job = wait_final(&c.cli, &commit)?;
    story.expect(
        status(&job) == "passed" && job["attempt"] == 2,
        format!(
            "job {id} passed once, on attempt 2 (got {} on attempt {})",
            status(&job),
            job["attempt"]
        ),
    );
    expected.insert(commit, "passed");
    c.runners[index].restart()?;
    wait_runners(c, 2)?;

    story.step("a runner is SIGSTOPped mid-job; its job moves within the timeout");
    let commit = cluster::commit(&c.repo, "fourth: slow", &[("delay", "4\n")])?;
    let (id, victim) = wait_running(&c.cli, &commit)?;
    let index = runner_index(c, &victim)?;
    let refused_before = c.cli.json(&["status"])?["refused_results"]
        .as_u64()
        .unwrap_or(0);
    let stopped_at = Instant::now();
    c.runners[index].signal("STOP")?;
    let result = wait_for(
        "the job to leave the stopped runner",
        STEP_DEADLINE,
        POLL,
        || {
            let job = c.cli.job(id)?;
            Ok((job["attempt"].as_u64() >= Some(2)).then_some(job))
        },
    );
    let secs = stopped_at.elapsed().as_secs_f64();
    c.runners[index].signal("CONT")?;
    result?;
    reassignments.push(("runner SIGSTOP".into(), secs));
    story.expect(
        secs <= RUNNER_TIMEOUT_S + HEARTBEAT_S + 1.0,
        format!(
            "job {id} moved off the stopped {victim} in {secs:.2}s (timeout {RUNNER_TIMEOUT}, heartbeat {HEARTBEAT})"
        ),
    );
    let job = wait_final(&c.cli, &commit)?;
    story.expect(
        status(&job) == "passed" && job["attempt"] == 2,
        format!(
            "job {id} passed on attempt 2 (got {} on {})",
            status(&job),
            job["attempt"]
        ),
    );
    // The resumed runner finishes attempt 1 (its sleep ended while stopped)
    // or is told to cancel it; either way nothing may overwrite attempt 2.
    wait_runners(c, 2)?;
    let settled = wait_for(
        "the stale attempt to be settled",
        STEP_DEADLINE,
        POLL,
        || {
            let refused = c.cli.json(&["status"])?["refused_results"]
                .as_u64()
                .unwrap_or(0);
            let runners = c.cli.json(&["runners"])?;
            let busy = runners
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .any(|r| r["running"].as_array().is_some_and(|j| !j.is_empty()))
                })
                .unwrap_or(true);
            Ok((refused > refused_before || !busy).then_some(refused))
        },
    )?;
    let again = c.cli.job(id)?;
    story.expect(
        again["attempt"] == 2 && status(&again) == "passed",
        format!("after SIGCONT the stale attempt changed nothing (refused results: {settled})"),
    );
    expected.insert(commit, "passed");

    story.step("the dispatcher is SIGKILLed with a job running and restarted on its state dir");
    let running_commit = cluster::commit(&c.repo, "fifth: slow", &[("delay", "3\n")])?;
    let (running_id, _) = wait_running(&c.cli, &running_commit)?;
    c.dispatcher.kill()?;
    let while_down = cluster::commit(
        &c.repo,
        "sixth: made while the dispatcher is down",
        &[("delay", "0\n")],
    )?;
    c.dispatcher.restart()?;
    wait_for(
        "the restarted dispatcher to answer",
        STEP_DEADLINE,
        POLL,
        || Ok(c.cli.json(&["status"]).ok()),
    )?;
    let job = wait_final(&c.cli, &running_commit)?;
    story.expect(
        status(&job) == "passed",
        format!(
            "job {running_id}, running at the crash, finished {} on attempt {}{}",
            status(&job),
            job["attempt"],
            if job["attempt"] == 1 {
                " (its runner reattached: not rerun)"
            } else {
                " (rerun)"
            }
        ),
    );
    let job = wait_final(&c.cli, &while_down)?;
    story.expect(
        status(&job) == "passed",
        format!(
            "the commit made while it was down, {}, was built",
            short(&while_down)
        ),
    );
    expected.insert(running_commit, "passed");
    expected.insert(while_down, "passed");

    story.step("the observer is SIGKILLed; two commits land before it restarts");
    c.observer.kill()?;
    let a = cluster::commit(&c.repo, "seventh", &[("verdict", "pass\n")])?;
    let b = cluster::commit(&c.repo, "eighth", &[("delay", "0\n")])?;
    c.observer.restart()?;
    for commit in [&a, &b] {
        let job = wait_final(&c.cli, commit)?;
        story.expect(
            status(&job) == "passed",
            format!(
                "commit {} was submitted and built after the restart",
                short(commit)
            ),
        );
        expected.insert(commit.clone(), "passed");
    }

    story.step("checking the record");
    let jobs = c.cli.jobs()?;
    let mut per_commit: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for job in &jobs {
        per_commit
            .entry(job["commit"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(job);
    }
    for (commit, want) in &expected {
        let found = per_commit.get(commit).map(Vec::len).unwrap_or(0);
        story.expect(
            found == 1,
            format!("commit {} has exactly one job ({found})", short(commit)),
        );
        if let Some([job]) = per_commit.get(commit).map(Vec::as_slice) {
            story.expect(
                status(job) == *want,
                format!("commit {} is {want} ({})", short(commit), status(job)),
            );
        }
    }
    story.expect(
        jobs.iter()
            .all(|j| matches!(status(j), "passed" | "failed")),
        "no job is left queued, running, errored or cancelled",
    );
    print_table(&jobs);
    println!("\nreassignment times:");
    for (what, secs) in &reassignments {
        println!("  {what:<16} {secs:6.2}s");
    }
    Ok(())
}

/// A GET over a plain TCP connection: the response's head and body as
/// text (enough to check a page answers without an HTTP client crate).
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to the pages at {addr}"))?;
    stream.set_read_timeout(Some(STEP_DEADLINE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// `--keep`: the dispatcher comes back on the story's state and serves
/// its pages until it is stopped (Ctrl-C).
fn keep_serving(c: &mut Cluster) -> Result<()> {
    c.dispatcher.restart()?;
    println!(
        "the dispatcher keeps serving the story's jobs: pages at http://{}/ (Ctrl-C stops it)",
        c.pages
    );
    while c.dispatcher.exited()?.is_none() {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn wait_runners(c: &Cluster, n: usize) -> Result<()> {
    wait_for(
        &format!("{n} runners to be connected"),
        STEP_DEADLINE,
        POLL,
        || {
            let runners = c.cli.json(&["runners"])?;
            Ok((runners.as_array().map(Vec::len) == Some(n)).then_some(()))
        },
    )
}

fn runner_index(c: &Cluster, name: &str) -> Result<usize> {
    c.runners
        .iter()
        .position(|r| r.name == name)
        .with_context(|| format!("the job runs on `{name}`, which this cluster did not start"))
}

fn print_table(jobs: &[Value]) {
    println!(
        "\n{:>4}  {:<10}  {:<9}  {:>7}  {:<9}  {:>9}",
        "JOB", "COMMIT", "STATUS", "ATTEMPT", "RUNNER", "DURATION"
    );
    for job in jobs.iter().rev() {
        let duration = job["tasks"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| t["duration_ms"].as_u64())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        println!(
            "{:>4}  {:<10}  {:<9}  {:>7}  {:<9}  {:>8.2}s",
            job["id"].as_u64().unwrap_or(0),
            short(job["commit"].as_str().unwrap_or("")),
            status(job),
            job["attempt"].as_u64().unwrap_or(0),
            job["runner"].as_str().unwrap_or("-"),
            duration as f64 / 1000.0
        );
    }
}
