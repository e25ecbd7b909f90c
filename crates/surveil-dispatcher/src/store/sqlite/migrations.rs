//! The store's schema as an ordered list of SQL scripts, and the code that
//! brings a database up to the newest one.
//!
//! `PRAGMA user_version` holds how many scripts a database has had. Each
//! script runs in its own transaction together with the version bump, so a
//! crash mid-migration leaves the previous version intact. Scripts are
//! append-only: never edit or reorder one that has shipped; add a new one.
//! This file must not hold queries used at run time (those are in
//! `sql.rs` beside it).

use rusqlite::Connection;

use super::Ctx;
use crate::store::StoreError;

/// The schema scripts, oldest first. Script `i` takes a database from
/// version `i` to version `i + 1`.
///
/// The SQL stays close to the portable subset (no `INSERT OR …`, no
/// reserved words as column names) so a PostgreSQL store can reuse it.
/// Times are unix milliseconds; statuses are the lower-case labels of
/// `JobStatus`/`TaskStatus`, readable with the `sqlite3` shell.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, attempts, per-task results, log chunks.
    r#"
    CREATE TABLE jobs (
        -- AUTOINCREMENT: an id is never handed out twice, even after a
        -- deletion, because clients and runners keep ids across restarts.
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        repo            TEXT    NOT NULL,
        branch          TEXT    NOT NULL,
        commit_id       TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        -- The current (or last) attempt; 0 until first assigned.
        attempt         INTEGER NOT NULL DEFAULT 0,
        runner          TEXT,
        message         TEXT,
        queued_at_ms    INTEGER NOT NULL,
        started_at_ms   INTEGER,
        finished_at_ms  INTEGER,
        UNIQUE (repo, commit_id)
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE INDEX jobs_by_repo ON jobs (repo, id);

    CREATE TABLE attempts (
        job_id          INTEGER NOT NULL REFERENCES jobs (id),
        attempt         INTEGER NOT NULL,
        runner          TEXT    NOT NULL,
        assigned_at_ms  INTEGER NOT NULL,
        -- When the runner said Started.
        started_at_ms   INTEGER,
        -- Set when the runner's result was recorded: its status and time.
        result_status   TEXT,
        result_message  TEXT,
        finished_at_ms  INTEGER,
        -- Why the attempt was revoked (requeue, superseded, job finished
        -- without a result); NULL while it is live or after its result.
        ended_reason    TEXT,
        -- End of the contiguous prefix of the attempt's combined log.
        log_end         INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, attempt)
    );

    CREATE TABLE task_results (
        job_id          INTEGER NOT NULL,
        attempt         INTEGER NOT NULL,
        idx             INTEGER NOT NULL,
        name            TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        exit_code       INTEGER,
        signal          INTEGER,
        duration_ms     INTEGER NOT NULL,
        message         TEXT    NOT NULL,
        PRIMARY KEY (job_id, attempt, idx),
        FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
    );

    CREATE TABLE log_chunks (
        job_id          INTEGER NOT NULL,
        attempt         INTEGER NOT NULL,
        log_offset      INTEGER NOT NULL,
        task            INTEGER NOT NULL,
        stream          INTEGER NOT NULL,
        data            BLOB    NOT NULL,
        PRIMARY KEY (job_id, attempt, log_offset),
        FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
    );
    "#,
    // Per-task start time and JUnit counts (issue 17). Plain ALTER TABLE
    // ADD COLUMN, which every SQL store has; the lists are text, one name
    // a line.
    r#"
    ALTER TABLE task_results ADD COLUMN started_at_ms INTEGER;
    ALTER TABLE task_results ADD COLUMN tests_passed INTEGER;
    ALTER TABLE task_results ADD COLUMN tests_failed INTEGER;
    ALTER TABLE task_results ADD COLUMN tests_skipped INTEGER;
    ALTER TABLE task_results ADD COLUMN tests_failing TEXT;
    ALTER TABLE task_results ADD COLUMN tests_problems TEXT;
    "#,
    // The ref and pull request a job was built for (issue 18). Jobs from
    // before were all submitted for a branch.
    r#"
    ALTER TABLE jobs ADD COLUMN ref_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN pull_request INTEGER;
    UPDATE jobs SET ref_name = 'refs/heads/' || branch WHERE branch <> '';
    CREATE INDEX jobs_by_pull_request ON jobs (pull_request, id)
        WHERE pull_request IS NOT NULL;
    "#,
    // 4: reruns (issue 15). The attempt a rerun started after: attempts up
    // to it belong to earlier runs and no longer count against
    // --max-attempts. Earlier attempts' rows stay as they are.
    r#"
    ALTER TABLE jobs ADD COLUMN rerun_base INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5: bounded logs (issue 19). An attempt's log cut at --max-log-size,
    // or deleted by retention; the partial index is what a prune scans.
    r#"
    ALTER TABLE attempts ADD COLUMN log_truncated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN log_pruned INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX attempts_with_logs ON attempts (job_id, attempt) WHERE log_pruned = 0;
    "#,
    // 6: a cancel asked of a running job, kept until its runner answers
    // (issue 19): a restart must not forget an acknowledged cancel.
    r#"
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    "#,
    // 7: the store's epoch (issue 19): a random 128-bit id, as 32 lower-case
    // hex digits, that ties runners' results and observers' cursors to this
    // store's life. An existing store gets one here; the restore step
    // (`surveil-dispatcher --new-epoch`) replaces it.
    r#"
    CREATE TABLE store_epoch (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        epoch           TEXT    NOT NULL
    );
    INSERT INTO store_epoch VALUES (1, lower(hex(randomblob(16))));
    "#,
    // 8: drains (issue 19). Attempts of the current run that a draining
    // runner handed back without a result: they do not count against
    // --max-attempts (a rerun sets it back to 0).
    r#"
    ALTER TABLE jobs ADD COLUMN handed_back INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// Applies every script the database has not had yet, each in its own
/// transaction with its version bump. Refuses a database whose version is
/// newer than this binary knows: running old code on a newer schema could
/// silently lose data.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let known = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    let found: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .ctx("reading the schema version")?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (version, script) in (found..).zip(&MIGRATIONS[found as usize..]) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .ctx("starting a schema migration")?;
        tx.execute_batch(script)
            .ctx(&format!("applying schema migration {}", version + 1))?;
        tx.pragma_update(None, "user_version", version + 1)
            .ctx("recording the schema version")?;
        tx.commit().ctx("committing a schema migration")?;
        tracing::info!(version = version + 1, "applied store schema migration");
    }
    Ok(known)
}
