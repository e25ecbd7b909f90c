//! The PostgreSQL store's statements: each write as a function the writer
//! runs inside its own savepoint of a batch transaction, each read as a
//! function run on a pooled connection.
//!
//! The attempt-fencing decisions are `store/fencing.rs`'s, shared with the
//! SQLite store and re-checked inside the transaction; the contiguous log
//! end follows the SQLite store's rule; the leader-term fence is the
//! writer's, checked once per transaction. This
//! file must not begin or commit transactions or open connections.

use bytes::Bytes;
use deadpool_postgres::ClientWrapper as Conn;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::Ctx;
use crate::domain::{
    Attempt, AttemptRecord, AttemptStatus, BranchHead, CommitId, FinalStatus, Job, JobFilter,
    JobId, JobResult, JobStatus, LogChunk, LogStream, Origin, PruneRule, Pruned, Submitted,
    TaskResult, TaskStatus, TestReport,
};
use crate::store::columns::{JOB_COLUMNS, id_of, int};
use crate::store::fencing::{self, AssignPlan, AttemptRow};
use crate::store::{RecordOutcome, StoreError};

fn att(attempt: Attempt) -> i64 {
    i64::from(attempt.0)
}

fn invalid(what: &str) -> StoreError {
    StoreError::Invalid(format!("a stored row cannot be read back: {what}"))
}

fn get_u64(row: &Row, idx: usize) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(idx).ctx("reading a column")?;
    u64::try_from(value).map_err(|_| invalid(&format!("negative value {value}")))
}

fn get_opt_u64(row: &Row, idx: usize) -> Result<Option<u64>, StoreError> {
    let value: Option<i64> = row.try_get(idx).ctx("reading a column")?;
    value
        .map(|v| u64::try_from(v).map_err(|_| invalid(&format!("negative value {v}"))))
        .transpose()
}

fn get_attempt(row: &Row, idx: usize) -> Result<Attempt, StoreError> {
    let value: i64 = row.try_get(idx).ctx("reading an attempt")?;
    u32::try_from(value)
        .map(Attempt)
        .map_err(|_| invalid(&format!("attempt {value}")))
}

fn job_status(row: &Row, idx: usize) -> Result<JobStatus, StoreError> {
    let label: String = row.try_get(idx).ctx("reading a status")?;
    JobStatus::from_label(&label).ok_or_else(|| invalid(&format!("unknown status {label:?}")))
}

fn none_if_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The job's (status, current attempt), or `NoSuchJob`. Locks the job's
/// row for the rest of the transaction.
async fn job_state(c: &Conn, job: JobId) -> Result<(JobStatus, Attempt), StoreError> {
    let stmt = c
        .prepare_cached("SELECT status, attempt FROM jobs WHERE id = $1 FOR UPDATE")
        .await
        .ctx("preparing a job's state")?;
    let row = c
        .query_opt(&stmt, &[&id_of(job)])
        .await
        .ctx("reading a job's state")?
        .ok_or(StoreError::NoSuchJob(job))?;
    Ok((job_status(&row, 0)?, get_attempt(&row, 1)?))
}

