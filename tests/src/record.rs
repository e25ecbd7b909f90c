//! Reads a dispatcher's store (`STATE_DIR/surveil.db`) read-only, to check
//! what the wire cannot show: how many results each job has recorded and
//! why each attempt ended. It never writes; open it after (or while) the
//! dispatcher runs — SQLite's WAL lets a reader in beside the writer.
//!
//! It reads the dispatcher's schema (`crates/surveil-dispatcher/src/store/
//! sqlite/migrations.rs`), tables `jobs` and `attempts`.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags};

/// One attempt of one job, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub job_id: u64,
    pub attempt: u32,
    pub runner: String,
    /// The recorded result's status (`passed`, …); `None` without a result.
    pub result_status: Option<String>,
    /// Why the attempt was revoked, if it was.
    pub ended_reason: Option<String>,
}

/// Every attempt in the store of the dispatcher whose `--state-dir` is
/// `state_dir`, ordered by job then attempt.
pub fn attempts(state_dir: &Path) -> Result<Vec<Attempt>> {
    let path = state_dir.join("surveil.db");
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut stmt = conn.prepare(
        "SELECT job_id, attempt, runner, result_status, ended_reason
           FROM attempts ORDER BY job_id, attempt",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(Attempt {
            job_id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
            attempt: row.get(1)?,
            runner: row.get(2)?,
            result_status: row.get(3)?,
            ended_reason: row.get(4)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the attempts in {}", path.display()))
}

/// The attempts of `job_id` that have a recorded result.
pub fn results_of(attempts: &[Attempt], job_id: u64) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| a.job_id == job_id && a.result_status.is_some())
        .collect()
}

/// [`attempts`] from a PostgreSQL store: the same table and columns
/// (`crates/surveil-dispatcher/src/store/postgres/schema.rs`), read with
/// `psql`. Line breaks in reasons are flattened so each row is one line.
pub fn attempts_pg(pg: &crate::postgres::Postgres, database: &str) -> Result<Vec<Attempt>> {
    let rows = pg.psql(
        database,
        "SELECT job_id, attempt, runner, coalesce(result_status, ''), \
                coalesce(replace(replace(ended_reason, E'\\n', ' '), E'\\r', ' '), E'\\x01') \
           FROM attempts ORDER BY job_id, attempt",
    )?;
    rows.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let cells: Vec<&str> = line.splitn(5, '|').collect();
            let [job, attempt, runner, status, reason] = cells[..] else {
                anyhow::bail!("an attempts row of {} cells: {line:?}", cells.len());
            };
            Ok(Attempt {
                job_id: job.parse().context("a job id")?,
                attempt: attempt.parse().context("an attempt")?,
                runner: runner.to_owned(),
                result_status: (!status.is_empty()).then(|| status.to_owned()),
                // SQL NULL was written as \x01 (an empty reason is a reason).
                ended_reason: (reason != "\u{1}").then(|| reason.to_owned()),
            })
        })
        .collect()
}
