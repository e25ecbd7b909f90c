//! The runner's protocol brain: which leases it holds, what the dispatcher
//! may have missed (unacknowledged results, retained logs, unsent
//! `Started`), when to dial again, and how a shutdown drains.
//!
//! Pure state only, in the style of the dispatcher's scheduler and of a
//! sans-IO protocol core: no sockets, no tokio, no clock. The shell
//! ([`crate::session`]) feeds it [`Event`]s with the current time through
//! [`RunnerCore::handle`], carries out the [`Action`]s it takes from
//! [`RunnerCore::poll_action`], and sleeps until [`RunnerCore::deadline`].
//! Everything here is decided in microseconds and tested without sockets.
//!
//! Drain (first shutdown signal): the runner tells the dispatcher with
//! `Drain` (again after every reconnect while it drains), so it is given no
//! new job; it stays connected, because closing the connection would
//! revoke the running jobs' leases. Running jobs may finish within the
//! drain timeout. Every lease it will not run to the end it hands back
//! (`HandBack`) instead of reporting a verdict on a job that did not fail:
//! those not started yet (queued behind busy slots, or an `Assign` that
//! crossed the `Drain`) at once, and those still running at the drain
//! deadline (or at a second signal) once they have been killed. The
//! dispatcher queues them again for another runner without counting the
//! attempt. A job that finished on its own while being killed is reported
//! as it ended. A hand-back that cannot be sent (no connection) is not
//! kept: the lease then expires at the dispatcher like any lost one, and
//! the job is queued again all the same.
//!
//! Store epochs: every lease and result belongs to the store epoch
//! (`Welcome.epoch`) it was assigned under, and the `Hello` names it. A
//! `Welcome` with another epoch means the dispatcher's store is not the one
//! that handed them out (it was restored from a backup, or replaced), so
//! its job ids may now name other commits: the core drops them all (logged
//! at warn with both epochs), kills such jobs still running and forgets
//! their results when they end, instead of letting them finish a
//! stranger's job. Without the restore step the epoch stays the same; then
//! an `Assign` of a held `(job, attempt)` for another commit is what shows
//! it, and the held one is dropped the same way. Results carry their commit,
//! and the dispatcher refuses one whose job has another.
//!
//! Invariants (checked by `RunnerCore::check_invariants` and the property
//! tests below):
//! - a lease is in exactly one of: queued, running, being stored, held for
//!   its `ResultAck`; every lease held is listed in the `Hello` of a dial;
//! - no more jobs run than the runner has slots, and none starts during a
//!   drain;
//! - a result is held, and sent again after every reconnect, until its
//!   `ResultAck` arrives;
//! - no action names a lease the core does not hold;
//! - nothing is sent while no connection is up.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use surveil_common::{Backoff, Secret};
use surveil_proto::{
    Assign, Drain, Envelope, HandBack, Hello, JobFinished, JobStatus, Lease, Log, Msg, Pong,
    Resend, Role, Started, Stream, Welcome,
};

use crate::Config;
use crate::job;
use crate::joblog::JobEvent;

/// A job attempt: `(job_id, attempt)`.
pub type LeaseKey = (u64, u32);

/// A result and the store epoch its lease was assigned under (empty when
/// unknown: an outbox file from before epochs), as the outbox keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// The result.
    pub result: JobFinished,
    /// `Welcome.epoch` of the connection that assigned it.
    pub epoch: String,
}

/// Most bytes of one job's log kept for resending after a reconnect; older
/// output is dropped first (a very chatty job that outlives a long outage
/// loses the oldest part of its log, never its result).
pub const LOG_RETAIN_BYTES: usize = 4 * 1024 * 1024;

/// The longest a `Resend`'s `retry_after_ms` is followed: a dispatcher
/// asking for more is still answered within this.
pub const MAX_RESEND_WAIT: Duration = Duration::from_secs(30);

/// After the jobs ended during a drain, how long the runner keeps trying
/// to deliver their results before leaving them to the outbox (they are
/// sent on the next start).
pub const RESULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// [`RESULT_FLUSH_TIMEOUT`] after a second shutdown signal: the operator
/// wants the runner gone, the outbox keeps the results.
pub const RESULT_FLUSH_TIMEOUT_IMMEDIATE: Duration = Duration::from_secs(1);

/// The pause between dials while dispatchers answer but none leads yet
/// (a failover): short, since one dial a quarter second costs the standbys
/// little for the few seconds a takeover lasts.
pub const FAILOVER_RETRY: Duration = Duration::from_millis(250);

/// Which shutdown signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The first: drain.
    Graceful,
    /// The second: cancel running jobs now.
    Immediate,
}