async fn exec(
    c: &Conn,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> Result<u64, StoreError> {
    let stmt = c.prepare_cached(sql).await.ctx(what)?;
    c.execute(&stmt, params).await.ctx(what)
}

// ---- writes ----

pub async fn submit(
    c: &Conn,
    repo: &str,
    origin: &Origin,
    commits: &[CommitId],
    now_ms: u64,
) -> Result<Vec<Submitted>, StoreError> {
    if repo.is_empty() {
        return Err(StoreError::Invalid("a submit needs a repository".into()));
    }
    let now = int(now_ms, "time")?;
    let pull_request = origin
        .pull_request
        .map(|n| int(n, "pull request number"))
        .transpose()?;
    let insert = c
        .prepare_cached(
            "INSERT INTO jobs (repo, branch, commit_id, status, attempt, queued_at_ms, \
             ref_name, pull_request) VALUES ($1, $2, $3, 'queued', 0, $4, $5, $6) \
             ON CONFLICT (repo, commit_id) DO NOTHING RETURNING id",
        )
        .await
        .ctx("preparing submit")?;
    let find = c
        .prepare_cached(
            "SELECT id, status, branch, attempt, ref_name FROM jobs \
             WHERE repo = $1 AND commit_id = $2",
        )
        .await
        .ctx("preparing submit")?;
    let mut out = Vec::with_capacity(commits.len());
    for commit in commits {
        let created = c
            .query_opt(
                &insert,
                &[
                    &repo,
                    &origin.branch,
                    &commit.as_str(),
                    &now,
                    &origin.ref_name,
                    &pull_request,
                ],
            )
            .await
            .ctx("inserting a job")?;
        let submitted = match created {
            Some(row) => Submitted {
                id: JobId(get_u64(&row, 0)?),
                created: true,
                status: JobStatus::Queued,
                branch: origin.branch.clone(),
                ref_name: origin.ref_name.clone(),
                attempt: Attempt(0),
            },
            None => {
                let row = c
                    .query_one(&find, &[&repo, &commit.as_str()])
                    .await
                    .ctx("looking up a submitted commit")?;
                Submitted {
                    id: JobId(get_u64(&row, 0)?),
                    created: false,
                    status: job_status(&row, 1)?,
                    branch: row.try_get(2).ctx("reading a branch")?,
                    attempt: get_attempt(&row, 3)?,
                    ref_name: row.try_get(4).ctx("reading a ref")?,
                }
            }
        };
        out.push(submitted);
    }
    Ok(out)
}

pub async fn assign(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    runner: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    let id = id_of(job);
    let supersede = match fencing::assign(job, status, current, attempt)? {
        AssignPlan::CheckHolder => {
            let holder: Option<String> = c
                .query_opt(
                    "SELECT runner FROM attempts WHERE job_id = $1 AND attempt = $2",
                    &[&id, &att(attempt)],
                )
                .await
                .ctx("reading an attempt")?
                .map(|row| row.get(0));
            return fencing::same_holder(job, attempt, runner, holder.as_deref());
        }
        AssignPlan::Insert { supersede } => supersede,
    };
    let now = int(now_ms, "time")?;
    if let Some(superseded) = supersede {
        let reason = fencing::superseded_by(attempt);
        exec(
            c,
            "UPDATE attempts SET ended_reason = $3 WHERE job_id = $1 AND attempt = $2 \
             AND ended_reason IS NULL AND result_status IS NULL",
            &[&id, &att(superseded), &reason],
            "revoking a superseded attempt",
        )
        .await?;
    }
    exec(
        c,
        "INSERT INTO attempts (job_id, attempt, runner, assigned_at_ms) VALUES ($1, $2, $3, $4)",
        &[&id, &att(attempt), &runner, &now],
        "inserting an attempt",
    )
    .await?;
    exec(
        c,
        "UPDATE jobs SET status = 'running', attempt = $2, runner = $3, started_at_ms = $4, \
         message = NULL WHERE id = $1",
        &[&id, &att(attempt), &runner, &now],
        "marking a job running",
    )
    .await?;
    Ok(())
}

pub async fn started(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    if !fencing::is_running_attempt(status, current, attempt) {
        return Ok(());
    }
    exec(
        c,
        "UPDATE attempts SET started_at_ms = $3 \
         WHERE job_id = $1 AND attempt = $2 AND started_at_ms IS NULL",
        &[&id_of(job), &att(attempt), &int(now_ms, "time")?],
        "recording Started",
    )
    .await?;
    Ok(())
}

pub async fn append_log(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    chunk: &LogChunk,
    cap: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    if !fencing::log_accepted(status, current, attempt, chunk) {
        return Ok(());
    }
    let (id, a) = (id_of(job), att(attempt));
    let (start, end) = fencing::log_span(chunk)?;
    // A cap past the store's range is no cap.
    let cap_at = i64::try_from(cap).unwrap_or(i64::MAX);
    let clip = fencing::log_clip(start, end, cap_at);
    let data = clip.kept(&chunk.data);
    let task = i64::from(chunk.task);
    if !data.is_empty() {
        store_chunk(c, id, a, start, task, chunk.stream, data).await?;
    }
    if clip.truncates() {
        let marked = exec(
            c,
            "UPDATE attempts SET log_truncated = true \
             WHERE job_id = $1 AND attempt = $2 AND NOT log_truncated",
            &[&id, &a],
            "marking an attempt's log truncated",
        )
        .await?;
        if marked > 0 {
            let note = fencing::truncation_note(cap);
            store_chunk(c, id, a, cap_at, task, LogStream::System, note.as_bytes()).await?;
        }
    }
    Ok(())
}

/// Inserts one chunk (unless one is stored at its offset) and moves the
/// attempt's contiguous end past it when it joins up.
async fn store_chunk(
    c: &Conn,
    id: i64,
    a: i64,
    start: i64,
    task: i64,
    stream: LogStream,
    data: &[u8],
) -> Result<(), StoreError> {
    let stmt = c
        .prepare_cached("SELECT log_end FROM attempts WHERE job_id = $1 AND attempt = $2")
        .await
        .ctx("preparing a log append")?;
    let Some(row) = c
        .query_opt(&stmt, &[&id, &a])
        .await
        .ctx("reading an attempt's log end")?
    else {
        return Ok(());
    };
    let log_end: i64 = row.get(0);
    let end = start.saturating_add(i64::try_from(data.len()).unwrap_or(i64::MAX));
    let inserted = exec(
        c,
        "INSERT INTO log_chunks (job_id, attempt, log_offset, task, stream, data) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, attempt, log_offset) DO NOTHING",
        &[&id, &a, &start, &task, &i16::from(stream.code()), &data],
        "inserting a log chunk",
    )
    .await?;
    if inserted == 0 || start > log_end || end <= log_end {
        return Ok(());
    }
    advance_log_end(c, id, a, log_end, end).await
}

/// As in the SQLite store: only chunks starting in (scanned, new_end] can
/// extend the contiguous end further.
async fn advance_log_end(
    c: &Conn,
    id: i64,
    a: i64,
    log_end: i64,
    end: i64,
) -> Result<(), StoreError> {
    let (mut scanned, mut new_end) = (log_end, end);
    let reach = c
        .prepare_cached(
            "SELECT MAX(log_offset + length(data)) FROM log_chunks \
             WHERE job_id = $1 AND attempt = $2 AND log_offset > $3 AND log_offset <= $4",
        )
        .await
        .ctx("preparing the log end scan")?;
    loop {
        let further: Option<i64> = c
            .query_one(&reach, &[&id, &a, &scanned, &new_end])
            .await
            .ctx("scanning for contiguous log chunks")?
            .get(0);
        match further {
            Some(further) if further > new_end => (scanned, new_end) = (new_end, further),
            _ => break,
        }
    }
    exec(
        c,
        "UPDATE attempts SET log_end = $3 WHERE job_id = $1 AND attempt = $2",
        &[&id, &a, &new_end],
        "advancing an attempt's log end",
    )
    .await?;
    Ok(())
}

pub async fn record_result(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    result: &JobResult,
    now_ms: u64,
) -> Result<RecordOutcome, StoreError> {
    let (status, current) = job_state(c, job).await?;
    let (id, a) = (id_of(job), att(attempt));
    let row = c
        .query_opt(
            "SELECT result_status IS NOT NULL, ended_reason IS NOT NULL \
             FROM attempts WHERE job_id = $1 AND attempt = $2",
            &[&id, &a],
        )
        .await
        .ctx("reading an attempt")?
        .map(|row| AttemptRow {
            has_result: row.get(0),
            revoked: row.get(1),
        });
    if let Some(outcome) = fencing::result(status, current, attempt, row) {
        return Ok(outcome);
    }
    let now = int(now_ms, "time")?;
    let label = result.status.label();
    let message = none_if_empty(&result.message);
    exec(
        c,
        "UPDATE attempts SET result_status = $3, result_message = $4, finished_at_ms = $5 \
         WHERE job_id = $1 AND attempt = $2",
        &[&id, &a, &label, &message, &now],
        "recording an attempt's result",
    )
    .await?;
    let insert = c
        .prepare_cached(
            "INSERT INTO task_results \
             (job_id, attempt, idx, name, status, exit_code, signal, duration_ms, message, \
              started_at_ms, tests_passed, tests_failed, tests_skipped, tests_failing, \
              tests_problems) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .await
        .ctx("preparing task results")?;
    for (idx, task) in (0_i64..).zip(&result.tasks) {
        let duration = int(task.duration_ms, "task duration")?;
        let started = task
            .started_at_ms
            .map(|ms| int(ms, "task start"))
            .transpose()?;
        let report = task.report.as_ref();
        let count = |f: fn(&TestReport) -> u32| report.map(|r| i64::from(f(r)));
        let (passed, failed, skipped) = (
            count(|r| r.passed),
            count(|r| r.failed),
            count(|r| r.skipped),
        );
        let failing = report.map(|r| r.failing.clone());
        let problems = report.map(|r| r.problems.clone());
        c.execute(
            &insert,
            &[
                &id,
                &a,
                &idx,
                &task.name,
                &task.status.label(),
                &task.exit_code,
                &task.signal,
                &duration,
                &task.message,
                &started,
                &passed,
                &failed,
                &skipped,
                &failing,
                &problems,
            ],
        )
        .await
        .ctx("inserting a task result")?;
    }
    exec(
        c,
        "UPDATE jobs SET status = $2, message = $3, finished_at_ms = $4 WHERE id = $1",
        &[&id, &label, &message, &now],
        "recording a job's result",
    )
    .await?;
    Ok(RecordOutcome::Recorded)
}

pub async fn requeue(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    reason: &str,
) -> Result<(), StoreError> {
    requeue_as(c, job, attempt, reason, false).await
}

/// A requeue of an attempt its runner handed back (see the SQLite store's
/// `hand_back`).
pub async fn hand_back(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    reason: &str,
) -> Result<(), StoreError> {
    requeue_as(c, job, attempt, reason, true).await
}

async fn requeue_as(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    reason: &str,
    handed_back: bool,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    if !fencing::is_running_attempt(status, current, attempt) {
        return Ok(());
    }
    let id = id_of(job);
    exec(
        c,
        "UPDATE attempts SET ended_reason = $3 \
         WHERE job_id = $1 AND attempt = $2 AND ended_reason IS NULL",
        &[&id, &att(attempt), &reason],
        "revoking an attempt",
    )
    .await?;
    exec(
        c,
        "UPDATE jobs SET status = 'queued', runner = NULL, started_at_ms = NULL, \
         handed_back = handed_back + $2 WHERE id = $1",
        &[&id, &i64::from(handed_back)],
        "requeueing a job",
    )
    .await?;
    Ok(())
}

pub async fn finish(
    c: &Conn,
    job: JobId,
    new_status: FinalStatus,
    message: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    if status.is_final() {
        return Ok(());
    }
    let id = id_of(job);
    if status == JobStatus::Running {
        let reason = none_if_empty(message).unwrap_or(new_status.label());
        exec(
            c,
            "UPDATE attempts SET ended_reason = $3 \
             WHERE job_id = $1 AND attempt = $2 AND ended_reason IS NULL",
            &[&id, &att(current), &reason],
            "ending an attempt",
        )
        .await?;
    }
    exec(
        c,
        "UPDATE jobs SET status = $2, message = $3, finished_at_ms = $4 WHERE id = $1",
        &[
            &id,
            &new_status.label(),
            &none_if_empty(message),
            &int(now_ms, "time")?,
        ],
        "finishing a job",
    )
    .await?;
    Ok(())
}

/// Queues a new run of a finished job (see the SQLite store's `rerun`).
pub async fn rerun(c: &Conn, job: JobId) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job).await?;
    fencing::rerun(job, status)?;
    exec(
        c,
        "UPDATE jobs SET status = 'queued', runner = NULL, message = NULL, \
         started_at_ms = NULL, finished_at_ms = NULL, rerun_base = $2, cancel_requested = false, \
         handed_back = 0 \
         WHERE id = $1",
        &[&id_of(job), &att(current)],
        "queueing a rerun",
    )
    .await?;
    Ok(())
}

