//! One job attempt from `Assign` to a durable `JobFinished`: check out the
//! commit, read the pipeline file, run the tasks, clean up, store the
//! result in the outbox, then hand it to the session.
//!
//! It talks to the session only through [`JobEvent`]s (in order: Started,
//! Logs, Finished) and never touches the connection; a job runs to the end
//! whether or not the dispatcher is reachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use surveil_proto::{Assign, JobFinished, JobStatus, Started};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::executor::{self, CancelSignal, ExecOptions, JobEnv};
use crate::joblog::{JobEvent, JobLog};
use crate::outbox::Outbox;
use crate::pipeline;
use crate::workspace::{CheckoutInfo, Workspace, WorkspaceError};

/// What every job of this runner shares.
#[derive(Debug)]
pub struct JobContext {
    /// Mirrors and job directories.
    pub workspace: Arc<Workspace>,
    /// Where results wait for their acknowledgement.
    pub outbox: Outbox,
    /// How tasks are run.
    pub exec: ExecOptions,
    /// Keep `jobs/<job>-<attempt>/` after the job (for debugging).
    pub keep_workdirs: bool,
    /// The runner's `--labels`; a pipeline needing others is refused.
    pub labels: Vec<String>,
}

/// Runs `assign` to the end and delivers its result as
/// [`JobEvent::Finished`] after storing it in the outbox, stamped with the
/// store `epoch` it was assigned under. A panic inside the job still
/// produces an `error` result. Every result names the commit it built.
pub async fn run(
    ctx: Arc<JobContext>,
    assign: Assign,
    epoch: String,
    cancel: CancelSignal,
    events: mpsc::Sender<JobEvent>,
) {
    let (job_id, attempt) = (assign.job_id, assign.attempt);
    let commit = assign.commit.clone();
    let inner = {
        let ctx = ctx.clone();
        let events = events.clone();
        tokio::spawn(
            async move {
                let mut log = JobLog::new(job_id, attempt, events);
                log.event(JobEvent::Started(Started { job_id, attempt }))
                    .await;
                let result = execute(&ctx, &assign, &cancel, &mut log).await;
                (result, log)
            }
            .in_current_span(),
        )
    };
    let (mut result, log) = match inner.await {
        Ok((result, log)) => (result, log),
        Err(e) => {
            let what = if e.is_panic() {
                "the runner's job task panicked"
            } else {
                "the runner's job task was aborted"
            };
            tracing::error!(error = %e, "{what}");
            let result = error_result(job_id, attempt, format!("{what}; this is a runner bug"));
            (result, JobLog::new(job_id, attempt, events))
        }
    };
    result.commit = commit;
    deliver(&ctx.outbox, result, &epoch, &log).await;
}

/// Stores `result` in the outbox and then passes it on; used for jobs that
/// never ran too (a refused repository).
pub async fn deliver(outbox: &Outbox, result: JobFinished, epoch: &str, log: &JobLog) {
    let stored = {
        let outbox = outbox.clone();
        let result = result.clone();
        let epoch = epoch.to_owned();
        tokio::task::spawn_blocking(move || outbox.store(&result, &epoch)).await
    };
    match stored {
        Ok(Ok(())) => {}
        // Still send it: the dispatcher may get it now, only a restart
        // before the ack would lose it.
        Ok(Err(e)) => tracing::error!(error = %e, "cannot store the result in the outbox"),
        Err(e) => tracing::error!(error = %e, "storing the result in the outbox failed"),
    }
    tracing::info!(status = result_status(&result).label(), "job finished");
    log.event(JobEvent::Finished(result)).await;
}

fn result_status(result: &JobFinished) -> JobStatus {
    result.status()
}

/// A result with no tasks: the job could not be run.
pub fn error_result(job_id: u64, attempt: u32, message: String) -> JobFinished {
    JobFinished {
        job_id,
        attempt,
        status: JobStatus::Error as i32,
        message,
        tasks: vec![],
        infrastructure: false,
        commit: String::new(),
    }
}

/// A result with no tasks, marked `infrastructure`: the job could not be
/// run because of this runner or the network (see
/// [`WorkspaceError::is_infrastructure`]), so the dispatcher may run it
/// elsewhere rather than record the error.
pub fn infrastructure_result(job_id: u64, attempt: u32, message: String) -> JobFinished {
    JobFinished {
        infrastructure: true,
        ..error_result(job_id, attempt, message)
    }
}

