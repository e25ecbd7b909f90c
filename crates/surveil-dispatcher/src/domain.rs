//! The dispatcher's own vocabulary: ids, statuses, jobs, results, log
//! chunks, queries and the views the service answers with.
//!
//! These are what the scheduler, the store and the service speak; no
//! protobuf type appears here or in them. `wire.rs` converts to and from
//! the protocol at the session edge, and an HTTP layer maps the same types
//! to JSON. This file holds data and its validation only: no IO, no clock.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type! {
    /// A job's id, handed out by the store and never reused.
    JobId(u64)
}

id_type! {
    /// An attempt number: 0 before the first assignment, 1 for the first,
    /// one more for each reassignment. It is the fencing token: only the
    /// job's live attempt may report on it.
    Attempt(u32)
}

id_type! {
    /// One runner connection, unique for the life of the process.
    SessionId(u64)
}

impl Attempt {
    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}

/// Why a value from outside (a peer, a user, a stored row) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A full commit id: 40 hex digits, lower-case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitId(String);

impl CommitId {
    /// Accepts 40 hex digits in either case and keeps them lower-case.
    pub fn parse(text: &str) -> Result<CommitId, Invalid> {
        if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(CommitId(text.to_ascii_lowercase()))
        } else {
            Err(Invalid(format!("`{text}` is not a full 40-hex commit id")))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job's status. Queued and running jobs are active; the others are
/// final: they change only when a user reruns the job, which queues a new
/// attempt and keeps the earlier attempts' results and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Waiting for a runner.
    Queued,
    /// Held by a runner (or an orphaned lease waiting for one).
    Running,
    /// Final: see [`FinalStatus`].
    Final(FinalStatus),
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinalStatus {
    /// Every task passed (or was allowed to fail).
    Passed,
    /// A task failed.
    Failed,
    /// The job could not be run (bad pipeline file, runners lost too often).
    Error,
    /// A user cancelled it.
    Cancelled,
}

impl JobStatus {
    /// Every status, in the contract's order.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Final(FinalStatus::Passed),
        JobStatus::Final(FinalStatus::Failed),
        JobStatus::Final(FinalStatus::Error),
        JobStatus::Final(FinalStatus::Cancelled),
    ];

    /// The lower-case label of the JSON contract and the store
    /// (`queued`, `running`, `passed`, `failed`, `error`, `cancelled`).
    pub fn label(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Final(status) => status.label(),
        }
    }

    /// The status with this label.
    pub fn from_label(label: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.label() == label)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Final(_))
    }
}

impl FinalStatus {
    /// The lower-case label (`passed`, `failed`, `error`, `cancelled`).
    pub fn label(self) -> &'static str {
        match self {
            FinalStatus::Passed => "passed",
            FinalStatus::Failed => "failed",
            FinalStatus::Error => "error",
            FinalStatus::Cancelled => "cancelled",
        }
    }
}

impl From<FinalStatus> for JobStatus {
    fn from(status: FinalStatus) -> JobStatus {
        JobStatus::Final(status)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How one task of a pipeline ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    /// Exit code 0.
    Passed,
    /// A non-zero exit or a signal.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Stopped because the job was cancelled.
    Cancelled,
    /// Could not be started.
    Error,
    /// Not run because an earlier task failed.
    Skipped,
}

impl TaskStatus {
    /// Every status, in the contract's order.
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Passed,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Cancelled,
        TaskStatus::Error,
        TaskStatus::Skipped,
    ];

    /// The lower-case label of the JSON contract and the store.
    pub fn label(self) -> &'static str {
        match self {
            TaskStatus::Passed => "passed",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Error => "error",
            TaskStatus::Skipped => "skipped",
        }
    }

    /// The status with this label.
    pub fn from_label(label: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|s| s.label() == label)
    }
}

/// Which output a log chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// A task's standard output.
    Stdout,
    /// A task's standard error.
    Stderr,
    /// The runner's own lines (checkout, pipeline errors).
    System,
}

