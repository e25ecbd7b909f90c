//! What both e2e stories (`e2e.rs` on SQLite, `e2e_pg.rs` on PostgreSQL)
//! tell their story with: the step log and its expectations, the waits on
//! a commit's job through the CLI, and the closing SIGTERM round. Kept
//! apart so a change to how a story reads the record reaches both.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

use surveil_tests::cluster::{Cli, Daemon, wait_for};

/// Upper bound on any single wait in a story: generous, because it only
/// matters when something is already wrong.
pub(crate) const STEP_DEADLINE: Duration = Duration::from_secs(60);
pub(crate) const POLL: Duration = Duration::from_millis(25);

pub(crate) struct Story {
    started: Instant,
    pub(crate) failures: Vec<String>,
}

impl Story {
    pub(crate) fn new() -> Story {
        Story {
            started: Instant::now(),
            failures: Vec::new(),
        }
    }

    pub(crate) fn step(&self, text: &str) {
        println!("[{:6.1}s] {text}", self.started.elapsed().as_secs_f64());
    }

    pub(crate) fn expect(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            println!("           ok: {what}");
        } else {
            println!("           FAILED: {what}");
            self.failures.push(what);
        }
    }

    /// Folds the story's and the shutdown's errors into the failures and
    /// fails the run when there are any, pointing at the daemons' logs.
    pub(crate) fn verdict(
        &mut self,
        results: [Result<()>; 2],
        logs: &std::path::Path,
    ) -> Result<()> {
        for err in results.into_iter().filter_map(Result::err) {
            self.failures.push(format!("{err:#}"));
        }
        if self.failures.is_empty() {
            return Ok(());
        }
        println!("\nlogs are in {}", logs.display());
        for failure in &self.failures {
            eprintln!("e2e: FAILED: {failure}");
        }
        bail!("{} expectation(s) failed", self.failures.len())
    }
}

pub(crate) fn status(job: &Value) -> &str {
    job["status"].as_str().unwrap_or("?")
}

pub(crate) fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

pub(crate) fn find_job(cli: &Cli, commit: &str) -> Result<Option<Value>> {
    Ok(cli
        .jobs()?
        .into_iter()
        .find(|j| j["commit"].as_str() == Some(commit)))
}

pub(crate) fn wait_final(cli: &Cli, commit: &str) -> Result<Value> {
    wait_for(
        &format!("commit {} to reach a final status", short(commit)),
        STEP_DEADLINE,
        POLL,
        || {
            Ok(find_job(cli, commit)?
                .filter(|j| matches!(status(j), "passed" | "failed" | "error" | "cancelled")))
        },
    )
}

/// `(job id, runner)` once the commit's job is running.
pub(crate) fn wait_running(cli: &Cli, commit: &str) -> Result<(u64, String)> {
    wait_for(
        &format!("commit {} to be running", short(commit)),
        STEP_DEADLINE,
        POLL,
        || {
            Ok(find_job(cli, commit)?.and_then(|j| {
                let runner = j["runner"].as_str()?.to_owned();
                (status(&j) == "running").then(|| (j["id"].as_u64().unwrap_or(0), runner))
            }))
        },
    )
}

/// SIGTERM to each daemon in the order given (clients of the dispatchers
/// first, so none sees its dispatcher vanish); each must exit 0.
pub(crate) fn shut_down<'a>(
    daemons: impl IntoIterator<Item = &'a mut Daemon>,
    story: &mut Story,
) -> Result<()> {
    story.step("SIGTERM to every daemon");
    let deadline = Duration::from_secs(20);
    for daemon in daemons {
        let name = daemon.name.clone();
        match daemon.terminate(deadline) {
            Ok(status) => story.expect(
                status.code() == Some(0),
                format!("{name} exited with {status}"),
            ),
            Err(err) => story.expect(false, format!("{name}: {err:#}")),
        }
    }
    Ok(())
}
