//! The JSON shapes of the HTTP API, built from the service's domain views:
//! the CLI's `--json` Job, runner and status shapes (the contract's field
//! names and order), extended compatibly with fields the pages need too,
//! so a page and the API never disagree. Also the repository key badges
//! and repository pages are addressed by. Pure functions; no IO.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::domain::{
    AttemptRecord, BranchHead, Job, LeaderView, RunnerView, StatusView, TaskResult, Waiting,
};

/// Unix milliseconds as RFC 3339 UTC with milliseconds and `Z` (contract).
pub fn timestamp(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// A job: the contract's Job, then the extensions (`repo_key`, and for a
/// queued job `waiting`).
#[derive(Debug, Serialize)]
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
    /// The full ref it was built for, as in the CLI's Job JSON.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    /// The pull (merge) request it was built for.
    pub pull_request: Option<u64>,
    /// The repository's key (badges, `/repos/{key}`).
    pub repo_key: String,
    /// Why a queued job waits; absent for other jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingJson>,
    /// Every attempt, oldest first: in one job's answers, absent in lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptJson>>,
}

/// One attempt of a job (as `surveil job ID --json` lists them).
#[derive(Debug, Serialize)]
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
}

impl From<&AttemptRecord> for AttemptJson {
    fn from(a: &AttemptRecord) -> Self {
        AttemptJson {
            attempt: a.attempt.0,
            runner: a.runner.clone(),
            status: a.status.label(),
            message: non_empty(a.message.as_deref()),
            assigned_at: timestamp(a.assigned_at_ms),
            started_at: a.started_at_ms.map(timestamp),
            finished_at: a.finished_at_ms.map(timestamp),
            tasks: a.tasks.iter().map(TaskJson::from).collect(),
        }
    }
}

/// One task result.
#[derive(Debug, Serialize)]
pub struct TaskJson {
    pub name: String,
    pub status: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub message: Option<String>,
}

/// Why a queued job waits.
#[derive(Debug, Serialize)]
pub struct WaitingJson {
    /// `no_runner`, `all_busy` or `assigning`.
    pub code: &'static str,
    /// The reason for a person.
    pub reason: String,
    /// Queued jobs of the same repository ahead of it.
    pub ahead: u32,
    /// Attempts lost so far, and the limit.
    pub lost_attempts: u32,
    pub max_attempts: u32,
}

impl From<&Waiting> for WaitingJson {
    fn from(w: &Waiting) -> Self {
        WaitingJson {
            code: w.reason.code(),
            reason: w.reason.describe(),
            ahead: w.ahead,
            lost_attempts: w.lost_attempts,
            max_attempts: w.max_attempts,
        }
    }
}

fn non_empty(text: Option<&str>) -> Option<String> {
    text.filter(|t| !t.is_empty()).map(str::to_owned)
}

impl JobJson {
    /// `job` as JSON, with why it waits when it is queued.
    pub fn new(job: &Job, waiting: Option<&Waiting>) -> JobJson {
        JobJson {
            id: job.id.0,
            repo: job.repo.clone(),
            branch: job.branch.clone(),
            commit: job.commit.to_string(),
            status: job.status.label(),
            attempt: job.attempt.0,
            runner: non_empty(job.runner.as_deref()),
            message: non_empty(job.message.as_deref()),
            queued_at: timestamp(job.queued_at_ms),
            started_at: job.started_at_ms.map(timestamp),
            finished_at: job.finished_at_ms.map(timestamp),
            tasks: job.tasks.iter().map(TaskJson::from).collect(),
            ref_name: non_empty(Some(job.ref_name.as_str())),
            pull_request: job.pull_request,
            repo_key: repo_key(&job.repo),
            waiting: waiting.map(WaitingJson::from),
            attempts: None,
        }
    }

    /// With its attempts listed.
    pub fn with_attempts(mut self, attempts: &[AttemptRecord]) -> JobJson {
        self.attempts = Some(attempts.iter().map(AttemptJson::from).collect());
        self
    }
}

impl From<&TaskResult> for TaskJson {
    fn from(task: &TaskResult) -> Self {
        TaskJson {
            name: task.name.clone(),
            status: task.status.label(),
            exit_code: task.exit_code,
            signal: task.signal,
            duration_ms: task.duration_ms,
            message: non_empty(Some(&task.message)),
        }
    }
}

