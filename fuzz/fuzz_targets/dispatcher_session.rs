//! Fuzzes the dispatcher's session handling of a frame sequence, at its
//! pure core: the input is decoded into a sequence of events — runners
//! connecting (name, slots, repositories, listed leases), disconnecting,
//! sending frames (`Pong`, `Started`, `Log`, `JobFinished` with any status,
//! or a message a runner may not send), jobs submitted, users cancelling,
//! the clock advancing, scheduling passes and dispatcher restarts — and
//! each event is applied to `surveil_dispatcher::scheduler::Scheduler`
//! exactly as `session.rs`, the monitor and start-up recovery apply them.
//!
//! After every event it checks the scheduler's own invariants and, against
//! a model built only from what the scheduler said (its effects and
//! decisions): at most one live lease per job, every lease held by a
//! connected runner, a final status given once and never changed, a
//! revoked attempt's `Started`, `Log` or result refused and the live one
//! accepted, a cancelled job ending `cancelled`. It does no IO: the store,
//! the sockets and the async tasks around the scheduler are not exercised.
//!
//! Which message a role may send is decided inline in the private
//! `session` module (not a function this crate can call), so that part of
//! the session is not fuzzed here.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use surveil_dispatcher::scheduler::{
    Attempt, CancelOutcome, Effect, JobId, JobSpec, ResultDecision, RunnerHello, Scheduler,
    SchedulerConfig, SessionId,
};
use surveil_proto::JobStatus;

const NAMES: [&str; 3] = ["r0", "r1", "r2"];
const REPOS: [&str; 3] = ["/src/a", "/src/b", "https://example.com/c.git"];
/// Bounds that keep one input fast (the checks after each event are linear
/// in jobs and runners) while leaving room for long stories.
const MAX_EVENTS: usize = 96;
const MAX_JOBS: JobId = 24;

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
    next_job: JobId,
    next_session: SessionId,
    /// Sessions the scheduler has not disconnected, and their names.
    connected: HashMap<SessionId, &'static str>,
    /// The latest session of each runner name.
    by_name: HashMap<&'static str, SessionId>,
    /// job → its live attempt (assigned and neither requeued nor final).
    live: HashMap<JobId, Attempt>,
    /// job → highest attempt ever assigned (the store's `attempt`).
    assigned: HashMap<JobId, Attempt>,
    /// job → the runner named in its last `Assign` (the store's `runner`).
    runner_of: HashMap<JobId, String>,
    /// Running jobs a user asked to cancel (the scheduler forgets these on
    /// restart, and so does the model).
    cancelling: HashSet<JobId>,
    finals: HashMap<JobId, JobStatus>,
    repo_of: HashMap<JobId, &'static str>,
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let config = SchedulerConfig {
        runner_timeout: Duration::from_millis(50 * (u64::from(u.arbitrary::<u8>()?) + 1)),
        max_attempts: match u.int_in_range(0..=4u8)? {
            0 => u32::MAX,
            n => u32::from(n),
        },
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
    match u.int_in_range(0..=9u8)? {
        // A job is durable in the store: submit it (or, as the redistributor
        // may, tell the scheduler about an active job again).
        0 | 1 => {
            if u.ratio(1, 8)? && m.next_job > 1 {
                let id = u.int_in_range(1..=m.next_job - 1)?;
                if s.knows_job(id) {
                    let before = s.counts();
                    let spec = spec(m, id, m.repo_of[&id]);
                    s.handle_job_submitted(spec, m.now);
                    assert_eq!(s.counts(), before, "a resubmitted job changed the queue");
                }
            } else if m.next_job <= MAX_JOBS {
                let id = m.next_job;
                m.next_job += 1;
                let repo = *u.choose(&REPOS)?;
                m.repo_of.insert(id, repo);
                let spec = spec(m, id, repo);
                s.handle_job_submitted(spec, m.now);
            }
        }
        // A runner completes its handshake (session.rs rejects a blank name
        // or zero slots before the scheduler hears of it).
        2 => {
            let name = *u.choose(&NAMES)?;
            let slots = match u.int_in_range(0..=4u8)? {
                0 => u32::MAX,
                n => u32::from(n),
            };
            let mask = u.int_in_range(0..=7u8)?;
            let repos = REPOS
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, r)| (*r).to_owned())
                .collect();
            let mut leases = Vec::new();
            for _ in 0..u.int_in_range(0..=4u8)? {
                let job = pick_job(u, m)?;
                leases.push((job, pick_attempt(u, m, job)?));
            }
            let session = m.next_session;
            m.next_session += 1;
            let old = m.by_name.insert(name, session);
            m.connected.insert(session, name);
            s.handle_runner_connected(
                RunnerHello {
                    session,
                    name: name.to_owned(),
                    addr: format!("127.0.0.1:{}", 40000 + session),
                    slots,
                    repos,
                    labels: vec![],
                    leases,
                },
                m.now,
            );
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
        }
        // A connection closes (or the peer said Error, or broke the
        // protocol): its leases are revoked at once.
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
        // A frame arrives from a session, handled as `run_runner` does.
        4..=6 => frame(u, s, m)?,
        // The monitor's tick, after some time.
        7 => {
            let step = m.config.runner_timeout * 2;
            let ms = u.int_in_range(0..=u64::try_from(step.as_millis()).unwrap_or(u64::MAX))?;
            m.now += Duration::from_millis(ms);
            s.handle_tick(m.now);
        }
        // The redistributor's scheduling pass.
        8 => {
            s.schedule(m.now);
            absorb(m, s.drain_effects());
            if let Err(e) = s.check_no_idle_match() {
                panic!("after schedule: {e}");
            }
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

fn spec(m: &Model, id: JobId, repo: &str) -> JobSpec {
    JobSpec {
        id,
        repo: repo.to_owned(),
        branch: "main".to_owned(),
        commit: format!("{id:040x}"),
        attempt: m.assigned.get(&id).copied().unwrap_or(0),
    }
}

/// A job id: usually one submitted (or the next), sometimes one no store
/// would hand out.
fn pick_job(u: &mut Unstructured<'_>, m: &Model) -> Result<JobId> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => 0,
        1 => u64::MAX,
        2 => u.arbitrary()?,
        _ => u.int_in_range(1..=m.next_job)?,
    })
}

