//! Scenarios S1 (commit → result), S2 (throughput of 200 commits at once)
//! and S3a/S3b (failover after SIGKILL / SIGSTOP of a runner). Each builds
//! its own cluster under `target/bench/<id>/` and reads times from the
//! dispatcher's records (`queued_at`, `started_at`, `finished_at`, Unix ms
//! on this machine's clock) through a direct protocol client polling every
//! few milliseconds. It measures; it never changes daemon settings beyond
//! the flags each scenario states.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use surveil_proto::{JobInfo, JobStatus};
use surveil_tests::cluster::{self, Daemon, wait_for};

use super::client::Client;
use super::{Env, Figure, Outcome, Target, cpu_time, now_ms, pipeline_repo, wait_idle_runners};

/// Polling period of the client while timing.
const POLL: Duration = Duration::from_millis(5);
const DEADLINE: Duration = Duration::from_secs(60);

/// Makes an empty commit on the checked-out branch; returns the time just
/// before `git commit` started (ms) and the commit id.
fn timed_commit(repo: &Path, message: &str) -> Result<(f64, String)> {
    let t0 = now_ms();
    cluster::git(repo, &["commit", "--quiet", "--allow-empty", "-m", message])?;
    Ok((t0, cluster::git(repo, &["rev-parse", "HEAD"])?))
}

/// Polls until the job of `commit` satisfies `done`.
fn wait_job(
    client: &mut Client,
    repo: &str,
    commit: &str,
    what: &str,
    done: impl Fn(&JobInfo) -> bool,
) -> Result<JobInfo> {
    wait_for(what, DEADLINE, POLL, || {
        Ok(client
            .jobs(Some(repo), 8)?
            .into_iter()
            .find(|j| j.commit == commit && done(j)))
    })
}

fn wait_final(client: &mut Client, repo: &str, commit: &str) -> Result<JobInfo> {
    wait_job(client, repo, commit, "a job's result", |j| {
        j.status().is_final() && j.finished_at_ms.is_some()
    })
}

fn ms(v: Option<u64>) -> Result<f64> {
    v.map(|v| v as f64).context("the job lacks a timestamp")
}

pub fn s1(env: &Env, out: &mut Outcome) -> Result<()> {
    let dir = env.scratch("s1")?;
    let repo_dir = dir.join("repo");
    let repo = pipeline_repo(&repo_dir, "true")?;
    let url = format!("file://{repo}");
    let (_dispatcher, addr) = env.dispatcher(&dir, &[])?;
    let _runner = env.runner(&dir, "runner-1", &addr, &[&repo, &url])?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 1, Duration::from_secs(30))?;
    let runs = if env.quick { 3 } else { 7 };

    let mut watch = Figure::new("ref watch: commit → result", "ms", Target::AtMost(100.0));
    let mut to_queued = Figure::new("ref watch: commit → queued", "ms", Target::Info);
    let mut to_started = Figure::new("ref watch: queued → started", "ms", Target::Info);
    let mut to_finished = Figure::new("ref watch: started → result", "ms", Target::Info);
    {
        let _observer =
            env.observer(&dir, "observer-watch", &addr, &repo, &["--interval", "1s"])?;
        // With no cursor the observer submits the current tip first.
        let tip = cluster::git(&repo_dir, &["rev-parse", "HEAD"])?;
        wait_final(&mut client, &repo, &tip)?;
        for run in 0..runs {
            let (t0, commit) = timed_commit(&repo_dir, &format!("s1 watch {run}"))?;
            let job = wait_final(&mut client, &repo, &commit)?;
            let queued = ms(Some(job.queued_at_ms))?;
            let started = ms(job.started_at_ms)?;
            let finished = ms(job.finished_at_ms)?;
            if job.status() != JobStatus::Passed {
                bail!("job {} ended {}", job.id, job.status().label());
            }
            watch.samples.push(finished - t0);
            to_queued.samples.push(queued - t0);
            to_started.samples.push(started - queued);
            to_finished.samples.push(finished - started);
        }
    }
    out.figures
        .extend([watch, to_queued, to_started, to_finished]);

    // The observer has no switch to turn its ref watch off; a `file://`
    // URL is a remote to it, which it polls by fetching every --interval.
    out.notes.push(
        "polling measured with the repository named by a file:// URL (fetched every \
         --interval 1s; the observer has no switch to disable its ref watch)"
            .to_owned(),
    );
    let mut polling = Figure::new("polling 1s: commit → result", "ms", Target::AtMost(1100.0));
    {
        let _observer = env.observer(&dir, "observer-poll", &addr, &url, &["--interval", "1s"])?;
        let tip = cluster::git(&repo_dir, &["rev-parse", "HEAD"])?;
        wait_final(&mut client, &url, &tip)?;
        for run in 0..runs {
            let (t0, commit) = timed_commit(&repo_dir, &format!("s1 poll {run}"))?;
            let job = wait_final(&mut client, &url, &commit)?;
            polling.samples.push(ms(job.finished_at_ms)? - t0);
        }
    }
    out.figures.push(polling);
    Ok(())
}

