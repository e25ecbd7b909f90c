//! Unit and property tests of the scheduling state machine: no sockets, no
//! tasks, time advanced by hand.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);
const REPO: &str = "/srv/git/app";

fn sched(max_attempts: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        runner_timeout: TIMEOUT,
        max_attempts,
    })
}

fn job(id: JobId, repo: &str) -> JobSpec {
    JobSpec {
        id,
        repo: repo.to_owned(),
        branch: "main".to_owned(),
        commit: format!("{id:040x}"),
        attempt: 0,
    }
}

fn runner(session: SessionId, name: &str, slots: u32) -> RunnerHello {
    RunnerHello {
        session,
        name: name.to_owned(),
        addr: "127.0.0.1:1".to_owned(),
        slots,
        repos: vec![REPO.to_owned()],
        labels: vec![],
        leases: vec![],
    }
}

fn assigns(effects: &[Effect]) -> Vec<(SessionId, JobId, Attempt)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Assign {
                session,
                job,
                attempt,
                ..
            } => Some((*session, *job, *attempt)),
            _ => None,
        })
        .collect()
}

#[test]
fn silent_runner_job_is_requeued_and_reassigned_after_the_timeout() {
    let t0 = Instant::now();
    let mut s = sched(3);
    for (session, name) in [(1, "a"), (2, "b"), (3, "c")] {
        s.handle_runner_connected(runner(session, name, 1), t0);
    }
    for id in 1..=3 {
        s.handle_job_submitted(job(id, REPO), t0);
    }
    s.schedule(t0);
    let first = assigns(&s.drain_effects());
    assert_eq!(first.len(), 3, "one job per runner: {first:?}");
    let sessions: BTreeSet<_> = first.iter().map(|a| a.0).collect();
    assert_eq!(sessions.len(), 3, "spread over the three runners");

    // Runners 1 and 2 keep talking; runner 3 goes silent.
    let later = t0 + TIMEOUT - Duration::from_millis(1);
    s.handle_frame(1, later);
    s.handle_frame(2, later);
    s.handle_tick(later);
    assert!(s.drain_effects().is_empty(), "nobody is late yet");

    let expired = t0 + TIMEOUT;
    s.handle_tick(expired);
    let (silent_job, _) = first.iter().find(|a| a.0 == 3).map(|a| (a.1, a.2)).unwrap();
    let effects = s.drain_effects();
    assert!(effects.contains(&Effect::Disconnect {
        session: 3,
        reason: format!("no frame for {TIMEOUT:?} (runner timeout)"),
    }));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Requeue { job, attempt: 1, .. } if *job == silent_job))
    );
    assert_eq!(s.counts(), (1, 2));

    // A fourth runner arrives and gets the job as attempt 2.
    s.handle_runner_connected(runner(4, "d", 1), expired);
    s.schedule(expired);
    assert_eq!(assigns(&s.drain_effects()), vec![(4, silent_job, 2)]);
    assert_eq!(s.reassignments(), 1);
    s.check_invariants().unwrap();
}

#[test]
fn revoked_attempt_result_is_refused_and_live_one_accepted() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(runner(1, "a", 1), t);
    s.handle_job_submitted(job(7, REPO), t);
    s.schedule(t);
    s.handle_runner_disconnected(1, "connection closed", t);
    s.handle_runner_connected(runner(2, "b", 1), t);
    s.schedule(t);
    assert!(assigns(&s.drain_effects()).contains(&(2, 7, 2)));

    assert!(!s.handle_started(1, 7, 1, t));
    assert!(!s.handle_log(1, 7, 1, t));
    assert!(matches!(
        s.handle_result(1, 7, 1, JobStatus::Passed, "", t),
        ResultDecision::Revoked { .. }
    ));
    assert!(s.handle_started(2, 7, 2, t));
    assert_eq!(
        s.handle_result(2, 7, 2, JobStatus::Failed, "", t),
        ResultDecision::Accept {
            status: JobStatus::Failed,
            message: String::new()
        }
    );
    // A failure is final: nothing is requeued, and a resend is left to the store.
    assert!(!s.knows_job(7));
    assert_eq!(
        s.handle_result(2, 7, 2, JobStatus::Failed, "", t),
        ResultDecision::Unknown
    );
}

