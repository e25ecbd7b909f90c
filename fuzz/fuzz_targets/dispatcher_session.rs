//! Fuzzes the dispatcher's handling of runner sessions through the very
//! code the service runs, minus its IO: the input is decoded into a
//! sequence of events — runners connecting (a `Hello`, possibly invalid),
//! disconnecting, sending frames (`Pong`, `Started`, `Log`, `JobFinished`
//! with any status numbers, `Error`, or a message a runner may not send),
//! commits submitted (new or known), store writes answering late or
//! failing, users cancelling, the clock advancing, scheduling passes and
//! dispatcher restarts.
//!
//! Frames go through `surveil_dispatcher::wire` (what a runner may send,
//! which fields are valid) and then `service::decide` and the scheduler,
//! exactly as the service calls them; the store's answers (the one part
//! replaced) come from a model of its rules: a result is recorded for the
//! live attempt, a resend is a duplicate, anything else is stale; writes
//! may fail or answer after other events.
//!
//! After every event it checks the scheduler's own invariants and, against
//! the model: at most one live lease per job, every lease held by a
//! connected runner, a final status given once and never changed, a
//! revoked attempt's `Started`, `Log` or result refused and the live one
//! accepted, a cancelled job ending `cancelled`, a job whose result is
//! being written neither requeued nor forgotten.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use surveil_dispatcher::domain::{
    Attempt, CommitId, FinalStatus, Job, JobId, JobStatus, RunnerReport, SessionId, Submitted,
};
use surveil_dispatcher::scheduler::{
    CancelOutcome, Effect, ResultDecision, Scheduler, SchedulerConfig,
};
use surveil_dispatcher::service::decide::{self, ReportDecision};
use surveil_dispatcher::store::RecordOutcome;
use surveil_dispatcher::wire::{self, ClientRequest};
use surveil_proto as proto;
use surveil_proto::{Msg, Role};

const NAMES: [&str; 3] = ["r0", "r1", "r2"];
const REPOS: [&str; 3] = ["/src/a", "/src/b", "https://example.com/c.git"];
/// Bounds that keep one input fast (the checks after each event are linear
/// in jobs and runners) while leaving room for long stories.
const MAX_EVENTS: usize = 96;
const MAX_JOBS: u64 = 24;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    // Running out of input just ends the story early.
    let _ = run(&mut u);
});

/// What the outside world knows, built only from the scheduler's effects
/// and decisions (as the store and the sessions would).
struct Model {
    start: Instant,
    now: Instant,
    config: SchedulerConfig,
    /// Jobs submitted so far have ids `1..next_job`.
    next_job: u64,
    next_session: u64,
    /// Sessions the scheduler has not disconnected, and their names.
    connected: HashMap<SessionId, &'static str>,
    /// The latest session of each runner name.
    by_name: HashMap<&'static str, SessionId>,
    /// job → its live attempt (assigned and neither requeued nor final).
    live: HashMap<JobId, Attempt>,
    /// job → highest attempt recorded as assigned (the store's `attempt`).
    assigned: HashMap<JobId, Attempt>,
    /// job → the runner named in its last `Assign` (the store's `runner`).
    runner_of: HashMap<JobId, String>,
    /// Running jobs a user asked to cancel (the scheduler forgets these on
    /// restart, and so does the model).
    cancelling: HashSet<JobId>,
    finals: HashMap<JobId, FinalStatus>,
    /// job → the attempt whose result the store holds.
    recorded: HashMap<JobId, Attempt>,
    /// Accepted results whose store write has not answered yet, oldest
    /// first.
    writing: Vec<(JobId, Attempt, FinalStatus)>,
    repo_of: HashMap<JobId, &'static str>,
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let config = SchedulerConfig {
        runner_timeout: Duration::from_millis(50 * (u64::from(u.arbitrary::<u8>()?) + 1)),
        max_attempts: match u.int_in_range(0..=4u8)? {
            0 => u32::MAX,
            n => u32::from(n),
        },
        // Past anything a fuzz case's ticks add up to.
        job_timeout: Duration::from_secs(24 * 3600),
        // Quarantines that start, end within a case's ticks, or never.
        quarantine_after: u32::from(u.int_in_range(0..=3u8)?),
        quarantine_for: Duration::from_millis(50 * (u64::from(u.arbitrary::<u8>()?) + 1)),
    };
    let start = Instant::now();
    let mut m = Model {
        start,
        now: start,
        config,
        next_job: 1,
        next_session: 1,
        connected: HashMap::new(),
        by_name: HashMap::new(),
        live: HashMap::new(),
        assigned: HashMap::new(),
        runner_of: HashMap::new(),
        cancelling: HashSet::new(),
        finals: HashMap::new(),
        recorded: HashMap::new(),
        writing: Vec::new(),
        repo_of: HashMap::new(),
    };
    let mut s = Scheduler::new(config);
    for _ in 0..MAX_EVENTS {
        if u.is_empty() {
            break;
        }
        step(u, &mut s, &mut m)?;
        absorb(&mut m, s.drain_effects());
        check(&s, &m);
    }
    Ok(())
}