/// The result of a failed checkout: infrastructure or the job's own error,
/// by [`WorkspaceError::is_infrastructure`].
pub fn checkout_failed(job_id: u64, attempt: u32, error: &WorkspaceError) -> JobFinished {
    let message = error.to_string();
    if error.is_infrastructure() {
        infrastructure_result(job_id, attempt, message)
    } else {
        error_result(job_id, attempt, message)
    }
}

async fn execute(
    ctx: &JobContext,
    assign: &Assign,
    cancel: &CancelSignal,
    log: &mut JobLog,
) -> JobFinished {
    let dir = ctx.workspace.job_dir(assign.job_id, assign.attempt);
    let result = checkout_and_run(ctx, assign, cancel, log, &dir).await;
    if ctx.keep_workdirs {
        log.system(0, &format!("work directory kept: {}", dir.display()))
            .await;
    } else {
        remove_dir(dir).await;
    }
    result
}

/// Checks the assigned commit out into `dir` in a blocking thread; the
/// job's ref is fetched too when the commit is on no branch.
async fn checkout(
    ctx: &JobContext,
    assign: &Assign,
    dir: &std::path::Path,
    interrupt: Arc<AtomicBool>,
) -> Result<Result<CheckoutInfo, WorkspaceError>, tokio::task::JoinError> {
    let workspace = ctx.workspace.clone();
    let (repo, commit, dir) = (assign.repo.clone(), assign.commit.clone(), dir.to_owned());
    let git_ref = assign.r#ref.clone();
    tokio::task::spawn_blocking(move || {
        workspace.checkout_at(&repo, &commit, &git_ref, &dir, &interrupt)
    })
    .await
}

/// Checks the commit out into `dir`, saying so in the SYSTEM log; `Err` is
/// the job's result when it cannot go on (cancelled, or the checkout
/// failed).
async fn check_out(
    ctx: &JobContext,
    assign: &Assign,
    cancel: &CancelSignal,
    log: &mut JobLog,
    dir: &std::path::Path,
) -> Result<(), JobFinished> {
    let (job_id, attempt) = (assign.job_id, assign.attempt);
    // A directory of the same attempt can only be a leftover.
    remove_dir(dir.to_owned()).await;
    log.system(
        0,
        &format!("checking out {} of {}", assign.commit, assign.repo),
    )
    .await;
    let interrupt = Arc::new(AtomicBool::new(false));
    let watcher = {
        let interrupt = interrupt.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            interrupt.store(true, Ordering::Relaxed);
        })
    };
    let checkout = checkout(ctx, assign, dir, interrupt);
    // A fetch blocked on a silent server does not look at `interrupt`
    // until its read times out (minutes): a cancel waits one kill grace
    // for it, then leaves the blocking thread to its transport timeout
    // (it writes nothing once interrupted) and ends the job.
    let grace = ctx.exec.kill_grace;
    let checkout = tokio::select! {
        done = checkout => Some(done),
        () = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => None,
    };
    watcher.abort();
    let checkout = match checkout {
        Some(done) if !cancel.is_cancelled() => done,
        abandoned => {
            let left = if abandoned.is_none() {
                format!(" (the fetch did not stop within {grace:?}; left to its transport timeout)")
            } else {
                String::new()
            };
            log.system(
                0,
                &format!("cancelled during checkout: {}{left}", cancel.reason()),
            )
            .await;
            return Err(JobFinished {
                job_id,
                attempt,
                status: JobStatus::Cancelled as i32,
                message: cancel.reason(),
                tasks: vec![],
                infrastructure: false,
                commit: assign.commit.clone(),
            });
        }
    };
    match checkout {
        Ok(Ok(info)) => {
            let fetched = if info.fetched {
                "fetched, "
            } else {
                "from the mirror, "
            };
            log.system(0, &format!("checked out ({fetched}{} files)", info.files))
                .await;
        }
        Ok(Err(e)) => {
            let result = checkout_failed(job_id, attempt, &e);
            let kind = if result.infrastructure {
                " (infrastructure: the job may run again elsewhere)"
            } else {
                ""
            };
            log.system(0, &format!("checkout failed{kind}: {e}")).await;
            return Err(result);
        }
        Err(e) => {
            let message = format!("checkout failed: the checkout task ended: {e}");
            log.system(0, &message).await;
            return Err(error_result(job_id, attempt, message));
        }
    }
    Ok(())
}