#[test]
fn lost_max_attempts_times_ends_error_saying_runners_were_lost() {
    let t = Instant::now();
    let mut s = sched(2);
    s.handle_job_submitted(job(1, REPO), t);
    for session in 1..=2 {
        s.handle_runner_connected(runner(session, "a", 1), t);
        s.schedule(t);
        s.handle_runner_disconnected(session, "connection reset", t);
    }
    let effects = s.drain_effects();
    let finish = effects
        .iter()
        .find_map(|e| match e {
            Effect::Finish {
                job: 1,
                status,
                message,
            } => Some((*status, message.clone())),
            _ => None,
        })
        .expect("job finished");
    assert_eq!(finish.0, JobStatus::Error);
    assert!(finish.1.contains("runners were lost"), "{}", finish.1);
    assert!(!s.knows_job(1));
}

#[test]
fn reconnect_while_old_session_alive_keeps_listed_lease_and_cancels_others() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(runner(1, "a", 2), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();

    let mut again = runner(2, "a", 2);
    again.leases = vec![(1, 1), (99, 4)];
    s.handle_runner_connected(again, t);
    let effects = s.drain_effects();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Disconnect { session: 1, .. }))
    );
    assert!(effects.contains(&Effect::Cancel {
        session: 2,
        job: 99,
        attempt: 4
    }));
    // Job 1 stays with attempt 1; job 2, not listed, is requeued and then
    // assigned to the new session as attempt 2.
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Assign { job: 1, .. }))
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Requeue { job: 2, .. }))
    );
    assert!(s.is_live(1, 1));
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 2, 2)]);
    s.check_invariants().unwrap();
}

#[test]
fn orphan_claimed_by_its_runner_within_the_grace_or_requeued_after() {
    let t0 = Instant::now();
    let mut s = sched(3);
    let mut running = job(1, REPO);
    running.attempt = 1;
    let mut other = job(2, REPO);
    other.attempt = 2;
    s.handle_recovered(
        vec![job(3, REPO)],
        vec![(running, "a".into()), (other, "b".into())],
        t0,
    );
    assert_eq!(s.counts(), (1, 2));

    let mut a = runner(1, "a", 3);
    a.leases = vec![(1, 1)];
    s.handle_runner_connected(a, t0 + Duration::from_secs(1));
    s.schedule(t0 + Duration::from_secs(1));
    // Job 1 kept (no Assign), job 3 assigned; job 2 still waits for "b".
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 3, 1)]);
    assert!(s.is_live(1, 1));
    s.handle_frame(1, t0 + TIMEOUT);
    s.handle_tick(t0 + TIMEOUT);
    let effects = s.drain_effects();
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Requeue {
            job: 2,
            attempt: 2,
            ..
        }
    )));
    s.schedule(t0 + TIMEOUT);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 2, 3)]);
}

#[test]
fn only_runners_of_the_repo_get_its_jobs() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(runner(1, "a", 4), t);
    s.handle_job_submitted(job(1, "/elsewhere"), t);
    s.schedule(t);
    assert!(s.drain_effects().is_empty());
    s.check_no_idle_match().unwrap();
    let mut b = runner(2, "b", 1);
    b.repos = vec!["/elsewhere".into()];
    s.handle_runner_connected(b, t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 1)]);
}

#[test]
fn cancel_queued_and_running() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_job_submitted(job(1, REPO), t);
    assert_eq!(s.handle_cancel(1, t), CancelOutcome::Cancelled);
    assert_eq!(
        s.drain_effects(),
        vec![Effect::Finish {
            job: 1,
            status: JobStatus::Cancelled,
            message: "cancelled by a user while queued".into()
        }]
    );
    assert_eq!(s.handle_cancel(1, t), CancelOutcome::NotActive);

    s.handle_runner_connected(runner(1, "a", 1), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();
    assert_eq!(s.handle_cancel(2, t), CancelOutcome::Cancelling);
    assert_eq!(
        s.drain_effects(),
        vec![Effect::Cancel {
            session: 1,
            job: 2,
            attempt: 1
        }]
    );
    // Whatever the runner reports, the job ends cancelled.
    assert!(matches!(
        s.handle_result(1, 2, 1, JobStatus::Passed, "", t),
        ResultDecision::Accept {
            status: JobStatus::Cancelled,
            ..
        }
    ));

    // A cancelled job whose runner is lost ends cancelled, not requeued.
    s.handle_job_submitted(job(3, REPO), t);
    s.schedule(t);
    s.drain_effects();
    s.handle_cancel(3, t);
    s.handle_runner_disconnected(1, "connection closed", t);
    assert!(s.drain_effects().iter().any(|e| matches!(
        e,
        Effect::Finish {
            job: 3,
            status: JobStatus::Cancelled,
            ..
        }
    )));
}

