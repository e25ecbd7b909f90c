//! The attempt-fencing rules of both SQL stores, as pure decisions over a
//! job's `(status, current attempt)` and the rows a backend read for it.
//! Each backend runs its own statements and row reads inside its own
//! transaction and asks these functions what the write may do, so the
//! rules exist once and one set of unit tests covers both stores.

use crate::domain::{Attempt, JobId, JobStatus, LogChunk};
use crate::store::{RecordOutcome, StoreError};

/// What an assignment may do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AssignPlan {
    /// The same attempt is current and running: it is a retried call when
    /// the backend finds the same runner holding it (see [`same_holder`]).
    CheckHolder,
    /// A new attempt row; `supersede` names the running attempt it revokes.
    Insert { supersede: Option<Attempt> },
}

pub(super) fn assign(
    job: JobId,
    status: JobStatus,
    current: Attempt,
    attempt: Attempt,
) -> Result<AssignPlan, StoreError> {
    let conflict = |reason: String| Err(StoreError::Conflict { job, reason });
    if status.is_final() {
        return conflict(format!("it is {status} and cannot be assigned"));
    }
    if attempt == current && status == JobStatus::Running {
        return Ok(AssignPlan::CheckHolder);
    }
    if attempt <= current {
        return conflict(format!(
            "attempt {attempt} is not newer than its current attempt {current}"
        ));
    }
    Ok(AssignPlan::Insert {
        supersede: (status == JobStatus::Running).then_some(current),
    })
}

/// [`AssignPlan::CheckHolder`]'s answer, from the attempt row's runner.
pub(super) fn same_holder(
    job: JobId,
    attempt: Attempt,
    runner: &str,
    holder: Option<&str>,
) -> Result<(), StoreError> {
    match holder {
        Some(holder) if holder == runner => Ok(()),
        holder => Err(StoreError::Conflict {
            job,
            reason: format!(
                "attempt {attempt} is already held by runner {}",
                holder.unwrap_or("?")
            ),
        }),
    }
}

/// The revocation reason an attempt superseded by `attempt` records.
pub(super) fn superseded_by(attempt: Attempt) -> String {
    format!("superseded by attempt {attempt}")
}

/// Whether `Started`, a requeue or anything else addressed to the running
/// attempt applies: only to the job's current attempt while it runs (a
/// resend or a stale attempt changes nothing).
pub(super) fn is_running_attempt(status: JobStatus, current: Attempt, attempt: Attempt) -> bool {
    status == JobStatus::Running && attempt == current
}

/// Whether a log chunk is stored: only while the job runs its current
/// attempt. A stale attempt's chunk, and any chunk after the attempt ended
/// (its result recorded, the job cancelled, requeued or finished without
/// a result), is refused: the runner sends its output before its result
/// on one ordered stream, so nothing that belongs to the log arrives
/// later, and a final job's log cannot grow.
pub(super) fn log_accepted(
    status: JobStatus,
    current: Attempt,
    attempt: Attempt,
    chunk: &LogChunk,
) -> bool {
    is_running_attempt(status, current, attempt) && !chunk.data.is_empty()
}

/// What `--max-log-size` leaves of a chunk spanning `[start, end)`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LogClip {
    /// Within the cap: stored whole.
    Whole,
    /// Crosses the cap: only its first `n` bytes are stored.
    Head(usize),
    /// Starts at or past the cap: nothing of it is stored.
    Beyond,
}

impl LogClip {
    /// Whether the attempt's log is marked truncated by this chunk.
    pub(super) fn truncates(&self) -> bool {
        *self != LogClip::Whole
    }

    /// What of `data` is stored.
    pub(super) fn kept<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        match self {
            LogClip::Whole => data,
            LogClip::Head(n) => &data[..*n],
            LogClip::Beyond => &[],
        }
    }
}

pub(super) fn log_clip(start: i64, end: i64, cap: i64) -> LogClip {
    if end <= cap {
        LogClip::Whole
    } else if start < cap {
        // start < cap < end, so the difference is positive and below the
        // chunk's length.
        LogClip::Head(usize::try_from(cap - start).unwrap_or(0))
    } else {
        LogClip::Beyond
    }
}

/// The line a truncated log ends with (in the SYSTEM stream, at the cap's
/// offset), so a reader of the raw log knows why it stops.
pub(super) fn truncation_note(cap: u64) -> String {
    format!(
        "\n[surveil] log truncated: this attempt's log reached --max-log-size ({}); \
         later output was dropped, the job kept running\n",
        surveil_common::format_size(cap)
    )
}

/// The chunk's `[start, end)` byte range as the store's integers, refused
/// when it reaches past their range.
pub(super) fn log_span(chunk: &LogChunk) -> Result<(i64, i64), StoreError> {
    let offset = chunk.offset;
    let beyond = || StoreError::Invalid(format!("log offset {offset} is beyond the store's range"));
    let start = i64::try_from(offset).map_err(|_| beyond())?;
    let end = offset
        .checked_add(chunk.data.len() as u64)
        .and_then(|end| i64::try_from(end).ok())
        .ok_or_else(beyond)?;
    Ok((start, end))
}

/// The attempt row a result is checked against.
pub(super) struct AttemptRow {
    pub(super) has_result: bool,
    pub(super) revoked: bool,
}