/// Records that a cancel was asked of a running job (see the SQLite
/// store's `request_cancel`).
pub async fn request_cancel(c: &Conn, job: JobId) -> Result<bool, StoreError> {
    let changed = exec(
        c,
        "UPDATE jobs SET cancel_requested = true WHERE id = $1 AND status = 'running'",
        &[&id_of(job)],
        "recording a cancel request",
    )
    .await?;
    Ok(changed > 0)
}

/// Deletes the logs of up to `batch` attempts of finished jobs `rule`
/// selects (see the SQLite store's `prune_logs`).
pub async fn prune_logs(c: &Conn, rule: PruneRule, batch: u32) -> Result<Pruned, StoreError> {
    let before = rule
        .finished_before_ms
        .map(|ms| int(ms, "time"))
        .transpose()?;
    let below_id: Option<i64> = match rule.keep_jobs {
        None => None,
        Some(0) => Some(i64::MAX),
        Some(keep) => c
            .query_opt(
                "SELECT id FROM jobs WHERE status NOT IN ('queued', 'running') \
                 ORDER BY id DESC LIMIT 1 OFFSET $1",
                &[&int(keep - 1, "--keep-jobs")?],
            )
            .await
            .ctx("finding the newest jobs to keep")?
            .map(|row| row.get(0)),
    };
    if before.is_none() && below_id.is_none() {
        return Ok(Pruned::default());
    }
    let rows = c
        .query(
            "SELECT a.job_id, a.attempt FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE NOT a.log_pruned AND j.status NOT IN ('queued', 'running') \
             AND (j.finished_at_ms < $1 OR j.id < $2) LIMIT $3",
            &[&before, &below_id, &i64::from(batch)],
        )
        .await
        .ctx("choosing attempts to prune")?;
    let mut pruned = Pruned {
        more: rows.len() >= batch as usize,
        ..Pruned::default()
    };
    for row in &rows {
        let (id, a): (i64, i64) = (row.get(0), row.get(1));
        let deleted = c
            .query_one(
                "WITH gone AS (DELETE FROM log_chunks WHERE job_id = $1 AND attempt = $2 \
                 RETURNING length(data) AS n) SELECT COALESCE(SUM(n), 0)::BIGINT FROM gone",
                &[&id, &a],
            )
            .await
            .ctx("deleting a pruned log")?;
        let bytes: i64 = deleted.get(0);
        exec(
            c,
            "UPDATE attempts SET log_pruned = true WHERE job_id = $1 AND attempt = $2",
            &[&id, &a],
            "marking a log pruned",
        )
        .await?;
        pruned.attempts += 1;
        pruned.bytes += u64::try_from(bytes).unwrap_or(0);
    }
    Ok(pruned)
}