async fn checkout_and_run(
    ctx: &JobContext,
    assign: &Assign,
    cancel: &CancelSignal,
    log: &mut JobLog,
    dir: &std::path::Path,
) -> JobFinished {
    let (job_id, attempt) = (assign.job_id, assign.attempt);
    if let Err(result) = check_out(ctx, assign, cancel, log, dir).await {
        return result;
    }
    let loaded = {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || pipeline::load(&dir)).await
    };
    let pipeline = match loaded {
        Ok(Ok(pipeline)) => pipeline,
        Ok(Err(e)) => {
            let message = e.to_string();
            log.system(0, &format!("pipeline error: {message}")).await;
            return error_result(job_id, attempt, message);
        }
        Err(e) => {
            let message = format!("reading {} failed: {e}", pipeline::PIPELINE_FILE);
            log.system(0, &message).await;
            return error_result(job_id, attempt, message);
        }
    };
    if let Err(message) = labels_present(&pipeline.labels, &ctx.labels) {
        log.system(0, &message).await;
        return error_result(job_id, attempt, message);
    }
    let info = JobEnv {
        job_id,
        attempt,
        repo: assign.repo.clone(),
        branch: assign.branch.clone(),
        git_ref: assign.r#ref.clone(),
        commit: assign.commit.clone(),
    };
    let outcome = executor::run_pipeline(&pipeline, dir, &info, &ctx.exec, log, cancel).await;
    log.system(0, &format!("job {}", outcome.status.label()))
        .await;
    JobFinished {
        job_id,
        attempt,
        status: outcome.status as i32,
        message: outcome.message,
        tasks: outcome.tasks,
        infrastructure: false,
        commit: assign.commit.clone(),
    }
}

/// The pipeline's `labels` must all be the runner's: the dispatcher does
/// not route by them yet, so a job must never run, silently, on a runner
/// that lacks what it asked for.
fn labels_present(wanted: &[String], have: &[String]) -> Result<(), String> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|l| !have.contains(l))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}: `labels` asks for {}, which this runner does not have (its labels: {}); \
         the dispatcher does not yet route jobs by pipeline labels",
        pipeline::PIPELINE_FILE,
        missing.join(", "),
        if have.is_empty() {
            "none".to_owned()
        } else {
            have.join(", ")
        }
    ))
}

async fn remove_dir(dir: PathBuf) {
    let shown = dir.display().to_string();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(dir = %shown, error = %e, "cannot remove the job's work directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_checkout_is_marked_infrastructure_only_for_the_runners_faults() {
        let unreachable = WorkspaceError::Unreachable {
            repo: "https://git.example/app.git".into(),
            reason: "connection refused".into(),
        };
        let result = checkout_failed(7, 2, &unreachable);
        assert!(result.infrastructure);
        assert_eq!(result.status(), JobStatus::Error);
        assert_eq!(result.message, unreachable.to_string());
        assert!(result.tasks.is_empty());
        let missing = WorkspaceError::CommitMissing {
            repo: "https://git.example/app.git".into(),
            commit: "0".repeat(40),
        };
        let result = checkout_failed(7, 2, &missing);
        assert!(
            !result.infrastructure,
            "a missing commit is the job's problem"
        );
        assert_eq!(result.status(), JobStatus::Error);
    }

    #[test]
    fn a_pipeline_needing_a_label_the_runner_lacks_is_refused() {
        let have = ["linux".to_owned(), "x86_64".to_owned()];
        assert_eq!(labels_present(&["linux".into()], &have), Ok(()));
        assert_eq!(super::labels_present(&[], &[]), Ok(()));
        let e = super::labels_present(&["gpu".into(), "linux".into()], &have).unwrap_err();
        assert!(e.starts_with(".surveil.toml: `labels` asks for gpu, which this runner does not have (its labels: linux, x86_64)"), "{e}");
    }
}
