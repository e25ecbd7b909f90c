//! What the user sees: the `--json` model (the contract's field names and
//! order, nulls, timestamps), the human tables and `key: value` lines, and
//! the log printer that marks a reassignment.
//!
//! Everything here is a pure function of the replies, the current time and
//! whether to colour; it must not talk to the dispatcher or read the
//! environment (the caller decides colour and `now`).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use surveil_proto::{
    AttemptInfo, GetStatusReply, JobInfo, JobStatus, ReadLogReply, RunnerInfo, TaskResult,
    TaskStatus,
};

/// Hex digits of a commit id shown in tables; enough to be unique in
/// practice and what `git log --oneline` users recognise.
const SHORT_COMMIT: usize = 12;

/// Spaces between table columns.
const COLUMN_GAP: &str = "  ";

// ---------------------------------------------------------------- JSON ----

/// A job in `--json` output (contract: "Job"). Field order is the
/// contract's; serde keeps declaration order.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct JobJson {
    pub id: u64,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub status: &'static str,
    pub attempt: u32,
    pub runner: Option<String>,
    pub message: Option<String>,
    pub queued_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub tasks: Vec<TaskJson>,
    /// The full ref it was built for (`refs/heads/main`,
    /// `refs/pull/7/head`); `null` when the submitter named none. Added
    /// after the contract's keys, so older readers are undisturbed.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// The pull (merge) request it was built for; `null` for a branch.
    pub pull_request: Option<u64>,
    /// Why a queued job still waits (`no connected runner lists this
    /// repository …`), as the dispatcher saw it when it answered; present
    /// only for queued jobs, and only from dispatchers that say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every attempt, oldest first: `job` and `rerun` only (absent from
    /// `jobs`, whose rows do not carry them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptJson>>,
    /// Whether the current attempt's log was cut at the dispatcher's
    /// `--max-log-size`: with `attempts` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_truncated: Option<bool>,
}

/// One attempt inside [`JobJson`].
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AttemptJson {
    pub attempt: u32,
    pub runner: String,
    /// `running`, a final status, or `revoked` (lost without a result).
    pub status: &'static str,
    pub message: Option<String>,
    pub assigned_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub tasks: Vec<TaskJson>,
    /// Bytes of its log stored.
    pub log_bytes: u64,
    /// Its log reached `--max-log-size`; later output was dropped.
    pub log_truncated: bool,
    /// Its log was deleted by retention (the attempt is kept).
    pub log_pruned: bool,
}

impl From<&AttemptInfo> for AttemptJson {
    fn from(a: &AttemptInfo) -> Self {
        AttemptJson {
            attempt: a.attempt,
            runner: a.runner.clone(),
            status: match a.status() {
                JobStatus::Unspecified => "revoked",
                status => status.label(),
            },
            message: non_empty(a.message.as_deref()),
            assigned_at: timestamp(a.assigned_at_ms),
            started_at: a.started_at_ms.map(timestamp),
            finished_at: a.finished_at_ms.map(timestamp),
            tasks: a.tasks.iter().map(TaskJson::from).collect(),
            log_bytes: a.log_bytes,
            log_truncated: a.log_truncated,
            log_pruned: a.log_pruned,
        }
    }
}

impl JobJson {
    /// `job` with its attempts listed (the `job` and `rerun` commands).
    pub fn with_attempts(job: &JobInfo) -> JobJson {
        JobJson {
            attempts: Some(job.attempts.iter().map(AttemptJson::from).collect()),
            log_truncated: Some(job.log_truncated),
            ..JobJson::from(job)
        }
    }
}

/// One task result inside [`JobJson`].
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TaskJson {
    pub name: String,
    pub status: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub message: Option<String>,
    /// When its process started; absent (not null) for a task that never
    /// started, and from dispatchers that do not record it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Its JUnit counts; absent when it has no `reports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestsJson>,
}

/// A task's test report inside [`TaskJson`].
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TestsJson {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub failing: Vec<String>,
    pub problems: Vec<String>,
}

/// `surveil prune --json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PruneJson {
    /// Attempts whose logs were deleted.
    pub attempts: u64,
    /// Log bytes deleted.
    pub bytes: u64,
}

/// `surveil status --json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatusJson {
    pub version: String,
    pub uptime_s: u64,
    pub runners: u32,
    pub queued: u64,
    pub running: u64,
    pub supervisor_restarts: RestartsJson,
    pub reassignments: u64,
    pub refused_results: u64,
    /// Connected runners quarantined after infrastructure failures (0 from
    /// older dispatchers).
    pub quarantined: u32,
    /// Connected runners draining (shutting down); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub draining: u32,
    /// With a PostgreSQL store (high availability): who leads. Absent with
    /// SQLite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderJson>,
    /// The store's epoch (32 hex digits; a restore step gives a new one).
    /// Absent from a standby or a dispatcher without epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The store's health; absent from a dispatcher too old to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreJson>,
}

/// `status --json`'s `store`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StoreJson {
    /// False while its writes fail, or one is stalled past
    /// `--store-write-timeout`.
    pub healthy: bool,
    /// Writes that failed in a row.
    pub failures: u32,
}