#[test]
fn assignment_spreads_over_least_loaded_runners() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(runner(1, "a", 4), t);
    s.handle_runner_connected(runner(2, "b", 4), t);
    for id in 1..=4 {
        s.handle_job_submitted(job(id, REPO), t);
    }
    s.schedule(t);
    let per: BTreeMap<SessionId, usize> =
        assigns(&s.drain_effects())
            .into_iter()
            .fold(BTreeMap::new(), |mut m, a| {
                *m.entry(a.0).or_default() += 1;
                m
            });
    assert_eq!(per, BTreeMap::from([(1, 2), (2, 2)]));
}

// ---- property tests -------------------------------------------------------

const REPOS: [&str; 2] = ["/r/a", "/r/b"];
const NAMES: [&str; 3] = ["n0", "n1", "n2"];

#[derive(Debug, Clone)]
enum Event {
    Submit {
        repo: usize,
    },
    Connect {
        name: usize,
        slots: u32,
        repos: u8,
        list: Vec<(usize, i8)>,
    },
    Disconnect {
        name: usize,
    },
    Frame {
        name: usize,
    },
    Advance {
        ms: u64,
    },
    Result {
        name: usize,
        job: usize,
        delta: i8,
        status: u8,
    },
    Started {
        name: usize,
        job: usize,
        delta: i8,
    },
    Cancel {
        job: usize,
    },
    Restart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..REPOS.len()).prop_map(|repo| Event::Submit { repo }),
        2 => (0..NAMES.len(), 1u32..3, 1u8..4, prop::collection::vec((0usize..8, -1i8..2), 0..3))
            .prop_map(|(name, slots, repos, list)| Event::Connect { name, slots, repos, list }),
        1 => (0..NAMES.len()).prop_map(|name| Event::Disconnect { name }),
        3 => (0..NAMES.len()).prop_map(|name| Event::Frame { name }),
        2 => (0u64..4000).prop_map(|ms| Event::Advance { ms }),
        3 => (0..NAMES.len(), 0usize..8, -1i8..2, 0u8..4)
            .prop_map(|(name, job, delta, status)| Event::Result { name, job, delta, status }),
        1 => (0..NAMES.len(), 0usize..8, -1i8..2)
            .prop_map(|(name, job, delta)| Event::Started { name, job, delta }),
        1 => (0usize..8).prop_map(|job| Event::Cancel { job }),
        1 => Just(Event::Restart),
    ]
}

/// What the test knows from the outside: the effects and decisions seen.
#[derive(Default)]
struct Model {
    /// job → (session, attempt) per the last Assign not since revoked.
    live: HashMap<JobId, Attempt>,
    /// Highest attempt ever assigned per job.
    assigned: HashMap<JobId, Attempt>,
    finals: HashMap<JobId, JobStatus>,
    sessions: HashMap<usize, SessionId>,
    next_session: SessionId,
    jobs: Vec<JobSpec>,
}

impl Model {
    fn absorb(&mut self, effects: Vec<Effect>) -> Result<(), TestCaseError> {
        for e in effects {
            match e {
                Effect::Assign { job, attempt, .. } => {
                    let prev = self.assigned.insert(job, attempt).unwrap_or(0);
                    prop_assert!(attempt > prev, "attempts grow: {prev} then {attempt}");
                    prop_assert!(!self.finals.contains_key(&job), "assigned after final");
                    self.live.insert(job, attempt);
                }
                Effect::Requeue { job, attempt, .. } => {
                    prop_assert_eq!(self.live.remove(&job), Some(attempt));
                }
                Effect::Finish { job, status, .. } => {
                    prop_assert!(status.is_final());
                    self.live.remove(&job);
                    let prev = self.finals.insert(job, status);
                    prop_assert!(prev.is_none(), "job {} finished twice", job);
                }
                Effect::Cancel { .. } | Effect::Disconnect { .. } => {}
            }
        }
        Ok(())
    }
}