/// Something that happened, for [`RunnerCore::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The dial asked for by [`Action::Dial`] completed its handshake.
    Connected(Welcome),
    /// That dial failed; the text says why.
    DialFailed(String),
    /// That dial failed, but a dispatcher answered as a standby: they are
    /// up and electing a leader (a failover), so the next dial comes after
    /// [`FAILOVER_RETRY`] rather than a growing backoff.
    NoLeaderYet(String),
    /// The connection ended (closed, broken, a write failed or timed
    /// out). `unsent` is the frame whose write failed, if one did.
    Disconnected {
        /// Why, for the log.
        reason: String,
        /// The frame that could not be written.
        unsent: Option<Envelope>,
    },
    /// A message from the dispatcher.
    Frame(Msg),
    /// A running job's progress.
    Job(JobEvent),
    /// A shutdown signal.
    Shutdown(Stop),
    /// Nothing but time passed (the [`RunnerCore::deadline`] came).
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect and handshake with this `Hello`; report
    /// [`Event::Connected`] or [`Event::DialFailed`].
    Dial(Hello),
    /// Write this frame on the connection.
    Send(Envelope),
    /// Close the connection (the core has logged why).
    Disconnect,
    /// Start running this job; its events come back as [`Event::Job`]. Its
    /// result goes into the outbox stamped with `epoch`.
    Start {
        /// The job.
        assign: Assign,
        /// The store epoch it was assigned under.
        epoch: String,
    },
    /// Stop this running job, reporting `reason`.
    Cancel {
        /// The job.
        job_id: u64,
        /// Its attempt.
        attempt: u32,
        /// Why, as the job's result message.
        reason: String,
    },
    /// A result for a job that never ran (refused, or cancelled before it
    /// started): store it in the outbox stamped with `epoch`, then report
    /// it as [`JobEvent::Finished`] like any other.
    Store {
        /// The result.
        result: JobFinished,
        /// The store epoch its lease was assigned under.
        epoch: String,
    },
    /// The dispatcher acknowledged this result: delete it from the outbox.
    Forget {
        /// The job.
        job_id: u64,
        /// Its attempt.
        attempt: u32,
    },
}

/// The tail of a job's log, for resending after a reconnect.
#[derive(Debug, Default)]
struct Retained {
    chunks: VecDeque<Log>,
    bytes: usize,
    dropped: u64,
}

impl Retained {
    fn push(&mut self, log: Log) {
        self.bytes += log.data.len();
        self.chunks.push_back(log);
        while self.bytes > LOG_RETAIN_BYTES {
            let Some(old) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
            self.dropped += old.data.len() as u64;
        }
    }
}

/// What the dispatcher asked to be sent again (its store failed to record
/// it), and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingResend {
    due: Instant,
    log_offset: Option<u64>,
    result: bool,
    started: bool,
}

/// A running job: whether the dispatcher has been told it started, and
/// the commit it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    started_sent: bool,
    commit: String,
}

/// The connection, as far as the core knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No connection; dial at `next_dial`.
    Down { next_dial: Instant },
    /// [`Action::Dial`] was emitted; waiting for its outcome.
    Dialing,
    /// Handshaken. Without any frame for `silence_limit` the dispatcher is
    /// presumed gone (its pings stopped).
    Up {
        silence_limit: Option<Duration>,
        last_heard: Instant,
    },
}

/// How far shutdown has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking work.
    Serving,
    /// No new job starts; running ones are cancelled at `deadline`.
    Draining {
        deadline: Option<Instant>,
        immediate: bool,
    },
    /// Nothing runs any more; results are being delivered until
    /// `deadline`.
    Flushing { deadline: Instant },
    /// The shell may close the connection and return.
    Done,
}

/// The runner's session state machine. See the module documentation. Its
/// `Debug` shows no token.
#[derive(Debug)]
pub struct RunnerCore {
    /// Who the runner is (name, slots, labels, repositories); the token and
    /// the leases are added at each dial.
    hello: Hello,
    token: Option<Secret>,
    drain_timeout: Duration,
    backoff: Backoff,
    link: Link,
    phase: Phase,
    queued: VecDeque<Assign>,
    running: BTreeMap<LeaseKey, Running>,
    /// Results of jobs that never ran, on their way into the outbox.
    storing: BTreeSet<LeaseKey>,
    /// Results in the outbox, waiting for `ResultAck`.
    results: BTreeMap<LeaseKey, Stamped>,
    retained: BTreeMap<LeaseKey, Retained>,
    /// `Resend` requests waiting for their time, on this connection.
    resends: BTreeMap<LeaseKey, PendingResend>,
    /// The store epoch the leases held belong to (a result in `results`
    /// may say otherwise until the next `Welcome` drops it); empty while
    /// unknown.
    epoch: String,
    /// Jobs of another epoch (or another commit) being killed, or results
    /// of such being stored: their end is forgotten, never reported. They
    /// still take their slot until they end.
    abandoned: BTreeSet<LeaseKey>,
    /// Running jobs being killed because the shutdown cut them off: their
    /// end is handed back, not reported.
    cut_off: BTreeSet<LeaseKey>,
    actions: VecDeque<Action>,
}