/// `status --json`'s `leader`: the leader term as the answering dispatcher
/// sees it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct LeaderJson {
    /// The leader's advertised address (`null` while none is known).
    pub addr: Option<String>,
    pub term: u64,
    /// Whether the dispatcher that answered is a standby.
    pub standby: bool,
}

/// Restart counts per supervised task. The three the contract names are
/// always present (0 when the dispatcher's map lacks them); any other task
/// the dispatcher reports follows them.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RestartsJson {
    pub monitor: u64,
    pub redistributor: u64,
    pub spawner: u64,
    #[serde(flatten)]
    pub other: BTreeMap<String, u64>,
}

/// One runner in `surveil runners --json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RunnerJson {
    pub name: String,
    pub addr: String,
    pub slots: u32,
    pub running: Vec<u64>,
    pub last_seen: String,
    /// The credential it authenticated with (`token:ci-3`, `cert:ci-3`,
    /// `shared`, `anonymous`); absent from older dispatchers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Until when it gets no new job after infrastructure failures; absent
    /// when it is not quarantined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_until: Option<String>,
    /// Its infrastructure failures in a row; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infra_failures: Option<u32>,
    /// `true` while it drains (it gets no new job); absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `surveil submit --json`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SubmitJson {
    pub job_ids: Vec<u64>,
}

impl From<&JobInfo> for JobJson {
    fn from(job: &JobInfo) -> Self {
        JobJson {
            id: job.id,
            repo: job.repo.clone(),
            branch: job.branch.clone(),
            commit: job.commit.clone(),
            status: job.status().label(),
            attempt: job.attempt,
            runner: non_empty(job.runner.as_deref()),
            message: non_empty(job.message.as_deref()),
            queued_at: timestamp(job.queued_at_ms),
            started_at: job.started_at_ms.map(timestamp),
            finished_at: job.finished_at_ms.map(timestamp),
            tasks: job.tasks.iter().map(TaskJson::from).collect(),
            ref_name: non_empty(Some(&job.r#ref)),
            pull_request: job.pull_request,
            reason: waiting_reason(job),
            attempts: None,
            log_truncated: None,
        }
    }
}

impl From<&TaskResult> for TaskJson {
    fn from(task: &TaskResult) -> Self {
        TaskJson {
            name: task.name.clone(),
            status: task.status().label(),
            exit_code: task.exit_code,
            signal: task.signal,
            duration_ms: task.duration_ms,
            message: non_empty(Some(&task.message)),
            started_at: task.started_at_ms.map(timestamp),
            tests: task.report.as_ref().map(|r| TestsJson {
                passed: r.passed,
                failed: r.failed,
                skipped: r.skipped,
                failing: r.failing.clone(),
                problems: r.problems.clone(),
            }),
        }
    }
}

impl From<&GetStatusReply> for StatusJson {
    fn from(status: &GetStatusReply) -> Self {
        let mut other = status.supervisor_restarts.clone();
        let mut take = |name: &str| other.remove(name).unwrap_or(0);
        let (monitor, redistributor, spawner) =
            (take("monitor"), take("redistributor"), take("spawner"));
        StatusJson {
            version: status.version.clone(),
            uptime_s: status.uptime_s,
            runners: status.runners,
            queued: status.queued,
            running: status.running,
            supervisor_restarts: RestartsJson {
                monitor,
                redistributor,
                spawner,
                other,
            },
            reassignments: status.reassignments,
            refused_results: status.refused_results,
            quarantined: status.quarantined,
            draining: status.draining,
            leader: (status.leader_term > 0 || status.standby).then(|| LeaderJson {
                addr: (!status.leader_addr.is_empty()).then(|| status.leader_addr.clone()),
                term: status.leader_term,
                standby: status.standby,
            }),
            epoch: (!status.epoch.is_empty()).then(|| status.epoch.clone()),
            store: status.store_healthy.map(|healthy| StoreJson {
                healthy,
                failures: status.store_failures,
            }),
        }
    }
}

impl From<&RunnerInfo> for RunnerJson {
    fn from(runner: &RunnerInfo) -> Self {
        RunnerJson {
            name: runner.name.clone(),
            addr: runner.addr.clone(),
            slots: runner.slots,
            running: runner.running.clone(),
            last_seen: timestamp(runner.last_seen_ms),
            identity: Some(runner.identity.clone()).filter(|i| !i.is_empty()),
            quarantined_until: (runner.quarantined_until_ms > 0)
                .then(|| timestamp(runner.quarantined_until_ms)),
            infra_failures: (runner.infra_failures > 0).then_some(runner.infra_failures),
            draining: runner.draining,
        }
    }
}

/// `value` as pretty JSON followed by a newline.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds and `Z`, e.g.
/// `2026-11-28T04:00:00.123Z` (contract).
pub fn timestamp(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// An empty text means "none" on the wire (proto3 strings); JSON says null.
fn non_empty(text: Option<&str>) -> Option<String> {
    text.filter(|t| !t.is_empty()).map(str::to_owned)
}

// -------------------------------------------------------------- tables ----

/// ANSI colours used for statuses, and only for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Green,
    Red,
    Yellow,
    Cyan,
    Dim,
}

impl Colour {
    fn code(self) -> &'static str {
        match self {
            Colour::Green => "32",
            Colour::Red => "31",
            Colour::Yellow => "33",
            Colour::Cyan => "36",
            Colour::Dim => "2",
        }
    }
}

/// The colour a job status is shown in.
pub fn job_colour(status: JobStatus) -> Option<Colour> {
    match status {
        JobStatus::Passed => Some(Colour::Green),
        JobStatus::Failed | JobStatus::Error => Some(Colour::Red),
        JobStatus::Cancelled => Some(Colour::Yellow),
        JobStatus::Running => Some(Colour::Cyan),
        JobStatus::Queued | JobStatus::Unspecified => None,
    }
}

/// The colour a task status is shown in.
pub fn task_colour(status: TaskStatus) -> Option<Colour> {
    match status {
        TaskStatus::Passed => Some(Colour::Green),
        TaskStatus::Failed | TaskStatus::TimedOut | TaskStatus::Error => Some(Colour::Red),
        TaskStatus::Cancelled => Some(Colour::Yellow),
        TaskStatus::Skipped => Some(Colour::Dim),
        TaskStatus::Unspecified => None,
    }
}

/// One table cell: its text and, for statuses, a colour.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    colour: Option<Colour>,
}