impl LogStream {
    /// The number the store keeps (the protocol's numbering, so rows
    /// written by earlier versions read the same).
    pub fn code(self) -> u8 {
        match self {
            LogStream::Stdout => 1,
            LogStream::Stderr => 2,
            LogStream::System => 3,
        }
    }
}

/// One task's result, as a runner reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskResult {
    /// The task's name in the pipeline file.
    pub name: String,
    /// How it ended.
    pub status: TaskStatus,
    /// Its exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// How long it ran.
    pub duration_ms: u64,
    /// The runner's note (empty for none).
    pub message: String,
    /// Unix milliseconds when its process started; `None` when it never did.
    pub started_at_ms: Option<u64>,
    /// Its JUnit test counts, when it has reports.
    pub report: Option<TestReport>,
}

/// A task's test counts from its JUnit reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestReport {
    /// Cases that passed.
    pub passed: u32,
    /// Cases that failed or errored.
    pub failed: u32,
    /// Cases skipped.
    pub skipped: u32,
    /// The failed cases' names (the runner keeps at most 100).
    pub failing: Vec<String>,
    /// Report files the runner could not read, with the reason.
    pub problems: Vec<String>,
}

/// What a runner reports when an attempt ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobResult {
    /// How the job ended.
    pub status: FinalStatus,
    /// Why (empty for none).
    pub message: String,
    /// Each task's result, in pipeline order.
    pub tasks: Vec<TaskResult>,
    /// The runner says the job could not be run because of the runner or
    /// the network (`JobFinished.infrastructure`): the scheduler queues it
    /// again instead of recording it. Never stored.
    pub infrastructure: bool,
}

/// A piece of an attempt's combined log (all tasks and streams, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// The task that wrote it (its index in the pipeline).
    pub task: u32,
    /// The stream it came from.
    pub stream: LogStream,
    /// The byte position of `data` in the attempt's combined log: a resent
    /// chunk is recognised by it.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// A job as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// The repository, as submitted.
    pub repo: String,
    /// The branch it was first submitted on.
    pub branch: String,
    /// The full ref it was first submitted for (`refs/heads/main`,
    /// `refs/pull/7/head`); empty when the submitter named none.
    pub ref_name: String,
    /// The pull (or merge) request it was first submitted for.
    pub pull_request: Option<u64>,
    /// The commit to build.
    pub commit: CommitId,
    /// Its status.
    pub status: JobStatus,
    /// The current (or last) attempt.
    pub attempt: Attempt,
    /// The runner holding it, or the one that produced its result.
    pub runner: Option<String>,
    /// Why it ended (or the runner's message).
    pub message: Option<String>,
    /// When it was first submitted (unix ms).
    pub queued_at_ms: u64,
    /// When its current attempt was assigned (unix ms).
    pub started_at_ms: Option<u64>,
    /// When it reached its final status (unix ms).
    pub finished_at_ms: Option<u64>,
    /// The task results of its recorded result; empty otherwise.
    pub tasks: Vec<TaskResult>,
    /// The last attempt of the runs before the latest rerun (0 when never
    /// rerun): attempts after it count against `--max-attempts`.
    pub rerun_base: Attempt,
    /// A cancel was asked while it ran and its runner has not answered yet
    /// (recovery tells the runner again).
    pub cancel_requested: bool,
    /// Attempts of the current run that runners handed back without a
    /// result (a drain): they do not count against `--max-attempts`.
    pub handed_back: u32,
}

/// One attempt of a job, as recorded: who ran it and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Its number (1 is the first).
    pub attempt: Attempt,
    /// The runner it was assigned to.
    pub runner: String,
    /// How it stands.
    pub status: AttemptStatus,
    /// The runner's message, or why the attempt was revoked.
    pub message: Option<String>,
    /// When it was assigned (unix ms).
    pub assigned_at_ms: u64,
    /// When the runner said it started (unix ms).
    pub started_at_ms: Option<u64>,
    /// When its result was recorded (unix ms).
    pub finished_at_ms: Option<u64>,
    /// The task results of its result; empty without one.
    pub tasks: Vec<TaskResult>,
    /// How many bytes of its log were stored (contiguously from 0).
    pub log_bytes: u64,
    /// Its log reached `--max-log-size`: later output was dropped.
    pub log_truncated: bool,
    /// Its log was deleted by retention (`--retain-logs`, `surveil prune`).
    pub log_pruned: bool,
}