fn step(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    match u.int_in_range(0..=11u8)? {
        0 | 1 => submit(u, s, m)?,
        2 => connect(u, s, m)?,
        // A connection closes (or broke): its leases are revoked at once.
        3 => {
            let session = pick_session(u, m)?;
            let was_connected = m.connected.contains_key(&session);
            s.handle_runner_disconnected(session, "connection closed", m.now);
            disconnected(m, session);
            if !was_connected {
                assert!(
                    s.drain_effects().is_empty(),
                    "a gone session's disconnect had effects"
                );
            }
        }
        4..=6 => frame(u, s, m)?,
        // The monitor's tick, after some time.
        7 => {
            let step = m.config.runner_timeout * 2;
            let ms = u.int_in_range(0..=u64::try_from(step.as_millis()).unwrap_or(u64::MAX))?;
            m.now += Duration::from_millis(ms);
            s.handle_tick(m.now);
        }
        8 => schedule(u, s, m)?,
        9 => store_answers(u, s, m)?,
        // The dispatcher closed a runner after failing to record its
        // report: its leases wait for it.
        10 => {
            let session = pick_session(u, m)?;
            s.handle_runner_released(session, m.now);
            disconnected(m, session);
            assert!(s.drain_effects().is_empty(), "a release decided something");
        }
        // A user cancels a job, or (rarely) the dispatcher restarts.
        _ => {
            if u.ratio(1, 6)? {
                restart(s, m);
            } else {
                cancel(u, s, m)?;
            }
        }
    }
    Ok(())
}

fn commit(id: JobId) -> String {
    format!("{:040x}", id.0)
}

/// The store's state of a known job, as the model knows it.
fn stored_status(m: &Model, id: JobId) -> JobStatus {
    match m.finals.get(&id) {
        Some(status) => JobStatus::Final(*status),
        None if m.live.contains_key(&id) => JobStatus::Running,
        None => JobStatus::Queued,
    }
}