// ---- reads ----

fn job_from_row(row: &Row) -> Result<Job, StoreError> {
    let commit: String = row.try_get(3).ctx("reading a commit")?;
    Ok(Job {
        id: JobId(get_u64(row, 0)?),
        repo: row.try_get(1).ctx("reading a repository")?,
        branch: row.try_get(2).ctx("reading a branch")?,
        commit: CommitId::parse(&commit).map_err(|e| invalid(&e.0))?,
        status: job_status(row, 4)?,
        attempt: get_attempt(row, 5)?,
        runner: row.try_get(6).ctx("reading a runner")?,
        message: row.try_get(7).ctx("reading a message")?,
        queued_at_ms: get_u64(row, 8)?,
        started_at_ms: get_opt_u64(row, 9)?,
        finished_at_ms: get_opt_u64(row, 10)?,
        ref_name: row.try_get(11).ctx("reading a ref")?,
        pull_request: get_opt_u64(row, 12)?,
        tasks: Vec::new(),
        rerun_base: get_attempt(row, 13)?,
        cancel_requested: row.try_get(14).ctx("reading whether a cancel was asked")?,
        handed_back: get_attempt(row, 15)?.0,
    })
}

async fn with_tasks(c: &Conn, mut job: Job) -> Result<Job, StoreError> {
    if job.attempt == Attempt(0) || !job.status.is_final() {
        return Ok(job);
    }
    job.tasks = tasks_of(c, job.id, job.attempt).await?;
    Ok(job)
}