/// A connected runner: the contract's shape, then labels and repositories.
#[derive(Debug, Serialize)]
pub struct RunnerJson {
    pub name: String,
    pub addr: String,
    pub slots: u32,
    pub running: Vec<u64>,
    pub last_seen: String,
    pub labels: Vec<String>,
    pub repos: Vec<String>,
    /// Until when it gets no new job after infrastructure failures; absent
    /// when it is not quarantined (as `surveil runners --json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined_until: Option<String>,
    /// Its infrastructure failures in a row; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infra_failures: Option<u32>,
    /// `true` while it drains (it gets no new job); absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl From<&RunnerView> for RunnerJson {
    fn from(r: &RunnerView) -> Self {
        RunnerJson {
            name: r.name.clone(),
            addr: r.addr.clone(),
            slots: r.slots,
            running: r.running.iter().map(|j| j.0).collect(),
            last_seen: timestamp(r.last_seen_ms),
            labels: r.labels.clone(),
            repos: r.repos.clone(),
            quarantined_until: r.quarantined_until_ms.map(timestamp),
            infra_failures: (r.infra_failures > 0).then_some(r.infra_failures),
            draining: r.draining,
        }
    }
}

/// The dispatcher's status: the contract's shape.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub version: String,
    pub uptime_s: u64,
    pub runners: u32,
    pub queued: u64,
    pub running: u64,
    pub supervisor_restarts: BTreeMap<String, u64>,
    pub reassignments: u64,
    pub refused_results: u64,
    /// Connected runners quarantined after infrastructure failures.
    pub quarantined: u32,
    /// Connected runners draining (as `surveil status --json`: absent when
    /// none).
    #[serde(skip_serializing_if = "is_zero")]
    pub draining: u32,
    /// With a PostgreSQL store: who leads (as `surveil status --json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderJson>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The leader term as the answering dispatcher sees it.
#[derive(Debug, Serialize)]
pub struct LeaderJson {
    /// The leader's advertised protocol address; `null` while none is known.
    pub addr: Option<String>,
    pub term: u64,
    /// Whether the dispatcher that answered is a standby.
    pub standby: bool,
}

impl From<&LeaderView> for LeaderJson {
    fn from(l: &LeaderView) -> Self {
        LeaderJson {
            addr: (!l.addr.is_empty()).then(|| l.addr.clone()),
            term: l.term,
            standby: l.standby,
        }
    }
}

impl From<&StatusView> for StatusJson {
    fn from(s: &StatusView) -> Self {
        StatusJson {
            version: s.version.clone(),
            uptime_s: s.uptime_s,
            runners: s.runners,
            queued: s.queued,
            running: s.running,
            supervisor_restarts: s.supervisor_restarts.clone(),
            reassignments: s.reassignments,
            refused_results: s.refused_results,
            quarantined: s.quarantined,
            draining: s.draining,
            leader: s.leader.as_ref().map(LeaderJson::from),
        }
    }
}

/// A repository with its branches' latest jobs.
#[derive(Debug, Serialize)]
pub struct RepoJson {
    pub key: String,
    pub repo: String,
    pub branches: Vec<BranchJson>,
}

/// One branch and its newest job.
#[derive(Debug, Serialize)]
pub struct BranchJson {
    pub branch: String,
    pub latest: JobJson,
}

/// Groups branch heads (ordered by repository) into repositories.
pub fn repos(heads: &[BranchHead]) -> Vec<RepoJson> {
    let mut out: Vec<RepoJson> = Vec::new();
    for head in heads {
        if out.last().is_none_or(|r| r.repo != head.repo) {
            out.push(RepoJson {
                key: repo_key(&head.repo),
                repo: head.repo.clone(),
                branches: Vec::new(),
            });
        }
        if let Some(repo) = out.last_mut() {
            repo.branches.push(BranchJson {
                branch: head.branch.clone(),
                latest: JobJson::new(&head.latest, None),
            });
        }
    }
    out
}

/// A repository's key in URLs: its path or URL without the scheme and
/// leading slashes, `/` written `-`, a `-` doubled, and any other byte
/// outside `[A-Za-z0-9._]` as `~XX`. Readable (`/srv/git/app` is
/// `srv-git-app`) and one-to-one for repositories named the same way.
pub fn repo_key(repo: &str) -> String {
    let rest = repo.split_once("://").map_or(repo, |(_, rest)| rest);
    let rest = rest.trim_start_matches('/').trim_end_matches('/');
    let rest = rest.strip_suffix(".git").unwrap_or(rest);
    let mut key = String::with_capacity(rest.len());
    for b in rest.bytes() {
        match b {
            b'/' => key.push('-'),
            b'-' => key.push_str("--"),
            b if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' => key.push(char::from(b)),
            b => key.push_str(&format!("~{b:02X}")),
        }
    }
    if key.is_empty() {
        key.push('~');
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_keys_are_readable_and_tell_repositories_apart() {
        assert_eq!(repo_key("/srv/git/app"), "srv-git-app");
        assert_eq!(
            repo_key("https://example.com/team/app.git"),
            "example.com-team-app"
        );
        assert_eq!(repo_key("/srv/my-app"), "srv-my--app");
        assert_ne!(repo_key("/a-b/c"), repo_key("/a/b-c"));
        assert_eq!(repo_key("/srv/a b"), "srv-a~20b");
    }
}