/// An attempt around the job's current one, or any value at all.
fn pick_attempt(u: &mut Unstructured<'_>, m: &Model, job: JobId) -> Result<Attempt> {
    let current = m.assigned.get(&job).copied().unwrap_or(1);
    Ok(match u.int_in_range(0..=7u8)? {
        0 => 0,
        1 => u32::MAX,
        2 => u.arbitrary()?,
        3 => current.saturating_sub(1),
        4 => current.saturating_add(1),
        _ => current,
    })
}

/// A connected runner's session, or a stale or never-seen one (a frame
/// already read from a connection the scheduler has since dropped).
fn pick_session(u: &mut Unstructured<'_>, m: &Model) -> Result<SessionId> {
    if u.ratio(1, 5)? {
        return u.int_in_range(0..=m.next_session);
    }
    let name = *u.choose(&NAMES)?;
    Ok(m.by_name.get(name).copied().unwrap_or(0))
}

fn frame(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let session = pick_session(u, m)?;
    let alive = s.handle_frame(session, m.now);
    assert_eq!(
        alive,
        m.connected.contains_key(&session),
        "handle_frame({session}) disagrees with the sessions connected"
    );
    match u.int_in_range(0..=7u8)? {
        // Pong: the frame itself was the point.
        0 => {}
        // Started or Log: accepted only from the live attempt.
        1 | 2 => {
            let job = pick_job(u, m)?;
            let attempt = pick_attempt(u, m, job)?;
            let accepted = if u.arbitrary()? {
                s.handle_started(session, job, attempt, m.now)
            } else {
                s.handle_log(session, job, attempt, m.now)
            };
            assert_eq!(
                accepted,
                m.live.get(&job) == Some(&attempt),
                "Started/Log of job {job} attempt {attempt}: live is {:?}",
                m.live.get(&job)
            );
        }
        // JobFinished with any status number; a non-final one is a protocol
        // error that closes the connection.
        3..=5 => {
            let job = pick_job(u, m)?;
            let attempt = pick_attempt(u, m, job)?;
            let raw: i32 = match u.int_in_range(0..=3u8)? {
                0 => u.arbitrary()?,
                _ => u.int_in_range(-1..=8)?,
            };
            match JobStatus::try_from(raw).ok().filter(|st| st.is_final()) {
                Some(status) => result(s, m, session, job, attempt, status),
                None => {
                    s.handle_runner_disconnected(session, "protocol error", m.now);
                    disconnected(m, session);
                }
            }
        }
        // Error from the runner, or a message a runner may not send: the
        // session ends.
        _ => {
            s.handle_runner_disconnected(session, "protocol error", m.now);
            disconnected(m, session);
        }
    }
    Ok(())
}

