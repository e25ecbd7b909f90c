//! The dispatcher's operations, one per thing a peer or a user can ask:
//! submit, a runner's arrival, reports and departure, cancel, reading and
//! following a log, listing jobs and runners, status.
//!
//! Each operation *decides* (the scheduler, under its lock, for one
//! synchronous call), *persists* (the store, awaited without the lock),
//! then *notifies* (the job's followers, the event stream, the runner, the
//! assignment pass), in that order and through this one path: a protocol
//! session and an HTTP handler call the same functions with domain types,
//! and neither touches the scheduler or the store.
//!
//! Layout: [`decide`] holds the synchronous halves (shared with the fuzz
//! target), `runner` the runner-facing operations, `effects` the ordered
//! applier of the scheduler's effects and the runner links, [`notify`] the
//! per-job watches and the event broadcast, [`follow`] log reading.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast};

use crate::domain::{
    AttemptRecord, BranchHead, Job, JobFilter, JobId, JobStatus, LogRetention, PruneRule, Pruned,
    RunnerView, SessionId, StatusView, Submission, Submitted, Waiting,
};
use crate::scheduler::{CancelOutcome, Scheduler, SchedulerConfig};
use crate::store::{JobStore, StoreError};

pub mod decide;
mod effects;
pub mod follow;
pub mod notify;
mod runner;
#[cfg(test)]
mod tests;

pub use effects::RunnerLink;
pub use follow::{LogEvent, LogFollow};
pub use notify::{Event, JobChange, RunnerChange};
pub use runner::ReportReply;

/// The supervised tasks, by the names used in logs, failpoints and
/// `status`'s `supervisor_restarts`.
pub const TASK_NAMES: [&str; 4] = ["monitor", "redistributor", "spawner", "pruner"];

/// `--max-log-size`'s default: 64 MiB of log per attempt.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 64 * 1024 * 1024;

/// The first pause before a runner resends a report the store failed to
/// record; it doubles with each failure in a row, up to 16 times this.
const RESEND_FIRST: std::time::Duration = std::time::Duration::from_millis(500);

/// How many attempts one store call of a prune handles: a short
/// transaction, so runners' writes wait little behind it.
const PRUNE_BATCH: u32 = 200;

/// Why an operation failed. Nothing was acknowledged: a peer may retry.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong (a bad argument): retrying it as it is
    /// fails again.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; nothing of the operation is durable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a cancel did, with the job as recorded afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelReply {
    /// Whether the job is (or will end) cancelled.
    pub ok: bool,
    /// What happened, for a person.
    pub message: String,
    /// The job after the request; `None` when there is no such job.
    pub job: Option<Job>,
}

/// What a rerun did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RerunOutcome {
    /// A new attempt is queued.
    Queued,
    /// The job is queued or running: only a finished job can be rerun.
    Active,
    /// There is no such job.
    Unknown,
}

/// What a rerun did, with the job as recorded afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RerunReply {
    /// What happened.
    pub outcome: RerunOutcome,
    /// What happened, for a person.
    pub message: String,
    /// The job after the request; `None` when there is no such job.
    pub job: Option<Job>,
}

/// The dispatcher's service layer. See the module documentation.
pub struct Service {
    store: Arc<dyn JobStore>,
    sched: Mutex<Scheduler>,
    /// Serialises effect application so effects are persisted in the order
    /// the scheduler decided them.
    applier: tokio::sync::Mutex<()>,
    links: Mutex<HashMap<SessionId, effects::Registered>>,
    next_session: AtomicU64,
    /// Wakes the assignment pass: a job was queued, a runner came or went,
    /// a slot was freed.
    wake: Notify,
    /// Rung when an orphaned lease with an earlier deadline may exist, so
    /// the monitor expires it on time rather than at its next beat.
    expiry_changed: Notify,
    /// Set when an assignment could not be recorded: the pass waits before
    /// trying again instead of spinning against a failing store.
    assign_failed: AtomicBool,
    notifier: Arc<notify::Notifier>,
    refused_results: AtomicU64,
    /// `--max-log-size`: the most bytes of one attempt's log stored.
    max_log_size: AtomicU64,
    /// `--retain-logs`: what a prune without bounds deletes.
    retention: Mutex<LogRetention>,
    restarts: Mutex<BTreeMap<&'static str, u64>>,
    started: tokio::time::Instant,
    /// The leader term this dispatcher serves under (PostgreSQL store).
    leader: Mutex<Option<crate::domain::LeaderView>>,
    /// The store's epoch, read once at start-up: it changes only by the
    /// restore step, which runs while no dispatcher serves the store.
    epoch: String,
    /// The store's health (set by the daemon): `status` shows it, report
    /// failures pace their resends by it, and a decision the store cannot
    /// follow trips its fail-stop.
    health: std::sync::OnceLock<Arc<crate::health::StoreHealth>>,
}