impl RunnerCore {
    /// A core for the runner `config` describes, whose unacknowledged
    /// results are `pending` (from the outbox at start-up); it dials at
    /// once.
    pub fn new(config: &Config, backoff: Backoff, pending: Vec<Stamped>, now: Instant) -> Self {
        let mut hello = Hello::new(Role::Runner, config.name.clone());
        hello.slots = config.slots;
        hello.labels = config.labels.clone();
        hello.repos = config.repos.clone();
        // Normally one epoch; after a crash mid-drop, older ones too: the
        // newest result's is the one the leases are listed under.
        let epoch = pending
            .iter()
            .rev()
            .find(|p| !p.epoch.is_empty())
            .map(|p| p.epoch.clone())
            .unwrap_or_default();
        let mut core = RunnerCore {
            hello,
            token: config.token.clone(),
            drain_timeout: config.drain_timeout,
            backoff,
            link: Link::Down { next_dial: now },
            phase: Phase::Serving,
            queued: VecDeque::new(),
            running: BTreeMap::new(),
            storing: BTreeSet::new(),
            results: pending
                .into_iter()
                .map(|p| ((p.result.job_id, p.result.attempt), p))
                .collect(),
            retained: BTreeMap::new(),
            resends: BTreeMap::new(),
            epoch,
            abandoned: BTreeSet::new(),
            cut_off: BTreeSet::new(),
            actions: VecDeque::new(),
        };
        core.advance(now);
        core
    }

