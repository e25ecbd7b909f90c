//! The SQLite store's statements: each write as a function run by the
//! writer inside its own savepoint, each read as a function run on a
//! read-only connection.
//!
//! Fencing lives here because it must be re-checked in the same
//! transaction as the write it guards. This file must not open
//! connections, start threads or begin/commit transactions (the writer and
//! `SqliteStore::read` do).

use bytes::Bytes;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::Ctx;
use crate::domain::{
    Attempt, AttemptRecord, AttemptStatus, BranchHead, CommitId, FinalStatus, Job, JobFilter,
    JobId, JobResult, JobStatus, LogChunk, LogStream, Origin, PruneRule, Pruned, Submitted,
    TaskResult, TaskStatus, TestReport,
};
use crate::store::columns::{JOB_COLUMNS, id_of, int};
use crate::store::fencing::{self, AssignPlan, AttemptRow};
use crate::store::{RecordOutcome, StoreError};

/// A non-negative SQLite integer as u64; a negative one means the file was
/// edited or damaged.
fn get_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(idx)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, value))
}

fn get_opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let value: Option<i64> = row.get(idx)?;
    value
        .map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

fn get_attempt(row: &Row<'_>, idx: usize) -> rusqlite::Result<Attempt> {
    row.get(idx).map(Attempt)
}

fn bad_value(idx: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        what.to_owned().into(),
    )
}

fn job_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<JobStatus> {
    let label: String = row.get(idx)?;
    JobStatus::from_label(&label)
        .ok_or_else(|| bad_value(idx, &format!("unknown status {label:?}")))
}

fn task_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<TaskStatus> {
    let label: String = row.get(idx)?;
    TaskStatus::from_label(&label)
        .ok_or_else(|| bad_value(idx, &format!("unknown task status {label:?}")))
}

fn commit_id(row: &Row<'_>, idx: usize) -> rusqlite::Result<CommitId> {
    let text: String = row.get(idx)?;
    CommitId::parse(&text).map_err(|e| bad_value(idx, &e.0))
}

fn none_if_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The job's (status, current attempt), or `NoSuchJob`.
fn job_state(c: &Connection, job: JobId) -> Result<(JobStatus, Attempt), StoreError> {
    c.prepare_cached("SELECT status, attempt FROM jobs WHERE id = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([id_of(job)], |row| {
                Ok((job_status(row, 0)?, get_attempt(row, 1)?))
            })
            .optional()
        })
        .ctx("reading a job's state")?
        .ok_or(StoreError::NoSuchJob(job))
}

// ---- writes ----

pub fn submit(
    c: &Connection,
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
    let mut find = c
        .prepare_cached(
            "SELECT id, status, branch, attempt, ref_name FROM jobs \
             WHERE repo = ?1 AND commit_id = ?2",
        )
        .ctx("preparing submit")?;
    let mut insert = c
        .prepare_cached(
            "INSERT INTO jobs (repo, branch, commit_id, status, attempt, queued_at_ms, \
             ref_name, pull_request) VALUES (?1, ?2, ?3, 'queued', 0, ?4, ?5, ?6)",
        )
        .ctx("preparing submit")?;
    let mut out = Vec::with_capacity(commits.len());
    for commit in commits {
        let existing = find
            .query_row(params![repo, commit.as_str()], |row| {
                Ok(Submitted {
                    id: JobId(get_u64(row, 0)?),
                    created: false,
                    status: job_status(row, 1)?,
                    branch: row.get(2)?,
                    attempt: get_attempt(row, 3)?,
                    ref_name: row.get(4)?,
                })
            })
            .optional()
            .ctx("looking up a submitted commit")?;
        let submitted = match existing {
            Some(known) => known,
            None => {
                insert
                    .execute(params![
                        repo,
                        origin.branch,
                        commit.as_str(),
                        now,
                        origin.ref_name,
                        pull_request
                    ])
                    .ctx("inserting a job")?;
                Submitted {
                    // Row ids are positive: AUTOINCREMENT starts at 1.
                    id: JobId(u64::try_from(c.last_insert_rowid()).unwrap_or_default()),
                    created: true,
                    status: JobStatus::Queued,
                    branch: origin.branch.clone(),
                    ref_name: origin.ref_name.clone(),
                    attempt: Attempt(0),
                }
            }
        };
        out.push(submitted);
    }
    Ok(out)
}

