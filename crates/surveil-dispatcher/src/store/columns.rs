//! What the two SQL stores share: the jobs table's column list, in the
//! order each backend's own row reader expects, and how the API's unsigned
//! integers become SQL's signed 64-bit ones (neither SQLite nor PostgreSQL
//! has an unsigned type).
//!
//! Only backend-neutral text and conversions belong here: statements,
//! parameter syntax and row readers stay with their backend.

use crate::domain::JobId;
use crate::store::StoreError;

/// The jobs table's columns as every job read selects them.
pub(super) const JOB_COLUMNS: &str = "id, repo, branch, commit_id, status, attempt, runner, \
                                      message, queued_at_ms, started_at_ms, finished_at_ms, \
                                      ref_name, pull_request, rerun_base, cancel_requested, \
                                      handed_back";

/// A u64 from the API as a signed 64-bit integer, refused (naming `what`)
/// beyond its range rather than wrapped.
pub(super) fn int(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Invalid(format!("{what} {value} is beyond the store's range")))
}

/// A job id as a signed 64-bit integer; ids beyond the range match no row.
pub(super) fn id_of(job: JobId) -> i64 {
    i64::try_from(job.0).unwrap_or(-1)
}