/// The task results recorded for one attempt, in order.
async fn tasks_of(c: &Conn, job: JobId, attempt: Attempt) -> Result<Vec<TaskResult>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT name, status, exit_code, signal, duration_ms, message, started_at_ms, \
             tests_passed, tests_failed, tests_skipped, tests_failing, tests_problems \
             FROM task_results WHERE job_id = $1 AND attempt = $2 ORDER BY idx",
        )
        .await
        .ctx("preparing task results")?;
    let rows = c
        .query(&stmt, &[&id_of(job), &att(attempt)])
        .await
        .ctx("reading task results")?;
    rows.iter()
        .map(|row| {
            let label: String = row.get(1);
            Ok(TaskResult {
                name: row.get(0),
                status: TaskStatus::from_label(&label)
                    .ok_or_else(|| invalid(&format!("unknown task status {label:?}")))?,
                exit_code: row.get(2),
                signal: row.get(3),
                duration_ms: get_u64(row, 4)?,
                message: row.get(5),
                started_at_ms: get_opt_u64(row, 6)?,
                report: report_from_row(row, 7)?,
            })
        })
        .collect()
}

/// Every attempt of a job, oldest first, each with its tasks.
pub async fn attempts(c: &Conn, job: JobId) -> Result<Vec<AttemptRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT attempt, runner, result_status, result_message, ended_reason, \
             assigned_at_ms, started_at_ms, finished_at_ms, log_end, log_truncated, log_pruned \
             FROM attempts WHERE job_id = $1 ORDER BY attempt",
            &[&id_of(job)],
        )
        .await
        .ctx("reading attempts")?;
    let mut records = Vec::with_capacity(rows.len());
    for row in &rows {
        let result: Option<String> = row.try_get(2).ctx("reading a result status")?;
        let ended: Option<String> = row.try_get(4).ctx("reading why an attempt ended")?;
        let status = match &result {
            Some(label) => match JobStatus::from_label(label) {
                Some(JobStatus::Final(s)) => AttemptStatus::Ended(s),
                _ => return Err(invalid(&format!("unknown result {label:?}"))),
            },
            None if ended.is_some() => AttemptStatus::Revoked,
            None => AttemptStatus::Running,
        };
        let message: Option<String> = row.try_get(3).ctx("reading a result message")?;
        let attempt = get_attempt(row, 0)?;
        let tasks = if matches!(status, AttemptStatus::Ended(_)) {
            tasks_of(c, job, attempt).await?
        } else {
            Vec::new()
        };
        records.push(AttemptRecord {
            attempt,
            runner: row.try_get(1).ctx("reading a runner")?,
            status,
            message: message.or(ended),
            assigned_at_ms: get_u64(row, 5)?,
            started_at_ms: get_opt_u64(row, 6)?,
            finished_at_ms: get_opt_u64(row, 7)?,
            tasks,
            log_bytes: get_u64(row, 8)?,
            log_truncated: row.try_get(9).ctx("reading whether a log was truncated")?,
            log_pruned: row.try_get(10).ctx("reading whether a log was pruned")?,
        });
    }
    Ok(records)
}