impl Cell {
    pub fn plain(text: impl Into<String>) -> Self {
        Cell {
            text: text.into(),
            colour: None,
        }
    }

    pub fn coloured(text: impl Into<String>, colour: Option<Colour>) -> Self {
        Cell {
            text: text.into(),
            colour,
        }
    }
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table whose columns are as wide as their widest cell. Widths count
/// visible characters, so colour codes never shift a column.
#[derive(Debug)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per header.
    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as lines, each ending in a newline, with no trailing
    /// spaces.
    pub fn render(&self, colour: bool) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self
            .headers
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.text.chars().count());
            }
        }
        let header_row: Vec<Cell> = self.headers.iter().map(|(h, _)| Cell::plain(*h)).collect();
        let mut out = String::new();
        for row in std::iter::once(&header_row).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                let pad = widths[i] - cell.text.chars().count();
                let last = i + 1 == columns;
                if i > 0 {
                    line.push_str(COLUMN_GAP);
                }
                if self.headers[i].1 == Align::Right {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                match cell.colour.filter(|_| colour) {
                    Some(c) => {
                        line.push_str(&format!("\x1b[{}m{}\x1b[0m", c.code(), cell.text));
                    }
                    None => line.push_str(&cell.text),
                }
                if self.headers[i].1 == Align::Left && !last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end_matches(' '));
            out.push('\n');
        }
        out
    }
}

/// A short human duration: `850ms`, `4.2s`, `12s`, `3m04s`, `2h05m`,
/// `3d04h`.
pub fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.subsec_millis());
    }
    if secs < 10 {
        return format!("{secs}.{}s", d.subsec_millis() / 100);
    }
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// Milliseconds between two Unix-ms instants, zero when clocks disagree.
fn between(from_ms: u64, to_ms: u64) -> Duration {
    Duration::from_millis(to_ms.saturating_sub(from_ms))
}

fn unix_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long a job has run: until it finished, or until `now` while it
/// runs; `None` while it has not started.
fn run_time(job: &JobInfo, now_ms: u64) -> Option<Duration> {
    let started = job.started_at_ms?;
    Some(between(started, job.finished_at_ms.unwrap_or(now_ms)))
}

/// The dispatcher's reason a queued job waits; `None` for any other job
/// (a reason left on one that has started since would be stale).
fn waiting_reason(job: &JobInfo) -> Option<String> {
    (job.status() == JobStatus::Queued)
        .then(|| non_empty(job.reason.as_deref()))
        .flatten()
}

fn short_commit(commit: &str) -> String {
    commit.chars().take(SHORT_COMMIT).collect()
}

fn or_dash(text: Option<&str>) -> String {
    match text {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => "-".to_owned(),
    }
}

/// `surveil jobs`: one line per job, newest first as the dispatcher sent
/// them. AGE is the time since the job was queued; DURATION how long its
/// current attempt ran (or has been running).
pub fn jobs_table(jobs: &[JobInfo], now: SystemTime, colour: bool) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let now_ms = unix_ms(now);
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("STATUS", Align::Left),
        ("ATTEMPT", Align::Right),
        ("RUNNER", Align::Left),
        ("COMMIT", Align::Left),
        ("BRANCH", Align::Left),
        ("REPO", Align::Left),
        ("AGE", Align::Right),
        ("DURATION", Align::Right),
    ]);
    for job in jobs {
        let status = job.status();
        table.row(vec![
            Cell::plain(job.id.to_string()),
            Cell::coloured(status.label(), job_colour(status)),
            Cell::plain(job.attempt.to_string()),
            Cell::plain(or_dash(job.runner.as_deref())),
            Cell::plain(short_commit(&job.commit)),
            Cell::plain(&job.branch),
            Cell::plain(&job.repo),
            Cell::plain(short_duration(between(job.queued_at_ms, now_ms))),
            Cell::plain(run_time(job, now_ms).map_or_else(|| "-".to_owned(), short_duration)),
        ]);
    }
    let mut out = table.render(colour);
    // Under the table rather than in a column: reasons are sentences, and
    // only queued jobs have one.
    let waits: Vec<(u64, String)> = jobs
        .iter()
        .filter_map(|j| waiting_reason(j).map(|r| (j.id, r)))
        .collect();
    if !waits.is_empty() {
        out.push('\n');
        for (id, reason) in waits {
            out.push_str(&format!("job {id} waits: {reason}\n"));
        }
    }
    out
}

