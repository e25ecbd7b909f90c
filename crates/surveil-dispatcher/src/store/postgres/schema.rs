//! The PostgreSQL store's schema as an ordered list of SQL scripts, and
//! the migration that brings a database up to the newest one.
//!
//! `surveil_schema.version` holds how many scripts a database has had. All
//! pending scripts run in one transaction under a transaction-scoped
//! advisory lock, so two dispatchers starting at once apply each script
//! exactly once (the second waits, then finds nothing to do) and a crash
//! mid-migration leaves the previous version intact (PostgreSQL's DDL is
//! transactional). Scripts are append-only, as in the SQLite store; this
//! file must not hold queries used at run time (`sql.rs` does).

use tokio_postgres::Client;

use super::Ctx;
use crate::store::StoreError;

/// The advisory lock key serialising migrations ("surveil" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7572_7665_696c;

/// The schema scripts, oldest first. Script `i` takes a database from
/// version `i` to version `i + 1`.
///
/// The tables mirror the SQLite store's (same columns, same meaning), so
/// the statements in `sql.rs` read like their SQLite twins. Times are unix
/// milliseconds, except the leader term's expiry, which is the database's
/// own clock on purpose: every dispatcher measures it with the same clock.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, attempts, per-task results, log chunks, the leader term.
    r#"
    CREATE TABLE jobs (
        -- An identity never hands out an id twice, even after a rollback.
        id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        repo            TEXT    NOT NULL,
        branch          TEXT    NOT NULL,
        commit_id       TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        attempt         BIGINT  NOT NULL DEFAULT 0,
        runner          TEXT,
        message         TEXT,
        queued_at_ms    BIGINT  NOT NULL,
        started_at_ms   BIGINT,
        finished_at_ms  BIGINT,
        UNIQUE (repo, commit_id)
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE INDEX jobs_by_repo ON jobs (repo, id);

    CREATE TABLE attempts (
        job_id          BIGINT  NOT NULL REFERENCES jobs (id),
        attempt         BIGINT  NOT NULL,
        runner          TEXT    NOT NULL,
        assigned_at_ms  BIGINT  NOT NULL,
        started_at_ms   BIGINT,
        result_status   TEXT,
        result_message  TEXT,
        finished_at_ms  BIGINT,
        ended_reason    TEXT,
        log_end         BIGINT  NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, attempt)
    );

    CREATE TABLE task_results (
        job_id          BIGINT  NOT NULL,
        attempt         BIGINT  NOT NULL,
        idx             BIGINT  NOT NULL,
        name            TEXT    NOT NULL,
        status          TEXT    NOT NULL,
        exit_code       INTEGER,
        signal          INTEGER,
        duration_ms     BIGINT  NOT NULL,
        message         TEXT    NOT NULL,
        PRIMARY KEY (job_id, attempt, idx),
        FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
    );

    CREATE TABLE log_chunks (
        job_id          BIGINT  NOT NULL,
        attempt         BIGINT  NOT NULL,
        log_offset      BIGINT  NOT NULL,
        task            BIGINT  NOT NULL,
        stream          SMALLINT NOT NULL,
        data            BYTEA   NOT NULL,
        PRIMARY KEY (job_id, attempt, log_offset),
        FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
    );

    -- The leader term: exactly one row. A dispatcher leads while its term
    -- is the row's and expires_at (database clock) is in the future; every
    -- write transaction re-checks that under a share lock on this row, so
    -- a takeover (which updates it) waits for those writes and refuses
    -- every later one from the old term.
    CREATE TABLE leader (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        term            BIGINT  NOT NULL,
        holder          TEXT    NOT NULL,
        addr            TEXT    NOT NULL,
        expires_at      TIMESTAMPTZ NOT NULL
    );
    INSERT INTO leader VALUES (1, 0, '', '', '-infinity');
    "#,
    // 2: per-task start time and JUnit counts (issue 17), as in SQLite's
    // second script; the name lists are arrays here.
    r#"
    ALTER TABLE task_results
        ADD COLUMN started_at_ms  BIGINT,
        ADD COLUMN tests_passed   BIGINT,
        ADD COLUMN tests_failed   BIGINT,
        ADD COLUMN tests_skipped  BIGINT,
        ADD COLUMN tests_failing  TEXT[],
        ADD COLUMN tests_problems TEXT[];
    "#,
    // 3: the ref and pull request a job was built for (issue 18), as in
    // SQLite's third script.
    r#"
    ALTER TABLE jobs
        ADD COLUMN ref_name     TEXT NOT NULL DEFAULT '',
        ADD COLUMN pull_request BIGINT;
    UPDATE jobs SET ref_name = 'refs/heads/' || branch WHERE branch <> '';
    CREATE INDEX jobs_by_pull_request ON jobs (pull_request, id)
        WHERE pull_request IS NOT NULL;
    "#,
    // 4: reruns (issue 15), as in SQLite's fourth script.
    r#"
    ALTER TABLE jobs ADD COLUMN rerun_base BIGINT NOT NULL DEFAULT 0;
    "#,
    // 5: bounded logs (issue 19), as in SQLite's fifth script.
    r#"
    ALTER TABLE attempts
        ADD COLUMN log_truncated BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN log_pruned    BOOLEAN NOT NULL DEFAULT false;
    CREATE INDEX attempts_with_logs ON attempts (job_id, attempt) WHERE NOT log_pruned;
    "#,
    // 6: a cancel asked of a running job, as in SQLite's sixth script.
    r#"
    ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT false;
    "#,
    // 7: the store's epoch, as in SQLite's seventh script. PostgreSQL has
    // no random bytes without pgcrypto: two random UUIDs (244 random bits)
    // hashed to 128.
    r#"
    CREATE TABLE store_epoch (
        id              INTEGER PRIMARY KEY CHECK (id = 1),
        epoch           TEXT    NOT NULL
    );
    INSERT INTO store_epoch VALUES (1, md5(gen_random_uuid()::text || gen_random_uuid()::text));
    "#,
    // 8: drains, as in SQLite's eighth script.
    r#"
    ALTER TABLE jobs ADD COLUMN handed_back BIGINT NOT NULL DEFAULT 0;
    "#,
];

/// Applies every script the database has not had yet. Refuses a database
/// whose version is newer than this binary knows.
pub async fn migrate(client: &mut Client) -> Result<u32, StoreError> {
    let known = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    let tx = client
        .transaction()
        .await
        .ctx("starting the schema migration")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .ctx("taking the migration lock")?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS surveil_schema (version INTEGER NOT NULL)")
        .await
        .ctx("creating the schema version table")?;
    let found: Option<i32> = tx
        .query_opt("SELECT version FROM surveil_schema", &[])
        .await
        .ctx("reading the schema version")?
        .map(|row| row.get(0));
    let found = match found {
        Some(v) => u32::try_from(v).unwrap_or(0),
        None => {
            tx.execute("INSERT INTO surveil_schema VALUES (0)", &[])
                .await
                .ctx("recording the schema version")?;
            0
        }
    };
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (version, script) in (found..).zip(&MIGRATIONS[found as usize..]) {
        tx.batch_execute(script)
            .await
            .ctx(&format!("applying schema migration {}", version + 1))?;
        tracing::info!(version = version + 1, "applied store schema migration");
    }
    let known_i32 = i32::try_from(known).unwrap_or(i32::MAX);
    tx.execute("UPDATE surveil_schema SET version = $1", &[&known_i32])
        .await
        .ctx("recording the schema version")?;
    tx.commit().await.ctx("committing the schema migration")?;
    Ok(known)
}
