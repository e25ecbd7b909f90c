//! The synchronous halves of the service's operations: what each does with
//! the scheduler under its lock, between reading the request and
//! persisting, or between the store's answer and the reply.
//!
//! Pure like the scheduler (no IO, no clock, no tokio), and public so that
//! the fuzz target drives exactly the decisions the service makes rather
//! than a copy of them. The service calls nothing else on the scheduler
//! for these operations.

use std::time::Instant;

use crate::domain::{
    Attempt, CommitId, FinalStatus, Job, JobId, JobResult, JobStatus, ResultAck, RunnerReport,
    SessionId, Submitted,
};
use crate::scheduler::{JobSpec, ResultDecision, Scheduler};
use crate::store::RecordOutcome;

/// What the service must do with a runner's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportDecision {
    /// Nothing: a sign of life, or a `Started`/log chunk of an attempt that
    /// is not live (ignored, as the protocol says).
    Ignore,
    /// Persist the `Started` or the log chunk.
    Persist,
    /// The scheduler decided something (a drain began, a lease was handed
    /// back): apply its effects, then run the assignment pass.
    Apply,
    /// What to do with the result.
    Result(ResultDecision),
}

/// Start-up recovery from the store's unfinished jobs: queued jobs queue
/// again; running ones become orphans their runner may claim. Returns
/// (queued, running).
pub fn recover(sched: &mut Scheduler, unfinished: Vec<Job>, now: Instant) -> (usize, usize) {
    let mut queued = Vec::new();
    let mut running = Vec::new();
    let mut cancelled = Vec::new();
    for job in unfinished {
        let runner = job.runner.clone().unwrap_or_default();
        if job.status == JobStatus::Running && job.cancel_requested {
            cancelled.push(job.id);
        }
        let spec = JobSpec {
            id: job.id,
            repo: job.repo,
            branch: job.branch,
            ref_name: job.ref_name,
            commit: job.commit,
            attempt: job.attempt,
            rerun_base: job.rerun_base,
            handed_back: job.handed_back,
        };
        if job.status == JobStatus::Running {
            running.push((spec, runner));
        } else {
            queued.push(spec);
        }
    }
    let counts = (queued.len(), running.len());
    sched.handle_recovered(queued, running, now);
    // An acknowledged cancel outlives the restart: the runner is told again
    // when it reclaims the lease, or the job ends cancelled if it does not.
    for job in cancelled {
        sched.handle_cancel(job, now);
    }
    counts
}

/// After the store recorded a submit: new jobs, and known ones still
/// queued that the scheduler does not track, wait for a runner; a known
/// job that is running or final is left as it is. `rows` are the store's
/// answer, one per commit in `commits`. Returns whether any job waits.
pub fn submitted(
    sched: &mut Scheduler,
    repo: &str,
    commits: &[CommitId],
    rows: &[Submitted],
    now: Instant,
) -> bool {
    let mut queued = false;
    for (commit, row) in commits.iter().zip(rows) {
        if row.status != JobStatus::Queued || sched.knows_job(row.id) {
            continue;
        }
        sched.handle_job_submitted(
            JobSpec {
                id: row.id,
                repo: repo.to_owned(),
                branch: row.branch.clone(),
                ref_name: row.ref_name.clone(),
                commit: commit.clone(),
                attempt: row.attempt,
                // A commit resubmitted while queued after a rerun: the
                // rerun's own call sets the budget (`handle_rerun`).
                rerun_base: Attempt(0),
                handed_back: 0,
            },
            now,
        );
        queued = true;
    }
    queued
}