/// Which finished jobs' logs a prune deletes: those either bound selects.
/// Queued and running jobs are never pruned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneRule {
    /// Jobs that reached their final status before this time (unix ms).
    pub finished_before_ms: Option<u64>,
    /// Every finished job but the newest this many (by id).
    pub keep_jobs: Option<u64>,
}

impl PruneRule {
    /// Whether the rule selects anything at all.
    pub fn is_empty(&self) -> bool {
        self.finished_before_ms.is_none() && self.keep_jobs.is_none()
    }
}

/// Which finished jobs' logs the dispatcher keeps (`--retain-logs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRetention {
    /// Every log is kept.
    Off,
    /// Logs of jobs that finished longer ago than this are deleted.
    Age(Duration),
    /// Logs of all finished jobs but the newest this many are deleted.
    Jobs(u64),
}

impl LogRetention {
    /// Parses `off`, a duration (`30d`, `12h`) or a job count (`1000jobs`).
    pub fn parse(text: &str) -> Result<LogRetention, String> {
        let text = text.trim();
        if text == "off" {
            return Ok(LogRetention::Off);
        }
        if let Some(count) = text.strip_suffix("jobs") {
            return count
                .trim()
                .parse()
                .map(LogRetention::Jobs)
                .map_err(|_| format!("`{text}` is not a number of jobs; write e.g. 1000jobs"));
        }
        match surveil_common::parse_duration(text) {
            Ok(age) if age.is_zero() => Err(format!(
                "`{text}` would delete every log at once; give a longer age, a number of jobs (1000jobs) or off"
            )),
            Ok(age) => Ok(LogRetention::Age(age)),
            Err(_) => Err(format!(
                "`{text}` is neither an age (30d, 12h), a number of jobs (1000jobs) nor off"
            )),
        }
    }

    /// What a prune at `now_ms` deletes under this retention.
    pub fn rule(self, now_ms: u64) -> PruneRule {
        let mut rule = PruneRule::default();
        match self {
            LogRetention::Off => {}
            LogRetention::Age(age) => {
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                rule.finished_before_ms = Some(now_ms.saturating_sub(age_ms));
            }
            LogRetention::Jobs(keep) => rule.keep_jobs = Some(keep),
        }
        rule
    }
}

/// What a prune deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Attempts whose logs were deleted.
    pub attempts: u64,
    /// Log bytes deleted.
    pub bytes: u64,
    /// Whether more attempts may be waiting (a store call's batch was
    /// full).
    pub more: bool,
}

/// How an attempt stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptStatus {
    /// Held by its runner, no result yet.
    Running,
    /// Its result was recorded with this status.
    Ended(FinalStatus),
    /// Revoked without a result (its runner was lost, the job was
    /// cancelled, or a newer attempt superseded it).
    Revoked,
}

impl AttemptStatus {
    /// `running`, a final status's label, or `revoked`.
    pub fn label(self) -> &'static str {
        match self {
            AttemptStatus::Running => "running",
            AttemptStatus::Ended(status) => status.label(),
            AttemptStatus::Revoked => "revoked",
        }
    }
}

/// Where submitted commits were seen: a branch, or a pull (merge)
/// request's head. Recorded on the jobs it creates; a known commit keeps
/// the origin it was first submitted with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The branch (for a pull request: its head branch, when known).
    pub branch: String,
    /// The full ref (`refs/heads/main`, `refs/pull/7/head`,
    /// `refs/merge-requests/3/head`); empty when unknown.
    pub ref_name: String,
    /// The pull or merge request number.
    pub pull_request: Option<u64>,
}