pub fn assign(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    runner: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    let id = id_of(job);
    let supersede = match fencing::assign(job, status, current, attempt)? {
        AssignPlan::CheckHolder => {
            let holder: Option<String> = c
                .query_row(
                    "SELECT runner FROM attempts WHERE job_id = ?1 AND attempt = ?2",
                    params![id, attempt.0],
                    |row| row.get(0),
                )
                .optional()
                .ctx("reading an attempt")?;
            return fencing::same_holder(job, attempt, runner, holder.as_deref());
        }
        AssignPlan::Insert { supersede } => supersede,
    };
    let now = int(now_ms, "time")?;
    if let Some(superseded) = supersede {
        c.execute(
            "UPDATE attempts SET ended_reason = ?3 \
             WHERE job_id = ?1 AND attempt = ?2 AND ended_reason IS NULL AND result_status IS NULL",
            params![id, superseded.0, fencing::superseded_by(attempt)],
        )
        .ctx("revoking a superseded attempt")?;
    }
    c.execute(
        "INSERT INTO attempts (job_id, attempt, runner, assigned_at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![id, attempt.0, runner, now],
    )
    .ctx("inserting an attempt")?;
    c.execute(
        "UPDATE jobs SET status = 'running', attempt = ?2, runner = ?3, started_at_ms = ?4, \
         message = NULL WHERE id = ?1",
        params![id, attempt.0, runner, now],
    )
    .ctx("marking a job running")?;
    Ok(())
}

pub fn started(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    if !fencing::is_running_attempt(status, current, attempt) {
        return Ok(());
    }
    // The first Started wins: a resend after a reconnect changes nothing.
    c.execute(
        "UPDATE attempts SET started_at_ms = ?3 \
         WHERE job_id = ?1 AND attempt = ?2 AND started_at_ms IS NULL",
        params![id_of(job), attempt.0, int(now_ms, "time")?],
    )
    .ctx("recording Started")?;
    Ok(())
}

