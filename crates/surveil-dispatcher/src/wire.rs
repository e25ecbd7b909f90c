//! The only place where protocol messages and domain types meet: incoming
//! frames become domain requests and reports (a missing or invalid field
//! is refused here, with a message naming it), and domain answers become
//! frames. Also which message a role may send.
//!
//! Pure functions, no IO: the sessions call them, and so does the fuzz
//! target, so what it feeds the service is what a peer would.

use surveil_proto as proto;
use surveil_proto::{Envelope, Msg, Role};

use crate::auth::Access;
use crate::domain::{
    Attempt, AttemptRecord, AttemptStatus, CommitId, FinalStatus, Job, JobFilter, JobId, JobResult,
    JobStatus, LogChunk, LogStream, Origin, Pruned, ResultAck, RunnerHello, RunnerReport,
    RunnerView, StatusView, Submission, TaskResult, TaskStatus, TestReport, ToRunner, Waiting,
};
use crate::service::{CancelReply, LogEvent, RerunOutcome, RerunReply};

/// Why a frame cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The peer sent `Error`: it is leaving, with this reason.
    Peer(String),
    /// The frame breaks the protocol: answer `Error` with this text and
    /// close.
    Protocol(String),
}

/// What an observer or a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    /// Nothing to answer (a `Pong`).
    Ignore,
    /// Submit commits.
    Submit(Submission),
    /// List jobs.
    ListJobs(JobFilter),
    /// One job.
    GetJob(JobId),
    /// Read (and perhaps follow) a job's log.
    ReadLog {
        /// The job.
        job: JobId,
        /// Where to start in the attempt's log.
        offset: u64,
        /// Whether to keep reading until the job is final.
        follow: bool,
        /// The attempt whose log to read; `None` for the latest.
        attempt: Option<Attempt>,
    },
    /// The connected runners.
    ListRunners,
    /// The dispatcher's counters.
    GetStatus,
    /// Cancel a job.
    Cancel(JobId),
    /// Queue a new attempt of a finished job.
    Rerun(JobId),
    /// Delete old finished jobs' logs: by age, beyond the newest N, or
    /// (neither given) as `--retain-logs` says.
    Prune {
        /// Jobs finished longer ago than this.
        older_than_ms: Option<u64>,
        /// All finished jobs but the newest this many.
        keep_jobs: Option<u64>,
    },
}

impl ClientRequest {
    /// What the request needs of the peer's identity (checked by
    /// [`Identity::allows`](crate::auth::Identity::allows), the one policy);
    /// `None` for a `Pong`, which asks nothing.
    pub fn access(&self) -> Option<Access> {
        Some(match self {
            ClientRequest::Ignore => return None,
            ClientRequest::ListJobs(_)
            | ClientRequest::GetJob(_)
            | ClientRequest::ReadLog { .. }
            | ClientRequest::ListRunners
            | ClientRequest::GetStatus => Access::Read,
            ClientRequest::Submit(_) => Access::Submit,
            ClientRequest::Cancel(_) | ClientRequest::Rerun(_) | ClientRequest::Prune { .. } => {
                Access::Operate
            }
        })
    }
}

fn protocol(text: String) -> FrameError {
    FrameError::Protocol(text)
}

// ---- runners ----

/// A runner's `Hello`, checked: a name and at least one slot. The leases
/// it lists count only when they were assigned under `epoch`, the store's
/// (or the runner names no epoch, as runners before epochs did): leases of
/// another epoch name jobs of another life of the store.
pub fn runner_hello(
    hello: &proto::Hello,
    addr: String,
    epoch: &str,
) -> Result<RunnerHello, &'static str> {
    if hello.name.trim().is_empty() {
        return Err("a runner's Hello needs a name (its unique --name)");
    }
    if hello.slots == 0 {
        return Err("a runner's Hello needs slots of at least 1");
    }
    Ok(RunnerHello {
        name: hello.name.clone(),
        addr,
        slots: hello.slots,
        repos: hello.repos.clone(),
        labels: hello.labels.clone(),
        leases: if hello.epoch.is_empty() || hello.epoch == epoch {
            hello
                .leases
                .iter()
                .map(|l| (JobId(l.job_id), Attempt(l.attempt)))
                .collect()
        } else {
            Vec::new()
        },
    })
}