impl Origin {
    /// A plain branch: its ref is `refs/heads/<branch>` (none for an empty
    /// branch).
    pub fn branch(branch: &str) -> Self {
        Origin {
            branch: branch.to_owned(),
            ref_name: if branch.is_empty() {
                String::new()
            } else {
                format!("refs/heads/{branch}")
            },
            pull_request: None,
        }
    }
}

/// Commits to build, as an observer or a user submits them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// The repository, named exactly as runners list it.
    pub repo: String,
    /// The branch and ref the commits were seen on.
    pub origin: Origin,
    /// The commits, oldest first.
    pub commits: Vec<CommitId>,
}

/// What a submit did with one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The commit's job.
    pub id: JobId,
    /// Whether this submit created it (false: the commit was known).
    pub created: bool,
    /// Its status now.
    pub status: JobStatus,
    /// The branch it is recorded on (the first one it was submitted on).
    pub branch: String,
    /// The ref it is recorded on (the first one it was submitted for).
    pub ref_name: String,
    /// Its current attempt.
    pub attempt: Attempt,
}

/// Which jobs a listing returns: newest first (id descending), every
/// filter given must match, keyset-paged by `before`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this repository.
    pub repo: Option<String>,
    /// Only this branch.
    pub branch: Option<String>,
    /// Only jobs of this pull (merge) request.
    pub pull_request: Option<u64>,
    /// Only jobs with this status.
    pub status: Option<JobStatus>,
    /// Only jobs older than this one (ids below it): the next page after a
    /// page whose last job this was.
    pub before: Option<JobId>,
    /// At most this many; `None` for all.
    pub limit: Option<u32>,
}

/// A connected runner, as `runners` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerView {
    /// Its unique name.
    pub name: String,
    /// Its peer address.
    pub addr: String,
    /// Jobs it runs at once.
    pub slots: u32,
    /// The jobs it holds.
    pub running: Vec<JobId>,
    /// When a frame last arrived from it (unix ms).
    pub last_seen_ms: u64,
    /// Its labels.
    pub labels: Vec<String>,
    /// The repositories it builds.
    pub repos: Vec<String>,
    /// The identity it authenticated as (`token:ci-3`, `cert:ci-3`,
    /// `shared`, `anonymous`).
    pub identity: String,
    /// Until when it gets no new job after infrastructure failures (unix
    /// ms); `None` when it is not quarantined.
    pub quarantined_until_ms: Option<u64>,
    /// Infrastructure failures in a row reported under its name.
    pub infra_failures: u32,
    /// It is draining (shutting down): it gets no new job.
    pub draining: bool,
}

/// The dispatcher's health and counters, as `status` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusView {
    /// The dispatcher's version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Connected runners.
    pub runners: u32,
    /// Jobs waiting for a runner.
    pub queued: u64,
    /// Jobs held by runners (or orphaned leases).
    pub running: u64,
    /// Restarts of each supervised task.
    pub supervisor_restarts: BTreeMap<String, u64>,
    /// Jobs requeued because their runner was lost.
    pub reassignments: u64,
    /// Results refused because their attempt was revoked.
    pub refused_results: u64,
    /// Connected runners quarantined now after infrastructure failures.
    pub quarantined: u32,
    /// Connected runners draining now.
    pub draining: u32,
    /// With a PostgreSQL store: who leads. `None` with SQLite.
    pub leader: Option<LeaderView>,
    /// The store's epoch (empty on a standby).
    pub epoch: String,
    /// Whether the store is healthy: its last write did not fail and no
    /// write has been in flight past `--store-write-timeout`.
    pub store_healthy: bool,
    /// Store writes that failed in a row.
    pub store_failures: u32,
}

/// The leader term as `status` shows it (high availability on PostgreSQL).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// The leader's advertised address; empty while none is known.
    pub addr: String,
    /// The current term.
    pub term: u64,
    /// Whether the dispatcher answering is a standby.
    pub standby: bool,
}