/// An observer's `Submit` of new commits (or, sometimes, known ones),
/// through the wire and the service's decision, the store answering as
/// the model says.
fn submit(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let known = u.ratio(1, 4)? && m.next_job > 1;
    let repo = if known {
        None
    } else {
        Some(*u.choose(&REPOS)?)
    };
    let ids: Vec<JobId> = match repo {
        None => {
            let id = JobId(u.int_in_range(1..=m.next_job - 1)?);
            vec![id]
        }
        Some(_) => {
            let room = (MAX_JOBS + 1).saturating_sub(m.next_job);
            let n = u.int_in_range(1..=3u64)?.min(room);
            (m.next_job..m.next_job + n).map(JobId).collect()
        }
    };
    let Some(&first) = ids.first() else {
        return Ok(());
    };
    let repo = repo.unwrap_or_else(|| m.repo_of[&first]);
    let msg = Msg::Submit(proto::Submit {
        repo: repo.to_owned(),
        branch: "main".to_owned(),
        commits: ids.iter().map(|id| commit(*id)).collect(),
        ..proto::Submit::default()
    });
    let Ok(ClientRequest::Submit(submission)) = wire::client_request(Role::Observer, msg) else {
        panic!("a valid Submit was refused");
    };
    let rows: Vec<Submitted> = ids
        .iter()
        .map(|id| {
            let created = !m.repo_of.contains_key(id);
            Submitted {
                id: *id,
                created,
                status: if created {
                    JobStatus::Queued
                } else {
                    stored_status(m, *id)
                },
                branch: "main".to_owned(),
                ref_name: "refs/heads/main".to_owned(),
                attempt: m.assigned.get(id).copied().unwrap_or_default(),
            }
        })
        .collect();
    for row in rows.iter().filter(|r| r.created) {
        m.repo_of.insert(row.id, repo);
        m.next_job = m.next_job.max(row.id.0 + 1);
    }
    let before = s.counts();
    let queued = decide::submitted(s, &submission.repo, &submission.commits, &rows, m.now);
    if !rows.iter().any(|r| r.created) {
        assert!(
            !queued && s.counts() == before,
            "a known job was queued again"
        );
    }
    Ok(())
}

/// A runner's `Hello` through the handshake's checks, then the scheduler.
fn connect(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let name = *u.choose(&NAMES)?;
    let mut hello = proto::Hello::new(Role::Runner, name);
    hello.slots = match u.int_in_range(0..=5u8)? {
        0 => u32::MAX,
        n => u32::from(n - 1),
    };
    if u.ratio(1, 16)? {
        hello.name = " ".to_owned();
    }
    let mask = u.int_in_range(0..=7u8)?;
    hello.repos = REPOS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, r)| (*r).to_owned())
        .collect();
    for _ in 0..u.int_in_range(0..=4u8)? {
        let job = pick_job(u, m)?;
        let attempt = pick_attempt(u, m, job)?;
        hello.leases.push(proto::Lease {
            job_id: job.0,
            attempt: attempt.0,
        });
    }
    let Ok(checked) = wire::runner_hello(&hello, "127.0.0.1:40000".to_owned(), "") else {
        assert!(
            hello.slots == 0 || hello.name.trim().is_empty(),
            "a valid Hello refused"
        );
        return Ok(());
    };
    let session = SessionId(m.next_session);
    m.next_session += 1;
    let old = m.by_name.insert(name, session);
    m.connected.insert(session, name);
    s.handle_runner_connected(session, checked, m.now);
    let effects = s.drain_effects();
    if let Some(old) = old.filter(|o| m.connected.contains_key(o)) {
        assert!(
            effects.contains(&Effect::Disconnect {
                session: old,
                reason: format!("replaced by a new session of runner {name}"),
            }),
            "session {old} of {name} not disconnected when replaced"
        );
    }
    absorb(m, effects);
    Ok(())
}

/// A job id: usually one submitted (or the next), sometimes one no store
/// would hand out.
fn pick_job(u: &mut Unstructured<'_>, m: &Model) -> Result<JobId> {
    Ok(JobId(match u.int_in_range(0..=9u8)? {
        0 => 0,
        1 => u64::MAX,
        2 => u.arbitrary()?,
        _ => u.int_in_range(1..=m.next_job)?,
    }))
}

/// An attempt around the job's current one, or any value at all.
fn pick_attempt(u: &mut Unstructured<'_>, m: &Model, job: JobId) -> Result<Attempt> {
    let current = m.assigned.get(&job).copied().unwrap_or(Attempt(1)).0;
    Ok(Attempt(match u.int_in_range(0..=7u8)? {
        0 => 0,
        1 => u32::MAX,
        2 => u.arbitrary()?,
        3 => current.saturating_sub(1),
        4 => current.saturating_add(1),
        _ => current,
    }))
}

