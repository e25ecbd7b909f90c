//! Scenario L: log ingest. One task prints 1 GiB (128 MiB in quick mode)
//! with `--max-log-size` raised above it; measured are the bytes stored
//! per second of the attempt, the dispatcher's peak memory (VmHWM), and
//! how long `status` takes meanwhile (the store's writer is busy with the
//! log; queries must not queue behind it).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use surveil_proto::JobStatus;
use surveil_tests::cluster;

use super::client::Client;
use super::{Env, Figure, Outcome, Target, pipeline_repo, vm_mib, wait_idle_runners};

/// How often `status` is timed while the log streams in.
const STATUS_EVERY: Duration = Duration::from_millis(100);

pub fn l(env: &Env, out: &mut Outcome) -> Result<()> {
    let mib: u64 = if env.quick { 128 } else { 1024 };
    let dir = env.scratch("l")?;
    // 1 KiB lines of x: what a chatty test prints, not one endless line.
    let command = format!(
        "head -c {} /dev/zero | tr '\\\\0' x | fold -w 1023",
        mib << 20
    );
    let repo = pipeline_repo(&dir.join("repo"), &command)?;
    let cap = format!("{}MiB", mib * 2);
    let (dispatcher, addr) = env.dispatcher(&dir, &["--max-log-size", &cap])?;
    let pid = dispatcher.pid().unwrap_or(0);
    let _runner = env.runner(&dir, "runner-1", &addr, &[&repo])?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 1, Duration::from_secs(30))?;
    let commit = cluster::git(&dir.join("repo"), &["rev-parse", "HEAD"])?;
    let id = client.submit(&repo, "main", vec![commit])?[0];

    let mut status_ms = Figure::new(
        "status round trip while the log streams in",
        "ms",
        Target::AtMost(100.0),
    );
    let deadline = Instant::now() + Duration::from_secs(if env.quick { 300 } else { 1800 });
    let job = loop {
        let at = Instant::now();
        client.status()?;
        status_ms.samples.push(at.elapsed().as_secs_f64() * 1000.0);
        let job = client.job(id)?;
        if let Some(job) = job.filter(|j| j.status().is_final()) {
            break job;
        }
        if Instant::now() > deadline {
            bail!("job {id} did not finish within the deadline");
        }
        std::thread::sleep(STATUS_EVERY);
    };
    if job.status() != JobStatus::Passed {
        bail!("job {id} ended {}", job.status().label());
    }
    let attempt = job
        .attempts
        .iter()
        .find(|a| a.attempt == job.attempt)
        .cloned()
        .unwrap_or_default();
    if attempt.log_truncated {
        bail!("the log was truncated under --max-log-size {cap}");
    }
    let (Some(started), Some(finished)) = (job.started_at_ms, job.finished_at_ms) else {
        bail!("job {id} lacks its times");
    };
    let seconds = (finished.saturating_sub(started)) as f64 / 1000.0;
    let stored_mib = attempt.log_bytes as f64 / f64::from(1 << 20);
    let mut rate = Figure::new(
        "log stored per second of the attempt",
        "MiB/s",
        Target::Info,
    );
    rate.samples.push(stored_mib / seconds.max(0.001));
    let mut peak = Figure::new(
        "dispatcher VmHWM after the job",
        "MiB",
        Target::AtMost(64.0),
    );
    peak.samples.push(vm_mib(pid, "VmHWM")?);
    out.notes.push(format!(
        "{stored_mib:.0} MiB stored in {seconds:.1} s (assigned → result); {} status samples",
        status_ms.samples.len()
    ));
    out.figures.extend([rate, peak, status_ms]);
    Ok(())
}