/// Why a queued job is still waiting, computed from the scheduler's state
/// (the runners connected now and what they hold), never guessed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// No connected runner lists the job's repository.
    NoRunner {
        /// Runners connected at all (they build other repositories).
        connected: u32,
    },
    /// Every connected runner that builds the repository has all its slots
    /// taken.
    AllBusy {
        /// How many runners build it.
        matching: u32,
        /// Their slots, added up.
        slots: u32,
    },
    /// No runner that builds the repository may take it now: some are
    /// quarantined after infrastructure failures (`--quarantine-after`),
    /// the others (if any) have all their slots taken.
    Quarantined {
        /// How many runners build it.
        matching: u32,
        /// The quarantined ones among them, by name.
        quarantined: Vec<String>,
    },
    /// No runner that builds the repository may take it now: some are
    /// draining (shutting down; they sent `Drain`), the others (if any)
    /// have all their slots taken.
    Draining {
        /// How many runners build it.
        matching: u32,
        /// The draining ones among them, by name.
        draining: Vec<String>,
    },
    /// A runner has a free slot: the next assignment pass takes the job
    /// (older jobs for the same runners go first).
    Assigning,
}

impl WaitReason {
    /// The reason for a person, e.g. `all 2 runners that build it are busy`.
    pub fn describe(&self) -> String {
        match self {
            WaitReason::NoRunner { connected: 0 } => {
                "no runner is connected; start one that lists this repository".to_owned()
            }
            WaitReason::NoRunner { connected } => format!(
                "no connected runner lists this repository ({connected} connected build other repositories)"
            ),
            WaitReason::AllBusy { matching: 1, slots } => {
                format!("the one runner that builds it is busy ({slots} of {slots} slots taken)")
            }
            WaitReason::AllBusy { matching, slots } => format!(
                "all {matching} runners that build it are busy ({slots} of {slots} slots taken)"
            ),
            WaitReason::Quarantined {
                matching,
                quarantined,
            } => {
                let names = quarantined.join(", ");
                let q = quarantined.len();
                let rest = (*matching as usize).saturating_sub(q);
                let (was, plural) = if q == 1 { ("is", "") } else { ("are", "s") };
                if rest == 0 {
                    format!(
                        "the runner{plural} that build{} it ({names}) {was} quarantined after infrastructure failures",
                        if q == 1 { "s" } else { "" }
                    )
                } else {
                    format!(
                        "runner{plural} {names} {was} quarantined after infrastructure failures; the other {rest} that build it {} busy",
                        if rest == 1 { "is" } else { "are" }
                    )
                }
            }
            WaitReason::Draining { matching, draining } => {
                let names = draining.join(", ");
                let d = draining.len();
                let rest = (*matching as usize).saturating_sub(d);
                let (was, plural) = if d == 1 { ("is", "") } else { ("are", "s") };
                if rest == 0 {
                    format!(
                        "the runner{plural} that build{} it ({names}) {was} draining (shutting down)",
                        if d == 1 { "s" } else { "" }
                    )
                } else {
                    format!(
                        "runner{plural} {names} {was} draining (shutting down); the other {rest} that build it {} busy",
                        if rest == 1 { "is" } else { "are" }
                    )
                }
            }
            WaitReason::Assigning => "a runner is free: being assigned".to_owned(),
        }
    }

    /// A stable machine-readable code (`no_runner`, `all_busy`,
    /// `quarantined`, `draining`, `assigning`) for the JSON API.
    pub fn code(&self) -> &'static str {
        match self {
            WaitReason::NoRunner { .. } => "no_runner",
            WaitReason::AllBusy { .. } => "all_busy",
            WaitReason::Quarantined { .. } => "quarantined",
            WaitReason::Draining { .. } => "draining",
            WaitReason::Assigning => "assigning",
        }
    }
}

/// A queued job's place in the queue and why it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Why it waits.
    pub reason: WaitReason,
    /// Queued jobs of the same repository ahead of it.
    pub ahead: u32,
    /// Attempts already lost (its runner died or was cut off); the job
    /// ends `error` after `max_attempts`.
    pub lost_attempts: u32,
    /// The dispatcher's `--max-attempts`.
    pub max_attempts: u32,
}