pub fn append_log(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    chunk: &LogChunk,
    cap: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    if !fencing::log_accepted(status, current, attempt, chunk) {
        return Ok(());
    }
    let id = id_of(job);
    let (start, end) = fencing::log_span(chunk)?;
    // A cap past the store's range is no cap.
    let cap_at = i64::try_from(cap).unwrap_or(i64::MAX);
    let clip = fencing::log_clip(start, end, cap_at);
    let data = clip.kept(&chunk.data);
    if !data.is_empty() {
        store_chunk(c, id, attempt, start, chunk.task, chunk.stream, data)?;
    }
    if clip.truncates() {
        let marked = c
            .prepare_cached(
                "UPDATE attempts SET log_truncated = 1 \
                 WHERE job_id = ?1 AND attempt = ?2 AND log_truncated = 0",
            )
            .and_then(|mut stmt| stmt.execute(params![id, attempt.0]))
            .ctx("marking an attempt's log truncated")?;
        if marked > 0 {
            let note = fencing::truncation_note(cap);
            store_chunk(
                c,
                id,
                attempt,
                cap_at,
                chunk.task,
                LogStream::System,
                note.as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// Inserts one chunk (unless one is stored at its offset) and moves the
/// attempt's contiguous end past it when it joins up.
fn store_chunk(
    c: &Connection,
    id: i64,
    attempt: Attempt,
    start: i64,
    task: u32,
    stream: LogStream,
    data: &[u8],
) -> Result<(), StoreError> {
    let log_end: Option<i64> = c
        .prepare_cached("SELECT log_end FROM attempts WHERE job_id = ?1 AND attempt = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![id, attempt.0], |row| row.get(0))
                .optional()
        })
        .ctx("reading an attempt's log end")?;
    let Some(log_end) = log_end else {
        return Ok(());
    };
    let end = start.saturating_add(i64::try_from(data.len()).unwrap_or(i64::MAX));
    let inserted = c
        .prepare_cached(
            "INSERT INTO log_chunks (job_id, attempt, log_offset, task, stream, data) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (job_id, attempt, log_offset) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![id, attempt.0, start, task, stream.code(), data]))
        .ctx("inserting a log chunk")?;
    if inserted == 0 || start > log_end || end <= log_end {
        return Ok(());
    }
    advance_log_end(c, id, attempt, log_end, end)
}

/// The chunk just stored ends at `end` past the contiguous prefix
/// `log_end`. Invariant kept here: no chunk starting at or before the
/// recorded end reaches past it. So only chunks starting in (scanned,
/// new_end] can extend it further: ones that arrived early, out of order.
fn advance_log_end(
    c: &Connection,
    id: i64,
    attempt: Attempt,
    log_end: i64,
    end: i64,
) -> Result<(), StoreError> {
    let (mut scanned, mut new_end) = (log_end, end);
    let mut reach = c
        .prepare_cached(
            "SELECT MAX(log_offset + length(data)) FROM log_chunks \
             WHERE job_id = ?1 AND attempt = ?2 AND log_offset > ?3 AND log_offset <= ?4",
        )
        .ctx("preparing the log end scan")?;
    loop {
        let further: Option<i64> = reach
            .query_row(params![id, attempt.0, scanned, new_end], |row| row.get(0))
            .ctx("scanning for contiguous log chunks")?;
        match further {
            Some(further) if further > new_end => (scanned, new_end) = (new_end, further),
            _ => break,
        }
    }
    c.prepare_cached("UPDATE attempts SET log_end = ?3 WHERE job_id = ?1 AND attempt = ?2")
        .and_then(|mut stmt| stmt.execute(params![id, attempt.0, new_end]))
        .ctx("advancing an attempt's log end")?;
    Ok(())
}

pub fn record_result(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    result: &JobResult,
    now_ms: u64,
) -> Result<RecordOutcome, StoreError> {
    let (status, current) = job_state(c, job)?;
    let id = id_of(job);
    let row = c
        .query_row(
            "SELECT result_status IS NOT NULL, ended_reason IS NOT NULL \
             FROM attempts WHERE job_id = ?1 AND attempt = ?2",
            params![id, attempt.0],
            |row| {
                Ok(AttemptRow {
                    has_result: row.get(0)?,
                    revoked: row.get(1)?,
                })
            },
        )
        .optional()
        .ctx("reading an attempt")?;
    if let Some(outcome) = fencing::result(status, current, attempt, row) {
        return Ok(outcome);
    }
    let now = int(now_ms, "time")?;
    let label = result.status.label();
    let message = none_if_empty(&result.message);
    c.execute(
        "UPDATE attempts SET result_status = ?3, result_message = ?4, finished_at_ms = ?5 \
         WHERE job_id = ?1 AND attempt = ?2",
        params![id, attempt.0, label, message, now],
    )
    .ctx("recording an attempt's result")?;
    let mut insert = c
        .prepare_cached(
            "INSERT INTO task_results \
             (job_id, attempt, idx, name, status, exit_code, signal, duration_ms, message, \
              started_at_ms, tests_passed, tests_failed, tests_skipped, tests_failing, \
              tests_problems) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .ctx("preparing task results")?;
    for (idx, task) in (0_i64..).zip(&result.tasks) {
        insert
            .execute(params![
                id,
                attempt.0,
                idx,
                task.name,
                task.status.label(),
                task.exit_code,
                task.signal,
                int(task.duration_ms, "task duration")?,
                task.message,
                task.started_at_ms
                    .map(|ms| int(ms, "task start"))
                    .transpose()?,
                task.report.as_ref().map(|r| r.passed),
                task.report.as_ref().map(|r| r.failed),
                task.report.as_ref().map(|r| r.skipped),
                task.report.as_ref().map(|r| lines(&r.failing)),
                task.report.as_ref().map(|r| lines(&r.problems)),
            ])
            .ctx("inserting a task result")?;
    }
    c.execute(
        "UPDATE jobs SET status = ?2, message = ?3, finished_at_ms = ?4 WHERE id = ?1",
        params![id, label, message, now],
    )
    .ctx("recording a job's result")?;
    Ok(RecordOutcome::Recorded)
}

pub fn requeue(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    reason: &str,
) -> Result<(), StoreError> {
    requeue_as(c, job, attempt, reason, false)
}

/// A requeue of an attempt its runner handed back (a drain): counted in
/// `handed_back`, so it does not count against `--max-attempts`.
pub fn hand_back(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    reason: &str,
) -> Result<(), StoreError> {
    requeue_as(c, job, attempt, reason, true)
}

fn requeue_as(
    c: &Connection,
    job: JobId,
    attempt: Attempt,
    reason: &str,
    handed_back: bool,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    if !fencing::is_running_attempt(status, current, attempt) {
        return Ok(());
    }
    let id = id_of(job);
    c.execute(
        "UPDATE attempts SET ended_reason = ?3 \
         WHERE job_id = ?1 AND attempt = ?2 AND ended_reason IS NULL",
        params![id, attempt.0, reason],
    )
    .ctx("revoking an attempt")?;
    c.execute(
        "UPDATE jobs SET status = 'queued', runner = NULL, started_at_ms = NULL, \
         handed_back = handed_back + ?2 WHERE id = ?1",
        params![id, i64::from(handed_back)],
    )
    .ctx("requeueing a job")?;
    Ok(())
}

pub fn finish(
    c: &Connection,
    job: JobId,
    new_status: FinalStatus,
    message: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    if status.is_final() {
        return Ok(());
    }
    let id = id_of(job);
    if status == JobStatus::Running {
        let reason = none_if_empty(message).unwrap_or(new_status.label());
        c.execute(
            "UPDATE attempts SET ended_reason = ?3 \
             WHERE job_id = ?1 AND attempt = ?2 AND ended_reason IS NULL",
            params![id, current.0, reason],
        )
        .ctx("ending an attempt")?;
    }
    c.execute(
        "UPDATE jobs SET status = ?2, message = ?3, finished_at_ms = ?4 WHERE id = ?1",
        params![
            id,
            new_status.label(),
            none_if_empty(message),
            int(now_ms, "time")?
        ],
    )
    .ctx("finishing a job")?;
    Ok(())
}

/// Queues a new run of a finished job: the next assignment is a new
/// attempt, and the earlier attempts' rows (results, tasks, logs) stay.
pub fn rerun(c: &Connection, job: JobId) -> Result<(), StoreError> {
    let (status, current) = job_state(c, job)?;
    fencing::rerun(job, status)?;
    c.execute(
        "UPDATE jobs SET status = 'queued', runner = NULL, message = NULL, \
         started_at_ms = NULL, finished_at_ms = NULL, rerun_base = ?2, cancel_requested = 0, \
         handed_back = 0 \
         WHERE id = ?1",
        params![id_of(job), current.0],
    )
    .ctx("queueing a rerun")?;
    Ok(())
}

/// Records that a cancel was asked of a running job (see
/// [`JobStore::request_cancel`](crate::store::JobStore::request_cancel)).
pub fn request_cancel(c: &Connection, job: JobId) -> Result<bool, StoreError> {
    let changed = c
        .prepare_cached("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND status = 'running'")
        .and_then(|mut stmt| stmt.execute([id_of(job)]))
        .ctx("recording a cancel request")?;
    Ok(changed > 0)
}

/// Deletes the logs of up to `batch` attempts of finished jobs `rule`
/// selects (see [`JobStore::prune_logs`](crate::store::JobStore::prune_logs)).
pub fn prune_logs(c: &Connection, rule: PruneRule, batch: u32) -> Result<Pruned, StoreError> {
    let before = rule
        .finished_before_ms
        .map(|ms| int(ms, "time"))
        .transpose()?;
    let below_id = match rule.keep_jobs {
        None => None,
        Some(0) => Some(i64::MAX),
        Some(keep) => c
            .query_row(
                "SELECT id FROM jobs WHERE status NOT IN ('queued', 'running') \
                 ORDER BY id DESC LIMIT 1 OFFSET ?1",
                [int(keep - 1, "--keep-jobs")?],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .ctx("finding the newest jobs to keep")?,
    };
    if before.is_none() && below_id.is_none() {
        return Ok(Pruned::default());
    }
    let picked: Vec<(i64, i64)> = c
        .prepare_cached(
            "SELECT a.job_id, a.attempt FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.log_pruned = 0 AND j.status NOT IN ('queued', 'running') \
             AND (j.finished_at_ms < ?1 OR j.id < ?2) LIMIT ?3",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![before, below_id, batch], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect()
        })
        .ctx("choosing attempts to prune")?;
    let mut pruned = Pruned {
        more: picked.len() >= batch as usize,
        ..Pruned::default()
    };
    for (id, attempt) in picked {
        let bytes: i64 = c
            .prepare_cached(
                "SELECT COALESCE(SUM(length(data)), 0) FROM log_chunks \
                 WHERE job_id = ?1 AND attempt = ?2",
            )
            .and_then(|mut stmt| stmt.query_row(params![id, attempt], |row| row.get(0)))
            .ctx("measuring a log to prune")?;
        c.prepare_cached("DELETE FROM log_chunks WHERE job_id = ?1 AND attempt = ?2")
            .and_then(|mut stmt| stmt.execute(params![id, attempt]))
            .ctx("deleting a pruned log")?;
        c.prepare_cached("UPDATE attempts SET log_pruned = 1 WHERE job_id = ?1 AND attempt = ?2")
            .and_then(|mut stmt| stmt.execute(params![id, attempt]))
            .ctx("marking a log pruned")?;
        pruned.attempts += 1;
        pruned.bytes += u64::try_from(bytes).unwrap_or(0);
    }
    Ok(pruned)
}

// ---- reads ----

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: JobId(get_u64(row, 0)?),
        repo: row.get(1)?,
        branch: row.get(2)?,
        commit: commit_id(row, 3)?,
        status: job_status(row, 4)?,
        attempt: get_attempt(row, 5)?,
        runner: row.get(6)?,
        message: row.get(7)?,
        queued_at_ms: get_u64(row, 8)?,
        started_at_ms: get_opt_u64(row, 9)?,
        finished_at_ms: get_opt_u64(row, 10)?,
        ref_name: row.get(11)?,
        pull_request: get_opt_u64(row, 12)?,
        tasks: Vec::new(),
        rerun_base: get_attempt(row, 13)?,
        cancel_requested: row.get(14)?,
        handed_back: get_attempt(row, 15)?.0,
    })
}

/// Fills in the task results of the job's recorded result: only the
/// current attempt can have one.
fn with_tasks(c: &Connection, mut job: Job) -> Result<Job, StoreError> {
    if job.attempt == Attempt(0) || !job.status.is_final() {
        return Ok(job);
    }
    job.tasks = tasks_of(c, job.id, job.attempt)?;
    Ok(job)
}

/// The task results recorded for one attempt, in order.
fn tasks_of(c: &Connection, job: JobId, attempt: Attempt) -> Result<Vec<TaskResult>, StoreError> {
    let mut stmt = c
        .prepare_cached(
            "SELECT name, status, exit_code, signal, duration_ms, message, started_at_ms, \
             tests_passed, tests_failed, tests_skipped, tests_failing, tests_problems \
             FROM task_results \
             WHERE job_id = ?1 AND attempt = ?2 ORDER BY idx",
        )
        .ctx("preparing task results")?;
    stmt.query_map(params![id_of(job), attempt.0], |row| {
        Ok(TaskResult {
            name: row.get(0)?,
            status: task_status(row, 1)?,
            exit_code: row.get(2)?,
            signal: row.get(3)?,
            duration_ms: get_u64(row, 4)?,
            message: row.get(5)?,
            started_at_ms: get_opt_u64(row, 6)?,
            report: report(row, 7)?,
        })
    })
    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
    .ctx("reading task results")
}

/// Every attempt of a job, oldest first, each with its tasks.
pub fn attempts(c: &Connection, job: JobId) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut records = c
        .prepare_cached(
            "SELECT attempt, runner, result_status, result_message, ended_reason, \
             assigned_at_ms, started_at_ms, finished_at_ms, log_end, log_truncated, log_pruned \
             FROM attempts WHERE job_id = ?1 ORDER BY attempt",
        )
        .and_then(|mut stmt| {
            stmt.query_map([id_of(job)], |row| {
                let result: Option<String> = row.get(2)?;
                let ended: Option<String> = row.get(4)?;
                let status = match (&result, &ended) {
                    (Some(label), _) => match JobStatus::from_label(label) {
                        Some(JobStatus::Final(s)) => AttemptStatus::Ended(s),
                        _ => return Err(bad_value(2, &format!("unknown result {label:?}"))),
                    },
                    (None, Some(_)) => AttemptStatus::Revoked,
                    (None, None) => AttemptStatus::Running,
                };
                let message: Option<String> = row.get(3)?;
                Ok(AttemptRecord {
                    attempt: get_attempt(row, 0)?,
                    runner: row.get(1)?,
                    status,
                    message: message.or(ended),
                    assigned_at_ms: get_u64(row, 5)?,
                    started_at_ms: get_opt_u64(row, 6)?,
                    finished_at_ms: get_opt_u64(row, 7)?,
                    tasks: Vec::new(),
                    log_bytes: get_u64(row, 8)?,
                    log_truncated: row.get(9)?,
                    log_pruned: row.get(10)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .ctx("reading attempts")?;
    for record in &mut records {
        if matches!(record.status, AttemptStatus::Ended(_)) {
            record.tasks = tasks_of(c, job, record.attempt)?;
        }
    }
    Ok(records)
}

/// A list of names as one text value, a name a line (a line break in a
/// name becomes a space).
fn lines(names: &[String]) -> String {
    names
        .iter()
        .map(|n| n.replace(['\n', '\r'], " "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn unlines(text: Option<String>) -> Vec<String> {
    text.filter(|t| !t.is_empty())
        .map(|t| t.split('\n').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The report columns from `idx` on; `None` when the task had none.
fn report(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<TestReport>> {
    let passed: Option<u32> = row.get(idx)?;
    let Some(passed) = passed else {
        return Ok(None);
    };
    Ok(Some(TestReport {
        passed,
        failed: row.get::<_, Option<u32>>(idx + 1)?.unwrap_or(0),
        skipped: row.get::<_, Option<u32>>(idx + 2)?.unwrap_or(0),
        failing: unlines(row.get(idx + 3)?),
        problems: unlines(row.get(idx + 4)?),
    }))
}

fn query_jobs(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    let jobs = c
        .prepare_cached(sql)
        .and_then(|mut stmt| {
            stmt.query_map(params, job_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .ctx("reading jobs")?;
    jobs.into_iter().map(|job| with_tasks(c, job)).collect()
}

pub fn get_job(c: &Connection, id: JobId) -> Result<Option<Job>, StoreError> {
    let Ok(id) = i64::try_from(id.0) else {
        return Ok(None);
    };
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(query_jobs(c, &sql, [id])?.pop())
}

pub fn list_jobs(c: &Connection, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
    let mut params = Vec::new();
    let mut filters = Vec::new();
    let mut add = |clause: &str, value: Value| {
        params.push(value);
        filters.push(format!("{clause} ?{}", params.len()));
    };
    if let Some(repo) = &filter.repo {
        add("repo =", Value::Text(repo.clone()));
    }
    if let Some(branch) = &filter.branch {
        add("branch =", Value::Text(branch.clone()));
    }
    if let Some(number) = filter.pull_request {
        // A number beyond SQLite's range matches no job.
        add(
            "pull_request =",
            Value::Integer(i64::try_from(number).unwrap_or(-1)),
        );
    }
    if let Some(status) = filter.status {
        add("status =", Value::Text(status.label().to_owned()));
    }
    if let Some(before) = filter.before {
        // An id beyond SQLite's range is after every job.
        add(
            "id <",
            Value::Integer(i64::try_from(before.0).unwrap_or(i64::MAX)),
        );
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
    query_jobs(c, &sql, rusqlite::params_from_iter(params))
}

pub fn branches(c: &Connection) -> Result<Vec<BranchHead>, StoreError> {
    // The newest job of a pair is its highest id (ids grow with submission).
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN \
         (SELECT MAX(id) FROM jobs GROUP BY repo, branch) ORDER BY repo, branch"
    );
    Ok(query_jobs(c, &sql, [])?
        .into_iter()
        .map(|latest| BranchHead {
            repo: latest.repo.clone(),
            branch: latest.branch.clone(),
            latest,
        })
        .collect())
}

pub fn unfinished(c: &Connection) -> Result<Vec<Job>, StoreError> {
    let sql =
        format!("SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') ORDER BY id");
    query_jobs(c, &sql, [])
}

pub fn read_log(
    c: &Connection,
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
    // A chunk covering `offset` (it may start before it). length() reads a
    // blob's size from its header, not the blob itself. No chunk starting at
    // or before the contiguous end reaches past it (see `append_log`), so
    // past that end only chunks starting after it can cover `offset`: that
    // keeps a follower polling at the end from scanning the whole log.
    let log_end = i64::try_from(log_len(c, id, attempt)?).unwrap_or(i64::MAX);
    let after = if from >= log_end { log_end } else { -1 };
    let first: Option<i64> = c
        .prepare_cached(
            "SELECT log_offset FROM log_chunks WHERE job_id = ?1 AND attempt = ?2 \
             AND log_offset <= ?3 AND log_offset > ?4 AND log_offset + length(data) > ?3 \
             ORDER BY log_offset DESC LIMIT 1",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![id, attempt.0, from, after], |row| row.get(0))
                .optional()
        })
        .ctx("finding a log chunk")?;
    let Some(first) = first else {
        return Ok(Bytes::new());
    };
    let mut stmt = c
        .prepare_cached(
            "SELECT log_offset, data FROM log_chunks WHERE job_id = ?1 AND attempt = ?2 \
             AND log_offset >= ?3 ORDER BY log_offset",
        )
        .ctx("preparing a log read")?;
    let mut rows = stmt
        .query(params![id, attempt.0, first])
        .ctx("reading log chunks")?;
    let mut out = Vec::new();
    let mut pos = offset;
    while out.len() < max_bytes {
        let Some(row) = rows.next().ctx("reading log chunks")? else {
            break;
        };
        let start = get_u64(row, 0).ctx("reading a log chunk")?;
        if start > pos {
            break; // a gap: the bytes at `pos` have not arrived yet
        }
        let data = row
            .get_ref(1)
            .and_then(|v| Ok(v.as_blob()?))
            .ctx("reading a log chunk")?;
        let skip = usize::try_from(pos - start).unwrap_or(usize::MAX);
        if skip >= data.len() {
            continue; // wholly before `pos` (an overlapping resend)
        }
        let take = (data.len() - skip).min(max_bytes - out.len());
        out.extend_from_slice(&data[skip..skip + take]);
        pos += take as u64;
    }
    Ok(Bytes::from(out))
}

/// The end of the contiguous log of (job, attempt) from offset 0: the
/// offset the next expected chunk starts at. 0 for an unknown attempt.
fn log_len(c: &Connection, id: i64, attempt: Attempt) -> Result<u64, StoreError> {
    let end: Option<u64> = c
        .prepare_cached("SELECT log_end FROM attempts WHERE job_id = ?1 AND attempt = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![id, attempt.0], |row| get_u64(row, 0))
                .optional()
        })
        .ctx("reading a log's length")?;
    Ok(end.unwrap_or(0))
}

pub fn epoch(c: &Connection) -> Result<String, StoreError> {
    c.query_row("SELECT epoch FROM store_epoch WHERE id = 1", [], |row| {
        row.get(0)
    })
    .ctx("reading the store epoch")
}

pub fn new_epoch(c: &Connection) -> Result<String, StoreError> {
    c.query_row(
        "UPDATE store_epoch SET epoch = lower(hex(randomblob(16))) WHERE id = 1 RETURNING epoch",
        [],
        |row| row.get(0),
    )
    .ctx("replacing the store epoch")
}