/// The report columns from `idx` on; `None` when the task had none.
fn report_from_row(row: &Row, idx: usize) -> Result<Option<TestReport>, StoreError> {
    let count = |i: usize| -> Result<u32, StoreError> {
        let n: Option<i64> = row.try_get(i).ctx("reading a test count")?;
        u32::try_from(n.unwrap_or(0)).map_err(|_| invalid("a test count out of range"))
    };
    let passed: Option<i64> = row.try_get(idx).ctx("reading a test count")?;
    if passed.is_none() {
        return Ok(None);
    }
    let names = |i: usize| -> Result<Vec<String>, StoreError> {
        let list: Option<Vec<String>> = row.try_get(i).ctx("reading test names")?;
        Ok(list.unwrap_or_default())
    };
    Ok(Some(TestReport {
        passed: count(idx)?,
        failed: count(idx + 1)?,
        skipped: count(idx + 2)?,
        failing: names(idx + 3)?,
        problems: names(idx + 4)?,
    }))
}

async fn query_jobs(
    c: &Conn,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Job>, StoreError> {
    let stmt = c.prepare_cached(sql).await.ctx("preparing a job query")?;
    let rows = c.query(&stmt, params).await.ctx("reading jobs")?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        jobs.push(with_tasks(c, job_from_row(row)?).await?);
    }
    Ok(jobs)
}