/// A connected runner's session, or a stale or never-seen one (a frame
/// already read from a connection the scheduler has since dropped).
fn pick_session(u: &mut Unstructured<'_>, m: &Model) -> Result<SessionId> {
    if u.ratio(1, 5)? {
        return Ok(SessionId(u.int_in_range(0..=m.next_session)?));
    }
    let name = *u.choose(&NAMES)?;
    Ok(m.by_name.get(name).copied().unwrap_or(SessionId(0)))
}

/// A frame a runner might send, as the protocol carries it.
fn runner_frame(u: &mut Unstructured<'_>, m: &Model) -> Result<Msg> {
    let job = pick_job(u, m)?;
    let attempt = pick_attempt(u, m, job)?;
    let status = |u: &mut Unstructured<'_>| -> Result<i32> {
        Ok(match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary()?,
            _ => u.int_in_range(-1..=8)?,
        })
    };
    Ok(match u.int_in_range(0..=9u8)? {
        0 => Msg::Pong(proto::Pong { seq: 1 }),
        1 => Msg::Started(proto::Started {
            job_id: job.0,
            attempt: attempt.0,
        }),
        2 | 3 => Msg::Log(proto::Log {
            job_id: job.0,
            attempt: attempt.0,
            task: 0,
            stream: u.int_in_range(0..=4)?,
            offset: u.int_in_range(0..=64)?,
            data: bytes::Bytes::from_static(b"output\n"),
        }),
        4..=6 => {
            let mut tasks = Vec::new();
            for _ in 0..u.int_in_range(0..=2u8)? {
                tasks.push(proto::TaskResult {
                    name: "unit".to_owned(),
                    status: u.int_in_range(0..=7)?,
                    ..proto::TaskResult::default()
                });
            }
            Msg::JobFinished(proto::JobFinished {
                job_id: job.0,
                attempt: attempt.0,
                status: status(u)?,
                message: "exit 1".to_owned(),
                tasks,
                // A fetch or checkout that failed on the runner's side.
                infrastructure: u.arbitrary()?,
                // No commit: the check of a result's commit against its job's
                // is the service tests' and the cluster story's.
                commit: String::new(),
            })
        }
        7 => Msg::Error(proto::Error {
            message: "bye".to_owned(),
        }),
        8 => Msg::Submit(proto::Submit::default()),
        _ => Msg::Ping(proto::Ping { seq: 1 }),
    })
}

/// A frame arrives from a session, handled as the runner session and the
/// service handle it.
fn frame(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let session = pick_session(u, m)?;
    let msg = runner_frame(u, m)?;
    let report = match wire::runner_report(msg) {
        Ok(report) => report,
        // A protocol error or the runner's Error: the session ends and its
        // leases are revoked.
        Err(_) => {
            s.handle_runner_disconnected(session, "protocol error", m.now);
            disconnected(m, session);
            return Ok(());
        }
    };
    // As the service does: effects decided before the report are applied
    // first.
    absorb(m, s.drain_effects());
    let alive = m.connected.contains_key(&session);
    let decision = decide::report(s, session, &report, m.now);
    if alive {
        let views = s.runners();
        let view = views
            .iter()
            .find(|v| v.session == session)
            .expect("connected");
        assert_eq!(view.last_seen, m.now, "a frame is a sign of life");
    }
    match (&report, decision) {
        (RunnerReport::Alive, decision) => assert_eq!(decision, ReportDecision::Ignore),
        (RunnerReport::Started { job, attempt } | RunnerReport::Log { job, attempt, .. }, d) => {
            let live = m.live.get(job) == Some(attempt);
            assert_eq!(
                d == ReportDecision::Persist,
                live,
                "Started/Log of job {job} attempt {attempt}: live is {:?}",
                m.live.get(job)
            );
        }
        (
            RunnerReport::Finished {
                job,
                attempt,
                result,
                ..
            },
            ReportDecision::Result(decision),
        ) => {
            result_decided(
                s,
                m,
                *job,
                *attempt,
                result.status,
                &result.message,
                decision,
            );
        }
        (report, decision) => panic!("{report:?} decided {decision:?}"),
    }
    Ok(())
}