fn run_events(events: Vec<Event>) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let mut now = start;
    let mut s = sched(2);
    let mut m = Model {
        next_session: 1,
        ..Model::default()
    };
    for ev in events {
        match ev {
            Event::Submit { repo } => {
                let id = m.jobs.len() as JobId + 1;
                let spec = job(id, REPOS[repo]);
                m.jobs.push(spec.clone());
                s.handle_job_submitted(spec, now);
            }
            Event::Connect {
                name,
                slots,
                repos,
                list,
            } => {
                let session = m.next_session;
                m.next_session += 1;
                let leases = list
                    .into_iter()
                    .map(|(j, d)| {
                        let id = j as JobId + 1;
                        let a = m.assigned.get(&id).copied().unwrap_or(1);
                        (id, a.saturating_add_signed(i32::from(d)).max(1))
                    })
                    .collect();
                let repos = REPOS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| repos & (1 << i) != 0)
                    .map(|(_, r)| (*r).to_owned())
                    .collect();
                m.sessions.insert(name, session);
                s.handle_runner_connected(
                    RunnerHello {
                        session,
                        name: NAMES[name].to_owned(),
                        addr: String::new(),
                        slots,
                        repos,
                        labels: vec![],
                        leases,
                    },
                    now,
                );
            }
            Event::Disconnect { name } => {
                if let Some(session) = m.sessions.remove(&name) {
                    s.handle_runner_disconnected(session, "closed", now);
                }
            }
            Event::Frame { name } => {
                if let Some(session) = m.sessions.get(&name) {
                    s.handle_frame(*session, now);
                }
            }
            Event::Advance { ms } => {
                now += Duration::from_millis(ms);
                s.handle_tick(now);
            }
            Event::Result {
                name,
                job,
                delta,
                status,
            } => {
                let session = m.sessions.get(&name).copied().unwrap_or(999);
                let id = job as JobId + 1;
                let attempt = m
                    .assigned
                    .get(&id)
                    .copied()
                    .unwrap_or(1)
                    .saturating_add_signed(i32::from(delta));
                let status = [
                    JobStatus::Passed,
                    JobStatus::Failed,
                    JobStatus::Error,
                    JobStatus::Cancelled,
                ][status as usize];
                // Effects emitted before the result are applied first, as
                // the shell does.
                m.absorb(s.drain_effects())?;
                let was_live = m.live.get(&id) == Some(&attempt);
                match s.handle_result(session, id, attempt, status, "", now) {
                    ResultDecision::Accept { status, .. } => {
                        prop_assert!(was_live, "accepted job {} attempt {} not live", id, attempt);
                        m.live.remove(&id);
                        let prev = m.finals.insert(id, status);
                        prop_assert!(prev.is_none(), "job {} finished twice", id);
                    }
                    ResultDecision::Revoked { .. } => {
                        prop_assert!(!was_live, "refused the live lease of job {}", id);
                    }
                    ResultDecision::Unknown => {
                        prop_assert!(!was_live);
                        prop_assert!(
                            m.finals.contains_key(&id) || id > m.jobs.len() as JobId,
                            "active job {} unknown",
                            id
                        );
                    }
                }
            }
            Event::Started { name, job, delta } => {
                let session = m.sessions.get(&name).copied().unwrap_or(999);
                let id = job as JobId + 1;
                let attempt = m
                    .assigned
                    .get(&id)
                    .copied()
                    .unwrap_or(1)
                    .saturating_add_signed(i32::from(delta));
                m.absorb(s.drain_effects())?;
                let accepted = s.handle_started(session, id, attempt, now);
                prop_assert_eq!(accepted, m.live.get(&id) == Some(&attempt));
            }
            Event::Cancel { job } => {
                s.handle_cancel(job as JobId + 1, now);
            }
            Event::Restart => {
                // The dispatcher restarts: the store (the model) says which
                // jobs are queued or running; runners are all gone.
                m.absorb(s.drain_effects())?;
                let mut queued = vec![];
                let mut running = vec![];
                for spec in &m.jobs {
                    if m.finals.contains_key(&spec.id) {
                        continue;
                    }
                    let mut spec = spec.clone();
                    spec.attempt = m.assigned.get(&spec.id).copied().unwrap_or(0);
                    if m.live.contains_key(&spec.id) {
                        let name = NAMES[spec.id as usize % NAMES.len()].to_owned();
                        running.push((spec, name));
                    } else {
                        queued.push(spec);
                    }
                }
                s = sched(2);
                s.handle_recovered(queued, running, now);
                m.sessions.clear();
            }
        }
        s.check_invariants().map_err(TestCaseError::fail)?;
        s.schedule(now);
        s.check_invariants().map_err(TestCaseError::fail)?;
        s.check_no_idle_match().map_err(TestCaseError::fail)?;
        m.absorb(s.drain_effects())?;
    }
    // Every job is either still active in the scheduler or final, never both.
    for spec in &m.jobs {
        prop_assert_ne!(s.knows_job(spec.id), m.finals.contains_key(&spec.id));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_for_random_event_sequences(events in prop::collection::vec(event(), 1..60)) {
        run_events(events)?;
    }
}