/// `None` when the result is to be recorded, else the outcome to answer
/// without writing.
pub(super) fn result(
    status: JobStatus,
    current: Attempt,
    attempt: Attempt,
    row: Option<AttemptRow>,
) -> Option<RecordOutcome> {
    match row {
        Some(AttemptRow {
            has_result: true, ..
        }) => Some(RecordOutcome::Duplicate),
        Some(AttemptRow { revoked: false, .. }) if is_running_attempt(status, current, attempt) => {
            None
        }
        _ => Some(RecordOutcome::Stale),
    }
}

/// Only a finished job can be rerun.
pub(super) fn rerun(job: JobId, status: JobStatus) -> Result<(), StoreError> {
    if status.is_final() {
        return Ok(());
    }
    Err(StoreError::Conflict {
        job,
        reason: format!("it is {status}: only a finished job can be rerun"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FinalStatus, LogStream};

    const JOB: JobId = JobId(7);

    fn conflict(result: Result<impl std::fmt::Debug, StoreError>) -> String {
        match result {
            Err(StoreError::Conflict { reason, .. }) => reason,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn assignment_is_fenced_by_attempt() {
        use JobStatus::{Queued, Running};
        let passed = JobStatus::Final(FinalStatus::Passed);
        assert_eq!(
            assign(JOB, Queued, Attempt(0), Attempt(1)).unwrap(),
            AssignPlan::Insert { supersede: None }
        );
        assert_eq!(
            assign(JOB, Running, Attempt(1), Attempt(2)).unwrap(),
            AssignPlan::Insert {
                supersede: Some(Attempt(1))
            }
        );
        assert_eq!(
            assign(JOB, Running, Attempt(2), Attempt(2)).unwrap(),
            AssignPlan::CheckHolder
        );
        assert!(conflict(assign(JOB, Queued, Attempt(2), Attempt(2))).contains("not newer"));
        assert!(conflict(assign(JOB, Running, Attempt(3), Attempt(2))).contains("not newer"));
        assert!(conflict(assign(JOB, passed, Attempt(1), Attempt(2))).contains("passed"));
        same_holder(JOB, Attempt(2), "r1", Some("r1")).unwrap();
        assert!(conflict(same_holder(JOB, Attempt(2), "r1", Some("r2"))).contains("runner r2"));
    }

    #[test]
    fn results_are_recorded_once_and_only_for_the_running_attempt() {
        use JobStatus::Running;
        let passed = JobStatus::Final(FinalStatus::Passed);
        let row = |has_result, revoked| {
            Some(AttemptRow {
                has_result,
                revoked,
            })
        };
        assert_eq!(
            result(Running, Attempt(1), Attempt(1), row(false, false)),
            None
        );
        assert_eq!(
            result(passed, Attempt(1), Attempt(1), row(true, false)),
            Some(RecordOutcome::Duplicate)
        );
        assert_eq!(
            result(Running, Attempt(2), Attempt(1), row(false, true)),
            Some(RecordOutcome::Stale)
        );
        assert_eq!(
            result(Running, Attempt(1), Attempt(1), row(false, true)),
            Some(RecordOutcome::Stale)
        );
        assert_eq!(
            result(Running, Attempt(1), Attempt(1), None),
            Some(RecordOutcome::Stale)
        );
    }

    #[test]
    fn logs_belong_to_the_current_attempt_and_stay_in_range() {
        let chunk = |offset, data: &'static [u8]| LogChunk {
            task: 0,
            stream: LogStream::Stdout,
            offset,
            data: bytes::Bytes::from_static(data),
        };
        let c = chunk(10, b"abc");
        assert!(log_accepted(JobStatus::Running, Attempt(1), Attempt(1), &c));
        assert!(!log_accepted(
            JobStatus::Final(FinalStatus::Cancelled),
            Attempt(1),
            Attempt(1),
            &c
        ));
        assert!(!log_accepted(
            JobStatus::Running,
            Attempt(2),
            Attempt(1),
            &c
        ));
        assert!(!log_accepted(JobStatus::Queued, Attempt(1), Attempt(1), &c));
        assert!(!log_accepted(
            JobStatus::Running,
            Attempt(1),
            Attempt(1),
            &chunk(0, b"")
        ));
        assert_eq!(log_span(&c).unwrap(), (10, 13));
        assert!(log_span(&chunk(u64::MAX - 1, b"abc")).is_err());
        assert!(log_span(&chunk(i64::MAX as u64, b"a")).is_err());
    }

    #[test]
    fn the_cap_keeps_a_chunks_head_and_drops_what_lies_past_it() {
        assert_eq!(log_clip(0, 10, 10), LogClip::Whole);
        assert_eq!(log_clip(5, 15, 10), LogClip::Head(5));
        assert_eq!(log_clip(9, 10_000, 10), LogClip::Head(1));
        assert_eq!(log_clip(10, 11, 10), LogClip::Beyond);
        assert_eq!(log_clip(50, 60, 10), LogClip::Beyond);
        assert!(!LogClip::Whole.truncates());
        assert!(LogClip::Head(1).truncates() && LogClip::Beyond.truncates());
        assert_eq!(LogClip::Whole.kept(b"abc"), b"abc");
        assert_eq!(LogClip::Head(2).kept(b"abc"), b"ab");
        assert!(LogClip::Beyond.kept(b"abc").is_empty());
        assert!(truncation_note(64 << 20).contains("64MiB"));
    }

    #[test]
    fn only_a_finished_job_is_rerun() {
        rerun(JOB, JobStatus::Final(FinalStatus::Failed)).unwrap();
        assert!(conflict(rerun(JOB, JobStatus::Running)).contains("only a finished job"));
    }
}