fn result_decided(
    s: &mut Scheduler,
    m: &mut Model,
    job: JobId,
    attempt: Attempt,
    status: FinalStatus,
    message: &str,
    decision: ResultDecision,
) {
    let was_live = m.live.get(&job) == Some(&attempt);
    let in_flight = m.writing.iter().any(|w| w.0 == job && w.1 == attempt);
    match decision {
        ResultDecision::Accept {
            status: recorded,
            message: recorded_message,
        } => {
            assert!(
                was_live && !in_flight,
                "accepted job {job} attempt {attempt}"
            );
            let expected = if m.cancelling.contains(&job) {
                assert_eq!(recorded_message, format!("cancelled by a user: {message}"));
                FinalStatus::Cancelled
            } else {
                assert_eq!(recorded_message, message);
                status
            };
            assert_eq!(recorded, expected, "job {job} recorded with another status");
            m.writing.push((job, attempt, recorded));
        }
        ResultDecision::Pending => assert!(in_flight, "job {job}: pending without a write"),
        ResultDecision::Retried { .. } => {
            // An infrastructure failure of the live attempt: not a result
            // to record, but the attempt's loss (requeued or ended), which
            // the effects show and `absorb` checks.
            assert!(
                was_live && !in_flight,
                "retried job {job} attempt {attempt}"
            );
            assert!(
                !m.cancelling.contains(&job),
                "cancelled job {job} retried"
            );
            assert_eq!(status, FinalStatus::Error, "job {job} retried from {status:?}");
            absorb(m, s.drain_effects());
            assert!(!m.live.contains_key(&job), "job {job} still live after a retry");
        }
        ResultDecision::Revoked { message } => {
            assert!(!was_live, "refused the live attempt {attempt} of job {job}");
            assert!(!m.finals.contains_key(&job), "final job {job} not Unknown");
            assert!(message.contains("refused"), "{message}");
        }
        ResultDecision::Unknown => {
            assert!(!was_live, "live job {job} unknown");
            assert!(
                m.finals.contains_key(&job) || !(1..m.next_job).contains(&job.0),
                "active job {job} unknown"
            );
            // The store's answer, and the service's ack for it.
            let outcome = if m.recorded.get(&job) == Some(&attempt) {
                RecordOutcome::Duplicate
            } else {
                RecordOutcome::Stale
            };
            let ack = decide::result_recorded(s, job, attempt, outcome);
            assert_eq!(ack.accepted, outcome == RecordOutcome::Duplicate);
        }
    }
}

/// The scheduling pass; the store refuses some of its assignments.
fn schedule(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    s.schedule(m.now);
    let mut kept = Vec::new();
    let mut refused = false;
    for effect in s.drain_effects() {
        if let Effect::Assign { assignment, .. } = &effect
            && u.ratio(1, 8)?
        {
            assert!(
                s.handle_assign_failed(assignment.job, assignment.attempt),
                "a fresh assignment of job {} could not be undone",
                assignment.job
            );
            refused = true;
            continue;
        }
        kept.push(effect);
    }
    absorb(m, kept);
    absorb(m, s.drain_effects());
    // A refused assignment leaves its job queued until the next pass.
    if !refused && let Err(e) = s.check_no_idle_match() {
        panic!("after schedule: {e}");
    }
    Ok(())
}

