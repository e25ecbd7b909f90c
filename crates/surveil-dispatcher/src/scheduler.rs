//! The dispatcher's brain: runners, queued jobs, leases, attempts and the
//! decisions made on them (assign, expire, requeue, accept or fence a
//! result, cancel).
//!
//! Pure state only: no IO, no clock, no tokio, no store handle. Every input
//! is a `handle_*(…, now)` call; every decision the outside world must act
//! on is queued as an [`Effect`] and collected with
//! [`Scheduler::drain_effects`], in the order the decisions were made. The
//! shell persists each effect before it tells a peer about it.
//!
//! A runner's result is decided in two steps, because the decision must not
//! outrun the store: [`Scheduler::handle_result`] accepts it and leaves the
//! job *finishing* (lease and slot held), and the shell reports the store's
//! answer with [`Scheduler::handle_result_stored`] or
//! [`Scheduler::handle_result_failed`] (back to running, so a resend is
//! accepted). An assignment the store refused is undone by
//! [`Scheduler::handle_assign_failed`]. So memory never runs ahead of disk.
//!
//! Architecture invariants (checked by [`Scheduler::check_invariants`] and
//! the property tests below):
//! - a job has at most one live lease, and a lease belongs to a connected
//!   runner (or, for one runner timeout, to an orphan slot waiting for its
//!   runner to come back);
//! - after [`Scheduler::schedule`], no queued job has a connected runner
//!   for its repository with a free slot that is not quarantined;
//! - a job leaves the scheduler with exactly one final status;
//! - a result, `Started` or log chunk for an attempt that is not the job's
//!   live lease is refused: the attempt number is the fencing token.
//!
//! Infrastructure failures (a runner's fetch or checkout failed because of
//! the runner or the network: [`Scheduler::handle_infra_failure`]) are not
//! results: the attempt is lost as if its runner had been, the job is
//! queued again (counting towards `max_attempts`, preferring another
//! runner), and the runner's name collects a count. After
//! `quarantine_after` of them in a row the runner is *quarantined*: it
//! stays connected but gets no assignment until [`Scheduler::handle_tick`]
//! lifts the quarantine (`quarantine_for`, doubling for each further
//! quarantine up to [`MAX_QUARANTINE`]). The count lives by name, so a
//! reconnect does not clear it; a result that is not an infrastructure
//! failure does (a dispatcher restart forgets it too). "After a scheduling
//! pass no queued job has an idle matching runner" counts only runners not
//! quarantined.
//!
//! Drains: a runner that sends `Drain` ([`Scheduler::handle_runner_draining`])
//! gets no new job for the rest of its session, and is not counted as idle
//! either. Leases it gives back without a result
//! ([`Scheduler::handle_hand_back`]: never started, or cut off by its drain
//! deadline) queue their job again at once, and those attempts do not count
//! against `max_attempts` (`JobSpec::handed_back`): a rolling restart of
//! the fleet burns no job's attempts and ends none `cancelled`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::domain::{
    Assignment, Attempt, CommitId, FinalStatus, JobId, RunnerHello, SessionId, WaitReason, Waiting,
};

/// The longest a quarantine doubles to (unless `--quarantine-for` itself is
/// longer): a runner whose disk was freed gets work again within the hour.
pub const MAX_QUARANTINE: Duration = Duration::from_secs(3600);

/// How long a disconnected runner's infrastructure count is kept after its
/// last failure and any quarantine ended: long enough to survive a
/// reconnect, short enough that names never seen again do not pile up.
const HEALTH_FORGET_AFTER: Duration = MAX_QUARANTINE;

/// The scheduler's tunables, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How long a runner may stay silent before its leases are revoked; also
    /// how long an orphaned lease waits for its runner to come back.
    pub runner_timeout: Duration,
    /// How long the leases of a runner whose connection closed or broke
    /// wait for it to reconnect (`--disconnect-grace`); zero revokes them
    /// at once.
    pub disconnect_grace: Duration,
    /// How many attempts of a job may be lost before it ends `error`.
    pub max_attempts: u32,
    /// How long one attempt may run (`--job-timeout`): then its runner is
    /// told to cancel it, and a runner timeout later it ends `error` even
    /// if the runner never answers (a fetch hung past every timeout).
    pub job_timeout: Duration,
    /// Infrastructure failures in a row after which a runner is
    /// quarantined (`--quarantine-after`); 0 never quarantines.
    pub quarantine_after: u32,
    /// A runner's first quarantine (`--quarantine-for`); each further one
    /// (without a good result in between) lasts twice the previous, up to
    /// [`MAX_QUARANTINE`].
    pub quarantine_for: Duration,
}

/// What the scheduler needs to know about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The job.
    pub id: JobId,
    /// Its repository, matched exactly against runners' repositories.
    pub repo: String,
    /// The branch it was submitted on.
    pub branch: String,
    /// The ref it was submitted for (empty when unknown).
    pub ref_name: String,
    /// The commit to build.
    pub commit: CommitId,
    /// Its last attempt (0 when never assigned); the next is one more.
    pub attempt: Attempt,
    /// The last attempt before its latest rerun (0 when never rerun): only
    /// attempts after it count against `max_attempts`.
    pub rerun_base: Attempt,
    /// Attempts of the current run handed back by draining runners: they
    /// do not count against `max_attempts` either.
    pub handed_back: u32,
}

impl JobSpec {
    /// Attempts of the current run so far that count (lost ones, while it
    /// is queued): not those handed back by a draining runner.
    fn run_attempts(&self) -> u32 {
        self.attempt
            .0
            .saturating_sub(self.rerun_base.0)
            .saturating_sub(self.handed_back)
    }
}