/// A frame from a runner, as a report.
pub fn runner_report(msg: Msg) -> Result<RunnerReport, FrameError> {
    match msg {
        Msg::Pong(_) => Ok(RunnerReport::Alive),
        Msg::Started(s) => Ok(RunnerReport::Started {
            job: JobId(s.job_id),
            attempt: Attempt(s.attempt),
        }),
        Msg::Log(log) => log_report(log),
        Msg::JobFinished(finished) => result_report(finished),
        Msg::Drain(_) => Ok(RunnerReport::Draining),
        Msg::HandBack(h) => Ok(RunnerReport::HandBack {
            job: JobId(h.job_id),
            attempt: Attempt(h.attempt),
            started: h.started,
            reason: if h.reason.trim().is_empty() {
                "its runner handed it back".to_owned()
            } else {
                h.reason
            },
        }),
        Msg::Error(err) => Err(FrameError::Peer(format!(
            "runner reported an error: {}",
            err.message
        ))),
        Msg::Hello(_) => Err(second_hello()),
        other @ (Msg::Welcome(_)
        | Msg::Reject(_)
        | Msg::Submit(_)
        | Msg::SubmitAck(_)
        | Msg::Assign(_)
        | Msg::Ping(_)
        | Msg::Cancel(_)
        | Msg::ResultAck(_)
        | Msg::Resend(_)
        | Msg::ListJobs(_)
        | Msg::ListJobsReply(_)
        | Msg::GetJob(_)
        | Msg::GetJobReply(_)
        | Msg::ReadLog(_)
        | Msg::ReadLogReply(_)
        | Msg::ListRunners(_)
        | Msg::ListRunnersReply(_)
        | Msg::GetStatus(_)
        | Msg::GetStatusReply(_)
        | Msg::CancelJob(_)
        | Msg::CancelJobReply(_)
        | Msg::RerunJob(_)
        | Msg::RerunJobReply(_)
        | Msg::Prune(_)
        | Msg::PruneReply(_)) => Err(protocol(format!(
            "a runner may not send {}; runners send Pong, Started, Log, JobFinished, Drain and HandBack",
            other.name()
        ))),
    }
}

fn second_hello() -> FrameError {
    protocol("a second Hello on one connection is not allowed".to_owned())
}

fn log_report(log: proto::Log) -> Result<RunnerReport, FrameError> {
    let stream = match proto::Stream::try_from(log.stream) {
        Ok(proto::Stream::Stdout) => LogStream::Stdout,
        Ok(proto::Stream::Stderr) => LogStream::Stderr,
        Ok(proto::Stream::System) => LogStream::System,
        Ok(proto::Stream::Unspecified) | Err(_) => {
            return Err(protocol(format!(
                "Log for job {} has stream {}; it must be STDOUT, STDERR or SYSTEM",
                log.job_id, log.stream
            )));
        }
    };
    Ok(RunnerReport::Log {
        job: JobId(log.job_id),
        attempt: Attempt(log.attempt),
        chunk: LogChunk {
            task: log.task,
            stream,
            offset: log.offset,
            data: log.data,
        },
    })
}