/// The store answers the oldest result write in flight: recorded, or
/// failed (nothing durable; the job runs again).
fn store_answers(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    if m.writing.is_empty() {
        return Ok(());
    }
    let (job, attempt, status) = m.writing.remove(0);
    if u.ratio(1, 3)? {
        decide::result_failed(s, job, attempt, m.now);
        assert!(
            s.is_live(job, attempt),
            "job {job} not running again after a failed write"
        );
    } else {
        let ack = decide::result_recorded(s, job, attempt, RecordOutcome::Recorded);
        assert!(ack.accepted && ack.message.is_empty());
        assert!(
            !s.knows_job(job),
            "job {job} still tracked after its result"
        );
        m.cancelling.remove(&job);
        m.live.remove(&job);
        m.recorded.insert(job, attempt);
        let previous = m.finals.insert(job, status);
        assert!(previous.is_none(), "job {job} finished twice");
    }
    Ok(())
}

fn cancel(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let job = pick_job(u, m)?;
    let known = s.knows_job(job);
    let live = m.live.contains_key(&job);
    let writing = m.writing.iter().any(|w| w.0 == job);
    let outcome = s.handle_cancel(job, m.now);
    let expected = match (known, live, writing) {
        (false, _, _) => CancelOutcome::NotActive,
        (true, false, _) => CancelOutcome::Cancelled,
        (true, true, true) => CancelOutcome::Finishing,
        (true, true, false) => CancelOutcome::Cancelling,
    };
    assert_eq!(outcome, expected, "cancel of job {job}");
    if outcome == CancelOutcome::Cancelling {
        m.cancelling.insert(job);
    }
    if outcome == CancelOutcome::Cancelled {
        let effects = s.drain_effects();
        assert!(
            matches!(effects.as_slice(), [Effect::Finish { job: j, status: FinalStatus::Cancelled, .. }] if *j == job),
            "cancel of queued job {job}: {effects:?}"
        );
        absorb(m, effects);
    }
    Ok(())
}

/// The dispatcher restarts on the same store: every connection is gone,
/// writes in flight never committed; recovery runs as the service runs it.
fn restart(s: &mut Scheduler, m: &mut Model) {
    absorb(m, s.drain_effects());
    m.writing.clear();
    let mut unfinished = Vec::new();
    for id in (1..m.next_job).map(JobId) {
        if m.finals.contains_key(&id) {
            continue;
        }
        let running = m.live.contains_key(&id);
        unfinished.push(Job {
            id,
            repo: m.repo_of[&id].to_owned(),
            branch: "main".to_owned(),
            ref_name: "refs/heads/main".to_owned(),
            pull_request: None,
            commit: CommitId::parse(&commit(id)).expect("40 hex digits"),
            status: if running {
                JobStatus::Running
            } else {
                JobStatus::Queued
            },
            attempt: m.assigned.get(&id).copied().unwrap_or_default(),
            runner: running.then(|| m.runner_of[&id].clone()),
            message: None,
            queued_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            tasks: Vec::new(),
        });
    }
    *s = Scheduler::new(m.config);
    let (queued, running) = decide::recover(s, unfinished, m.now);
    assert_eq!(running, m.live.len(), "running jobs recovered");
    assert_eq!(queued + running, (1..m.next_job).count() - m.finals.len());
    m.connected.clear();
    m.by_name.clear();
    m.cancelling.clear();
}

fn disconnected(m: &mut Model, session: SessionId) {
    if let Some(name) = m.connected.remove(&session)
        && m.by_name.get(name) == Some(&session)
    {
        m.by_name.remove(name);
    }
}