/// The latest job of one branch of one repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchHead {
    /// The repository, as submitted.
    pub repo: String,
    /// The branch.
    pub branch: String,
    /// Its newest job.
    pub latest: Job,
}

/// What a runner's handshake tells the dispatcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerHello {
    /// Its unique name (not blank).
    pub name: String,
    /// Its peer address.
    pub addr: String,
    /// Jobs it runs at once (at least 1).
    pub slots: u32,
    /// Repositories it may build.
    pub repos: Vec<String>,
    /// Free-form labels.
    pub labels: Vec<String>,
    /// Leases it still holds from an earlier session.
    pub leases: Vec<(JobId, Attempt)>,
}

/// A report a runner sends about its work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerReport {
    /// Nothing but a sign of life (a `Pong`).
    Alive,
    /// It started the attempt.
    Started {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: Attempt,
    },
    /// Output of the attempt.
    Log {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: Attempt,
        /// The bytes and where they go.
        chunk: LogChunk,
    },
    /// The runner started draining (`Drain`): it takes no new job.
    Draining,
    /// The runner gave the attempt back without a result (`HandBack`).
    HandBack {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: Attempt,
        /// Whether it had started (and was cut off).
        started: bool,
        /// Why, from the runner.
        reason: String,
    },
    /// The attempt ended.
    Finished {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: Attempt,
        /// Its result.
        result: JobResult,
        /// The commit the runner built (`JobFinished.commit`); empty from a
        /// runner that does not say.
        commit: String,
    },
}

/// The dispatcher's answer to a runner's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultAck {
    /// Whether the result is (now or already) the job's recorded result;
    /// `false`: the attempt was revoked, drop the result.
    pub accepted: bool,
    /// Why, when there is something to say.
    pub message: String,
}

/// A job a runner is told to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// Its new attempt.
    pub attempt: Attempt,
    /// Its repository.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// Its ref (empty when unknown): the runner fetches it when the commit
    /// is on no branch (a pull request's head).
    pub ref_name: String,
    /// Its commit.
    pub commit: CommitId,
}

/// What the dispatcher tells a runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToRunner {
    /// Run this attempt (already recorded).
    Assign(Assignment),
    /// Stop this attempt.
    Cancel {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: Attempt,
    },
    /// Are you there?
    Ping {
        /// Echoed in the `Pong`.
        seq: u64,
    },
    /// Send this again: the store could not record it.
    Resend(ResendRequest),
}

/// What a runner must send again, on the same connection, because the store
/// failed to record it; nothing of it was acknowledged and the lease stays
/// live meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendRequest {
    /// The job.
    pub job: JobId,
    /// The attempt.
    pub attempt: Attempt,
    /// Resend the attempt's log chunks from this offset (the store holds
    /// the log only up to it); `None` when the log needs nothing.
    pub log_offset: Option<u64>,
    /// Resend the `JobFinished`.
    pub result: bool,
    /// Resend the `Started`.
    pub started: bool,
    /// How long the runner waits before resending.
    pub retry_after: Duration,
    /// What failed.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_only_ended_jobs_are_final() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::from_label(status.label()), Some(status));
            assert_eq!(
                status.is_final(),
                !matches!(status, JobStatus::Queued | JobStatus::Running)
            );
        }
        for status in TaskStatus::ALL {
            assert_eq!(TaskStatus::from_label(status.label()), Some(status));
        }
        assert_eq!(JobStatus::from_label("unspecified"), None);
        assert_eq!(TaskStatus::from_label("PASSED"), None);
    }

    #[test]
    fn commit_ids_are_40_hex_digits_kept_lower_case() {
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF01";
        assert_eq!(
            CommitId::parse(upper).unwrap().as_str(),
            upper.to_ascii_lowercase()
        );
        for bad in ["", "abc", &"g".repeat(40), &"a".repeat(41)] {
            let err = CommitId::parse(bad).unwrap_err();
            assert!(err.0.contains("not a full 40-hex commit id"), "{err}");
        }
    }
}