    /// Feeds one event; then fires whatever is due at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Connected(welcome) => self.on_connected(&welcome, now),
            Event::DialFailed(reason) => self.on_dial_failed(&reason, now),
            Event::NoLeaderYet(reason) => self.on_no_leader_yet(&reason, now),
            Event::Disconnected { reason, unsent } => self.on_disconnected(&reason, unsent, now),
            Event::Frame(msg) => self.on_frame(msg, now),
            Event::Job(event) => self.on_job_event(event),
            Event::Shutdown(Stop::Graceful) => self.drain(now),
            Event::Shutdown(Stop::Immediate) => self.stop_now(),
            Event::Tick => {}
        }
        self.advance(now);
    }

    /// The next thing the shell must do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the core next needs [`Event::Tick`] (a dial, a silence limit,
    /// the drain or flush deadline); `None` to wait for events only.
    pub fn deadline(&self) -> Option<Instant> {
        let link = match self.link {
            Link::Down { next_dial } => Some(next_dial),
            Link::Dialing => None,
            Link::Up {
                silence_limit,
                last_heard,
            } => {
                let silence = silence_limit.map(|limit| last_heard + limit);
                let resend = self.resends.values().map(|r| r.due).min();
                [silence, resend].into_iter().flatten().min()
            }
        };
        let phase = match self.phase {
            Phase::Draining { deadline, .. } => deadline,
            // Results still being stored end the flush when they arrive.
            Phase::Flushing { deadline } if self.storing.is_empty() => Some(deadline),
            Phase::Serving | Phase::Flushing { .. } | Phase::Done => None,
        };
        match self.phase {
            Phase::Done => None,
            _ => [link, phase].into_iter().flatten().min(),
        }
    }

    /// Whether the run is over: nothing runs, and the results were
    /// delivered or the flush deadline passed (the outbox keeps them).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether `key` is held in any state (queued, running, being stored,
    /// waiting for its ack).
    fn holds(&self, key: LeaseKey) -> bool {
        self.running.contains_key(&key)
            || self.storing.contains(&key)
            || self.results.contains_key(&key)
            || self.queued.iter().any(|a| (a.job_id, a.attempt) == key)
    }

    /// Every lease held under the core's epoch, sorted: what a `Hello`
    /// lists.
    fn leases(&self) -> Vec<LeaseKey> {
        let mut leases: Vec<LeaseKey> = self
            .running
            .keys()
            .chain(self.storing.iter())
            .chain(
                self.results
                    .iter()
                    .filter(|(_, p)| p.epoch.is_empty() || p.epoch == self.epoch)
                    .map(|(key, _)| key),
            )
            .copied()
            .chain(self.queued.iter().map(|a| (a.job_id, a.attempt)))
            .collect();
        leases.sort_unstable();
        leases.dedup();
        leases
    }

    /// The store epoch the held leases belong to; empty while unknown.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Leases whose results wait for their `ResultAck`.
    #[cfg(test)]
    fn unacknowledged(&self) -> Vec<LeaseKey> {
        self.results.keys().copied().collect()
    }

    fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// Panics when an invariant of the module documentation is broken.
    #[cfg(test)]
    fn check_invariants(&self) {
        assert!(
            self.running.len() <= self.hello.slots as usize,
            "{} jobs run on {} slots",
            self.running.len(),
            self.hello.slots
        );
        for (key, held) in &self.results {
            if self.is_connected() && !self.epoch.is_empty() {
                assert_eq!(
                    held.epoch, self.epoch,
                    "result {key:?} of another epoch kept"
                );
            }
        }
        let mut seen = BTreeSet::new();
        let all = self
            .running
            .keys()
            .chain(self.storing.iter())
            .chain(self.results.keys())
            .copied()
            .chain(self.queued.iter().map(|a| (a.job_id, a.attempt)));
        for key in all {
            assert!(seen.insert(key), "lease {key:?} held twice");
        }
        for key in &self.cut_off {
            assert!(
                self.running.contains_key(key),
                "cut-off {key:?} not running"
            );
        }
        if self.phase == Phase::Done {
            assert!(self.running.is_empty(), "done with jobs running");
            assert!(self.storing.is_empty(), "done with results being stored");
        }
    }

    fn hello(&self) -> Hello {
        let mut hello = self.hello.clone();
        if let Some(token) = &self.token {
            hello.token = token.expose().clone();
        }
        hello.leases = self
            .leases()
            .into_iter()
            .map(|(job_id, attempt)| Lease { job_id, attempt })
            .collect();
        if !hello.leases.is_empty() {
            hello.epoch.clone_from(&self.epoch);
        }
        hello
    }

    /// Queues a frame if a connection is up; a frame for a link that is
    /// down is simply not sent (resending covers what matters).
    fn send(&mut self, frame: impl Into<Envelope>) -> bool {
        if !self.is_connected() {
            return false;
        }
        self.actions.push_back(Action::Send(frame.into()));
        true
    }

    fn on_connected(&mut self, welcome: &Welcome, now: Instant) {
        if self.link != Link::Dialing {
            tracing::warn!("a connection nobody dialled; ignored");
            return;
        }
        tracing::info!(session = %welcome.session_id, dispatcher = %welcome.server_version, "connected to the dispatcher");
        self.backoff.reset();
        // Several missed pings, and never less than the runner timeout the
        // dispatcher itself applies to us.
        let silence_limit = (welcome.heartbeat_interval_ms > 0).then(|| {
            let beats = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms) * 4);
            beats.max(Duration::from_millis(u64::from(welcome.runner_timeout_ms)))
        });
        self.link = Link::Up {
            silence_limit,
            last_heard: now,
        };
        // An empty epoch is a dispatcher that predates epochs (or a
        // standby): nothing can be checked against it.
        if !welcome.epoch.is_empty() {
            self.enter_epoch(&welcome.epoch);
        }
        self.resend();
        if self.phase != Phase::Serving {
            self.announce_drain(now);
        }
    }

    /// Welcomed under `epoch`: everything held from another epoch is
    /// dropped (see the module documentation). Results from before epochs
    /// are kept and take this one: nothing tells where they came from, and
    /// their commit check is the dispatcher's.
    fn enter_epoch(&mut self, epoch: &str) {
        if !self.epoch.is_empty() && self.epoch != epoch {
            let old = std::mem::take(&mut self.epoch);
            tracing::warn!(
                old_epoch = %old,
                epoch,
                "the dispatcher's store epoch changed (restored from a backup, or replaced): \
                 dropping every lease and result of the old epoch"
            );
            for assign in std::mem::take(&mut self.queued) {
                self.drop_lease((assign.job_id, assign.attempt), "not started", &old, epoch);
            }
            for key in self.running.keys().copied().collect::<Vec<_>>() {
                self.abandon(key, "running; killed", &old, epoch);
            }
            for key in std::mem::take(&mut self.storing) {
                self.abandoned.insert(key);
                self.drop_lease(key, "its result being stored", &old, epoch);
            }
        }
        let foreign: Vec<(LeaseKey, String)> = self
            .results
            .iter()
            .filter(|(_, p)| !p.epoch.is_empty() && p.epoch != epoch)
            .map(|(key, p)| (*key, p.epoch.clone()))
            .collect();
        for (key, old) in foreign {
            self.results.remove(&key);
            self.drop_lease(key, "its result unacknowledged", &old, epoch);
            self.actions.push_back(Action::Forget {
                job_id: key.0,
                attempt: key.1,
            });
        }
        for held in self.results.values_mut() {
            if held.epoch.is_empty() {
                held.epoch = epoch.to_owned();
            }
        }
        self.epoch = epoch.to_owned();
    }

    /// Logs a lease given up because it belongs to another epoch (or, with
    /// the same epoch, another commit) and forgets its retained log.
    fn drop_lease(&mut self, key: LeaseKey, what: &str, old: &str, epoch: &str) {
        tracing::warn!(
            job = key.0,
            attempt = key.1,
            lease_epoch = %old,
            epoch,
            "dropped a lease the dispatcher's store no longer knows ({what}): its job id may name another commit now"
        );
        self.retained.remove(&key);
        // A resend the dispatcher asked for belongs to the dropped lease.
        self.resends.remove(&key);
    }

    /// Kills a running job whose lease is dropped; its end is not reported.
    fn abandon(&mut self, key: LeaseKey, what: &str, old: &str, epoch: &str) {
        self.running.remove(&key);
        self.cut_off.remove(&key);
        self.abandoned.insert(key);
        self.drop_lease(key, what, old, epoch);
        self.actions.push_back(Action::Cancel {
            job_id: key.0,
            attempt: key.1,
            reason: "its lease belongs to another life of the dispatcher's store".into(),
        });
    }

    /// After a handshake: what the dispatcher may have missed. Logs are
    /// idempotent by offset, results by (job, attempt), `Started` is sent
    /// for the jobs it has not been sent for yet.
    fn resend(&mut self) {
        let unstarted: Vec<LeaseKey> = self
            .running
            .iter()
            .filter(|(_, running)| !running.started_sent)
            .map(|(key, _)| *key)
            .collect();
        for (job_id, attempt) in unstarted {
            self.send(Started { job_id, attempt });
            self.mark_started((job_id, attempt), true);
        }
        let mut frames = Vec::new();
        for (key, retained) in &self.retained {
            if retained.dropped > 0 {
                tracing::warn!(
                    job = key.0,
                    attempt = key.1,
                    bytes = retained.dropped,
                    "the oldest log output was dropped while disconnected"
                );
            }
            frames.extend(retained.chunks.iter().cloned().map(Envelope::from));
        }
        frames.extend(
            self.results
                .values()
                .map(|p| Envelope::from(p.result.clone())),
        );
        for frame in frames {
            self.send(frame);
        }
    }

    fn mark_started(&mut self, key: LeaseKey, sent: bool) {
        if let Some(running) = self.running.get_mut(&key) {
            running.started_sent = sent;
        }
    }

    fn on_no_leader_yet(&mut self, reason: &str, now: Instant) {
        if self.link != Link::Dialing {
            return;
        }
        // Not a growing backoff: the standby takes over within a term, and
        // every pause past that is the jobs' logs and results waiting.
        tracing::info!(error = %reason, retry_in = ?FAILOVER_RETRY, "no dispatcher leads yet (a failover); dialling again soon");
        self.link = Link::Down {
            next_dial: now + FAILOVER_RETRY,
        };
    }

    fn on_dial_failed(&mut self, reason: &str, now: Instant) {
        if self.link != Link::Dialing {
            return;
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %reason, retry_in = ?delay, "cannot reach the dispatcher");
        self.link = Link::Down {
            next_dial: now + delay,
        };
    }

    /// The shell lost the connection: nothing queued for it will be
    /// written, and a `Started` among that must go out again after the
    /// next handshake.
    fn on_disconnected(&mut self, reason: &str, unsent: Option<Envelope>, now: Instant) {
        if !self.is_connected() {
            return;
        }
        let mut dropped: Vec<Envelope> = unsent.into_iter().collect();
        self.actions.retain(|action| match action {
            Action::Send(frame) => {
                dropped.push(frame.clone());
                false
            }
            _ => true,
        });
        for frame in dropped {
            if let Some(Msg::Started(started)) = frame.msg {
                self.mark_started((started.job_id, started.attempt), false);
            }
        }
        self.link_lost(reason, now);
    }

    /// Closes the connection on our side, after the frames queued for it.
    fn disconnect(&mut self, reason: &str, now: Instant) {
        if self.is_connected() {
            self.link_lost(reason, now);
            self.actions.push_back(Action::Disconnect);
        }
    }

    fn link_lost(&mut self, reason: &str, now: Instant) {
        // The next handshake resends everything the dispatcher may lack.
        self.resends.clear();
        tracing::warn!(
            reason,
            "disconnected from the dispatcher; jobs keep running"
        );
        // A short, jittered pause so a restarted dispatcher is not stormed.
        let delay = self.backoff.next_delay();
        self.link = Link::Down {
            next_dial: now + delay,
        };
    }

    fn on_frame(&mut self, msg: Msg, now: Instant) {
        if let Link::Up { last_heard, .. } = &mut self.link {
            *last_heard = now;
        }
        match msg {
            Msg::Ping(ping) => {
                self.send(Pong { seq: ping.seq });
            }
            Msg::Assign(assign) => self.on_assign(assign),
            Msg::Cancel(cancel) => self.on_cancel((cancel.job_id, cancel.attempt)),
            Msg::ResultAck(ack) => {
                self.on_ack((ack.job_id, ack.attempt), ack.accepted, &ack.message);
            }
            Msg::Resend(resend) => self.on_resend(&resend, now),
            Msg::Error(error) => {
                let reason = format!(
                    "the dispatcher reported a protocol error: {}",
                    error.message
                );
                self.disconnect(&reason, now);
            }
            other => {
                let name = other.name();
                self.send(surveil_proto::Error {
                    message: format!("a runner does not accept {name}"),
                });
                self.disconnect(&format!("unexpected {name} from the dispatcher"), now);
            }
        }
    }

    fn on_assign(&mut self, assign: Assign) {
        let key = (assign.job_id, assign.attempt);
        let span =
            tracing::info_span!("job", job = key.0, attempt = key.1, commit = %assign.commit);
        let _entered = span.enter();
        if self.holds(key) {
            match self.held_commit(key) {
                Some(held) if !held.is_empty() && held != assign.commit => {
                    // The same epoch handed this (job, attempt) out for
                    // another commit: the store was restored without the
                    // restore step. The held one is not this job.
                    tracing::warn!(held_commit = %held, "assignment of a held lease for another commit: the store lost the one held");
                    let epoch = self.epoch.clone();
                    self.drop_held(key, &epoch);
                }
                _ => {
                    tracing::info!("assignment of a job already held: not run again");
                    return;
                }
            }
        }
        if !self.hello.repos.contains(&assign.repo) {
            tracing::warn!(repo = %assign.repo, "refused: repository not in this runner's REPO list");
            let message = format!(
                "runner {} does not build repository {} (its REPO list: {})",
                self.hello.name,
                assign.repo,
                self.hello.repos.join(", ")
            );
            let mut refused = job::error_result(key.0, key.1, message);
            refused.commit = assign.commit;
            self.store(refused);
            return;
        }
        if self.phase != Phase::Serving {
            tracing::info!("assignment during drain: handed back, not started");
            self.hand_back(key, false, "assigned while it drained; never started");
            return;
        }
        self.queued.push_back(assign);
    }

    fn on_cancel(&mut self, key: LeaseKey) {
        if self.running.contains_key(&key) {
            tracing::info!(job = key.0, attempt = key.1, "cancel from the dispatcher");
            self.actions.push_back(Action::Cancel {
                job_id: key.0,
                attempt: key.1,
                reason: "cancelled by the dispatcher".into(),
            });
        } else if let Some(assign) = self
            .queued
            .iter()
            .position(|a| (a.job_id, a.attempt) == key)
            .and_then(|pos| self.queued.remove(pos))
        {
            self.store(JobFinished {
                job_id: key.0,
                attempt: key.1,
                status: JobStatus::Cancelled as i32,
                message: "cancelled by the dispatcher before it started".into(),
                tasks: vec![],
                infrastructure: false,
                commit: assign.commit,
            });
        } else {
            // Finished already (its result is resent until acked) or
            // unknown: nothing runs that could be stopped.
            tracing::debug!(job = key.0, attempt = key.1, "cancel for no running job");
        }
    }

    /// The dispatcher could not record a report: keep the connection and
    /// send it again after the pause it asks for. Requests for the same
    /// attempt merge (the earliest log offset, every flag, the latest
    /// pause).
    fn on_resend(&mut self, resend: &Resend, now: Instant) {
        let key = (resend.job_id, resend.attempt);
        if !self.holds(key) {
            tracing::debug!(
                job = key.0,
                attempt = key.1,
                "resend of an attempt not held"
            );
            return;
        }
        tracing::warn!(
            job = key.0,
            attempt = key.1,
            reason = %resend.message,
            retry_after_ms = resend.retry_after_ms,
            "the dispatcher could not record a report; sending it again"
        );
        let wait = Duration::from_millis(u64::from(resend.retry_after_ms)).min(MAX_RESEND_WAIT);
        let entry = self.resends.entry(key).or_insert(PendingResend {
            due: now,
            log_offset: None,
            result: false,
            started: false,
        });
        entry.due = entry.due.max(now + wait);
        entry.log_offset = match (entry.log_offset, resend.log_offset) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        entry.result |= resend.result;
        entry.started |= resend.started;
    }

    /// Sends the `Resend` requests whose time has come.
    fn fire_resends(&mut self, now: Instant) {
        if !self.is_connected() {
            return;
        }
        let due: Vec<(LeaseKey, PendingResend)> = self
            .resends
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(k, r)| (*k, *r))
            .collect();
        for (key, resend) in due {
            self.resends.remove(&key);
            if resend.started && self.holds(key) {
                self.send(Started {
                    job_id: key.0,
                    attempt: key.1,
                });
            }
            if let Some(offset) = resend.log_offset {
                for chunk in self.log_from(key, offset) {
                    self.send(chunk);
                }
            }
            if resend.result
                && let Some(result) = self.results.get(&key).map(|p| p.result.clone())
            {
                self.send(result);
            }
        }
    }

    /// The retained chunks of `key`'s log from `offset` on. When the
    /// oldest retained chunk starts past it (the output in between was
    /// dropped to bound memory), a SYSTEM note saying so comes first, at
    /// `offset` and no longer than the hole: the dispatcher's gap is
    /// filled (it takes later chunks again) and a reader of the log learns
    /// why it stops there.
    fn log_from(&self, key: LeaseKey, offset: u64) -> Vec<Log> {
        let Some(retained) = self.retained.get(&key) else {
            return Vec::new();
        };
        let chunks: Vec<Log> = retained
            .chunks
            .iter()
            .filter(|c| c.offset + c.data.len() as u64 > offset)
            .cloned()
            .collect();
        let Some(first) = chunks.first() else {
            return chunks;
        };
        if first.offset <= offset {
            return chunks;
        }
        let hole = usize::try_from(first.offset - offset).unwrap_or(usize::MAX);
        let note = format!(
            "\n[surveil] {hole} bytes of output were lost: the dispatcher could not store them and the runner no longer held them\n"
        );
        let mut data = note.into_bytes();
        data.truncate(hole);
        let mut all = vec![Log {
            job_id: key.0,
            attempt: key.1,
            task: first.task,
            stream: Stream::System as i32,
            offset,
            data: data.into(),
        }];
        all.extend(chunks);
        all
    }

    fn on_ack(&mut self, key: LeaseKey, accepted: bool, message: &str) {
        if self.results.remove(&key).is_none() {
            // Perhaps of a dropped result whose (job, attempt) runs again
            // for another commit: that run's log stays retained.
            tracing::debug!(job = key.0, attempt = key.1, "ack for a result not held");
            return;
        }
        self.retained.remove(&key);
        self.resends.remove(&key);
        if accepted {
            tracing::info!(
                job = key.0,
                attempt = key.1,
                "result recorded by the dispatcher"
            );
        } else {
            tracing::warn!(
                job = key.0,
                attempt = key.1,
                reason = %message,
                "dispatcher refused the result (the attempt was revoked); dropped"
            );
        }
        self.actions.push_back(Action::Forget {
            job_id: key.0,
            attempt: key.1,
        });
    }

    /// A result for a job that never ran: through the outbox like any other.
    fn store(&mut self, result: JobFinished) {
        self.storing.insert((result.job_id, result.attempt));
        self.actions.push_back(Action::Store {
            result,
            epoch: self.epoch.clone(),
        });
    }

    /// The commit a held lease builds, if the core knows it.
    fn held_commit(&self, key: LeaseKey) -> Option<&str> {
        if let Some(running) = self.running.get(&key) {
            return Some(&running.commit);
        }
        if let Some(held) = self.results.get(&key) {
            return Some(&held.result.commit);
        }
        self.queued
            .iter()
            .find(|a| (a.job_id, a.attempt) == key)
            .map(|a| a.commit.as_str())
    }

    /// Gives up a held lease that is not the dispatcher's any more, in
    /// whatever state it is.
    fn drop_held(&mut self, key: LeaseKey, epoch: &str) {
        let old = self.epoch.clone();
        if self.running.contains_key(&key) {
            self.abandon(key, "running; killed", &old, epoch);
        } else if self.storing.remove(&key) {
            self.abandoned.insert(key);
            self.drop_lease(key, "its result being stored", &old, epoch);
        } else if self.results.remove(&key).is_some() {
            self.drop_lease(key, "its result unacknowledged", &old, epoch);
            self.actions.push_back(Action::Forget {
                job_id: key.0,
                attempt: key.1,
            });
        } else {
            self.queued.retain(|a| (a.job_id, a.attempt) != key);
            self.drop_lease(key, "not started", &old, epoch);
        }
    }

    fn on_job_event(&mut self, event: JobEvent) {
        match event {
            JobEvent::Started(started) => {
                let key = (started.job_id, started.attempt);
                if self.running.contains_key(&key) {
                    let sent = self.send(started);
                    self.mark_started(key, sent);
                }
            }
            JobEvent::Log(log) => {
                let key = (log.job_id, log.attempt);
                if self.running.contains_key(&key) {
                    self.retained.entry(key).or_default().push(log.clone());
                    self.send(log);
                }
            }
            JobEvent::Finished(result) => {
                let key = (result.job_id, result.attempt);
                if self.abandoned.remove(&key) {
                    // Killed because its lease was dropped: the result is
                    // another store life's, and leaves the outbox unsent.
                    tracing::info!(
                        job = key.0,
                        attempt = key.1,
                        "a dropped lease's job ended; its result is discarded"
                    );
                    self.actions.push_back(Action::Forget {
                        job_id: key.0,
                        attempt: key.1,
                    });
                    return;
                }
                let cut_off = self.cut_off.remove(&key);
                self.running.remove(&key);
                if cut_off && result.status == JobStatus::Cancelled as i32 {
                    self.retained.remove(&key);
                    self.resends.remove(&key);
                    self.actions.push_back(Action::Forget {
                        job_id: key.0,
                        attempt: key.1,
                    });
                    self.hand_back(key, true, &result.message);
                    return;
                }
                self.storing.remove(&key);
                // Even a lease the core did not know: the result is in the
                // outbox, and losing it is the one thing not allowed.
                self.results.insert(
                    key,
                    Stamped {
                        result: result.clone(),
                        epoch: self.epoch.clone(),
                    },
                );
                self.send(result);
            }
        }
    }

    /// The first shutdown signal.
    fn drain(&mut self, now: Instant) {
        if self.phase != Phase::Serving {
            return;
        }
        tracing::info!(
            running = self.running.len(),
            not_started = self.queued.len(),
            drain_timeout = ?self.drain_timeout,
            "draining: running jobs may finish, no new job starts"
        );
        self.phase = Phase::Draining {
            deadline: Some(now + self.drain_timeout),
            immediate: false,
        };
        self.announce_drain(now);
    }

    /// Tells the dispatcher the runner drains (it assigns nothing more) and
    /// hands back the leases not started: on entering the drain, and on
    /// every connection made during it.
    fn announce_drain(&mut self, now: Instant) {
        if !self.is_connected() {
            return;
        }
        let deadline_ms = match self.phase {
            Phase::Draining {
                deadline: Some(deadline),
                ..
            } => u64::try_from(deadline.saturating_duration_since(now).as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            _ => 0,
        };
        self.send(Drain { deadline_ms });
        for assign in std::mem::take(&mut self.queued) {
            let key = (assign.job_id, assign.attempt);
            if self.abandoned.contains(&key) {
                self.queued.push_back(assign);
                continue;
            }
            self.hand_back(key, false, "never started");
        }
    }

    /// Gives a lease back to the dispatcher without a result. The core
    /// holds it no longer, sent or not (see the module documentation).
    fn hand_back(&mut self, key: LeaseKey, started: bool, what: &str) {
        let reason = format!("runner {} shutting down: {what}", self.hello.name);
        let sent = self.send(HandBack {
            job_id: key.0,
            attempt: key.1,
            started,
            reason,
        });
        if sent {
            tracing::info!(
                job = key.0,
                attempt = key.1,
                started,
                "lease handed back to the dispatcher, which queues the job again"
            );
        } else {
            tracing::warn!(
                job = key.0,
                attempt = key.1,
                started,
                "not connected: the lease is given up; the dispatcher queues the job again when it expires"
            );
        }
    }

    /// The second shutdown signal: running jobs are cancelled at once.
    fn stop_now(&mut self) {
        let cancel = match self.phase {
            Phase::Serving => true,
            Phase::Draining { deadline, .. } => deadline.is_some(),
            Phase::Flushing { .. } | Phase::Done => false,
        };
        if let Phase::Serving | Phase::Draining { .. } = self.phase {
            self.phase = Phase::Draining {
                deadline: None,
                immediate: true,
            };
        }
        if cancel {
            self.cancel_all("runner stopped at once by a second shutdown signal");
        }
    }

    /// Kills every running job for the shutdown: their ends are handed
    /// back (see the module documentation).
    fn cancel_all(&mut self, reason: &str) {
        for &(job_id, attempt) in self.running.keys() {
            self.cut_off.insert((job_id, attempt));
            self.actions.push_back(Action::Cancel {
                job_id,
                attempt,
                reason: reason.to_owned(),
            });
        }
    }

    /// Fires what is due at `now`: the silence limit, the drain deadline,
    /// queued jobs into free slots, the end of the run, the next dial.
    fn advance(&mut self, now: Instant) {
        if let Link::Up {
            silence_limit: Some(limit),
            last_heard,
        } = self.link
            && now >= last_heard + limit
        {
            self.disconnect("nothing heard from the dispatcher for too long", now);
        }
        if let Phase::Draining {
            deadline: Some(deadline),
            immediate,
        } = self.phase
            && now >= deadline
        {
            self.phase = Phase::Draining {
                deadline: None,
                immediate,
            };
            let reason = format!(
                "runner shut down: the job did not finish within the drain timeout ({})",
                humantime::format_duration(self.drain_timeout)
            );
            self.cancel_all(&reason);
        }
        self.fire_resends(now);
        self.start_queued();
        self.advance_shutdown(now);
        if let Link::Down { next_dial } = self.link
            && now >= next_dial
            && self.phase != Phase::Done
        {
            self.actions.push_back(Action::Dial(self.hello()));
            self.link = Link::Dialing;
        }
    }

    fn start_queued(&mut self) {
        // A dropped job still being killed keeps its slot, and a new
        // assignment of its (job, attempt) waits until it has ended (they
        // would share a work directory and an outbox file).
        while self.phase == Phase::Serving
            && self.running.len() + self.abandoned.len() < self.hello.slots as usize
        {
            let Some(pos) = self
                .queued
                .iter()
                .position(|a| !self.abandoned.contains(&(a.job_id, a.attempt)))
            else {
                return;
            };
            let Some(assign) = self.queued.remove(pos) else {
                return;
            };
            let key = (assign.job_id, assign.attempt);
            self.running.insert(
                key,
                Running {
                    started_sent: false,
                    commit: assign.commit.clone(),
                },
            );
            self.actions.push_back(Action::Start {
                assign,
                epoch: self.epoch.clone(),
            });
        }
    }

    fn advance_shutdown(&mut self, now: Instant) {
        match self.phase {
            Phase::Draining { immediate, .. }
                if self.running.is_empty()
                    && self.storing.is_empty()
                    && self.abandoned.is_empty() =>
            {
                if self.results.is_empty() {
                    return self.finish();
                }
                let flush = if immediate {
                    RESULT_FLUSH_TIMEOUT_IMMEDIATE
                } else {
                    RESULT_FLUSH_TIMEOUT
                };
                self.phase = Phase::Flushing {
                    deadline: now + flush,
                };
            }
            Phase::Flushing { deadline }
                if self.storing.is_empty() && (self.results.is_empty() || now >= deadline) =>
            {
                if !self.results.is_empty() {
                    tracing::warn!(
                        results = self.results.len(),
                        "leaving unacknowledged results in the outbox for the next start"
                    );
                }
                self.finish();
            }
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.phase = Phase::Done;
        if !self.queued.is_empty() {
            tracing::info!(
                jobs = ?self.queued.iter().map(|a| (a.job_id, a.attempt)).collect::<Vec<_>>(),
                "never started because of the shutdown; the dispatcher requeues them"
            );
        }
    }
}

#[cfg(test)]
mod tests;