/// Applies effects to the model, checking each as the service would meet
/// it (every assignment recorded).
fn absorb(m: &mut Model, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::Assign {
                session,
                runner,
                assignment,
            } => {
                let job = assignment.job;
                let attempt = assignment.attempt;
                let name = m.connected.get(&session);
                assert_eq!(
                    name.copied(),
                    Some(runner.as_str()),
                    "job {job} assigned to session {session}, not a connected runner of that name"
                );
                assert!(
                    !m.finals.contains_key(&job),
                    "job {job} assigned after final"
                );
                assert!(!m.live.contains_key(&job), "job {job} assigned while live");
                assert_eq!(assignment.repo, m.repo_of[&job]);
                assert_eq!(assignment.commit.as_str(), commit(job));
                let previous = m.assigned.insert(job, attempt).unwrap_or_default();
                assert_eq!(
                    attempt,
                    previous.next(),
                    "job {job}: attempt {previous} then {attempt}"
                );
                assert!(attempt.0 <= m.config.max_attempts);
                m.live.insert(job, attempt);
                m.runner_of.insert(job, runner);
            }
            Effect::Requeue { job, attempt, .. } => {
                assert_eq!(m.live.remove(&job), Some(attempt), "requeue of job {job}");
                assert!(!m.cancelling.contains(&job), "cancelled job {job} requeued");
                assert!(
                    !m.writing.iter().any(|w| w.0 == job),
                    "job {job} requeued while its result is being written"
                );
                assert!(
                    attempt.0 < m.config.max_attempts,
                    "job {job} requeued at the limit"
                );
            }
            Effect::Finish { job, status, .. } => {
                if m.cancelling.remove(&job) {
                    assert_eq!(status, FinalStatus::Cancelled, "cancelled job {job}");
                }
                assert!(
                    !m.writing.iter().any(|w| w.0 == job),
                    "job {job} finished while its result is being written"
                );
                m.live.remove(&job);
                let previous = m.finals.insert(job, status);
                assert!(previous.is_none(), "job {job} finished twice");
            }
            Effect::Cancel { session, .. } => {
                assert!(
                    m.connected.contains_key(&session),
                    "Cancel sent to gone session {session}"
                );
            }
            Effect::Disconnect { session, .. } => {
                assert!(
                    m.connected.contains_key(&session),
                    "Disconnect of gone session {session}"
                );
                disconnected(m, session);
            }
        }
    }
}

/// The invariants, after every event.
fn check(s: &Scheduler, m: &Model) {
    if let Err(e) = s.check_invariants() {
        panic!("{e}");
    }
    let sessions: BTreeSet<SessionId> = s.sessions().into_iter().collect();
    let expected: BTreeSet<SessionId> = m.connected.keys().copied().collect();
    assert_eq!(sessions, expected, "connected sessions");
    let mut holders: BTreeMap<JobId, SessionId> = BTreeMap::new();
    for view in s.runners() {
        assert_eq!(
            m.connected.get(&view.session).copied(),
            Some(view.name.as_str())
        );
        assert!(view.last_seen >= m.start && view.last_seen <= m.now);
        for job in view.running {
            let attempt = m.live.get(&job).copied();
            assert!(
                attempt.is_some(),
                "session {} holds job {job}, not live",
                view.session
            );
            assert_eq!(
                s.lease_holder(job, attempt.unwrap_or_default()),
                Some(view.session)
            );
            assert!(
                holders.insert(job, view.session).is_none(),
                "job {job} held twice"
            );
        }
    }
    let mut active = 0;
    for id in (1..m.next_job).map(JobId) {
        let final_ = m.finals.contains_key(&id);
        assert_ne!(
            s.knows_job(id),
            final_,
            "job {id}: known and final, or neither"
        );
        if !final_ {
            active += 1;
        }
        if let Some(&attempt) = m.live.get(&id) {
            assert!(
                s.is_live(id, attempt),
                "job {id} attempt {attempt} not live"
            );
        }
    }
    for (job, attempt, _) in &m.writing {
        assert!(s.is_live(*job, *attempt), "job {job} left while finishing");
    }
    let (queued, running) = s.counts();
    assert_eq!(running, m.live.len(), "running jobs");
    assert_eq!(queued + running, active, "active jobs");
}