/// A report from `session`: any report shows the runner is alive; what
/// else it needs depends on whether its attempt is live.
pub fn report(
    sched: &mut Scheduler,
    session: SessionId,
    report: &RunnerReport,
    now: Instant,
) -> ReportDecision {
    let live = match report {
        RunnerReport::Alive => {
            sched.handle_frame(session, now);
            return ReportDecision::Ignore;
        }
        RunnerReport::Draining => {
            return if sched.handle_runner_draining(session, now) {
                ReportDecision::Apply
            } else {
                ReportDecision::Ignore
            };
        }
        RunnerReport::HandBack {
            job,
            attempt,
            reason,
            ..
        } => {
            return if sched.handle_hand_back(session, *job, *attempt, reason, now) {
                ReportDecision::Apply
            } else {
                ReportDecision::Ignore
            };
        }
        RunnerReport::Started { job, attempt } => {
            sched.handle_started(session, *job, *attempt, now)
        }
        RunnerReport::Log {
            job,
            attempt,
            chunk,
        } => {
            // Past a gap the runner was asked to fill, a chunk waits for
            // the resend that brings it again.
            sched.handle_log(session, *job, *attempt, now)
                && sched.log_wanted(*job, *attempt, chunk.offset)
        }
        RunnerReport::Finished {
            job,
            attempt,
            result,
            commit,
        } => {
            return ReportDecision::Result(self::result(
                sched, session, *job, *attempt, result, commit, now,
            ));
        }
    };
    if live {
        ReportDecision::Persist
    } else {
        ReportDecision::Ignore
    }
}

/// A result from `session`, decided (again, after a
/// [`ResultDecision::Pending`]). One marked `infrastructure` is an
/// infrastructure failure only as an `error` without task results (what a
/// runner sends when its fetch or checkout failed); any other is taken as
/// the result it says it is, so no runner can make a red build retried.
/// A result naming another `commit` than the
/// job's is refused whoever sends it: it was issued under another life of
/// the store (one restored from a backup without the restore step), whose
/// job ids named other commits, and must not finish this one. The lease
/// stays as it was.
pub fn result(
    sched: &mut Scheduler,
    session: SessionId,
    job: JobId,
    attempt: Attempt,
    result: &JobResult,
    commit: &str,
    now: Instant,
) -> ResultDecision {
    if !commit.is_empty()
        && let Some(expected) = sched.job_commit(job)
        && expected.as_str() != commit
    {
        let message = format!(
            "attempt {attempt} of job {job} is a build of commit {commit}, but job {job} is commit {expected} \
             (the result was issued under another life of this store); result refused"
        );
        sched.handle_frame(session, now);
        return ResultDecision::Revoked { message };
    }
    if is_infrastructure_failure(result) {
        return sched.handle_infra_failure(session, job, attempt, &result.message, now);
    }
    sched.handle_result(session, job, attempt, result.status, &result.message, now)
}

/// Whether `result` is an infrastructure failure the scheduler retries:
/// marked so by the runner, `error`, and no task ran.
pub fn is_infrastructure_failure(result: &JobResult) -> bool {
    result.infrastructure && result.status == FinalStatus::Error && result.tasks.is_empty()
}

/// The store answered a result write with `outcome` (after an accepted or
/// an unknown decision alike): the scheduler lets the job go, and this is
/// the acknowledgement to send.
pub fn result_recorded(
    sched: &mut Scheduler,
    job: JobId,
    attempt: Attempt,
    outcome: RecordOutcome,
) -> ResultAck {
    sched.handle_result_stored(job, attempt);
    match outcome {
        RecordOutcome::Recorded => ResultAck {
            accepted: true,
            message: String::new(),
        },
        RecordOutcome::Duplicate => ResultAck {
            accepted: true,
            message: "already recorded".to_owned(),
        },
        RecordOutcome::Stale => ResultAck {
            accepted: false,
            message: format!(
                "attempt {attempt} of job {job} is not the job's live attempt; result refused"
            ),
        },
    }
}

/// A result write failed, so nothing of it is durable: the job runs again
/// as before (no acknowledgement is sent; the runner resends).
pub fn result_failed(sched: &mut Scheduler, job: JobId, attempt: Attempt, now: Instant) {
    sched.handle_result_failed(job, attempt, now);
}

/// A log chunk's write failed: returns the offset the runner must resend
/// the attempt's log from (`None`: the attempt is no longer live).
pub fn log_failed(sched: &mut Scheduler, job: JobId, attempt: Attempt, offset: u64) -> Option<u64> {
    sched.handle_log_failed(job, attempt, offset)
}

/// A log chunk was recorded: a gap it fills is closed.
pub fn log_stored(sched: &mut Scheduler, job: JobId, attempt: Attempt, offset: u64) {
    sched.handle_log_stored(job, attempt, offset);
}