fn result_report(finished: proto::JobFinished) -> Result<RunnerReport, FrameError> {
    let job = finished.job_id;
    let status = match proto::JobStatus::try_from(finished.status) {
        Ok(proto::JobStatus::Passed) => FinalStatus::Passed,
        Ok(proto::JobStatus::Failed) => FinalStatus::Failed,
        Ok(proto::JobStatus::Error) => FinalStatus::Error,
        Ok(proto::JobStatus::Cancelled) => FinalStatus::Cancelled,
        _ => {
            return Err(protocol(format!(
                "JobFinished for job {job} has status {} (a final status is needed: PASSED, FAILED, ERROR or CANCELLED)",
                finished.status
            )));
        }
    };
    let tasks = finished
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, task)| {
            task_from_proto(task).map_err(|status| {
                protocol(format!(
                    "JobFinished for job {job}: task {i} has status {status}; it must be PASSED, FAILED, TIMED_OUT, CANCELLED, ERROR or SKIPPED"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RunnerReport::Finished {
        commit: finished.commit,
        job: JobId(job),
        attempt: Attempt(finished.attempt),
        result: JobResult {
            status,
            message: finished.message,
            tasks,
            infrastructure: finished.infrastructure,
        },
    })
}

/// A task result from the wire; `Err` carries the unknown status number.
fn task_from_proto(task: proto::TaskResult) -> Result<TaskResult, i32> {
    let status = match proto::TaskStatus::try_from(task.status) {
        Ok(proto::TaskStatus::Passed) => TaskStatus::Passed,
        Ok(proto::TaskStatus::Failed) => TaskStatus::Failed,
        Ok(proto::TaskStatus::TimedOut) => TaskStatus::TimedOut,
        Ok(proto::TaskStatus::Cancelled) => TaskStatus::Cancelled,
        Ok(proto::TaskStatus::Error) => TaskStatus::Error,
        Ok(proto::TaskStatus::Skipped) => TaskStatus::Skipped,
        Ok(proto::TaskStatus::Unspecified) | Err(_) => return Err(task.status),
    };
    Ok(TaskResult {
        name: task.name,
        status,
        exit_code: task.exit_code,
        signal: task.signal,
        duration_ms: task.duration_ms,
        message: task.message,
        started_at_ms: task.started_at_ms,
        report: task.report.map(|r| TestReport {
            passed: r.passed,
            failed: r.failed,
            skipped: r.skipped,
            failing: r.failing,
            problems: r.problems,
        }),
    })
}

/// What the dispatcher tells a runner, as a frame.
pub fn to_runner(msg: ToRunner) -> Envelope {
    match msg {
        ToRunner::Assign(a) => proto::Assign {
            job_id: a.job.0,
            attempt: a.attempt.0,
            repo: a.repo,
            branch: a.branch,
            commit: a.commit.as_str().to_owned(),
            r#ref: a.ref_name,
        }
        .into(),
        ToRunner::Cancel { job, attempt } => proto::Cancel {
            job_id: job.0,
            attempt: attempt.0,
        }
        .into(),
        ToRunner::Ping { seq } => proto::Ping { seq }.into(),
        ToRunner::Resend(r) => proto::Resend {
            job_id: r.job.0,
            attempt: r.attempt.0,
            log_offset: r.log_offset,
            result: r.result,
            retry_after_ms: u32::try_from(r.retry_after.as_millis()).unwrap_or(u32::MAX),
            message: r.message,
            started: r.started,
        }
        .into(),
    }
}

/// The answer to a runner's result.
pub fn result_ack(job: JobId, attempt: Attempt, ack: ResultAck) -> proto::ResultAck {
    proto::ResultAck {
        job_id: job.0,
        attempt: attempt.0,
        accepted: ack.accepted,
        message: ack.message,
    }
}

// ---- observers and clients ----

/// A frame from an observer (which may only submit) or a client.
pub fn client_request(role: Role, msg: Msg) -> Result<ClientRequest, FrameError> {
    let queries = role == Role::Client;
    match msg {
        Msg::Pong(_) => Ok(ClientRequest::Ignore),
        Msg::Submit(submit) => submission(submit).map(ClientRequest::Submit),
        Msg::Error(err) => Err(FrameError::Peer(format!(
            "peer reported an error: {}",
            err.message
        ))),
        Msg::Hello(_) => Err(second_hello()),
        Msg::ListJobs(q) if queries => Ok(ClientRequest::ListJobs(job_filter(&q))),
        Msg::GetJob(q) if queries => Ok(ClientRequest::GetJob(JobId(q.job_id))),
        Msg::ReadLog(q) if queries => Ok(ClientRequest::ReadLog {
            job: JobId(q.job_id),
            offset: q.offset,
            follow: q.follow,
            attempt: (q.attempt > 0).then_some(Attempt(q.attempt)),
        }),
        Msg::ListRunners(_) if queries => Ok(ClientRequest::ListRunners),
        Msg::GetStatus(_) if queries => Ok(ClientRequest::GetStatus),
        Msg::CancelJob(q) if queries => Ok(ClientRequest::Cancel(JobId(q.job_id))),
        Msg::RerunJob(q) if queries => Ok(ClientRequest::Rerun(JobId(q.job_id))),
        Msg::Prune(q) if queries => Ok(ClientRequest::Prune {
            older_than_ms: q.older_than_ms,
            keep_jobs: q.keep_jobs,
        }),
        other @ (Msg::ListJobs(_)
        | Msg::GetJob(_)
        | Msg::ReadLog(_)
        | Msg::ListRunners(_)
        | Msg::GetStatus(_)
        | Msg::CancelJob(_)
        | Msg::RerunJob(_)
        | Msg::Prune(_)
        | Msg::Welcome(_)
        | Msg::Reject(_)
        | Msg::SubmitAck(_)
        | Msg::Assign(_)
        | Msg::Ping(_)
        | Msg::Cancel(_)
        | Msg::Started(_)
        | Msg::Log(_)
        | Msg::JobFinished(_)
        | Msg::ResultAck(_)
        | Msg::Resend(_)
        | Msg::Drain(_)
        | Msg::HandBack(_)
        | Msg::ListJobsReply(_)
        | Msg::GetJobReply(_)
        | Msg::ReadLogReply(_)
        | Msg::ListRunnersReply(_)
        | Msg::GetStatusReply(_)
        | Msg::CancelJobReply(_)
        | Msg::RerunJobReply(_)
        | Msg::PruneReply(_)) => {
            let allowed = if queries {
                "clients send Submit, ListJobs, GetJob, ReadLog, ListRunners, GetStatus, CancelJob, RerunJob and Prune"
            } else {
                "observers send Submit"
            };
            Err(protocol(format!(
                "a {} may not send {}; {allowed}",
                role_name(role),
                other.name()
            )))
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Runner => "runner",
        Role::Observer => "observer",
        Role::Client => "client",
        Role::Unspecified => "peer without a role",
    }
}

fn submission(submit: proto::Submit) -> Result<Submission, FrameError> {
    let proto::Submit {
        repo,
        branch,
        commits,
        r#ref,
        pull_request,
    } = submit;
    if repo.trim().is_empty() {
        return Err(protocol(
            "Submit.repo is empty; name the repository as runners list it".to_owned(),
        ));
    }
    let commits = commits
        .iter()
        .map(|c| {
            CommitId::parse(c).map_err(|_| {
                protocol(format!(
                    "Submit.commits holds `{c}`, which is not a full 40-hex commit id"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let origin = origin(branch, r#ref, pull_request)?;
    Ok(Submission {
        repo,
        origin,
        commits,
    })
}

/// The longest ref name accepted, as git's own limit on a path.
const MAX_REF_LEN: usize = 4096;

/// A Submit's branch, ref and pull request: an empty ref stands for the
/// branch's; a ref must be a full one, and a pull request needs the ref
/// of its head.
fn origin(
    branch: String,
    ref_name: String,
    pull_request: Option<u64>,
) -> Result<Origin, FrameError> {
    if ref_name.is_empty() {
        if pull_request.is_some() {
            return Err(protocol(
                "Submit.pull_request is set without Submit.ref; name the request's head ref \
                 (refs/pull/N/head, refs/merge-requests/N/head)"
                    .to_owned(),
            ));
        }
        return Ok(Origin::branch(&branch));
    }
    let well_formed = ref_name.starts_with("refs/")
        && ref_name.len() <= MAX_REF_LEN
        && !ref_name.contains("..")
        && !ref_name.ends_with('/')
        && !ref_name.chars().any(|c| c.is_control() || c == ' ');
    if !well_formed {
        return Err(protocol(format!(
            "Submit.ref `{}` is not a full ref name (refs/heads/…, refs/pull/N/head, …)",
            ref_name.chars().take(200).collect::<String>()
        )));
    }
    Ok(Origin {
        branch,
        ref_name,
        pull_request,
    })
}

/// `ListJobs`: an unset (or unknown) status and a zero limit mean any and
/// all, as the CLI sends them.
fn job_filter(q: &proto::ListJobs) -> JobFilter {
    JobFilter {
        repo: q.repo.clone(),
        branch: q.branch.clone(),
        pull_request: q.pull_request,
        status: proto::JobStatus::try_from(q.status)
            .ok()
            .and_then(job_status_from_proto),
        before: q.before.map(JobId),
        limit: (q.limit > 0).then_some(q.limit),
    }
}

/// The most jobs one `ListJobsReply` carries, whatever the limit asked.
pub const MAX_LIST_PAGE: u32 = 1_000;

/// Bytes kept free in a reply frame for the envelope around the jobs.
const REPLY_MARGIN: usize = 64;

/// `filter` as one page: at most [`MAX_LIST_PAGE`] jobs, plus one to learn
/// whether more follow.
pub fn list_page(mut filter: JobFilter) -> (JobFilter, u32) {
    let page = filter.limit.map_or(MAX_LIST_PAGE, |l| l.min(MAX_LIST_PAGE));
    filter.limit = Some(page + 1);
    (filter, page)
}

/// The `ListJobsReply` for the jobs [`list_page`]'s filter found: cut to the
/// page and to what fits `max_frame`, with `more` saying so.
pub fn list_reply(
    jobs: Vec<Job>,
    page: u32,
    asked: Option<u32>,
    max_frame: usize,
    waiting: &std::collections::HashMap<JobId, Waiting>,
) -> proto::ListJobsReply {
    use prost::Message as _;
    let found = jobs.len();
    let mut reply = proto::ListJobsReply {
        jobs: jobs
            .into_iter()
            .take(page as usize)
            .map(|j| {
                let why = waiting.get(&j.id);
                with_reason(job_info(j), why)
            })
            .collect(),
        more: false,
    };
    // More than the page exist, and the asker wanted more than the page.
    let cut_by_page = found > page as usize && asked.is_none_or(|l| l > page);
    let budget = max_frame.saturating_sub(REPLY_MARGIN);
    let mut cut_by_size = false;
    while reply.encoded_len() > budget && !reply.jobs.is_empty() {
        // Halving keeps the trimming cheap for a page far over the limit.
        let keep = reply.jobs.len() / 2;
        reply.jobs.truncate(keep);
        cut_by_size = true;
    }
    reply.more = cut_by_page || cut_by_size;
    reply
}

fn job_status_from_proto(status: proto::JobStatus) -> Option<JobStatus> {
    Some(match status {
        proto::JobStatus::Unspecified => return None,
        proto::JobStatus::Queued => JobStatus::Queued,
        proto::JobStatus::Running => JobStatus::Running,
        proto::JobStatus::Passed => FinalStatus::Passed.into(),
        proto::JobStatus::Failed => FinalStatus::Failed.into(),
        proto::JobStatus::Error => FinalStatus::Error.into(),
        proto::JobStatus::Cancelled => FinalStatus::Cancelled.into(),
    })
}

fn job_status(status: JobStatus) -> i32 {
    let status = match status {
        JobStatus::Queued => proto::JobStatus::Queued,
        JobStatus::Running => proto::JobStatus::Running,
        JobStatus::Final(FinalStatus::Passed) => proto::JobStatus::Passed,
        JobStatus::Final(FinalStatus::Failed) => proto::JobStatus::Failed,
        JobStatus::Final(FinalStatus::Error) => proto::JobStatus::Error,
        JobStatus::Final(FinalStatus::Cancelled) => proto::JobStatus::Cancelled,
    };
    status.into()
}

fn task_status(status: TaskStatus) -> i32 {
    let status = match status {
        TaskStatus::Passed => proto::TaskStatus::Passed,
        TaskStatus::Failed => proto::TaskStatus::Failed,
        TaskStatus::TimedOut => proto::TaskStatus::TimedOut,
        TaskStatus::Cancelled => proto::TaskStatus::Cancelled,
        TaskStatus::Error => proto::TaskStatus::Error,
        TaskStatus::Skipped => proto::TaskStatus::Skipped,
    };
    status.into()
}

/// A job as client replies carry it.
pub fn job_info(job: Job) -> proto::JobInfo {
    proto::JobInfo {
        id: job.id.0,
        repo: job.repo,
        branch: job.branch,
        commit: job.commit.as_str().to_owned(),
        status: job_status(job.status),
        attempt: job.attempt.0,
        runner: job.runner,
        message: job.message,
        queued_at_ms: job.queued_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        r#ref: job.ref_name,
        pull_request: job.pull_request,
        tasks: job.tasks.into_iter().map(task_result).collect(),
        log_truncated: false,
        attempts: Vec::new(),
        reason: None,
    }
}

/// `info` with why its job still waits, for a queued job the scheduler
/// holds (`waiting`, from [`crate::service::Service::waiting_of`]). Other
/// jobs carry no reason: a stale one would mislead more than none.
pub fn with_reason(mut info: proto::JobInfo, waiting: Option<&Waiting>) -> proto::JobInfo {
    if info.status == proto::JobStatus::Queued as i32 {
        info.reason = waiting.map(|w| w.reason.describe());
    }
    info
}

fn task_result(t: TaskResult) -> proto::TaskResult {
    proto::TaskResult {
        name: t.name,
        status: task_status(t.status),
        exit_code: t.exit_code,
        signal: t.signal,
        duration_ms: t.duration_ms,
        message: t.message,
        started_at_ms: t.started_at_ms,
        report: t.report.map(|r| proto::TestReport {
            passed: r.passed,
            failed: r.failed,
            skipped: r.skipped,
            failing: r.failing,
            problems: r.problems,
        }),
    }
}

/// A job with its attempts, as `GetJob` and `RerunJob` replies carry it.
pub fn job_with_attempts(job: Job, attempts: Vec<AttemptRecord>) -> proto::JobInfo {
    let mut info = job_info(job);
    info.attempts = attempts
        .into_iter()
        .map(|a| proto::AttemptInfo {
            attempt: a.attempt.0,
            runner: a.runner,
            status: match a.status {
                AttemptStatus::Running => job_status(JobStatus::Running),
                AttemptStatus::Ended(s) => job_status(JobStatus::Final(s)),
                AttemptStatus::Revoked => proto::JobStatus::Unspecified as i32,
            },
            message: a.message,
            assigned_at_ms: a.assigned_at_ms,
            started_at_ms: a.started_at_ms,
            finished_at_ms: a.finished_at_ms,
            tasks: a.tasks.into_iter().map(task_result).collect(),
            log_bytes: a.log_bytes,
            log_truncated: a.log_truncated,
            log_pruned: a.log_pruned,
        })
        .collect();
    info.log_truncated = info
        .attempts
        .iter()
        .find(|a| a.attempt == info.attempt)
        .is_some_and(|a| a.log_truncated);
    info
}

/// The answer to `ListRunners`.
pub fn runners_reply(runners: Vec<RunnerView>) -> proto::ListRunnersReply {
    proto::ListRunnersReply {
        runners: runners
            .into_iter()
            .map(|r| proto::RunnerInfo {
                name: r.name,
                addr: r.addr,
                slots: r.slots,
                running: r.running.into_iter().map(|j| j.0).collect(),
                last_seen_ms: r.last_seen_ms,
                labels: r.labels,
                repos: r.repos,
                identity: r.identity,
                quarantined_until_ms: r.quarantined_until_ms.unwrap_or(0),
                infra_failures: r.infra_failures,
                draining: r.draining,
            })
            .collect(),
    }
}

/// The answer to `GetStatus`.
pub fn status_reply(status: StatusView) -> proto::GetStatusReply {
    proto::GetStatusReply {
        version: status.version,
        uptime_s: status.uptime_s,
        runners: status.runners,
        queued: status.queued,
        running: status.running,
        supervisor_restarts: status.supervisor_restarts.into_iter().collect(),
        reassignments: status.reassignments,
        refused_results: status.refused_results,
        quarantined: status.quarantined,
        draining: status.draining,
        leader_addr: status
            .leader
            .as_ref()
            .map(|l| l.addr.clone())
            .unwrap_or_default(),
        standby: status.leader.as_ref().is_some_and(|l| l.standby),
        leader_term: status.leader.as_ref().map_or(0, |l| l.term),
        epoch: status.epoch,
        store_healthy: Some(status.store_healthy),
        store_failures: status.store_failures,
    }
}

/// The answer to `CancelJob`.
pub fn cancel_reply(reply: CancelReply) -> proto::CancelJobReply {
    proto::CancelJobReply {
        ok: reply.ok,
        message: reply.message,
        job: reply.job.map(job_info),
    }
}

/// The answer to `RerunJob`.
pub fn rerun_reply(reply: RerunReply, attempts: Vec<AttemptRecord>) -> proto::RerunJobReply {
    proto::RerunJobReply {
        ok: reply.outcome == RerunOutcome::Queued,
        message: reply.message,
        job: reply.job.map(|j| job_with_attempts(j, attempts)),
    }
}

/// The answer to `Prune`.
pub fn prune_reply(outcome: Result<Pruned, String>) -> proto::PruneReply {
    match outcome {
        Ok(pruned) => proto::PruneReply {
            ok: true,
            message: format!(
                "deleted the logs of {} attempts ({} bytes)",
                pruned.attempts, pruned.bytes
            ),
            attempts: pruned.attempts,
            bytes: pruned.bytes,
        },
        Err(message) => proto::PruneReply {
            ok: false,
            message,
            ..proto::PruneReply::default()
        },
    }
}

/// One `ReadLogReply` for what reading `job`'s log found.
pub fn read_log_reply(job: JobId, event: LogEvent) -> proto::ReadLogReply {
    let base = proto::ReadLogReply {
        job_id: job.0,
        ..proto::ReadLogReply::default()
    };
    match event {
        LogEvent::Bytes {
            attempt,
            offset,
            data,
            status,
        } => proto::ReadLogReply {
            attempt: attempt.0,
            offset,
            data,
            status: job_status(status),
            ..base
        },
        LogEvent::End {
            attempt,
            offset,
            status,
        } => proto::ReadLogReply {
            attempt: attempt.0,
            offset,
            end: true,
            status: job_status(status),
            ..base
        },
        LogEvent::NotFound => proto::ReadLogReply {
            end: true,
            not_found: true,
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(status: i32, task_status: i32) -> Msg {
        Msg::JobFinished(proto::JobFinished {
            job_id: 7,
            attempt: 2,
            status,
            message: "m".into(),
            infrastructure: false,
            tasks: vec![proto::TaskResult {
                name: "unit".into(),
                status: task_status,
                exit_code: Some(1),
                signal: None,
                duration_ms: 5,
                message: String::new(),
                ..proto::TaskResult::default()
            }],
            commit: "c0ffee".into(),
        })
    }

    #[test]
    fn results_need_final_job_and_known_task_statuses() {
        let ok = runner_report(finished(proto::JobStatus::Failed.into(), 2)).unwrap();
        let RunnerReport::Finished {
            job,
            attempt,
            result,
            commit,
        } = ok
        else {
            panic!("{ok:?}");
        };
        assert_eq!((job, attempt), (JobId(7), Attempt(2)));
        assert_eq!(commit, "c0ffee", "the commit built is passed on");
        assert_eq!(result.status, FinalStatus::Failed);
        assert_eq!(result.tasks[0].status, TaskStatus::Failed);
        for status in [0, 1, 2, 99, -1] {
            let err = runner_report(finished(status, 1)).unwrap_err();
            assert_eq!(
                err,
                protocol(format!(
                    "JobFinished for job 7 has status {status} (a final status is needed: PASSED, FAILED, ERROR or CANCELLED)"
                ))
            );
        }
        let FrameError::Protocol(text) = runner_report(finished(3, 0)).unwrap_err() else {
            panic!("not a protocol error");
        };
        assert!(text.contains("task 0 has status 0"), "{text}");
    }

    #[test]
    fn every_status_maps_to_its_protocol_value() {
        for status in JobStatus::ALL {
            let back = proto::JobStatus::try_from(job_status(status)).unwrap();
            assert_eq!(job_status_from_proto(back), Some(status));
            assert_eq!(back.label(), status.label());
        }
        for status in TaskStatus::ALL {
            let back = proto::TaskStatus::try_from(task_status(status)).unwrap();
            assert_eq!(back.label(), status.label());
        }
    }

    #[test]
    fn a_log_needs_a_known_stream_and_roles_send_only_their_messages() {
        let log = |stream| {
            Msg::Log(proto::Log {
                job_id: 1,
                attempt: 1,
                task: 0,
                stream,
                offset: 0,
                data: "x".into(),
            })
        };
        assert!(matches!(
            runner_report(log(3)),
            Ok(RunnerReport::Log { .. })
        ));
        assert!(matches!(
            runner_report(log(0)),
            Err(FrameError::Protocol(_))
        ));
        assert_eq!(
            client_request(Role::Observer, Msg::GetStatus(proto::GetStatus {})),
            Err(protocol(
                "a observer may not send GetStatus; observers send Submit".into()
            ))
        );
        assert_eq!(
            client_request(Role::Client, Msg::GetStatus(proto::GetStatus {})),
            Ok(ClientRequest::GetStatus)
        );
        assert!(matches!(
            runner_report(Msg::Submit(proto::Submit::default())),
            Err(FrameError::Protocol(text)) if text.starts_with("a runner may not send Submit")
        ));
    }

    #[test]
    fn submits_need_a_repository_and_full_commit_ids() {
        let submit = |repo: &str, commits: &[&str]| {
            client_request(
                Role::Observer,
                Msg::Submit(proto::Submit {
                    repo: repo.into(),
                    branch: "main".into(),
                    commits: commits.iter().map(|c| (*c).to_owned()).collect(),
                    ..proto::Submit::default()
                }),
            )
        };
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF01";
        let Ok(ClientRequest::Submit(s)) = submit("/r", &[upper]) else {
            panic!("refused");
        };
        assert_eq!(s.commits[0].as_str(), upper.to_ascii_lowercase());
        assert!(
            matches!(submit(" ", &[upper]), Err(FrameError::Protocol(t)) if t.contains("Submit.repo is empty"))
        );
        assert!(
            matches!(submit("/r", &["abc"]), Err(FrameError::Protocol(t)) if t.contains("`abc`"))
        );
    }

    #[test]
    fn a_submit_names_its_ref_or_stands_for_its_branch() {
        let submit = |branch: &str, r#ref: &str, pull_request: Option<u64>| {
            client_request(
                Role::Observer,
                Msg::Submit(proto::Submit {
                    repo: "/r".into(),
                    branch: branch.into(),
                    commits: vec!["a".repeat(40)],
                    r#ref: r#ref.into(),
                    pull_request,
                }),
            )
            .map(|request| match request {
                ClientRequest::Submit(s) => s.origin,
                other => panic!("not a submit: {other:?}"),
            })
        };
        // An older observer names only the branch.
        assert_eq!(submit("main", "", None), Ok(Origin::branch("main")));
        assert_eq!(
            submit("main", "", None).unwrap().ref_name,
            "refs/heads/main"
        );
        assert_eq!(submit("", "", None).unwrap().ref_name, "");
        let pr = submit("feature", "refs/pull/7/head", Some(7)).unwrap();
        assert_eq!(
            (pr.branch.as_str(), pr.ref_name.as_str(), pr.pull_request),
            ("feature", "refs/pull/7/head", Some(7))
        );
        for bad in ["main", "refs/heads/a b", "refs/heads/../x", "refs/heads/"] {
            assert!(
                matches!(submit("main", bad, None), Err(FrameError::Protocol(t)) if t.contains("not a full ref name")),
                "{bad}"
            );
        }
        assert!(matches!(
            submit("main", "", Some(3)),
            Err(FrameError::Protocol(t)) if t.contains("Submit.pull_request is set without Submit.ref")
        ));
    }

    #[test]
    fn list_jobs_takes_unset_values_as_any() {
        let q = proto::ListJobs::default();
        assert_eq!(job_filter(&q), JobFilter::default());
        let q = proto::ListJobs {
            repo: Some("/r".into()),
            status: proto::JobStatus::Running.into(),
            limit: 5,
            branch: Some("dev".into()),
            pull_request: Some(9),
            before: Some(40),
        };
        assert_eq!(
            job_filter(&q),
            JobFilter {
                repo: Some("/r".into()),
                branch: Some("dev".into()),
                pull_request: Some(9),
                status: Some(JobStatus::Running),
                limit: Some(5),
                before: Some(JobId(40)),
            }
        );
    }
}