pub async fn get_job(c: &Conn, id: JobId) -> Result<Option<Job>, StoreError> {
    let Ok(id) = i64::try_from(id.0) else {
        return Ok(None);
    };
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    Ok(query_jobs(c, &sql, &[&id]).await?.pop())
}

pub async fn list_jobs(c: &Conn, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
    let status = filter.status.map(|s| s.label().to_owned());
    // An id beyond the range is after every job.
    let before = filter
        .before
        .map(|b| i64::try_from(b.0).unwrap_or(i64::MAX));
    // A number beyond the range matches no job.
    let pull_request = filter.pull_request.map(|n| i64::try_from(n).unwrap_or(-1));
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    let mut filters = Vec::new();
    let wanted: [(&str, Option<&(dyn ToSql + Sync)>); 5] = [
        ("repo =", filter.repo.as_ref().map(|v| v as _)),
        ("branch =", filter.branch.as_ref().map(|v| v as _)),
        ("pull_request =", pull_request.as_ref().map(|v| v as _)),
        ("status =", status.as_ref().map(|v| v as _)),
        ("id <", before.as_ref().map(|v| v as _)),
    ];
    for (clause, value) in wanted {
        if let Some(value) = value {
            params.push(value);
            filters.push(format!("{clause} ${}", params.len()));
        }
    }
    let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs");
    if !filters.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&filters.join(" AND "));
    }
    sql.push_str(" ORDER BY id DESC");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    query_jobs(c, &sql, &params).await
}

pub async fn branches(c: &Conn) -> Result<Vec<BranchHead>, StoreError> {
    // The newest job of a pair is its highest id (ids grow with submission).
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN \
         (SELECT MAX(id) FROM jobs GROUP BY repo, branch) \
         ORDER BY repo COLLATE \"C\", branch COLLATE \"C\""
    );
    // Byte order, as SQLite sorts, whatever the database's locale.
    Ok(query_jobs(c, &sql, &[])
        .await?
        .into_iter()
        .map(|latest| BranchHead {
            repo: latest.repo.clone(),
            branch: latest.branch.clone(),
            latest,
        })
        .collect())
}