/// A decision the shell must persist and carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Record the assignment, then send it to the session. If it cannot be
    /// recorded, tell [`Scheduler::handle_assign_failed`].
    Assign {
        /// The runner's session.
        session: SessionId,
        /// The runner's name, recorded with the job.
        runner: String,
        /// The job and its new attempt.
        assignment: Assignment,
    },
    /// Send `Cancel` to the session (the job was cancelled, or the runner
    /// listed a lease that is no longer its own).
    Cancel {
        /// The runner's session.
        session: SessionId,
        /// The job.
        job: JobId,
        /// The attempt to stop.
        attempt: Attempt,
    },
    /// Record that the job is queued again (its attempt was lost, or
    /// handed back).
    Requeue {
        /// The job.
        job: JobId,
        /// The attempt that was lost.
        attempt: Attempt,
        /// Why, for the job's log and the dispatcher's log.
        reason: String,
        /// Its runner handed it back (a drain): the attempt does not count
        /// against `max_attempts`, and the store keeps that count.
        handed_back: bool,
    },
    /// Record the job's final status (cancelled, or error after too many
    /// lost attempts). Results reported by runners are recorded by the
    /// shell after [`ResultDecision::Accept`] instead.
    Finish {
        /// The job.
        job: JobId,
        /// Its final status.
        status: FinalStatus,
        /// Why.
        message: String,
    },
    /// Close the session's connection.
    Disconnect {
        /// The session.
        session: SessionId,
        /// Why, sent in an `Error` and logged.
        reason: String,
    },
}

/// What to do with a runner's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultDecision {
    /// The live lease's runner could not run the job for infrastructure
    /// reasons: the attempt is over and nothing of it is recorded as a
    /// result; its requeue (or, past `max_attempts`, the job's `error`) is
    /// among the effects. Apply them, then acknowledge the result as
    /// accepted so the runner drops it.
    Retried {
        /// What was decided, for the dispatcher's log.
        message: String,
    },
    /// The attempt holds the job's live lease: record this final status
    /// (the runner's, or `cancelled` when a user cancelled the job), then
    /// tell [`Scheduler::handle_result_stored`] or
    /// [`Scheduler::handle_result_failed`]. Until then the job is
    /// *finishing*: it keeps its lease and its runner's slot.
    Accept {
        /// The status to record.
        status: FinalStatus,
        /// The message to record.
        message: String,
    },
    /// The job is still active but this attempt's lease was revoked:
    /// refuse, and record nothing.
    Revoked {
        /// Why, for the `ResultAck`.
        message: String,
    },
    /// A result of this attempt is being recorded right now (a resend from
    /// a new connection): decide again once that write has answered.
    Pending,
    /// The scheduler does not know the job (finished, or never existed):
    /// only the store can tell a harmless resend from a stale result.
    Unknown,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running: its runner was told to stop, and the job ends
    /// `cancelled` when the runner reports or is lost.
    Cancelling,
    /// The job's result is being recorded: too late to cancel.
    Finishing,
    /// The job is not active (finished or unknown).
    NotActive,
}

/// A connected runner, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedRunner {
    /// Its session.
    pub session: SessionId,
    /// Its name.
    pub name: String,
    /// Its peer address.
    pub addr: String,
    /// Its slots.
    pub slots: u32,
    /// The jobs it holds.
    pub running: Vec<JobId>,
    /// When a frame last arrived from it.
    pub last_seen: Instant,
    /// Its labels.
    pub labels: Vec<String>,
    /// Its repositories.
    pub repos: Vec<String>,
    /// Until when it is quarantined (it gets no new job), if it is.
    pub quarantined_until: Option<Instant>,
    /// Infrastructure failures in a row under its name.
    pub infra_failures: u32,
    /// It is draining (it sent `Drain`): it gets no new job.
    pub draining: bool,
}

/// A runner name's record of infrastructure failures, kept across its
/// sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health {
    /// Infrastructure failures since its last other result.
    failures: u32,
    /// Quarantines since its last other result: the next lasts
    /// `quarantine_for * 2^quarantines`.
    quarantines: u32,
    /// In force until the tick at or after this instant lifts it.
    until: Option<Instant>,
    /// Its latest failure, for forgetting names that never come back.
    last_failure: Instant,
}

#[derive(Debug, Clone)]
struct Runner {
    name: String,
    addr: String,
    slots: u32,
    repos: BTreeSet<String>,
    labels: Vec<String>,
    last_seen: Instant,
    leases: BTreeSet<JobId>,
    /// It sent `Drain`: no new job for this session.
    draining: bool,
}

