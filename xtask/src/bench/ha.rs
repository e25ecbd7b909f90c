//! The dispatcher on PostgreSQL: P2 and P4 are S2 and S4 with the store
//! in a real PostgreSQL the scenario starts (as the tests do), and F is a
//! failover: the leader of two dispatchers SIGKILLed while a job streams
//! its log, timed until the standby leads and until it has accepted the
//! job's next log line (the same attempt: the job is not rerun).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use surveil_proto::JobInfo;
use surveil_tests::cluster::{self, Daemon, wait_for};
use surveil_tests::postgres::Postgres;

use super::client::Client;
use super::{Env, Figure, Outcome, Target, latency, pipeline_repo, scale};

/// The default `--leader-ttl`, which the failover target is stated in.
const LEADER_TTL: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(10);

/// A PostgreSQL server with a fresh database, and the dispatcher flags
/// that use it.
fn database() -> Result<(Postgres, Vec<String>)> {
    let pg = Postgres::start()
        .context("PostgreSQL is needed for this scenario (Debian: apt-get install postgresql)")?;
    let db = pg.create_database()?;
    let args = vec![
        "--store".to_owned(),
        pg.url(&db),
        "--store-password-file".to_owned(),
        pg.password_file().display().to_string(),
    ];
    Ok((pg, args))
}

pub fn p2(env: &Env, out: &mut Outcome) -> Result<()> {
    let (_pg, args) = database()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    out.notes
        .push("the dispatcher's store in a local PostgreSQL (its own initdb, defaults)".to_owned());
    latency::s2_on(env, out, "p2", &args, 100.0)
}

pub fn p4(env: &Env, out: &mut Outcome) -> Result<()> {
    let (_pg, args) = database()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    out.notes
        .push("the leader's store in a local PostgreSQL (its own initdb, defaults)".to_owned());
    scale::s4_on(env, out, "p4", &args)
}

/// Whether the dispatcher at `addr` answers as the leader.
fn leads(addr: &str) -> bool {
    Client::connect(addr)
        .and_then(|mut c| c.status())
        .is_ok_and(|s| !s.standby && s.leader_term > 0)
}

fn stands_by(addr: &str) -> bool {
    Client::connect(addr)
        .and_then(|mut c| c.status())
        .is_ok_and(|s| s.standby)
}

/// The log bytes the store holds for the job's current attempt.
fn logged(job: &JobInfo) -> (u32, u64) {
    let bytes = job
        .attempts
        .iter()
        .find(|a| a.attempt == job.attempt)
        .map_or(0, |a| a.log_bytes);
    (job.attempt, bytes)
}

pub fn f(env: &Env, out: &mut Outcome) -> Result<()> {
    let (_pg, store) = database()?;
    let dir = env.scratch("f")?;
    let repo_dir = dir.join("repo");
    // A job that prints a line every 50 ms for a minute: there is always
    // a next line to wait for.
    let repo = pipeline_repo(
        &repo_dir,
        "i=0; while [ $i -lt 1200 ]; do echo line $i; i=$((i+1)); sleep 0.05; done",
    )?;
    let mut extra: Vec<&str> = store.iter().map(String::as_str).collect();
    let ttl = format!("{}s", LEADER_TTL.as_secs());
    extra.extend(["--leader-ttl", &ttl]);
    let mut dispatchers: Vec<(Daemon, String)> = Vec::new();
    let (a, a_addr) = env.dispatcher(&dir.join("a"), &extra)?;
    wait_for(
        "dispatcher a to lead",
        Duration::from_secs(30),
        POLL,
        || Ok(leads(&a_addr).then_some(())),
    )?;
    dispatchers.push((a, a_addr));
    // A standby welcomes a client (it answers `status`), so the same
    // start-up wait works for it.
    let (b, b_addr) = env.dispatcher(&dir.join("b"), &extra)?;
    wait_for(
        "dispatcher b to stand by",
        Duration::from_secs(30),
        POLL,
        || Ok(stands_by(&b_addr).then_some(())),
    )?;
    dispatchers.push((b, b_addr));
    let both = format!("{},{}", dispatchers[0].1, dispatchers[1].1);
    let _runner = env.runner(&dir, "runner-1", &both, &[&repo])?;

    let mut took_over = Figure::new(
        "leader SIGKILL → standby leads",
        "s",
        Target::AtMost(LEADER_TTL.as_secs_f64() + 1.0),
    );
    let mut next_line = Figure::new(
        "leader SIGKILL → the job's next log line accepted",
        "s",
        Target::AtMost(LEADER_TTL.as_secs_f64() + 1.0),
    );
    let mut kept = Figure::new("jobs kept on their attempt", "jobs", Target::AtLeast(1.0));
    let mut leader = 0;
    for run in 0..3 {
        let standby = 1 - leader;
        let (leader_addr, standby_addr) = (
            dispatchers[leader].1.clone(),
            dispatchers[standby].1.clone(),
        );
        let commit = cluster::commit(
            &repo_dir,
            &format!("f-{run}"),
            &[("run", &format!("{run}\n"))],
        )?;
        let mut client = Client::connect(&leader_addr)?;
        let id = client.submit(&repo, "main", vec![commit])?[0];
        let before = wait_for(
            "the job to stream its log",
            Duration::from_secs(60),
            POLL,
            || Ok(client.job(id)?.map(|j| logged(&j)).filter(|(_, b)| *b > 0)),
        )?;
        // Let the store catch up with the stream, then take the figure
        // the new leader must exceed.
        std::thread::sleep(Duration::from_millis(300));
        let at_kill = client.job(id)?.map(|j| logged(&j)).unwrap_or(before);
        drop(client);
        let t0 = Instant::now();
        dispatchers[leader].0.kill()?;
        wait_for("the standby to lead", LEADER_TTL * 5, POLL, || {
            Ok(leads(&standby_addr).then_some(()))
        })?;
        took_over.samples.push(t0.elapsed().as_secs_f64());
        let mut client = Client::connect(&standby_addr)?;
        let after = wait_for(
            "the job's next log line on the new leader",
            LEADER_TTL * 10,
            POLL,
            || {
                Ok(client
                    .job(id)?
                    .map(|j| logged(&j))
                    .filter(|(_, bytes)| *bytes > at_kill.1))
            },
        )?;
        next_line.samples.push(t0.elapsed().as_secs_f64());
        if after.0 != at_kill.0 {
            bail!(
                "run {run}: the job moved from attempt {} to {} across the failover",
                at_kill.0,
                after.0
            );
        }
        kept.samples.push(1.0);
        client.cancel(id)?;
        wait_for("the job to end", Duration::from_secs(30), POLL, || {
            Ok(client
                .job(id)?
                .filter(|j| {
                    surveil_proto::JobStatus::try_from(j.status).is_ok_and(|s| s.is_final())
                })
                .map(|_| ()))
        })?;
        // The old leader comes back as the standby.
        dispatchers[leader].0.restart()?;
        wait_for(
            "the old leader to stand by",
            Duration::from_secs(30),
            POLL,
            || Ok(stands_by(&leader_addr).then_some(())),
        )?;
        leader = standby;
    }
    out.figures.extend([took_over, next_line, kept]);
    out.notes.push(format!(
        "two dispatchers on a local PostgreSQL, --leader-ttl {ttl}; one runner given both \
         addresses; the leader alternates between the runs"
    ));
    Ok(())
}
