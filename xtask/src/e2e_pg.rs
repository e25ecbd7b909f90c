//! `cargo xtask e2e --store postgres`: the failover story. A real
//! PostgreSQL (started through the same harness as the tests), two
//! dispatchers on it, two runners, an observer and the CLI each given both
//! addresses, over a scratch repository under `target/e2e-postgres/`. The
//! leader is SIGKILLed mid-job; the standby takes over, the running job
//! finishes on its first attempt, a commit made after the failover is
//! built, and the record (read from the database) holds one job and one
//! attempt per commit. Exits non-zero if any expectation failed.
//!
//! It shares the default story's pipeline and its way of telling and
//! checking (`story.rs`), nothing else: `cargo xtask e2e` without `--store`
//! never starts PostgreSQL.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;
use surveil_tests::cluster::{self, Bins, Cli, Daemon, wait_for};
use surveil_tests::postgres::Postgres;

use crate::e2e::{PIPELINE, TEST_SCRIPT};
use crate::story::{
    POLL, STEP_DEADLINE, Story, short, shut_down, status, wait_final, wait_running,
};

const LEADER_TTL: &str = "3s";

struct Cluster {
    dir: PathBuf,
    repo: PathBuf,
    pg: Postgres,
    db: String,
    /// Both addresses, leader first at the start.
    addrs: [String; 2],
    dispatchers: Vec<Daemon>,
    runners: Vec<Daemon>,
    observer: Option<Daemon>,
    cli: Cli,
}

pub fn run(root: &Path, keep: bool) -> Result<()> {
    let mut story = Story::new();
    story.step("building the binaries");
    let bins = cluster::build(root, false)?;
    let dir = cluster::target_dir(root).join("e2e-postgres");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    story.step("starting PostgreSQL (initdb into a scratch directory)");
    let pg = Postgres::start()
        .context("PostgreSQL is needed for this story (Debian: apt-get install postgresql)")?;
    let db = pg.create_database()?;
    story.step(&format!("PostgreSQL on {}, database {db}", pg.addr()));
    let mut c = start(&dir, &bins, pg, db, &mut story)?;
    let result = tell(&mut c, &mut story);
    let daemons = c
        .observer
        .iter_mut()
        .chain(c.runners.iter_mut())
        .chain(c.dispatchers.iter_mut());
    let shutdown = shut_down(daemons, &mut story);
    story.verdict([result, shutdown], &c.dir)?;
    if keep {
        println!("\ncluster directory kept: {}", c.dir.display());
    } else {
        fs::remove_dir_all(&c.dir).ok();
    }
    story.step("all expectations held");
    Ok(())
}

fn dispatcher(
    c_dir: &Path,
    bins: &Bins,
    pg: &Postgres,
    db: &str,
    name: &str,
) -> Result<(String, Daemon)> {
    let addr = format!("127.0.0.1:{}", cluster::stable_port()?);
    let state = c_dir.join(name);
    fs::create_dir_all(&state)?;
    let daemon = Daemon::start(
        name,
        &bins.dispatcher,
        [
            "--listen",
            &addr,
            "--state-dir",
            &state.display().to_string(),
            "--store",
            &pg.url(db),
            "--store-password-file",
            &pg.password_file().display().to_string(),
            "--leader-ttl",
            LEADER_TTL,
            "--heartbeat-interval",
            "500ms",
            "--runner-timeout",
            "5s",
        ]
        .map(str::to_owned)
        .to_vec(),
        vec![],
        c_dir.join(format!("{name}.log")),
    )?;
    Ok((addr, daemon))
}