/// Writes `count` empty commits on top of `base` to `refs/bench/<name>`
/// in one `git fast-import`; returns them oldest first.
fn make_commits(repo: &Path, base: &str, count: usize, name: &str) -> Result<Vec<String>> {
    let refname = format!("refs/bench/{name}");
    let mut stream = String::new();
    for i in 0..count {
        let message = format!("{name} commit {i}\n");
        stream.push_str(&format!(
            "commit {refname}\ncommitter Bench <bench@surveil.invalid> {} +0000\ndata {}\n{message}",
            1_800_000_000 + i,
            message.len()
        ));
        if i == 0 {
            stream.push_str(&format!("from {base}\n"));
        }
        stream.push('\n');
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running git fast-import")?;
    child
        .stdin
        .take()
        .context("fast-import stdin")?
        .write_all(stream.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("git fast-import failed ({status})");
    }
    let list = cluster::git(
        repo,
        &["rev-list", "--reverse", &format!("{base}..{refname}")],
    )?;
    Ok(list.lines().map(str::to_owned).collect())
}

pub fn s2(env: &Env, out: &mut Outcome) -> Result<()> {
    s2_on(env, out, "s2", &[], 50.0)
}

/// S2 with `store` added to the dispatcher's flags (a PostgreSQL store for
/// P2), under `target/bench/<name>`, against a throughput target of
/// `target_rate` jobs/s.
pub fn s2_on(
    env: &Env,
    out: &mut Outcome,
    name: &str,
    store: &[&str],
    target_rate: f64,
) -> Result<()> {
    const COMMITS: usize = 200;
    let dir = env.scratch(name)?;
    let repo_dir = dir.join("repo");
    let repo = pipeline_repo(&repo_dir, "true")?;
    let (dispatcher, addr) = env.dispatcher(&dir, store)?;
    let dispatcher_pid = dispatcher.pid().context("dispatcher pid")?;
    let _runners = (1..=4)
        .map(|i| env.runner(&dir, &format!("runner-{i}"), &addr, &[&repo]))
        .collect::<Result<Vec<Daemon>>>()?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 4, Duration::from_secs(30))?;
    let _observer = env.observer(&dir, "observer", &addr, &repo, &["--every-commit"])?;
    let tip = cluster::git(&repo_dir, &["rev-parse", "HEAD"])?;
    wait_final(&mut client, &repo, &tip)?;

    let mut rate = Figure::new("throughput", "jobs/s", Target::AtLeast(target_rate));
    let mut cpu = Figure::new("dispatcher CPU per job", "ms", Target::AtMost(5.0));
    let mut built = Figure::new("jobs passed", "jobs", Target::AtLeast(COMMITS as f64));
    for run in 0..3 {
        let base = cluster::git(&repo_dir, &["rev-parse", "HEAD"])?;
        let commits = make_commits(&repo_dir, &base, COMMITS, &format!("s2-{run}"))?;
        let last = commits.last().context("no commits made")?.clone();
        let cpu0 = cpu_time(dispatcher_pid)?;
        let t0 = now_ms();
        cluster::git(&repo_dir, &["update-ref", "refs/heads/main", &last])?;
        // Gentle polling here: every query costs the dispatcher CPU too.
        wait_for(
            "the last of the 200 commits to be queued",
            Duration::from_secs(120),
            Duration::from_millis(20),
            || {
                Ok(client
                    .jobs(Some(&repo), 1)?
                    .first()
                    .is_some_and(|j| j.commit == last)
                    .then_some(()))
            },
        )?;
        wait_for(
            "the 200 jobs to finish",
            Duration::from_secs(300),
            Duration::from_millis(50),
            || {
                let status = client.status()?;
                Ok((status.queued == 0 && status.running == 0).then_some(()))
            },
        )?;
        let cpu1 = cpu_time(dispatcher_pid)?;
        let jobs = client.jobs(Some(&repo), COMMITS as u32)?;
        let ours: Vec<&JobInfo> = jobs
            .iter()
            .filter(|j| commits.contains(&j.commit))
            .collect();
        let passed = ours
            .iter()
            .filter(|j| j.status() == JobStatus::Passed)
            .count();
        let end = ours
            .iter()
            .filter_map(|j| j.finished_at_ms)
            .max()
            .context("no job finished")? as f64;
        rate.samples.push(COMMITS as f64 / ((end - t0) / 1000.0));
        cpu.samples
            .push((cpu1 - cpu0).as_secs_f64() * 1000.0 / COMMITS as f64);
        built.samples.push(passed as f64);
        // The checked-out branch moved under the work tree; keep it clean.
        cluster::git(&repo_dir, &["reset", "--quiet", "--hard", &last])?;
    }
    out.figures.extend([rate, cpu, built]);
    out.notes.push(
        "CPU from /proc/PID/stat utime+stime (10 ms ticks) between the ref update and \
         the client seeing the queue empty"
            .to_owned(),
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Stop,
}

pub fn s3a(env: &Env, out: &mut Outcome) -> Result<()> {
    s3(env, out, Fault::Kill)
}

pub fn s3b(env: &Env, out: &mut Outcome) -> Result<()> {
    s3(env, out, Fault::Stop)
}

fn s3(env: &Env, out: &mut Outcome, fault: Fault) -> Result<()> {
    let name = match fault {
        Fault::Kill => "s3a",
        Fault::Stop => "s3b",
    };
    let dir = env.scratch(name)?;
    let repo_dir = dir.join("repo");
    let repo = pipeline_repo(&repo_dir, "sleep 5")?;
    // Default heartbeat (1 s) and runner timeout (5 s).
    let (_dispatcher, addr) = env.dispatcher(&dir, &[])?;
    let mut runners = ["runner-1", "runner-2"]
        .iter()
        .map(|n| env.runner(&dir, n, &addr, &[&repo]))
        .collect::<Result<Vec<Daemon>>>()?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 2, Duration::from_secs(30))?;
    let _observer = env.observer(&dir, "observer", &addr, &repo, &[])?;
    let tip = cluster::git(&repo_dir, &["rev-parse", "HEAD"])?;
    let first = wait_job(&mut client, &repo, &tip, "the tip's job", |_| true)?;
    client.cancel(first.id)?;
    wait_final(&mut client, &repo, &tip)?;
    wait_idle_runners(&mut client, 2, Duration::from_secs(30))?;

    let (figure_name, target) = match fault {
        Fault::Kill => ("SIGKILL → started on the other", 0.3),
        Fault::Stop => ("SIGSTOP → started on the other", 5.0 + 1.0),
    };
    let mut moved = Figure::new(figure_name, "s", Target::AtMost(target));
    let mut seen = Figure::new("… as seen by a 5 ms poll", "s", Target::Info);
    for run in 0..3 {
        let (_, commit) = timed_commit(&repo_dir, &format!("{name} {run}"))?;
        let job = wait_job(&mut client, &repo, &commit, "the job to start", |j| {
            j.status() == JobStatus::Running && j.started_at_ms.is_some()
        })?;
        let started = ms(job.started_at_ms)?;
        let victim = job
            .runner
            .clone()
            .context("a running job without a runner")?;
        let index = runners
            .iter()
            .position(|r| r.name == victim)
            .with_context(|| format!("job runs on unknown runner {victim}"))?;
        let wait = (started + 1000.0 - now_ms()).max(0.0);
        std::thread::sleep(Duration::from_secs_f64(wait / 1000.0));
        let t_fault = now_ms();
        match fault {
            Fault::Kill => {
                runners[index].kill()?;
            }
            Fault::Stop => runners[index].signal("STOP")?,
        }
        let result = wait_for(
            "the job to start on the other runner",
            DEADLINE,
            POLL,
            || {
                Ok(client.job(job.id)?.filter(|j| {
                    j.attempt >= 2 && j.status() == JobStatus::Running && j.started_at_ms.is_some()
                }))
            },
        );
        let observed = now_ms();
        if fault == Fault::Stop {
            runners[index].signal("CONT")?;
        }
        let again = result?;
        if again.runner.as_deref() == Some(victim.as_str()) {
            bail!("job {} restarted on the same runner {victim}", job.id);
        }
        moved
            .samples
            .push((ms(again.started_at_ms)? - t_fault) / 1000.0);
        seen.samples.push((observed - t_fault) / 1000.0);
        client.cancel(job.id)?;
        wait_final(&mut client, &repo, &commit)?;
        if fault == Fault::Kill {
            runners[index].restart()?;
        }
        wait_idle_runners(&mut client, 2, Duration::from_secs(60))?;
    }
    out.figures.extend([moved, seen]);
    if fault == Fault::Stop {
        out.notes
            .push("target = default --runner-timeout 5s + 1 s".to_owned());
    }
    Ok(())
}