/// Unix time in milliseconds, for the store's timestamps.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The scheduler's clock: tokio's, so paused-time tests move it.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock (a bug) must not wedge the daemon: the
    // state is still consistent between calls, so keep using it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Service {
    /// Start-up is recovery: rebuilds the scheduler from the store's
    /// unfinished jobs (queued jobs queue again; running jobs become
    /// orphaned leases their runner may reclaim within one runner timeout).
    pub async fn open(
        store: Arc<dyn JobStore>,
        config: SchedulerConfig,
    ) -> Result<Service, StoreError> {
        let unfinished = store.unfinished().await?;
        let epoch = store.epoch().await?;
        tracing::info!(epoch = %epoch, "store epoch");
        let mut sched = Scheduler::new(config);
        let (queued, running) = decide::recover(&mut sched, unfinished, now());
        tracing::info!(queued, running, "recovered unfinished jobs");
        Ok(Service {
            store,
            sched: Mutex::new(sched),
            applier: tokio::sync::Mutex::new(()),
            links: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            wake: Notify::new(),
            expiry_changed: Notify::new(),
            assign_failed: AtomicBool::new(false),
            notifier: notify::Notifier::new(),
            refused_results: AtomicU64::new(0),
            max_log_size: AtomicU64::new(DEFAULT_MAX_LOG_SIZE),
            retention: Mutex::new(LogRetention::Off),
            restarts: Mutex::new(TASK_NAMES.iter().map(|n| (*n, 0)).collect()),
            started: tokio::time::Instant::now(),
            leader: Mutex::new(None),
            epoch,
            health: std::sync::OnceLock::new(),
        })
    }

    /// The store's epoch, sent in every `Welcome` and shown by `status`.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Runs one synchronous scheduler call under the lock.
    fn with_sched<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        f(&mut lock(&self.sched))
    }

    fn wake_assigner(&self) {
        self.wake.notify_one();
    }

    /// Records submitted commits as queued jobs (or finds the known ones)
    /// and returns their jobs in order, saying which this call created;
    /// new jobs wait for a runner. One store write whatever the number of
    /// commits.
    pub async fn submit(&self, submission: &Submission) -> Result<Vec<Submitted>, ServiceError> {
        let Submission {
            repo,
            origin,
            commits,
        } = submission;
        if repo.trim().is_empty() {
            return Err(ServiceError::Invalid(
                "a submit needs a repository, named as runners list it".to_owned(),
            ));
        }
        let rows = self.store.submit(repo, origin, commits, unix_ms()).await?;
        let queued = self.with_sched(|s| decide::submitted(s, repo, commits, &rows, now()));
        for row in rows.iter().filter(|r| r.created) {
            self.notifier.event(|| Event::Job {
                id: row.id,
                change: JobChange::Queued,
            });
        }
        let ids: Vec<JobId> = rows.iter().map(|r| r.id).collect();
        tracing::info!(
            repo = %repo,
            branch = %origin.branch,
            git_ref = %origin.ref_name,
            pull_request = ?origin.pull_request,
            jobs = ?ids,
            "submitted"
        );
        if queued {
            self.wake_assigner();
        }
        Ok(rows)
    }

    /// Cancels a job: a queued one ends at once, a running one's runner is
    /// told to stop and the job ends `cancelled` when it reports or is
    /// lost. The reply shows the job as recorded after the decision.
    pub async fn cancel(&self, job: JobId) -> Result<CancelReply, ServiceError> {
        let outcome = self.with_sched(|s| s.handle_cancel(job, now()));
        if outcome == CancelOutcome::Cancelling {
            // Durable before acknowledged: a restart must still cancel it.
            // On failure the runner may already stop the job (the
            // scheduler keeps the request), but the user is told it failed.
            if let Err(err) = self.store.request_cancel(job).await {
                self.apply_effects().await;
                return Err(err.into());
            }
        }
        // The reply reflects the durable state: apply the decision first.
        self.apply_effects().await;
        if outcome == CancelOutcome::Cancelling {
            self.notifier.event(|| Event::Job {
                id: job,
                change: JobChange::CancelRequested,
            });
        }
        let record = self.store.get_job(job).await?;
        let (ok, message) = match (outcome, &record) {
            (CancelOutcome::Cancelled, _) => (true, "cancelled".to_owned()),
            (CancelOutcome::Cancelling, _) => (
                true,
                "the runner was told to stop; the job ends cancelled when it reports".to_owned(),
            ),
            (CancelOutcome::Finishing, _) => (
                false,
                format!("job {job} is finishing: its result is being recorded"),
            ),
            (CancelOutcome::NotActive, None) => (false, format!("no job {job}")),
            (CancelOutcome::NotActive, Some(j)) => {
                (false, format!("job {job} already ended {}", j.status))
            }
        };
        Ok(CancelReply {
            ok,
            message,
            job: record,
        })
    }

    /// Queues a new attempt of a finished job; its earlier attempts'
    /// results and logs stay readable (see [`Service::attempts`]). A
    /// queued or running job is refused, as is an unknown one.
    pub async fn rerun(&self, job: JobId) -> Result<RerunReply, ServiceError> {
        let outcome = match self.store.rerun(job).await {
            Ok(()) => RerunOutcome::Queued,
            Err(StoreError::Conflict { .. }) => RerunOutcome::Active,
            Err(StoreError::NoSuchJob(_)) => RerunOutcome::Unknown,
            Err(err) => return Err(err.into()),
        };
        let record = self.store.get_job(job).await?;
        let message = match (outcome, &record) {
            (RerunOutcome::Queued, Some(j)) => {
                let spec = crate::scheduler::JobSpec {
                    id: j.id,
                    repo: j.repo.clone(),
                    branch: j.branch.clone(),
                    ref_name: j.ref_name.clone(),
                    commit: j.commit.clone(),
                    attempt: j.attempt,
                    rerun_base: j.rerun_base,
                    handed_back: 0,
                };
                self.with_sched(|s| s.handle_rerun(spec, now()));
                self.notifier.event(|| Event::Job {
                    id: job,
                    change: JobChange::Queued,
                });
                self.wake_assigner();
                tracing::info!(job = %job, after = %j.rerun_base, "rerun queued");
                format!("job {job} queued again (attempt {} next)", j.attempt.0 + 1)
            }
            (RerunOutcome::Active, Some(j)) => {
                format!(
                    "job {job} is {}: only a finished job can be rerun",
                    j.status
                )
            }
            _ => format!("no job {job}"),
        };
        Ok(RerunReply {
            outcome: if record.is_none() {
                RerunOutcome::Unknown
            } else {
                outcome
            },
            message,
            job: record,
        })
    }

    /// Every attempt of a job, oldest first, with its tasks.
    pub async fn attempts(&self, job: JobId) -> Result<Vec<AttemptRecord>, ServiceError> {
        Ok(self.store.attempts(job).await?)
    }

    /// One job, as recorded.
    pub async fn get_job(&self, job: JobId) -> Result<Option<Job>, ServiceError> {
        Ok(self.store.get_job(job).await?)
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, ServiceError> {
        Ok(self.store.list_jobs(filter).await?)
    }

    /// Why each queued job still waits, oldest first, from the scheduler's
    /// state now (see [`Waiting`]).
    pub fn waiting(&self) -> Vec<(JobId, Waiting)> {
        self.with_sched(|s| s.waiting())
    }

    /// [`Service::waiting`] by job id, for looking up those of `jobs` that
    /// are queued; empty (without asking the scheduler) when none is.
    pub fn waiting_of(&self, jobs: &[Job]) -> HashMap<JobId, Waiting> {
        if !jobs.iter().any(|j| j.status == JobStatus::Queued) {
            return HashMap::new();
        }
        self.waiting().into_iter().collect()
    }

    /// The newest job of every (repository, branch) pair.
    pub async fn branches(&self) -> Result<Vec<BranchHead>, ServiceError> {
        Ok(self.store.branches().await?)
    }

    /// Reads `job`'s log (its latest attempt) from `offset`; with
    /// `follow`, waits for more until the job is final. See [`LogFollow`].
    pub fn follow_log(&self, job: JobId, offset: u64, follow: bool) -> LogFollow {
        let watch = follow.then(|| self.notifier.watch(job));
        LogFollow::new(Arc::clone(&self.store), job, offset, watch)
    }

    /// [`Service::follow_log`] of one attempt (`None`: the latest); an
    /// earlier attempt's log is read to its end and not followed.
    pub fn follow_attempt_log(
        &self,
        job: JobId,
        attempt: Option<crate::domain::Attempt>,
        offset: u64,
        follow: bool,
    ) -> LogFollow {
        let reader = self.follow_log(job, offset, follow);
        match attempt {
            Some(attempt) => reader.of_attempt(attempt),
            None => reader,
        }
    }

    /// Job and runner changes as they happen, for pages and streams. A
    /// receiver that falls more than the channel's capacity behind gets
    /// `Lagged` and should read the state again.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.notifier.subscribe_events()
    }

    /// The connected runners, ordered by name.
    pub fn runners(&self) -> Vec<RunnerView> {
        let (views, at) = self.with_sched(|s| (s.runners(), now()));
        let wall = unix_ms();
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        views
            .into_iter()
            .map(|r| RunnerView {
                identity: self.identity_of(r.session),
                last_seen_ms: wall.saturating_sub(ms(at.saturating_duration_since(r.last_seen))),
                // At least one millisecond ahead: a quarantine due but not
                // yet lifted by the next tick still shows.
                quarantined_until_ms: r.quarantined_until.map(|until| {
                    wall.saturating_add(ms(until.saturating_duration_since(at)).max(1))
                }),
                infra_failures: r.infra_failures,
                draining: r.draining,
                name: r.name,
                addr: r.addr,
                slots: r.slots,
                running: r.running,
                labels: r.labels,
                repos: r.repos,
            })
            .collect()
    }

    /// The dispatcher's counters.
    pub fn status(&self) -> StatusView {
        let (runners, (queued, running), reassignments, (quarantined, draining)) =
            self.with_sched(|s| {
                (
                    s.runner_count(),
                    s.counts(),
                    s.reassignments(),
                    (s.quarantined_count(), s.draining_count()),
                )
            });
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            runners: u32::try_from(runners).unwrap_or(u32::MAX),
            queued: queued as u64,
            running: running as u64,
            supervisor_restarts: lock(&self.restarts)
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            reassignments,
            refused_results: self.refused_results.load(Ordering::Relaxed),
            quarantined: u32::try_from(quarantined).unwrap_or(u32::MAX),
            draining: u32::try_from(draining).unwrap_or(u32::MAX),
            leader: lock(&self.leader).clone(),
            epoch: self.epoch.clone(),
            store_healthy: self.health.get().is_none_or(|h| h.healthy()),
            store_failures: self.health.get().map_or(0, |h| h.failures()),
        }
    }

    /// Attaches the store's health (see the field).
    pub(crate) fn set_health(&self, health: Arc<crate::health::StoreHealth>) {
        let _ = self.health.set(health);
    }

    /// Stops the dispatcher because the store cannot follow what was
    /// decided (see [`crate::health`]); without a health attached (a bare
    /// service in tests), only logs.
    pub(crate) fn fail_stop(&self, reason: String) {
        match self.health.get() {
            Some(health) => health.trip(reason),
            None => tracing::error!(%reason, "store unhealthy"),
        }
    }

    /// Whether the dispatcher is stopping for its store.
    pub(crate) fn failing_stop(&self) -> bool {
        self.health
            .get()
            .is_some_and(|h| h.tripped().is_cancelled())
    }

    /// How long a runner waits before resending a report the store failed
    /// to record: longer the more writes failed in a row, so a failing
    /// disk is not hammered, and never long enough to matter to a job.
    pub(crate) fn resend_delay(&self) -> std::time::Duration {
        let failures = self.health.get().map_or(1, |h| h.failures()).clamp(1, 5);
        RESEND_FIRST * (1 << (failures - 1))
    }

    /// Records the leader term this dispatcher serves under, for `status`.
    pub(crate) fn set_leader(&self, view: crate::domain::LeaderView) {
        *lock(&self.leader) = Some(view);
    }

    /// Sets `--max-log-size` (the most bytes of one attempt's log stored
    /// from now on) and `--retain-logs`.
    pub fn set_log_limits(&self, max_log_size: u64, retention: LogRetention) {
        self.max_log_size.store(max_log_size, Ordering::Relaxed);
        *lock(&self.retention) = retention;
    }

    /// `--retain-logs`, as [`Service::set_log_limits`] set it.
    pub fn retention(&self) -> LogRetention {
        *lock(&self.retention)
    }

    /// [`Service::prune_logs`] with the bounds `--retain-logs` gives; a
    /// prune that names none. Refused when retention is off.
    pub async fn prune_by_retention(&self) -> Result<Pruned, ServiceError> {
        match self.retention() {
            LogRetention::Off => Err(ServiceError::Invalid(
                "the dispatcher keeps every log (--retain-logs off): give a bound, \
                 --older-than AGE or --keep-jobs N"
                    .to_owned(),
            )),
            retention => self.prune_logs(retention.rule(unix_ms())).await,
        }
    }

    /// Deletes the logs of the finished jobs `rule` selects (the jobs,
    /// attempts and results stay), in short transactions until none is
    /// left, and says how much went. An empty rule is refused.
    pub async fn prune_logs(&self, rule: PruneRule) -> Result<Pruned, ServiceError> {
        if rule.is_empty() {
            return Err(ServiceError::Invalid(
                "a prune needs a bound: an age (--older-than) or a number of jobs to keep (--keep-jobs)"
                    .to_owned(),
            ));
        }
        let mut total = Pruned::default();
        loop {
            let batch = self.store.prune_logs(rule, PRUNE_BATCH).await?;
            total.attempts += batch.attempts;
            total.bytes += batch.bytes;
            // Each full batch marks its attempts pruned, so the next call
            // finds fewer: the loop ends.
            if !batch.more || batch.attempts == 0 {
                break;
            }
        }
        if total.attempts > 0 {
            tracing::info!(
                attempts = total.attempts,
                bytes = total.bytes,
                "pruned old logs"
            );
        }
        Ok(total)
    }

    /// Counts a restart of a supervised task, for `status`.
    pub(crate) fn count_restart(&self, task: &'static str) {
        *lock(&self.restarts).entry(task).or_default() += 1;
    }

    /// (connected runners, whether jobs wait): what the spawner needs.
    pub(crate) fn fleet(&self) -> (usize, bool) {
        self.with_sched(|s| (s.runner_count(), s.has_queued()))
    }

    /// The monitor's beat: pings every runner and expires silent runners
    /// and orphaned leases past their grace.
    ///
    /// It never waits on the store (see [`Service::expire`]).
    pub(crate) fn heartbeat(&self, seq: u64) {
        self.ping_all(seq);
        self.expire();
    }

    /// Expires orphaned leases whose grace is over (and silent runners),
    /// between beats; ends quarantines that are over.
    ///
    /// It only decides: what it decides (requeues, finishes, disconnects)
    /// is applied by the assignment pass it wakes, so that a stalled write
    /// holding the applier cannot delay the monitor's next ping or expiry.
    pub(crate) fn expire(&self) {
        let (decided, lifted) = self.with_sched(|s| {
            let before = s.effects_emitted();
            let lifted = s.handle_tick(now());
            (s.effects_emitted() != before, lifted)
        });
        // A lifted quarantine frees a runner for the queue.
        if decided || lifted {
            self.wake_assigner();
        }
    }

    /// When the next orphaned lease expires, if any.
    pub(crate) fn next_expiry(&self) -> Option<std::time::Instant> {
        self.with_sched(|s| s.next_orphan_deadline())
    }

    /// Resolves when [`Service::next_expiry`] may have moved earlier.
    pub(crate) async fn expiry_may_change(&self) {
        self.expiry_changed.notified().await;
    }

    /// The assignment pass: assigns what can be assigned, records each
    /// assignment and tells its runner. Returns whether an assignment could
    /// not be recorded (then the caller waits before the next pass).
    pub(crate) async fn assign_pass(&self) -> bool {
        self.with_sched(|s| s.schedule(now()));
        self.apply_effects().await;
        self.assign_failed.swap(false, Ordering::Relaxed)
    }

    /// Resolves once a pass may find something to do.
    pub(crate) async fn work_may_wait(&self) {
        self.wake.notified().await;
    }

    /// Applies what is still decided but not yet done, then closes the
    /// store: every acknowledged write is durable when it returns.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.apply_effects().await;
        self.store.close().await
    }
}