pub async fn unfinished(c: &Conn) -> Result<Vec<Job>, StoreError> {
    let sql =
        format!("SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') ORDER BY id");
    query_jobs(c, &sql, &[]).await
}

pub async fn read_log(
    c: &Conn,
    job: JobId,
    attempt: Attempt,
    offset: u64,
    max_bytes: usize,
) -> Result<Bytes, StoreError> {
    let (Ok(id), Ok(from)) = (i64::try_from(job.0), i64::try_from(offset)) else {
        return Ok(Bytes::new());
    };
    if max_bytes == 0 {
        return Ok(Bytes::new());
    }
    let a = att(attempt);
    let log_end: i64 = c
        .query_opt(
            "SELECT log_end FROM attempts WHERE job_id = $1 AND attempt = $2",
            &[&id, &a],
        )
        .await
        .ctx("reading a log's length")?
        .map_or(0, |row| row.get(0));
    // Same reasoning as the SQLite store: past the contiguous end only
    // chunks starting after it can cover `offset`.
    let after = if from >= log_end { log_end } else { -1 };
    let stmt = c
        .prepare_cached(
            "SELECT log_offset FROM log_chunks WHERE job_id = $1 AND attempt = $2 \
             AND log_offset <= $3 AND log_offset > $4 AND log_offset + length(data) > $3 \
             ORDER BY log_offset DESC LIMIT 1",
        )
        .await
        .ctx("preparing a log read")?;
    let Some(first) = c
        .query_opt(&stmt, &[&id, &a, &from, &after])
        .await
        .ctx("finding a log chunk")?
    else {
        return Ok(Bytes::new());
    };
    let first: i64 = first.get(0);
    // Enough chunks to fill `max_bytes` are read in pages, so a large log
    // is never loaded whole.
    let page = c
        .prepare_cached(
            "SELECT log_offset, data FROM log_chunks WHERE job_id = $1 AND attempt = $2 \
             AND log_offset >= $3 ORDER BY log_offset LIMIT 64",
        )
        .await
        .ctx("preparing a log read")?;
    let mut out = Vec::new();
    let mut pos = offset;
    let mut next = first;
    'pages: while out.len() < max_bytes {
        let rows = c
            .query(&page, &[&id, &a, &next])
            .await
            .ctx("reading log chunks")?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let start = get_u64(row, 0)?;
            if start > pos || out.len() >= max_bytes {
                break 'pages; // a gap: the bytes at `pos` have not arrived yet
            }
            let data: &[u8] = row.get(1);
            next = i64::try_from(start).unwrap_or(i64::MAX).saturating_add(1);
            let skip = usize::try_from(pos - start).unwrap_or(usize::MAX);
            if skip >= data.len() {
                continue;
            }
            let take = (data.len() - skip).min(max_bytes - out.len());
            out.extend_from_slice(&data[skip..skip + take]);
            pos += take as u64;
        }
    }
    Ok(Bytes::from(out))
}

pub async fn epoch(c: &Conn) -> Result<String, StoreError> {
    let row = c
        .query_one("SELECT epoch FROM store_epoch WHERE id = 1", &[])
        .await
        .ctx("reading the store epoch")?;
    Ok(row.get(0))
}

/// Replaces the epoch unless a dispatcher holds an unexpired leader term:
/// the restore step is for a database no dispatcher serves, and a live
/// leader would go on handing out the old epoch. `None` when one does.
pub async fn new_epoch(c: &Conn) -> Result<Option<String>, StoreError> {
    let row = c
        .query_opt(
            "UPDATE store_epoch \
             SET epoch = md5(gen_random_uuid()::text || gen_random_uuid()::text) \
             WHERE id = 1 AND NOT EXISTS \
                 (SELECT 1 FROM leader WHERE expires_at > clock_timestamp()) \
             RETURNING epoch",
            &[],
        )
        .await
        .ctx("replacing the store epoch")?;
    Ok(row.map(|row| row.get(0)))
}