fn result(
    s: &mut Scheduler,
    m: &mut Model,
    session: SessionId,
    job: JobId,
    attempt: Attempt,
    status: JobStatus,
) {
    // As the shell does: effects decided before the result are applied
    // first.
    absorb(m, s.drain_effects());
    let was_live = m.live.get(&job) == Some(&attempt);
    let message = "exit 1";
    match s.handle_result(session, job, attempt, status, message, m.now) {
        ResultDecision::Accept {
            status: recorded,
            message: recorded_message,
        } => {
            assert!(was_live, "accepted job {job} attempt {attempt}, not live");
            let expected = if m.cancelling.remove(&job) {
                assert_eq!(recorded_message, format!("cancelled by a user: {message}"));
                JobStatus::Cancelled
            } else {
                assert_eq!(recorded_message, message);
                status
            };
            assert_eq!(recorded, expected, "job {job} recorded with another status");
            m.live.remove(&job);
            let previous = m.finals.insert(job, recorded);
            assert!(previous.is_none(), "job {job} finished twice");
        }
        ResultDecision::Revoked { message } => {
            assert!(!was_live, "refused the live attempt {attempt} of job {job}");
            assert!(!m.finals.contains_key(&job), "final job {job} not Unknown");
            assert!(message.contains("refused"), "{message}");
        }
        ResultDecision::Unknown => {
            assert!(!was_live, "live job {job} unknown");
            assert!(
                m.finals.contains_key(&job) || !(1..m.next_job).contains(&job),
                "active job {job} unknown"
            );
        }
    }
}

fn cancel(u: &mut Unstructured<'_>, s: &mut Scheduler, m: &mut Model) -> Result<()> {
    let job = pick_job(u, m)?;
    let known = s.knows_job(job);
    let live = m.live.contains_key(&job);
    let outcome = s.handle_cancel(job, m.now);
    let expected = match (known, live) {
        (false, _) => CancelOutcome::NotActive,
        (true, false) => CancelOutcome::Cancelled,
        (true, true) => CancelOutcome::Cancelling,
    };
    assert_eq!(outcome, expected, "cancel of job {job}");
    if outcome == CancelOutcome::Cancelling {
        m.cancelling.insert(job);
    }
    if outcome == CancelOutcome::Cancelled {
        let effects = s.drain_effects();
        assert!(
            matches!(effects.as_slice(), [Effect::Finish { job: j, status: JobStatus::Cancelled, .. }] if *j == job),
            "cancel of queued job {job}: {effects:?}"
        );
        absorb(m, effects);
    }
    Ok(())
}

/// The dispatcher restarts on the same store: every connection is gone;
/// jobs recorded running become orphans their runner may reclaim.
fn restart(s: &mut Scheduler, m: &mut Model) {
    absorb(m, s.drain_effects());
    let mut queued = Vec::new();
    let mut running = Vec::new();
    for id in 1..m.next_job {
        if m.finals.contains_key(&id) {
            continue;
        }
        let spec = spec(m, id, m.repo_of[&id]);
        if m.live.contains_key(&id) {
            running.push((spec, m.runner_of[&id].clone()));
        } else {
            queued.push(spec);
        }
    }
    *s = Scheduler::new(m.config);
    s.handle_recovered(queued, running, m.now);
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

/// Applies effects to the model, checking each as the shell would meet it.
fn absorb(m: &mut Model, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::Assign {
                session,
                runner,
                job,
                attempt,
                repo,
                ..
            } => {
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
                assert_eq!(repo, m.repo_of[&job]);
                let previous = m.assigned.insert(job, attempt).unwrap_or(0);
                assert_eq!(
                    attempt,
                    previous + 1,
                    "job {job}: attempt {previous} then {attempt}"
                );
                assert!(attempt <= m.config.max_attempts);
                m.live.insert(job, attempt);
                m.runner_of.insert(job, runner);
            }
            Effect::Requeue { job, attempt, .. } => {
                assert_eq!(m.live.remove(&job), Some(attempt), "requeue of job {job}");
                assert!(!m.cancelling.contains(&job), "cancelled job {job} requeued");
                assert!(
                    attempt < m.config.max_attempts,
                    "job {job} requeued at the limit"
                );
            }
            Effect::Finish { job, status, .. } => {
                assert!(status.is_final(), "job {job} finished {status:?}");
                if m.cancelling.remove(&job) {
                    assert_eq!(status, JobStatus::Cancelled, "cancelled job {job}");
                }
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
    for id in 1..m.next_job {
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
    let (queued, running) = s.counts();
    assert_eq!(running, m.live.len(), "running jobs");
    assert_eq!(queued + running, active, "active jobs");
}