fn start(dir: &Path, bins: &Bins, pg: Postgres, db: String, story: &mut Story) -> Result<Cluster> {
    let repo = dir.join("repo");
    fs::create_dir_all(&repo)?;
    cluster::git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
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
    let (a, leader) = dispatcher(dir, bins, &pg, &db, "dispatcher-a")?;
    let single = Cli {
        bin: bins.cli.clone(),
        dispatch: a.clone(),
    };
    wait_for("dispatcher-a to lead", STEP_DEADLINE, POLL, || {
        Ok(leader_of(&single).filter(|(_, standby)| !standby))
    })?;
    story.step(&format!("dispatcher-a on {a} leads"));
    let (b, standby) = dispatcher(dir, bins, &pg, &db, "dispatcher-b")?;
    let on_b = Cli {
        bin: bins.cli.clone(),
        dispatch: b.clone(),
    };
    let named = wait_for("dispatcher-b to stand by", STEP_DEADLINE, POLL, || {
        Ok(leader_of(&on_b).filter(|(_, standby)| *standby))
    })?;
    story.expect(
        named.0 == a,
        format!(
            "dispatcher-b on {b} stands by and names the leader {}",
            named.0
        ),
    );
    let both = format!("{a},{b}");
    let mut runners = Vec::new();
    for name in ["runner-1", "runner-2"] {
        let work = dir.join(name);
        fs::create_dir_all(&work)?;
        let argv = [
            "--dispatch",
            &both,
            "--work-dir",
            &work.display().to_string(),
            "--name",
            name,
        ]
        .map(str::to_owned)
        .into_iter()
        .chain(cluster::runner_isolation_args())
        .chain([repo.display().to_string()])
        .collect();
        runners.push(Daemon::start(
            name,
            &bins.runner,
            argv,
            vec![],
            dir.join(format!("{name}.log")),
        )?);
    }
    let observer_state = dir.join("observer");
    fs::create_dir_all(&observer_state)?;
    // The observer lists the standby first: it must find the leader.
    let observer = Daemon::start(
        "observer",
        &bins.observer,
        [
            "--dispatch",
            &format!("{b},{a}"),
            "--state-dir",
            &observer_state.display().to_string(),
            "--every-commit",
            "--interval",
            "500ms",
            &repo.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        vec![],
        dir.join("observer.log"),
    )?;
    let c = Cluster {
        dir: dir.to_owned(),
        repo,
        pg,
        db,
        addrs: [a, b],
        dispatchers: vec![leader, standby],
        runners,
        observer: Some(observer),
        cli: Cli {
            bin: bins.cli.clone(),
            dispatch: both,
        },
    };
    story.step("two runners (--dispatch A,B) and the observer (--dispatch B,A) are up");
    let job = wait_final(&c.cli, &first)?;
    story.expect(
        status(&job) == "passed",
        format!(
            "the first commit passed through the leader (got {})",
            status(&job)
        ),
    );
    Ok(c)
}

/// `(leader address, whether the answering dispatcher is a standby)` from
/// `surveil status --json`, once a leader is known.
fn leader_of(cli: &Cli) -> Option<(String, bool)> {
    let status = cli.json(&["status"]).ok()?;
    let leader = &status["leader"];
    let addr = leader["addr"].as_str()?.to_owned();
    Some((addr, leader["standby"].as_bool()?))
}

fn tell(c: &mut Cluster, story: &mut Story) -> Result<()> {
    let [a, b] = c.addrs.clone();
    story.step("a slow commit runs; the leader is SIGKILLed mid-job");
    let slow = cluster::commit(&c.repo, "second: slow", &[("delay", "6\n")])?;
    let (id, runner) = wait_running(&c.cli, &slow)?;
    story.expect(true, format!("job {id} runs on {runner}"));
    let term_before = term(c)?;
    let killed = Instant::now();
    c.dispatchers[0].kill()?;
    let on_b = Cli {
        bin: c.cli.bin.clone(),
        dispatch: b.clone(),
    };
    wait_for("dispatcher-b to take over", STEP_DEADLINE, POLL, || {
        Ok(leader_of(&on_b).filter(|(addr, standby)| !standby && *addr == b))
    })?;
    let took_over = killed.elapsed().as_secs_f64();
    // A figure, not a pass mark: `cargo xtask bench` holds the target.
    story.step(&format!(
        "dispatcher-b leads {took_over:.2}s after the SIGKILL (TTL {LEADER_TTL})"
    ));
    story.expect(
        term(c)? > term_before,
        format!("the leader term moved on from {term_before}"),
    );
    let job = wait_final(&c.cli, &slow)?;
    story.expect(
        status(&job) == "passed" && job["attempt"] == 1,
        format!(
            "job {id}, running at the crash, finished {} on attempt {} (not rerun)",
            status(&job),
            job["attempt"]
        ),
    );

    story.step("a commit made after the failover reaches the new leader");
    let after = cluster::commit(&c.repo, "third: after the failover", &[("delay", "0\n")])?;
    let job = wait_final(&c.cli, &after)?;
    story.expect(
        status(&job) == "passed",
        format!("it {} ({})", status(&job), short(&after)),
    );

    story.step("dispatcher-a restarts (as systemd would) and stands by");
    c.dispatchers[0].restart()?;
    let on_a = Cli {
        bin: c.cli.bin.clone(),
        dispatch: a.clone(),
    };
    let named = wait_for("dispatcher-a to stand by", STEP_DEADLINE, POLL, || {
        Ok(leader_of(&on_a).filter(|(_, standby)| *standby))
    })?;
    story.expect(
        named.0 == b,
        format!("dispatcher-a stands by, naming {}", named.0),
    );
    check_record(c, story)
}

fn check_record(c: &Cluster, story: &mut Story) -> Result<()> {
    story.step("checking the record in PostgreSQL");
    let commits = cluster::git(&c.repo, &["rev-list", "HEAD"])?;
    let jobs = c.cli.jobs()?;
    for commit in commits.lines() {
        let found: Vec<&Value> = jobs.iter().filter(|j| j["commit"] == commit).collect();
        story.expect(
            found.len() == 1 && status(found[0]) == "passed",
            format!(
                "commit {} has one job, passed ({} found)",
                short(commit),
                found.len()
            ),
        );
    }
    let rows = c.pg.psql(
        &c.db,
        "SELECT job_id, count(*), count(result_status) FROM attempts GROUP BY job_id ORDER BY job_id",
    )?;
    println!("\n  job | attempts | results (from the attempts table)");
    for row in rows.lines() {
        let cells: Vec<&str> = row.split('|').collect();
        println!(
            "  {:>3} | {:>8} | {:>7}",
            cells[0],
            cells.get(1).unwrap_or(&"?"),
            cells.get(2).unwrap_or(&"?")
        );
        story.expect(
            cells.get(1) == Some(&"1") && cells.get(2) == Some(&"1"),
            format!("job {} has one attempt and one recorded result", cells[0]),
        );
    }
    Ok(())
}

fn term(c: &Cluster) -> Result<u64> {
    c.pg.psql(&c.db, "SELECT term FROM leader")?
        .parse()
        .context("reading the leader term")
}