impl Runner {
    fn free_slots(&self) -> usize {
        (self.slots as usize).saturating_sub(self.leases.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum JobState {
    Queued,
    Leased {
        session: SessionId,
    },
    /// Running, but its runner's connection is gone without the lease being
    /// revoked (found running in the store at start-up, or the dispatcher
    /// closed the connection after failing to record its report): its
    /// runner may reconnect and claim it until `deadline`.
    Orphaned {
        runner: String,
        deadline: Instant,
        /// How long it was given, for the reason when it expires.
        waited: Duration,
    },
    /// The live attempt reported its result, which is being recorded. The
    /// lease (and the runner's slot, while `session` is connected) is held
    /// until the store answers.
    Finishing {
        session: Option<SessionId>,
        runner: String,
    },
}

#[derive(Debug, Clone)]
struct Job {
    spec: JobSpec,
    state: JobState,
    cancel_requested: bool,
    /// When the running attempt passes `--job-timeout` (then, once
    /// `timed_out`, when it is ended without its runner).
    deadline: Option<Instant>,
    /// Its runner was told to cancel it for running past `--job-timeout`.
    timed_out: bool,
    /// The live attempt's log offset whose chunk the store failed to
    /// record: the runner was asked to resend from it, and later chunks
    /// are dropped until that resend fills it (so one failure costs one
    /// resend, not one per chunk that followed it).
    log_gap: Option<u64>,
    /// Runners whose infrastructure failed this run of the job: the next
    /// assignment prefers any other.
    infra_failed_on: BTreeSet<String>,
}

/// How an attempt was lost, for the message of a job that gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Its runner went away, or never came back.
    RunnerLost,
    /// Its runner's fetch or checkout failed for infrastructure reasons.
    Infrastructure,
}

/// The scheduling state machine. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    runners: BTreeMap<SessionId, Runner>,
    names: HashMap<String, SessionId>,
    jobs: BTreeMap<JobId, Job>,
    /// Queued job ids; ids grow with submission, so the first is the oldest.
    queue: BTreeSet<JobId>,
    effects: VecDeque<Effect>,
    effects_emitted: u64,
    reassignments: u64,
    /// Infrastructure failures by runner name; only names with a failure
    /// since their last other result (or a quarantine in force).
    health: HashMap<String, Health>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            runners: BTreeMap::new(),
            names: HashMap::new(),
            jobs: BTreeMap::new(),
            queue: BTreeSet::new(),
            effects: VecDeque::new(),
            effects_emitted: 0,
            reassignments: 0,
            health: HashMap::new(),
        }
    }

    fn emit(&mut self, effect: Effect) {
        self.effects_emitted += 1;
        self.effects.push_back(effect);
    }

    /// Takes the pending effects, oldest first.
    pub fn drain_effects(&mut self) -> Vec<Effect> {
        self.effects.drain(..).collect()
    }

    /// How many effects have been emitted since start: a caller compares
    /// it before and after a call to learn whether the call decided
    /// anything.
    pub fn effects_emitted(&self) -> u64 {
        self.effects_emitted
    }

    /// Jobs requeued because their runner was lost, since start.
    pub fn reassignments(&self) -> u64 {
        self.reassignments
    }

    /// (queued, running) jobs; orphaned and finishing jobs count as
    /// running.
    pub fn counts(&self) -> (usize, usize) {
        (self.queue.len(), self.jobs.len() - self.queue.len())
    }

    /// Whether the scheduler tracks `job` (queued, running, orphaned or
    /// finishing).
    pub fn knows_job(&self, job: JobId) -> bool {
        self.jobs.contains_key(&job)
    }

    /// Whether any job is waiting for a runner.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Number of connected runners.
    pub fn runner_count(&self) -> usize {
        self.runners.len()
    }

    /// Connected runners' sessions, for pinging.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.runners.keys().copied().collect()
    }

    /// Connected runners, ordered by name.
    pub fn runners(&self) -> Vec<ConnectedRunner> {
        let mut views: Vec<ConnectedRunner> = self
            .runners
            .iter()
            .map(|(session, r)| ConnectedRunner {
                session: *session,
                name: r.name.clone(),
                addr: r.addr.clone(),
                slots: r.slots,
                running: r.leases.iter().copied().collect(),
                last_seen: r.last_seen,
                labels: r.labels.clone(),
                repos: r.repos.iter().cloned().collect(),
                quarantined_until: self.quarantined_until(&r.name),
                infra_failures: self.health.get(&r.name).map_or(0, |h| h.failures),
                draining: r.draining,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Until when the runner called `name` is quarantined, if it is.
    pub fn quarantined_until(&self, name: &str) -> Option<Instant> {
        self.health.get(name).and_then(|h| h.until)
    }

    /// Connected runners quarantined now.
    pub fn quarantined_count(&self) -> usize {
        self.runners
            .values()
            .filter(|r| self.is_quarantined(&r.name))
            .count()
    }

    fn is_quarantined(&self, name: &str) -> bool {
        self.quarantined_until(name).is_some()
    }

    /// Connected runners draining now.
    pub fn draining_count(&self) -> usize {
        self.runners.values().filter(|r| r.draining).count()
    }

    /// Whether the runner may be given a job now: a free slot, not
    /// draining and not quarantined.
    fn can_take(&self, r: &Runner) -> bool {
        r.free_slots() > 0 && !r.draining && !self.is_quarantined(&r.name)
    }

    /// Why each queued job waits, oldest first: from the runners connected
    /// now, the repositories they list and their free slots.
    pub fn waiting(&self) -> Vec<(JobId, Waiting)> {
        let mut ahead: HashMap<&str, u32> = HashMap::new();
        let connected = u32::try_from(self.runners.len()).unwrap_or(u32::MAX);
        self.queue
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|j| (*id, j)))
            .map(|(id, j)| {
                let repo = j.spec.repo.as_str();
                let (mut matching, mut slots, mut free) = (0u32, 0u32, 0usize);
                let (mut quarantined, mut draining) = (Vec::new(), Vec::new());
                for r in self.runners.values().filter(|r| r.repos.contains(repo)) {
                    matching += 1;
                    if self.is_quarantined(&r.name) {
                        quarantined.push(r.name.clone());
                        continue;
                    }
                    if r.draining {
                        draining.push(r.name.clone());
                        continue;
                    }
                    slots = slots.saturating_add(r.slots);
                    free += r.free_slots();
                }
                let reason = if matching == 0 {
                    WaitReason::NoRunner { connected }
                } else if free > 0 {
                    WaitReason::Assigning
                } else if !quarantined.is_empty() {
                    quarantined.sort();
                    WaitReason::Quarantined {
                        matching,
                        quarantined,
                    }
                } else if !draining.is_empty() {
                    draining.sort();
                    WaitReason::Draining { matching, draining }
                } else {
                    WaitReason::AllBusy { matching, slots }
                };
                let before = ahead.entry(repo).or_default();
                let waiting = Waiting {
                    reason,
                    ahead: *before,
                    lost_attempts: j.spec.run_attempts(),
                    max_attempts: self.config.max_attempts,
                };
                *before += 1;
                (id, waiting)
            })
            .collect()
    }

    /// The address of the connected runner called `name`, if any. O(1):
    /// every runner connect asks it, so it must not walk all runners.
    pub fn runner_addr(&self, name: &str) -> Option<&str> {
        let session = self.names.get(name)?;
        self.runners.get(session).map(|r| r.addr.as_str())
    }

    /// The commit of an active `job`; `None` for a job the scheduler does
    /// not hold (finished, or never submitted).
    pub fn job_commit(&self, job: JobId) -> Option<&CommitId> {
        self.jobs.get(&job).map(|j| &j.spec.commit)
    }

    /// The connected session holding `job`'s lease at `attempt`, if any.
    pub fn lease_holder(&self, job: JobId, attempt: Attempt) -> Option<SessionId> {
        let j = self.jobs.get(&job)?;
        match j.state {
            JobState::Leased { session }
            | JobState::Finishing {
                session: Some(session),
                ..
            } if j.spec.attempt == attempt => Some(session),
            _ => None,
        }
    }

    /// Whether `attempt` holds `job`'s live lease (leased, orphaned or
    /// finishing). `Started` and log chunks are accepted only then.
    pub fn is_live(&self, job: JobId, attempt: Attempt) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|j| j.spec.attempt == attempt && !matches!(j.state, JobState::Queued))
    }

    /// Start-up recovery: `queued` jobs wait for a runner again; `running`
    /// jobs (with the runner that held them) become orphaned leases that
    /// their runner may claim within one runner timeout.
    pub fn handle_recovered(
        &mut self,
        queued: Vec<JobSpec>,
        running: Vec<(JobSpec, String)>,
        now: Instant,
    ) {
        for spec in queued {
            self.insert_queued(spec);
        }
        let deadline = now + self.config.runner_timeout;
        for (spec, runner) in running {
            let id = spec.id;
            if self.jobs.contains_key(&id) {
                continue;
            }
            self.jobs.insert(
                id,
                Job {
                    spec,
                    state: JobState::Orphaned {
                        runner,
                        deadline,
                        waited: self.config.runner_timeout,
                    },
                    cancel_requested: false,
                    // How long it ran before the restart is not known here.
                    deadline: Some(now + self.config.job_timeout),
                    timed_out: false,
                    log_gap: None,
                    infra_failed_on: BTreeSet::new(),
                },
            );
        }
    }

    /// A job is durable in the store and waits for a runner. Idempotent: a
    /// job already known is left alone.
    pub fn handle_job_submitted(&mut self, spec: JobSpec, _now: Instant) {
        self.insert_queued(spec);
    }

    /// The store queued a rerun of a finished job (the scheduler forgot it
    /// when it ended): it waits again, with a fresh attempt budget. A job
    /// a concurrent submit already re-queued gets the rerun's budget.
    pub fn handle_rerun(&mut self, spec: JobSpec, _now: Instant) {
        match self.jobs.get_mut(&spec.id) {
            Some(j) if j.state == JobState::Queued => {
                j.spec.rerun_base = spec.rerun_base;
                j.spec.handed_back = spec.handed_back;
            }
            Some(_) => {}
            None => self.insert_queued(spec),
        }
    }

    fn insert_queued(&mut self, spec: JobSpec) {
        let id = spec.id;
        if self.jobs.contains_key(&id) {
            return;
        }
        self.jobs.insert(
            id,
            Job {
                spec,
                state: JobState::Queued,
                cancel_requested: false,
                deadline: None,
                timed_out: false,
                log_gap: None,
                infra_failed_on: BTreeSet::new(),
            },
        );
        self.queue.insert(id);
    }

    /// A runner completed its handshake as `session`. Listed leases that
    /// are still its own (held by its previous, still live session, or
    /// orphaned or finishing under its name) are kept; any other listed
    /// lease gets a `Cancel`. A previous session with the same name is
    /// replaced: its leases the runner did not list are lost (the runner
    /// does not have them).
    pub fn handle_runner_connected(
        &mut self,
        session: SessionId,
        hello: RunnerHello,
        now: Instant,
    ) {
        let RunnerHello {
            name,
            addr,
            slots,
            repos,
            labels,
            leases: listed,
        } = hello;
        let mut inherited = BTreeSet::new();
        let mut old_session = None;
        if let Some(old) = self.names.remove(&name)
            && let Some(old_runner) = self.runners.remove(&old)
        {
            inherited = old_runner.leases;
            old_session = Some(old);
            self.emit(Effect::Disconnect {
                session: old,
                reason: format!("replaced by a new session of runner {name}"),
            });
        }

        let listed: BTreeMap<JobId, Attempt> = listed.into_iter().collect();
        let mut kept = BTreeSet::new();
        let mut cancels = Vec::new();
        for (&job, &attempt) in &listed {
            let Some(j) = self.jobs.get_mut(&job) else {
                cancels.push((job, attempt));
                continue;
            };
            let owned = match &j.state {
                JobState::Leased { session: s } => {
                    Some(*s) == old_session && inherited.contains(&job)
                }
                JobState::Orphaned { runner, .. } | JobState::Finishing { runner, .. } => {
                    *runner == name
                }
                JobState::Queued => false,
            };
            if !owned || j.spec.attempt != attempt {
                cancels.push((job, attempt));
                continue;
            }
            kept.insert(job);
            if let JobState::Finishing { runner, .. } = &j.state {
                // Its result is being recorded: nothing to cancel.
                j.state = JobState::Finishing {
                    session: Some(session),
                    runner: runner.clone(),
                };
            } else {
                j.state = JobState::Leased { session };
                if j.cancel_requested {
                    cancels.push((job, attempt));
                }
            }
        }
        for (job, attempt) in cancels {
            self.emit(Effect::Cancel {
                session,
                job,
                attempt,
            });
        }
        self.runners.insert(
            session,
            Runner {
                name: name.clone(),
                addr,
                slots,
                repos: repos.into_iter().collect(),
                labels,
                last_seen: now,
                leases: kept.clone(),
                draining: false,
            },
        );
        self.names.insert(name.clone(), session);
        for job in inherited.difference(&kept) {
            self.lose(
                *job,
                &format!("runner {name} reconnected without listing the lease"),
            );
        }
    }

    /// A runner's connection closed or broke under it (a FIN or an RST,
    /// a NAT table flushed included): the runner may be about to dial
    /// again, so its leases wait `disconnect_grace` for it as orphans
    /// before they are revoked (at once when the grace is zero).
    pub fn handle_runner_closed(&mut self, session: SessionId, reason: &str, now: Instant) {
        let grace = self.config.disconnect_grace;
        if grace.is_zero() {
            return self.handle_runner_disconnected(session, reason, now);
        }
        if let Some(runner) = self.unregister(session) {
            self.orphan(runner, now + grace, grace);
        }
    }

    /// The earliest moment an orphaned lease expires, for the shell to
    /// call [`Scheduler::handle_tick`] then rather than at the next beat.
    pub fn next_orphan_deadline(&self) -> Option<Instant> {
        self.jobs
            .values()
            .filter_map(|j| match j.state {
                JobState::Orphaned { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// A runner's connection was ended for it (silence, a protocol
    /// error): its leases are revoked at once.
    pub fn handle_runner_disconnected(&mut self, session: SessionId, reason: &str, _now: Instant) {
        let Some(runner) = self.unregister(session) else {
            return;
        };
        for job in runner.leases {
            self.lose(job, &format!("runner {}: {reason}", runner.name));
        }
    }

    /// The dispatcher closed the runner's connection because it could not
    /// record what the runner reported: the runner is not at fault, so its
    /// leases become orphans it may claim back (and resend its reports)
    /// within one runner timeout, as after a dispatcher restart.
    pub fn handle_runner_released(&mut self, session: SessionId, now: Instant) {
        if let Some(runner) = self.unregister(session) {
            let wait = self.config.runner_timeout;
            self.orphan(runner, now + wait, wait);
        }
    }

    fn orphan(&mut self, runner: Runner, deadline: Instant, waited: Duration) {
        for job in runner.leases {
            let Some(j) = self.jobs.get_mut(&job) else {
                continue;
            };
            j.state = match &j.state {
                JobState::Finishing { runner, .. } => JobState::Finishing {
                    session: None,
                    runner: runner.clone(),
                },
                _ => JobState::Orphaned {
                    runner: runner.name.clone(),
                    deadline,
                    waited,
                },
            };
        }
    }

    fn unregister(&mut self, session: SessionId) -> Option<Runner> {
        let runner = self.runners.remove(&session)?;
        if self.names.get(&runner.name) == Some(&session) {
            self.names.remove(&runner.name);
        }
        Some(runner)
    }

    /// A frame arrived from the session: the runner is alive. Returns
    /// whether the session is still a connected runner.
    pub fn handle_frame(&mut self, session: SessionId, now: Instant) -> bool {
        match self.runners.get_mut(&session) {
            Some(r) => {
                if now > r.last_seen {
                    r.last_seen = now;
                }
                true
            }
            None => false,
        }
    }

    /// The runner sent `Drain`: it gets no new job for the rest of this
    /// session (a reconnect while it still drains says so again). Returns
    /// whether it was not draining yet.
    pub fn handle_runner_draining(&mut self, session: SessionId, now: Instant) -> bool {
        self.handle_frame(session, now);
        match self.runners.get_mut(&session) {
            Some(r) if !r.draining => {
                r.draining = true;
                true
            }
            _ => false,
        }
    }

    /// The runner gave back `attempt` of `job` without a result (it never
    /// started it, or its drain cut it off). Only the session holding the
    /// live lease may: then the job is queued again at once, its runner's
    /// slot is free, and the attempt does not count against
    /// `max_attempts` (a cancel asked meanwhile ends it `cancelled`).
    /// Anything else is ignored (a stale or foreign lease). Returns whether
    /// the lease was given back.
    pub fn handle_hand_back(
        &mut self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        reason: &str,
        now: Instant,
    ) -> bool {
        self.handle_frame(session, now);
        let Some(j) = self.jobs.get_mut(&job) else {
            return false;
        };
        if j.spec.attempt != attempt || j.state != (JobState::Leased { session }) {
            return false;
        }
        if let Some(r) = self.runners.get_mut(&session) {
            r.leases.remove(&job);
        }
        if j.cancel_requested {
            self.jobs.remove(&job);
            self.emit(Effect::Finish {
                job,
                status: FinalStatus::Cancelled,
                message: format!("cancelled by a user; its runner gave it back ({reason})"),
            });
            return true;
        }
        j.spec.handed_back = j.spec.handed_back.saturating_add(1);
        j.state = JobState::Queued;
        j.deadline = None;
        j.timed_out = false;
        j.log_gap = None;
        self.queue.insert(job);
        self.reassignments += 1;
        self.emit(Effect::Requeue {
            job,
            attempt,
            reason: reason.to_owned(),
            handed_back: true,
        });
        true
    }

    /// Expires runners silent for a runner timeout (disconnecting them and
    /// revoking their leases) and orphaned leases past their deadline, and
    /// lifts quarantines that have run their time. Returns whether a
    /// connected runner's quarantine was lifted: then a scheduling pass
    /// may assign to it.
    pub fn handle_tick(&mut self, now: Instant) -> bool {
        let timeout = self.config.runner_timeout;
        let silent: Vec<SessionId> = self
            .runners
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_seen) >= timeout)
            .map(|(s, _)| *s)
            .collect();
        for session in silent {
            let reason = format!("no frame for {timeout:?} (runner timeout)");
            self.emit(Effect::Disconnect {
                session,
                reason: reason.clone(),
            });
            self.handle_runner_disconnected(session, &reason, now);
        }
        let expired: Vec<(JobId, String, Duration)> = self
            .jobs
            .iter()
            .filter_map(|(id, j)| match &j.state {
                JobState::Orphaned {
                    runner,
                    deadline,
                    waited,
                } if *deadline <= now => Some((*id, runner.clone(), *waited)),
                _ => None,
            })
            .collect();
        for (job, runner, waited) in expired {
            self.lose(
                job,
                &format!("runner {runner} did not come back within {waited:?}"),
            );
        }
        self.enforce_job_timeout(now);
        self.lift_quarantines(now)
    }

    /// Ends quarantines due at `now` (their counts stay: one more failure
    /// quarantines the runner again, for twice as long) and forgets the
    /// counts of names not connected for a long while.
    fn lift_quarantines(&mut self, now: Instant) -> bool {
        let mut lifted = false;
        for (name, h) in &mut self.health {
            if h.until.is_some_and(|until| until <= now) {
                h.until = None;
                lifted |= self.names.contains_key(name);
            }
        }
        let names = &self.names;
        self.health.retain(|name, h| {
            names.contains_key(name)
                || h.until.is_some()
                || now.saturating_duration_since(h.last_failure) < HEALTH_FORGET_AFTER
        });
        lifted
    }

    /// Attempts past `--job-timeout`: their runner is told to cancel; one
    /// runner timeout later, a job still not reported ends `error`
    /// without it (the runner's late result is then stale).
    fn enforce_job_timeout(&mut self, now: Instant) {
        let grace = self.config.runner_timeout;
        let limit = self.config.job_timeout;
        let due: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                matches!(j.state, JobState::Leased { .. } | JobState::Orphaned { .. })
                    && j.deadline.is_some_and(|d| d <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for job in due {
            let Some(j) = self.jobs.get_mut(&job) else {
                continue;
            };
            if !j.timed_out {
                j.timed_out = true;
                j.deadline = Some(now + grace);
                if let JobState::Leased { session } = j.state {
                    let attempt = j.spec.attempt;
                    self.emit(Effect::Cancel {
                        session,
                        job,
                        attempt,
                    });
                }
                continue;
            }
            if let JobState::Leased { session } = j.state
                && let Some(r) = self.runners.get_mut(&session)
            {
                r.leases.remove(&job);
            }
            self.jobs.remove(&job);
            self.queue.remove(&job);
            self.emit(Effect::Finish {
                job,
                status: FinalStatus::Error,
                message: format!(
                    "ran past --job-timeout ({limit:?}) and its runner did not stop it within {grace:?}"
                ),
            });
        }
    }

    /// The attempt was lost (runner gone): requeue, or end the job when it
    /// was being cancelled or has used up its attempts. A finishing job
    /// only loses its runner: its fate is the store's answer.
    fn lose(&mut self, job: JobId, reason: &str) {
        self.lose_with(job, reason, Loss::RunnerLost);
    }

    /// [`lose`](Self::lose), saying why in the give-up message; returns
    /// whether the job ended.
    fn lose_with(&mut self, job: JobId, reason: &str, loss: Loss) -> bool {
        let Some(j) = self.jobs.get_mut(&job) else {
            return false;
        };
        match &j.state {
            JobState::Leased { session } => {
                if let Some(r) = self.runners.get_mut(session) {
                    r.leases.remove(&job);
                }
            }
            JobState::Finishing { session, runner } => {
                if let Some(r) = session.and_then(|s| self.runners.get_mut(&s)) {
                    r.leases.remove(&job);
                }
                j.state = JobState::Finishing {
                    session: None,
                    runner: runner.clone(),
                };
                return false;
            }
            JobState::Queued | JobState::Orphaned { .. } => {}
        }
        let attempt = j.spec.attempt;
        let tried = j.spec.run_attempts();
        if j.cancel_requested {
            self.jobs.remove(&job);
            self.emit(Effect::Finish {
                job,
                status: FinalStatus::Cancelled,
                message: format!("cancelled by a user; its runner was lost ({reason})"),
            });
            true
        } else if tried >= self.config.max_attempts {
            self.jobs.remove(&job);
            let message = match loss {
                Loss::RunnerLost => format!(
                    "gave up after {tried} attempts: its runners were lost each time (last: {reason})"
                ),
                Loss::Infrastructure => {
                    format!("gave up after {tried} attempts (--max-attempts); the last: {reason}")
                }
            };
            self.emit(Effect::Finish {
                job,
                status: FinalStatus::Error,
                message,
            });
            true
        } else {
            j.state = JobState::Queued;
            j.deadline = None;
            j.timed_out = false;
            self.queue.insert(job);
            self.reassignments += 1;
            self.emit(Effect::Requeue {
                job,
                attempt,
                reason: reason.to_owned(),
                handed_back: false,
            });
            false
        }
    }

    /// A runner reported `Started`: accepted only from the live lease.
    pub fn handle_started(
        &mut self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        now: Instant,
    ) -> bool {
        self.handle_frame(session, now);
        self.is_live(job, attempt)
    }

    /// A runner reported a log chunk: accepted only from the live lease.
    pub fn handle_log(
        &mut self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        now: Instant,
    ) -> bool {
        self.handle_started(session, job, attempt, now)
    }

    /// Whether a live attempt's log chunk at `offset` is to be stored:
    /// `false` past a gap the runner was asked to fill first.
    pub fn log_wanted(&self, job: JobId, attempt: Attempt, offset: u64) -> bool {
        self.jobs
            .get(&job)
            .is_none_or(|j| j.spec.attempt != attempt || j.log_gap.is_none_or(|gap| offset <= gap))
    }

    /// The store failed to record `attempt`'s log chunk at `offset`: the
    /// attempt's log has a gap there (or earlier, if one was open). Returns
    /// the offset the runner must resend from; `None` when the attempt is
    /// not live.
    pub fn handle_log_failed(&mut self, job: JobId, attempt: Attempt, offset: u64) -> Option<u64> {
        let j = self.jobs.get_mut(&job)?;
        if j.spec.attempt != attempt || matches!(j.state, JobState::Queued) {
            return None;
        }
        let gap = j.log_gap.map_or(offset, |gap| gap.min(offset));
        j.log_gap = Some(gap);
        Some(gap)
    }

    /// The store recorded `attempt`'s log chunk at `offset`: a gap there
    /// is filled, and the chunks after it are taken again.
    pub fn handle_log_stored(&mut self, job: JobId, attempt: Attempt, offset: u64) {
        if let Some(j) = self.jobs.get_mut(&job)
            && j.spec.attempt == attempt
            && j.log_gap == Some(offset)
        {
            j.log_gap = None;
        }
    }

    /// The gap in `attempt`'s log the runner was asked to fill, if any.
    pub fn log_gap(&self, job: JobId, attempt: Attempt) -> Option<u64> {
        self.jobs
            .get(&job)
            .filter(|j| j.spec.attempt == attempt)
            .and_then(|j| j.log_gap)
    }

    /// A runner reported its result. Fenced by the attempt: only the job's
    /// live lease may finish it; on [`ResultDecision::Accept`] the job is
    /// finishing until the shell says how the store answered.
    pub fn handle_result(
        &mut self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        status: FinalStatus,
        message: &str,
        now: Instant,
    ) -> ResultDecision {
        self.handle_frame(session, now);
        let runner = match self.holder_name(session, job, attempt) {
            Ok(runner) => runner,
            Err(decision) => return decision,
        };
        let j = &self.jobs[&job];
        let (status, message) = if j.timed_out && !j.cancel_requested {
            (
                FinalStatus::Error,
                format!(
                    "ran past --job-timeout ({:?}) and was stopped{}",
                    self.config.job_timeout,
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    }
                ),
            )
        } else if j.cancel_requested {
            (
                FinalStatus::Cancelled,
                if message.is_empty() {
                    "cancelled by a user".to_owned()
                } else {
                    format!("cancelled by a user: {message}")
                },
            )
        } else {
            (status, message.to_owned())
        };
        let holder = match j.state {
            JobState::Leased { session } => Some(session),
            _ => None,
        };
        if status != FinalStatus::Cancelled {
            // The runner got its checkout done (or the job's own error is
            // the commit's): its infrastructure works. A cancel says
            // nothing either way. A quarantine in force runs its time.
            if let Some(h) = self.health.get_mut(&runner) {
                if h.until.is_some() {
                    h.failures = 0;
                    h.quarantines = 0;
                } else {
                    self.health.remove(&runner);
                }
            }
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.state = JobState::Finishing {
                session: holder,
                runner,
            };
        }
        ResultDecision::Accept { status, message }
    }

    /// The name of the runner whose result for (`job`, `attempt`) this
    /// session may report (the live lease's holder: its session, or after a
    /// reconnect or a dispatcher restart a session of the same runner), or
    /// the decision for a report it may not make.
    fn holder_name(
        &self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
    ) -> Result<String, ResultDecision> {
        let Some(j) = self.jobs.get(&job) else {
            return Err(ResultDecision::Unknown);
        };
        let live = j.spec.attempt == attempt;
        let reporter = self.runners.get(&session).map(|r| r.name.as_str());
        let not_holder = |holder: &str| ResultDecision::Revoked {
            message: format!(
                "attempt {attempt} of job {job} is held by runner {holder}, not by {}; result refused",
                reporter.unwrap_or("this session")
            ),
        };
        match &j.state {
            JobState::Finishing { .. } if live => Err(ResultDecision::Pending),
            JobState::Leased { session: holder } if live => {
                let name = self
                    .runners
                    .get(holder)
                    .map(|r| r.name.clone())
                    .unwrap_or_default();
                if *holder != session && reporter != Some(name.as_str()) {
                    return Err(not_holder(&name));
                }
                Ok(name)
            }
            JobState::Orphaned { runner, .. } if live => {
                if reporter != Some(runner.as_str()) {
                    return Err(not_holder(runner));
                }
                Ok(runner.clone())
            }
            state => Err(ResultDecision::Revoked {
                message: format!(
                    "attempt {attempt} of job {job} was revoked (the job is now at attempt {}, {}); result refused",
                    j.spec.attempt,
                    if matches!(state, JobState::Queued) {
                        "queued"
                    } else {
                        "running"
                    }
                ),
            }),
        }
    }

    /// A runner reported that it could not run the job because of its own
    /// infrastructure or the network (`JobFinished.infrastructure`: the
    /// fetch or the checkout failed). Fenced like
    /// [`handle_result`](Self::handle_result). From the live lease, the
    /// attempt is lost and the job queued again, preferring other runners,
    /// or ends `error` naming this failure once `max_attempts` are used
    /// up ([`ResultDecision::Retried`], with the effects to apply); the
    /// runner's count grows and may quarantine it. A job a user cancelled,
    /// or one past `--job-timeout`, ends as [`handle_result`] decides.
    ///
    /// [`handle_result`]: Self::handle_result
    pub fn handle_infra_failure(
        &mut self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        message: &str,
        now: Instant,
    ) -> ResultDecision {
        self.handle_frame(session, now);
        let runner = match self.holder_name(session, job, attempt) {
            Ok(runner) => runner,
            Err(decision) => return decision,
        };
        let j = &self.jobs[&job];
        if j.cancel_requested || j.timed_out {
            return self.handle_result(session, job, attempt, FinalStatus::Error, message, now);
        }
        let quarantined = self.count_infra_failure(&runner, now);
        let reason = format!(
            "infrastructure failure on runner {runner}: {}",
            if message.is_empty() {
                "no reason given"
            } else {
                message
            }
        );
        if let Some(j) = self.jobs.get_mut(&job) {
            j.infra_failed_on.insert(runner.clone());
        }
        let ended = self.lose_with(job, &reason, Loss::Infrastructure);
        let mut said = if ended {
            format!("attempt {attempt} failed ({reason}); out of attempts, the job ends error")
        } else {
            format!("attempt {attempt} failed ({reason}); the job is queued again")
        };
        if let Some(until) = quarantined {
            said.push_str(&format!(
                "; runner {runner} is quarantined for {:?}",
                until.saturating_duration_since(now)
            ));
        }
        ResultDecision::Retried { message: said }
    }

    /// Counts an infrastructure failure of runner `name`; returns the end
    /// of the quarantine it starts, if it starts one. Failures while a
    /// quarantine is in force (jobs assigned before it) count but do not
    /// lengthen it.
    fn count_infra_failure(&mut self, name: &str, now: Instant) -> Option<Instant> {
        let (after, base) = (self.config.quarantine_after, self.config.quarantine_for);
        let h = self.health.entry(name.to_owned()).or_insert(Health {
            failures: 0,
            quarantines: 0,
            until: None,
            last_failure: now,
        });
        h.failures = h.failures.saturating_add(1);
        h.last_failure = now;
        if after == 0 || h.failures < after || h.until.is_some() {
            return None;
        }
        let cap = MAX_QUARANTINE.max(base);
        let factor = 1u32.checked_shl(h.quarantines).unwrap_or(u32::MAX);
        let length = base.checked_mul(factor).map_or(cap, |d| d.min(cap));
        h.quarantines = h.quarantines.saturating_add(1);
        let until = now + length;
        h.until = Some(until);
        Some(until)
    }

    /// The store answered the write of an accepted result (recorded, a
    /// duplicate, or refused as stale: either way it holds the job's final
    /// word): the job leaves the scheduler and its runner's slot is free.
    pub fn handle_result_stored(&mut self, job: JobId, attempt: Attempt) {
        let Some(j) = self.jobs.get(&job) else {
            return;
        };
        let JobState::Finishing { session, .. } = &j.state else {
            return;
        };
        if j.spec.attempt != attempt {
            return;
        }
        if let Some(r) = session.and_then(|s| self.runners.get_mut(&s)) {
            r.leases.remove(&job);
        }
        self.jobs.remove(&job);
    }

    /// The write of an accepted result failed, so nothing of it is
    /// durable: the job is running again as before, so that the runner's
    /// resend is accepted. If the runner is gone meanwhile, the lease waits
    /// one runner timeout for it as an orphan.
    pub fn handle_result_failed(&mut self, job: JobId, attempt: Attempt, now: Instant) {
        let deadline = now + self.config.runner_timeout;
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let JobState::Finishing { session, runner } = &j.state else {
            return;
        };
        if j.spec.attempt != attempt {
            return;
        }
        j.state = match session {
            Some(session) => JobState::Leased { session: *session },
            None => JobState::Orphaned {
                runner: runner.clone(),
                deadline,
                waited: self.config.runner_timeout,
            },
        };
    }

    /// An [`Effect::Assign`] could not be recorded, so it was never sent:
    /// the job is queued again at its previous attempt, as if the
    /// assignment had not been decided (or, when a user cancelled it
    /// meanwhile, ends cancelled). Returns whether it applied.
    pub fn handle_assign_failed(&mut self, job: JobId, attempt: Attempt) -> bool {
        let Some(j) = self.jobs.get_mut(&job) else {
            return false;
        };
        let JobState::Leased { session } = j.state else {
            return false;
        };
        if j.spec.attempt != attempt {
            return false;
        }
        if let Some(r) = self.runners.get_mut(&session) {
            r.leases.remove(&job);
        }
        j.spec.attempt = Attempt(attempt.0.saturating_sub(1));
        if j.cancel_requested {
            self.jobs.remove(&job);
            self.emit(Effect::Finish {
                job,
                status: FinalStatus::Cancelled,
                message: "cancelled by a user while queued".to_owned(),
            });
        } else {
            j.state = JobState::Queued;
            self.queue.insert(job);
        }
        true
    }

    /// A user asked to cancel `job`.
    pub fn handle_cancel(&mut self, job: JobId, _now: Instant) -> CancelOutcome {
        let Some(j) = self.jobs.get_mut(&job) else {
            return CancelOutcome::NotActive;
        };
        match j.state {
            JobState::Queued => {
                self.jobs.remove(&job);
                self.queue.remove(&job);
                self.emit(Effect::Finish {
                    job,
                    status: FinalStatus::Cancelled,
                    message: "cancelled by a user while queued".to_owned(),
                });
                CancelOutcome::Cancelled
            }
            JobState::Leased { session } => {
                j.cancel_requested = true;
                let attempt = j.spec.attempt;
                self.emit(Effect::Cancel {
                    session,
                    job,
                    attempt,
                });
                CancelOutcome::Cancelling
            }
            JobState::Orphaned { .. } => {
                // Its runner gets the Cancel if it reconnects; otherwise
                // the orphan expires and the job ends cancelled.
                j.cancel_requested = true;
                CancelOutcome::Cancelling
            }
            JobState::Finishing { .. } => CancelOutcome::Finishing,
        }
    }

    /// The scheduling pass: assigns queued jobs, oldest first, to connected
    /// runners that build their repository and have a free slot, spreading
    /// them over the least-loaded runners.
    pub fn schedule(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
        let mut free: usize = self
            .runners
            .values()
            .filter(|r| !r.draining && !self.is_quarantined(&r.name))
            .map(Runner::free_slots)
            .sum();
        let queued: Vec<JobId> = self.queue.iter().copied().collect();
        for job in queued {
            if free == 0 {
                break;
            }
            let Some(j) = self.jobs.get(&job) else {
                continue;
            };
            // A runner whose infrastructure already failed this job goes
            // last: any other free one is tried first.
            let best = self
                .runners
                .iter()
                .filter(|(_, r)| self.can_take(r) && r.repos.contains(&j.spec.repo))
                .min_by_key(|(s, r)| (j.infra_failed_on.contains(&r.name), r.leases.len(), **s))
                .map(|(s, _)| *s);
            let Some(session) = best else {
                continue;
            };
            free -= 1;
            self.queue.remove(&job);
            let runner = self.runners.get_mut(&session).expect("chosen above");
            runner.leases.insert(job);
            let runner_name = runner.name.clone();
            let j = self.jobs.get_mut(&job).expect("checked above");
            j.spec.attempt = j.spec.attempt.next();
            j.state = JobState::Leased { session };
            j.deadline = Some(now + self.config.job_timeout);
            j.timed_out = false;
            j.log_gap = None;
            let assignment = Assignment {
                job,
                attempt: j.spec.attempt,
                repo: j.spec.repo.clone(),
                branch: j.spec.branch.clone(),
                ref_name: j.spec.ref_name.clone(),
                commit: j.spec.commit.clone(),
            };
            self.emit(Effect::Assign {
                session,
                runner: runner_name,
                assignment,
            });
        }
    }

    /// Checks the structural invariants; `Err` names the first broken one.
    /// Used by tests and the fuzz target.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, j) in &self.jobs {
            let holder = match &j.state {
                JobState::Queued => {
                    if !self.queue.contains(id) {
                        return Err(format!("job {id} queued but not in the queue"));
                    }
                    None
                }
                JobState::Leased { session }
                | JobState::Finishing {
                    session: Some(session),
                    ..
                } => Some(*session),
                JobState::Orphaned { .. } | JobState::Finishing { session: None, .. } => None,
            };
            if !matches!(j.state, JobState::Queued) && j.spec.attempt == Attempt(0) {
                return Err(format!("job {id} running at attempt 0"));
            }
            if let Some(session) = holder {
                let Some(r) = self.runners.get(&session) else {
                    return Err(format!("job {id} held by gone session {session}"));
                };
                if !r.leases.contains(id) {
                    return Err(format!("job {id} held by {session} which does not list it"));
                }
            }
        }
        for id in &self.queue {
            if !matches!(self.jobs.get(id).map(|j| &j.state), Some(JobState::Queued)) {
                return Err(format!("job {id} in the queue but not queued"));
            }
        }
        self.check_runners()
    }

    fn check_runners(&self) -> Result<(), String> {
        let mut holders: HashMap<JobId, SessionId> = HashMap::new();
        for (session, r) in &self.runners {
            if self.names.get(&r.name) != Some(session) {
                return Err(format!(
                    "runner {} (session {session}) not indexed by name",
                    r.name
                ));
            }
            for job in &r.leases {
                if let Some(other) = holders.insert(*job, *session) {
                    return Err(format!(
                        "job {job} leased by sessions {other} and {session}"
                    ));
                }
                match self.jobs.get(job).map(|j| &j.state) {
                    Some(
                        JobState::Leased { session: s }
                        | JobState::Finishing {
                            session: Some(s), ..
                        },
                    ) if s == session => {}
                    other => {
                        return Err(format!(
                            "session {session} lists job {job} whose state is {other:?}"
                        ));
                    }
                }
            }
        }
        if self.names.len() != self.runners.len() {
            return Err("name index and runners disagree".to_owned());
        }
        Ok(())
    }

    /// After [`schedule`](Self::schedule): `Err` when a queued job has a
    /// runner for its repository with a free slot that is not quarantined.
    pub fn check_no_idle_match(&self) -> Result<(), String> {
        for id in &self.queue {
            let repo = &self.jobs[id].spec.repo;
            if let Some((s, _)) = self
                .runners
                .iter()
                .find(|(_, r)| self.can_take(r) && r.repos.contains(repo))
            {
                return Err(format!(
                    "job {id} queued while session {s} has a free slot for {repo}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