/// `key: value` lines with the values lined up.
fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(&format!("{:<width$} {value}\n", format!("{key}:")));
    }
    out
}

/// A timestamp with how long ago it was, for human output.
fn when(unix_ms: u64, now_ms: u64) -> String {
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms));
    format!("{at} ({} ago)", short_duration(between(unix_ms, now_ms)))
}

/// `surveil job ID`: the job's details, then its task table.
pub fn job_details(job: &JobInfo, now: SystemTime, colour: bool) -> String {
    let now_ms = unix_ms(now);
    let status = job.status();
    let status_text = match job_colour(status).filter(|_| colour) {
        Some(c) => format!("\x1b[{}m{}\x1b[0m", c.code(), status.label()),
        None => status.label().to_owned(),
    };
    let mut pairs = vec![
        ("job", job.id.to_string()),
        ("status", status_text),
        ("repo", job.repo.clone()),
        ("branch", job.branch.clone()),
        ("ref", or_dash(Some(&job.r#ref))),
        ("commit", job.commit.clone()),
        ("attempt", job.attempt.to_string()),
        ("runner", or_dash(job.runner.as_deref())),
    ];
    if let Some(message) = non_empty(job.message.as_deref()) {
        pairs.push(("message", message));
    }
    if let Some(reason) = waiting_reason(job) {
        pairs.push(("waiting", reason));
    }
    pairs.push(("queued", when(job.queued_at_ms, now_ms)));
    if let Some(started) = job.started_at_ms {
        pairs.push(("started", when(started, now_ms)));
    }
    if let Some(finished) = job.finished_at_ms {
        pairs.push(("finished", when(finished, now_ms)));
    }
    if let Some(ran) = run_time(job, now_ms) {
        pairs.push(("duration", short_duration(ran)));
    }
    if let Some(current) = job.attempts.iter().find(|a| a.attempt == job.attempt) {
        if current.log_pruned {
            pairs.push(("log", "deleted by retention".to_owned()));
        } else if current.log_truncated {
            pairs.push((
                "log",
                format!(
                    "truncated at --max-log-size ({} bytes stored)",
                    current.log_bytes
                ),
            ));
        }
    }
    let mut out = key_values(&pairs);
    if !job.tasks.is_empty() {
        out.push('\n');
        out.push_str(&tasks_table(&job.tasks, colour));
        for task in &job.tasks {
            if let Some(report) = &task.report {
                out.push_str(&tests_line(&task.name, report));
            }
        }
    }
    if job.attempts.len() > 1 {
        out.push_str("\nattempts:\n");
        for a in &job.attempts {
            let status = AttemptJson::from(a).status;
            let note = non_empty(a.message.as_deref()).unwrap_or_default();
            out.push_str(&format!(
                "  {:>3}  {:<10} {:<16} {note}\n",
                a.attempt, status, a.runner
            ));
        }
    }
    out
}

/// `unit: tests 41 passed, 2 failed, 1 skipped; failing: a.x, a.y`.
fn tests_line(task: &str, r: &surveil_proto::TestReport) -> String {
    let mut line = format!(
        "{task}: tests {} passed, {} failed, {} skipped",
        r.passed, r.failed, r.skipped
    );
    if !r.failing.is_empty() {
        line.push_str(&format!("; failing: {}", r.failing.join(", ")));
    }
    for problem in &r.problems {
        line.push_str(&format!("; {problem}"));
    }
    line.push('\n');
    line
}

fn tasks_table(tasks: &[TaskResult], colour: bool) -> String {
    let mut table = Table::new(&[
        ("TASK", Align::Left),
        ("STATUS", Align::Left),
        ("EXIT", Align::Right),
        ("DURATION", Align::Right),
        ("MESSAGE", Align::Left),
    ]);
    for task in tasks {
        let status = task.status();
        let exit = match (task.exit_code, task.signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "-".to_owned(),
        };
        table.row(vec![
            Cell::plain(&task.name),
            Cell::coloured(status.label(), task_colour(status)),
            Cell::plain(exit),
            Cell::plain(short_duration(Duration::from_millis(task.duration_ms))),
            Cell::plain(&task.message),
        ]);
    }
    table.render(colour)
}

/// `surveil runners`: one line per connected runner.
pub fn runners_table(runners: &[RunnerInfo], now: SystemTime) -> String {
    if runners.is_empty() {
        return "no runners connected\n".to_owned();
    }
    let now_ms = unix_ms(now);
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("ADDR", Align::Left),
        ("SLOTS", Align::Right),
        ("RUNNING", Align::Left),
        ("LAST SEEN", Align::Right),
        ("HEALTH", Align::Left),
    ]);
    for runner in runners {
        let running = if runner.running.is_empty() {
            "-".to_owned()
        } else {
            let ids: Vec<String> = runner.running.iter().map(u64::to_string).collect();
            ids.join(",")
        };
        table.row(vec![
            Cell::plain(&runner.name),
            Cell::plain(&runner.addr),
            Cell::plain(runner.slots.to_string()),
            Cell::plain(running),
            Cell::plain(format!(
                "{} ago",
                short_duration(between(runner.last_seen_ms, now_ms))
            )),
            Cell::plain(health(runner, now_ms)),
        ]);
    }
    table.render(false)
}

/// A runner's HEALTH cell: `-`, `2 infra failures`, `quarantined 4m12s
/// (3 infra failures)` (the time left), `draining` first while it drains.
fn health(runner: &RunnerInfo, now_ms: u64) -> String {
    let cell = infra_health(runner, now_ms);
    match (runner.draining, cell.as_str()) {
        (false, _) => cell,
        (true, "-") => "draining".to_owned(),
        (true, _) => format!("draining, {cell}"),
    }
}

fn infra_health(runner: &RunnerInfo, now_ms: u64) -> String {
    let failures = match runner.infra_failures {
        1 => "1 infra failure".to_owned(),
        n => format!("{n} infra failures"),
    };
    if runner.quarantined_until_ms > 0 {
        let left = Duration::from_millis(runner.quarantined_until_ms.saturating_sub(now_ms));
        format!("quarantined {} ({failures})", short_duration(left))
    } else if runner.infra_failures > 0 {
        failures
    } else {
        "-".to_owned()
    }
}

/// `surveil status`: `key: value` lines.
pub fn status_lines(status: &GetStatusReply) -> String {
    let json = StatusJson::from(status);
    let r = &json.supervisor_restarts;
    let mut restarts = format!(
        "monitor {}, redistributor {}, spawner {}",
        r.monitor, r.redistributor, r.spawner
    );
    for (name, count) in &r.other {
        restarts.push_str(&format!(", {name} {count}"));
    }
    let mut pairs = vec![
        ("version", json.version.clone()),
        (
            "uptime",
            format!(
                "{} ({} s)",
                short_duration(Duration::from_secs(json.uptime_s)),
                json.uptime_s
            ),
        ),
        ("runners", json.runners.to_string()),
        ("queued", json.queued.to_string()),
        ("running", json.running.to_string()),
        ("reassignments", json.reassignments.to_string()),
        ("refused results", json.refused_results.to_string()),
        ("quarantined runners", json.quarantined.to_string()),
        ("draining runners", json.draining.to_string()),
        ("supervisor restarts", restarts),
    ];
    if let Some(leader) = &json.leader {
        let addr = leader.addr.as_deref().unwrap_or("none elected");
        let role = if leader.standby { "standby" } else { "leader" };
        pairs.push(("role", role.to_owned()));
        pairs.push(("leader", format!("{addr} (term {})", leader.term)));
    }
    if let Some(epoch) = &json.epoch {
        pairs.push(("store epoch", epoch.clone()));
    }
    if let Some(store) = &json.store {
        let health = match (store.healthy, store.failures) {
            (true, _) => "healthy".to_owned(),
            (false, 0) => "unhealthy: a write is stalled".to_owned(),
            (false, n) => format!("unhealthy: {n} writes failed in a row"),
        };
        pairs.push(("store", health));
    }
    key_values(&pairs)
}

// ----------------------------------------------------------------- logs ----

/// Writes `ReadLogReply` bytes to the user as they arrive, one request's
/// worth. The dispatcher sends the latest attempt's log; when the attempt
/// changes mid-follow (the job was reassigned) the new attempt's log starts
/// again at offset 0, and a marker line says so.
#[derive(Debug, Default)]
pub struct LogPrinter {
    /// The attempt whose bytes were last seen; 0 before any (attempt 0
    /// means the job has not been assigned yet).
    attempt: u32,
    /// The next byte offset expected in that attempt's log.
    next_offset: u64,
    /// Whether the last byte written ended a line (or nothing was written).
    at_line_start: bool,
}

impl LogPrinter {
    pub fn new() -> Self {
        LogPrinter {
            at_line_start: true,
            ..LogPrinter::default()
        }
    }

    /// Writes `reply`'s new bytes to `out` and flushes, so a follower sees
    /// output while the task runs. Bytes already written (a resent chunk)
    /// are skipped by offset.
    pub fn write(&mut self, reply: &ReadLogReply, out: &mut dyn Write) -> io::Result<()> {
        if reply.attempt != 0 && reply.attempt != self.attempt {
            if self.attempt != 0 {
                if !self.at_line_start {
                    out.write_all(b"\n")?;
                }
                writeln!(
                    out,
                    "--- attempt {} (job was reassigned) ---",
                    reply.attempt
                )?;
                self.at_line_start = true;
            }
            self.attempt = reply.attempt;
            self.next_offset = reply.offset;
        }
        let already = self.next_offset.saturating_sub(reply.offset);
        let skip = usize::try_from(already)
            .unwrap_or(usize::MAX)
            .min(reply.data.len());
        let fresh = &reply.data[skip..];
        if !fresh.is_empty() {
            out.write_all(fresh)?;
            self.at_line_start = fresh.ends_with(b"\n");
            self.next_offset = reply.offset.max(self.next_offset) + fresh.len() as u64;
        }
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use surveil_proto::{JobStatus, TaskStatus};

    use super::*;

    /// 2026-11-28T04:00:00.123Z, the contract's example.
    const QUEUED_MS: u64 = 1_795_838_400_123;

    fn job() -> JobInfo {
        JobInfo {
            id: 7,
            repo: "/srv/git/app".into(),
            branch: "main".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            status: JobStatus::Failed as i32,
            attempt: 2,
            runner: Some("ci-3".into()),
            message: None,
            queued_at_ms: QUEUED_MS,
            started_at_ms: Some(QUEUED_MS + 1_000),
            finished_at_ms: None,
            r#ref: "refs/heads/main".into(),
            pull_request: None,
            log_truncated: false,
            reason: None,
            attempts: Vec::new(),
            tasks: vec![
                TaskResult {
                    name: "unit".into(),
                    status: TaskStatus::Passed as i32,
                    exit_code: Some(0),
                    signal: None,
                    duration_ms: 12,
                    message: String::new(),
                    ..TaskResult::default()
                },
                TaskResult {
                    name: "lint".into(),
                    status: TaskStatus::TimedOut as i32,
                    exit_code: None,
                    signal: Some(9),
                    duration_ms: 600_000,
                    message: "timed out after 10m".into(),
                    ..TaskResult::default()
                },
            ],
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        assert_eq!(timestamp(QUEUED_MS), "2026-11-28T04:00:00.123Z");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_test_report_shows_in_the_json_and_under_the_table() {
        let mut job = job();
        job.tasks[0].started_at_ms = Some(QUEUED_MS + 2_000);
        job.tasks[0].report = Some(surveil_proto::TestReport {
            passed: 41,
            failed: 2,
            skipped: 1,
            failing: vec!["m.a".into(), "m.b".into()],
            problems: vec![],
        });
        let text = serde_json::to_string(&JobJson::from(&job)).unwrap();
        assert!(
            text.contains(concat!(
                r#""duration_ms":12,"message":null,"started_at":"2026-11-28T04:00:02.123Z","#,
                r#""tests":{"passed":41,"failed":2,"skipped":1,"failing":["m.a","m.b"],"problems":[]}}"#
            )),
            "{text}"
        );
        assert_eq!(
            tests_line("unit", job.tasks[0].report.as_ref().unwrap()),
            "unit: tests 41 passed, 2 failed, 1 skipped; failing: m.a, m.b\n"
        );
    }

    #[test]
    fn job_json_has_the_contract_keys_in_order_and_nulls() {
        let text = serde_json::to_string(&JobJson::from(&job())).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"id":7,"repo":"/srv/git/app","branch":"main","#,
                r#""commit":"0123456789abcdef0123456789abcdef01234567","#,
                r#""status":"failed","attempt":2,"runner":"ci-3","message":null,"#,
                r#""queued_at":"2026-11-28T04:00:00.123Z","#,
                r#""started_at":"2026-11-28T04:00:01.123Z","finished_at":null,"#,
                r#""tasks":[{"name":"unit","status":"passed","exit_code":0,"signal":null,"#,
                r#""duration_ms":12,"message":null},"#,
                r#"{"name":"lint","status":"timed_out","exit_code":null,"signal":9,"#,
                r#""duration_ms":600000,"message":"timed out after 10m"}],"#,
                r#""ref":"refs/heads/main","pull_request":null}"#,
            )
        );
        let mut pr = job();
        pr.r#ref = "refs/pull/12/head".into();
        pr.pull_request = Some(12);
        let text = serde_json::to_string(&JobJson::from(&pr)).unwrap();
        assert!(
            text.ends_with(r#""ref":"refs/pull/12/head","pull_request":12}"#),
            "{text}"
        );
        pr.r#ref = String::new();
        let text = serde_json::to_string(&JobJson::from(&pr)).unwrap();
        assert!(text.contains(r#""ref":null"#), "{text}");
    }

    #[test]
    fn empty_runner_and_message_are_null() {
        let mut j = job();
        j.runner = Some(String::new());
        j.message = Some(String::new());
        let json = JobJson::from(&j);
        assert_eq!(json.runner, None);
        assert_eq!(json.message, None);
        j.runner = None;
        j.message = Some("bad pipeline: .surveil.toml:3: unknown key `rn`".into());
        let json = JobJson::from(&j);
        assert_eq!(json.runner, None);
        assert_eq!(
            json.message.as_deref(),
            Some("bad pipeline: .surveil.toml:3: unknown key `rn`")
        );
    }

    #[test]
    fn status_json_always_has_the_three_restart_keys() {
        let mut reply = GetStatusReply {
            version: "0.1.0".into(),
            uptime_s: 12,
            runners: 2,
            queued: 0,
            running: 1,
            reassignments: 3,
            refused_results: 1,
            ..GetStatusReply::default()
        };
        reply.supervisor_restarts.insert("redistributor".into(), 4);
        reply.supervisor_restarts.insert("archiver".into(), 1);
        let text = serde_json::to_string(&StatusJson::from(&reply)).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"version":"0.1.0","uptime_s":12,"runners":2,"queued":0,"running":1,"#,
                r#""supervisor_restarts":{"monitor":0,"redistributor":4,"spawner":0,"archiver":1},"#,
                r#""reassignments":3,"refused_results":1,"quarantined":0}"#
            )
        );
        reply.epoch = "ab".repeat(16);
        let text = serde_json::to_string(&StatusJson::from(&reply)).unwrap();
        assert!(
            text.ends_with(&format!(
                r#""refused_results":1,"quarantined":0,"epoch":"{}"}}"#,
                "ab".repeat(16)
            )),
            "{text}"
        );
        let lines = status_lines(&reply);
        assert!(
            lines.contains("store epoch") && lines.contains(&"ab".repeat(16)),
            "{lines}"
        );
    }

    #[test]
    fn status_shows_the_stores_health_when_the_dispatcher_tells_it() {
        let mut reply = GetStatusReply {
            store_healthy: Some(false),
            store_failures: 2,
            ..GetStatusReply::default()
        };
        let json = serde_json::to_value(StatusJson::from(&reply)).unwrap();
        assert_eq!(
            json["store"],
            serde_json::json!({"healthy": false, "failures": 2})
        );
        assert!(
            status_lines(&reply).contains("unhealthy: 2 writes failed in a row"),
            "{}",
            status_lines(&reply)
        );
        reply.store_healthy = None;
        let json = serde_json::to_value(StatusJson::from(&reply)).unwrap();
        assert!(json.get("store").is_none(), "{json}");
    }

    #[test]
    fn runner_and_submit_json() {
        let runner = RunnerInfo {
            name: "ci-3".into(),
            addr: "127.0.0.1:53412".into(),
            slots: 1,
            running: vec![7],
            last_seen_ms: QUEUED_MS,
            labels: vec!["x".into()],
            repos: vec!["/r".into()],
            identity: "token:ci-3".into(),
            ..RunnerInfo::default()
        };
        assert_eq!(
            serde_json::to_string(&RunnerJson::from(&runner)).unwrap(),
            r#"{"name":"ci-3","addr":"127.0.0.1:53412","slots":1,"running":[7],"last_seen":"2026-11-28T04:00:00.123Z","identity":"token:ci-3"}"#
        );
        let quarantined = RunnerInfo {
            quarantined_until_ms: QUEUED_MS + 300_000,
            infra_failures: 3,
            ..runner.clone()
        };
        assert_eq!(
            serde_json::to_string(&RunnerJson::from(&quarantined)).unwrap(),
            r#"{"name":"ci-3","addr":"127.0.0.1:53412","slots":1,"running":[7],"last_seen":"2026-11-28T04:00:00.123Z","identity":"token:ci-3","quarantined_until":"2026-11-28T04:05:00.123Z","infra_failures":3}"#
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(QUEUED_MS + 48_000);
        let table = runners_table(&[runner.clone(), quarantined], now);
        assert!(
            table.contains("quarantined 4m12s (3 infra failures)"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .nth(1)
                .is_some_and(|l| l.trim_end().ends_with('-')),
            "{table}"
        );
        let draining = RunnerInfo {
            name: "ci-4".into(),
            draining: true,
            ..runner.clone()
        };
        assert!(
            serde_json::to_string(&RunnerJson::from(&draining))
                .unwrap()
                .ends_with(r#","identity":"token:ci-3","draining":true}"#)
        );
        let table = runners_table(&[draining], now);
        assert!(
            table
                .lines()
                .nth(1)
                .is_some_and(|l| l.trim_end().ends_with("draining")),
            "{table}"
        );
        assert_eq!(
            serde_json::to_string(&SubmitJson { job_ids: vec![7] }).unwrap(),
            r#"{"job_ids":[7]}"#
        );
    }

    #[test]
    fn table_columns_line_up_with_and_without_colour() {
        let mut table = Table::new(&[
            ("ID", Align::Right),
            ("STATUS", Align::Left),
            ("REPO", Align::Left),
        ]);
        table.row(vec![
            Cell::plain("7"),
            Cell::coloured("passed", Some(Colour::Green)),
            Cell::plain("/a"),
        ]);
        table.row(vec![
            Cell::plain("1234"),
            Cell::coloured("cancelled", Some(Colour::Yellow)),
            Cell::plain("/long/repo"),
        ]);
        let plain = table.render(false);
        assert_eq!(
            plain,
            "  ID  STATUS     REPO\n   7  passed     /a\n1234  cancelled  /long/repo\n"
        );
        let coloured = table.render(true);
        assert_eq!(
            coloured,
            "  ID  STATUS     REPO\n   7  \x1b[32mpassed\x1b[0m     /a\n1234  \x1b[33mcancelled\x1b[0m  /long/repo\n"
        );
    }

    #[test]
    fn jobs_table_shows_short_commit_age_and_duration() {
        let now = UNIX_EPOCH + Duration::from_millis(QUEUED_MS + 65_000);
        let mut queued = job();
        queued.id = 8;
        queued.status = JobStatus::Queued as i32;
        queued.runner = None;
        queued.attempt = 0;
        queued.started_at_ms = None;
        let text = jobs_table(&[queued, job()], now, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ID  STATUS  ATTEMPT  RUNNER  COMMIT        BRANCH  REPO            AGE  DURATION",
                " 8  queued        0  -       0123456789ab  main    /srv/git/app  1m05s         -",
                " 7  failed        2  ci-3    0123456789ab  main    /srv/git/app  1m05s     1m04s",
            ]
        );
        assert_eq!(jobs_table(&[], now, false), "no jobs\n");
    }

    #[test]
    fn a_queued_jobs_reason_shows_in_job_jobs_and_json_and_nowhere_else() {
        let now = UNIX_EPOCH + Duration::from_millis(QUEUED_MS + 2_000);
        let why =
            "no connected runner lists this repository (1 connected build other repositories)";
        let mut queued = job();
        queued.id = 8;
        queued.status = JobStatus::Queued as i32;
        queued.reason = Some(why.into());
        let table = jobs_table(&[queued.clone(), job()], now, false);
        assert!(
            table.ends_with(&format!("\n\njob 8 waits: {why}\n")),
            "{table}"
        );
        let details = job_details(&queued, now, false);
        assert!(
            details.contains(&format!("\nwaiting:  {why}\n")),
            "{details}"
        );
        let json = serde_json::to_string(&JobJson::from(&queued)).unwrap();
        assert!(
            json.contains(&format!(r#""pull_request":null,"reason":"{why}"}}"#)),
            "{json}"
        );

        // A reason on a job that is no longer queued is not shown.
        let mut started = queued;
        started.status = JobStatus::Running as i32;
        assert!(!jobs_table(std::slice::from_ref(&started), now, false).contains("waits"));
        assert!(!job_details(&started, now, false).contains("waiting"));
        assert!(
            !serde_json::to_string(&JobJson::from(&started))
                .unwrap()
                .contains("reason")
        );
    }

    #[test]
    fn job_details_list_fields_then_tasks() {
        let now = UNIX_EPOCH + Duration::from_millis(QUEUED_MS + 2_000);
        let text = job_details(&job(), now, false);
        assert!(
            text.starts_with("job:      7\nstatus:   failed\nrepo:     /srv/git/app\n"),
            "{text}"
        );
        assert!(
            text.contains("\nqueued:   2026-11-28T04:00:00Z (2.0s ago)\n"),
            "{text}"
        );
        assert!(!text.contains("message:"), "{text}");
        let tasks = tasks_table(&job().tasks, false);
        assert_eq!(
            tasks,
            "TASK  STATUS         EXIT  DURATION  MESSAGE\n\
             unit  passed            0      12ms\n\
             lint  timed_out  signal 9    10m00s  timed out after 10m\n"
        );
        assert!(text.ends_with(&format!("\n\n{tasks}")), "{text}");
    }

    #[test]
    fn status_lines_are_aligned_key_values() {
        let reply = GetStatusReply {
            version: "0.1.0".into(),
            uptime_s: 3720,
            runners: 2,
            ..GetStatusReply::default()
        };
        let text = status_lines(&reply);
        assert!(
            text.starts_with("version:             0.1.0\nuptime:              1h02m (3720 s)\n"),
            "{text}"
        );
        assert!(
            text.ends_with("supervisor restarts: monitor 0, redistributor 0, spawner 0\n"),
            "{text}"
        );
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(short_duration(Duration::from_millis(4_250)), "4.2s");
        assert_eq!(short_duration(Duration::from_secs(12)), "12s");
        assert_eq!(short_duration(Duration::from_secs(184)), "3m04s");
        assert_eq!(short_duration(Duration::from_secs(7_500)), "2h05m");
        assert_eq!(
            short_duration(Duration::from_secs(3 * 86_400 + 4 * 3_600)),
            "3d04h"
        );
    }

    fn chunk(attempt: u32, offset: u64, data: &str) -> ReadLogReply {
        ReadLogReply {
            job_id: 7,
            attempt,
            offset,
            data: data.as_bytes().to_vec().into(),
            ..ReadLogReply::default()
        }
    }

    #[test]
    fn log_printer_marks_a_reassignment_and_skips_resent_bytes() {
        let mut printer = LogPrinter::new();
        let mut out = Vec::new();
        for reply in [
            chunk(0, 0, ""),
            chunk(1, 0, "checkout\nbuil"),
            chunk(1, 9, "building"), // "buil" resent: only "ding" is new
            chunk(2, 0, "again\n"),
            chunk(2, 6, ""),
        ] {
            printer.write(&reply, &mut out).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "checkout\nbuilding\n--- attempt 2 (job was reassigned) ---\nagain\n"
        );
    }

    #[test]
    fn log_printer_starting_on_a_later_attempt_prints_no_marker() {
        let mut printer = LogPrinter::new();
        let mut out = Vec::new();
        printer.write(&chunk(3, 0, "hello\n"), &mut out).unwrap();
        assert_eq!(out, b"hello\n");
    }
}
