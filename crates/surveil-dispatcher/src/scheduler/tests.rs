//! Unit and property tests of the scheduling state machine: no sockets, no
//! tasks, time advanced by hand.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_millis(200);
const REPO: &str = "/srv/git/app";

/// Long enough that only the tests about it reach it.
const JOB_TIMEOUT: Duration = Duration::from_secs(3600);

const QUARANTINE_AFTER: u32 = 3;
const QUARANTINE_FOR: Duration = Duration::from_secs(300);

fn sched(max_attempts: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        runner_timeout: TIMEOUT,
        disconnect_grace: GRACE,
        max_attempts,
        job_timeout: JOB_TIMEOUT,
        quarantine_after: QUARANTINE_AFTER,
        quarantine_for: QUARANTINE_FOR,
    })
}

fn j(n: u64) -> JobId {
    JobId(n)
}

fn a(n: u32) -> Attempt {
    Attempt(n)
}

fn sid(n: u64) -> SessionId {
    SessionId(n)
}

fn job(id: u64, repo: &str) -> JobSpec {
    JobSpec {
        id: j(id),
        repo: repo.to_owned(),
        branch: "main".to_owned(),
        ref_name: "refs/heads/main".to_owned(),
        commit: CommitId::parse(&format!("{id:040x}")).unwrap(),
        attempt: a(0),
        rerun_base: a(0),
        handed_back: 0,
    }
}

fn runner(name: &str, slots: u32) -> RunnerHello {
    RunnerHello {
        name: name.to_owned(),
        addr: "127.0.0.1:1".to_owned(),
        slots,
        repos: vec![REPO.to_owned()],
        labels: vec![],
        leases: vec![],
    }
}

fn assigns(effects: &[Effect]) -> Vec<(u64, u64, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Assign {
                session,
                assignment,
                ..
            } => Some((session.0, assignment.job.0, assignment.attempt.0)),
            _ => None,
        })
        .collect()
}

fn requeued(effects: &[Effect], job: u64) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, Effect::Requeue { job: id, .. } if *id == j(job)))
}

#[test]
fn silent_runner_job_is_requeued_and_reassigned_after_the_timeout() {
    let t0 = Instant::now();
    let mut s = sched(3);
    for (session, name) in [(1, "a"), (2, "b"), (3, "c")] {
        s.handle_runner_connected(sid(session), runner(name, 1), t0);
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
    s.handle_frame(sid(1), later);
    s.handle_frame(sid(2), later);
    s.handle_tick(later);
    assert!(s.drain_effects().is_empty(), "nobody is late yet");

    let expired = t0 + TIMEOUT;
    s.handle_tick(expired);
    let silent_job = first.iter().find(|a| a.0 == 3).unwrap().1;
    let effects = s.drain_effects();
    assert!(effects.contains(&Effect::Disconnect {
        session: sid(3),
        reason: format!("no frame for {TIMEOUT:?} (runner timeout)"),
    }));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Requeue { job, attempt: Attempt(1), .. } if job.0 == silent_job
    )));
    assert_eq!(s.counts(), (1, 2));

    // A fourth runner arrives and gets the job as attempt 2.
    s.handle_runner_connected(sid(4), runner("d", 1), expired);
    s.schedule(expired);
    assert_eq!(assigns(&s.drain_effects()), vec![(4, silent_job, 2)]);
    assert_eq!(s.reassignments(), 1);
    s.check_invariants().unwrap();
}

#[test]
fn revoked_attempt_result_is_refused_and_live_one_accepted() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(7, REPO), t);
    s.schedule(t);
    s.handle_runner_disconnected(sid(1), "connection closed", t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.schedule(t);
    assert!(assigns(&s.drain_effects()).contains(&(2, 7, 2)));

    assert!(!s.handle_started(sid(1), j(7), a(1), t));
    assert!(!s.handle_log(sid(1), j(7), a(1), t));
    assert!(matches!(
        s.handle_result(sid(1), j(7), a(1), FinalStatus::Passed, "", t),
        ResultDecision::Revoked { .. }
    ));
    assert!(s.handle_started(sid(2), j(7), a(2), t));
    assert_eq!(
        s.handle_result(sid(2), j(7), a(2), FinalStatus::Failed, "", t),
        ResultDecision::Accept {
            status: FinalStatus::Failed,
            message: String::new()
        }
    );
    // Finishing: a second report of the same attempt waits for the store.
    assert_eq!(
        s.handle_result(sid(2), j(7), a(2), FinalStatus::Failed, "", t),
        ResultDecision::Pending
    );
    s.handle_result_stored(j(7), a(2));
    // A failure is final: nothing is requeued, and a resend is left to the store.
    assert!(!s.knows_job(j(7)));
    assert_eq!(
        s.handle_result(sid(2), j(7), a(2), FinalStatus::Failed, "", t),
        ResultDecision::Unknown
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_finishing_job_keeps_its_slot_until_the_store_answers() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);
    assert!(matches!(
        s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "", t),
        ResultDecision::Accept { .. }
    ));
    // Not durable yet: the slot stays taken, the job counts as running,
    // and a cancel is too late.
    s.schedule(t);
    assert!(s.drain_effects().is_empty());
    assert_eq!(s.counts(), (1, 1));
    assert_eq!(s.lease_holder(j(1), a(1)), Some(sid(1)));
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::Finishing);
    s.check_invariants().unwrap();
    s.handle_result_stored(j(1), a(1));
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 2, 1)]);
    s.check_invariants().unwrap();
}

#[test]
fn a_failed_result_write_leaves_the_job_running_so_the_resend_is_accepted() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    s.drain_effects();
    let accepted = s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "ok", t);
    assert!(matches!(accepted, ResultDecision::Accept { .. }));
    s.handle_result_failed(j(1), a(1), t);
    assert!(s.is_live(j(1), a(1)));
    assert_eq!(s.lease_holder(j(1), a(1)), Some(sid(1)));
    s.check_invariants().unwrap();
    assert_eq!(
        s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "ok", t),
        accepted,
        "the resend is accepted like the first"
    );
    assert!(s.drain_effects().is_empty(), "nothing was requeued");
}

#[test]
fn a_finishing_job_whose_runner_leaves_waits_for_the_store_then_for_the_runner() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    s.drain_effects();
    s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "", t);
    s.handle_runner_disconnected(sid(1), "connection reset", t);
    assert!(
        s.drain_effects().is_empty(),
        "a finishing job is not requeued"
    );
    assert_eq!(s.counts(), (0, 1));
    s.check_invariants().unwrap();

    // The write failed: the job is an orphan its runner may claim.
    s.handle_result_failed(j(1), a(1), t);
    let mut back = runner("a", 1);
    back.leases = vec![(j(1), a(1))];
    s.handle_runner_connected(sid(2), back, t + Duration::from_secs(1));
    assert!(s.drain_effects().is_empty(), "claimed, not cancelled");
    assert_eq!(s.lease_holder(j(1), a(1)), Some(sid(2)));
    assert!(matches!(
        s.handle_result(sid(2), j(1), a(1), FinalStatus::Passed, "", t),
        ResultDecision::Accept { .. }
    ));
    s.check_invariants().unwrap();
}

#[test]
fn a_released_runner_keeps_its_leases_for_a_runner_timeout() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 2), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();
    s.handle_runner_released(sid(1), t);
    assert!(s.drain_effects().is_empty(), "nothing revoked");
    assert_eq!(s.runner_count(), 0);
    assert!(s.is_live(j(1), a(1)) && s.is_live(j(2), a(1)));
    s.check_invariants().unwrap();

    // It comes back listing job 1 only: job 1 is kept, job 2 expires.
    let mut back = runner("a", 2);
    back.leases = vec![(j(1), a(1))];
    s.handle_runner_connected(sid(2), back, t + Duration::from_millis(10));
    assert_eq!(s.lease_holder(j(1), a(1)), Some(sid(2)));
    s.handle_frame(sid(2), t + TIMEOUT);
    s.handle_tick(t + TIMEOUT);
    let effects = s.drain_effects();
    assert!(
        requeued(&effects, 2) && !requeued(&effects, 1),
        "{effects:?}"
    );
    s.check_invariants().unwrap();
}

#[test]
fn an_assignment_the_store_refused_is_undone() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);
    assert!(s.handle_assign_failed(j(1), a(1)));
    assert_eq!(s.counts(), (1, 0));
    assert!(!s.is_live(j(1), a(1)));
    s.check_invariants().unwrap();
    // The next pass assigns it again with the same attempt number.
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);
    assert!(!s.handle_assign_failed(j(1), a(2)), "not that attempt");

    // Cancelled before the failure was known: it ends cancelled.
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::Cancelling);
    s.drain_effects();
    assert!(s.handle_assign_failed(j(1), a(1)));
    assert!(matches!(
        s.drain_effects().as_slice(),
        [Effect::Finish {
            status: FinalStatus::Cancelled,
            ..
        }]
    ));
    assert!(!s.knows_job(j(1)));
    s.check_invariants().unwrap();
}

#[test]
fn lost_max_attempts_times_ends_error_saying_runners_were_lost() {
    let t = Instant::now();
    let mut s = sched(2);
    s.handle_job_submitted(job(1, REPO), t);
    for session in 1..=2 {
        s.handle_runner_connected(sid(session), runner("a", 1), t);
        s.schedule(t);
        s.handle_runner_disconnected(sid(session), "connection reset", t);
    }
    let effects = s.drain_effects();
    let finish = effects
        .iter()
        .find_map(|e| match e {
            Effect::Finish {
                job: JobId(1),
                status,
                message,
            } => Some((*status, message.clone())),
            _ => None,
        })
        .expect("job finished");
    assert_eq!(finish.0, FinalStatus::Error);
    assert!(finish.1.contains("runners were lost"), "{}", finish.1);
    assert!(!s.knows_job(j(1)));
}

#[test]
fn a_rerun_gets_a_fresh_attempt_budget_after_the_attempts_before_it() {
    let t = Instant::now();
    let mut s = sched(2);
    // Ended after attempt 2 (its runners lost twice), then rerun.
    let mut spec = job(1, REPO);
    spec.attempt = a(2);
    spec.rerun_base = a(2);
    s.handle_rerun(spec, t);
    assert_eq!(s.waiting()[0].1.lost_attempts, 0);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.schedule(t);
    let assigned: Vec<u32> = s
        .drain_effects()
        .iter()
        .filter_map(|e| match e {
            Effect::Assign { assignment, .. } => Some(assignment.attempt.0),
            _ => None,
        })
        .collect();
    assert_eq!(assigned, vec![3], "the attempt after the earlier ones");
    // One lost attempt of the new run requeues it: the budget is 2 again.
    s.handle_runner_disconnected(sid(1), "connection reset", t);
    let effects = s.drain_effects();
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Requeue { .. })),
        "{effects:?}"
    );
    assert_eq!(s.waiting()[0].1.lost_attempts, 1);
    // A second loss uses it up.
    s.handle_runner_connected(sid(2), runner("a", 1), t);
    s.schedule(t);
    s.handle_runner_disconnected(sid(2), "connection reset", t);
    let effects = s.drain_effects();
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Finish { status: FinalStatus::Error, message, .. } if message.contains("after 2 attempts")
        )),
        "{effects:?}"
    );
    s.check_invariants().unwrap();
}

#[test]
fn reconnect_while_old_session_alive_keeps_listed_lease_and_cancels_others() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 2), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();

    let mut again = runner("a", 2);
    again.leases = vec![(j(1), a(1)), (j(99), a(4))];
    s.handle_runner_connected(sid(2), again, t);
    let effects = s.drain_effects();
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Disconnect {
            session: SessionId(1),
            ..
        }
    )));
    assert!(effects.contains(&Effect::Cancel {
        session: sid(2),
        job: j(99),
        attempt: a(4)
    }));
    // Job 1 stays with attempt 1; job 2, not listed, is requeued and then
    // assigned to the new session as attempt 2.
    assert!(assigns(&effects).is_empty());
    assert!(requeued(&effects, 2));
    assert!(s.is_live(j(1), a(1)));
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 2, 2)]);
    s.check_invariants().unwrap();
}

#[test]
fn orphan_claimed_by_its_runner_within_the_grace_or_requeued_after() {
    let t0 = Instant::now();
    let mut s = sched(3);
    let mut running = job(1, REPO);
    running.attempt = a(1);
    let mut other = job(2, REPO);
    other.attempt = a(2);
    s.handle_recovered(
        vec![job(3, REPO)],
        vec![(running, "a".into()), (other, "b".into())],
        t0,
    );
    assert_eq!(s.counts(), (1, 2));

    let mut hello = runner("a", 3);
    hello.leases = vec![(j(1), a(1))];
    s.handle_runner_connected(sid(1), hello, t0 + Duration::from_secs(1));
    s.schedule(t0 + Duration::from_secs(1));
    // Job 1 kept (no Assign), job 3 assigned; job 2 still waits for "b".
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 3, 1)]);
    assert!(s.is_live(j(1), a(1)));
    s.handle_frame(sid(1), t0 + TIMEOUT);
    s.handle_tick(t0 + TIMEOUT);
    let effects = s.drain_effects();
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Requeue {
            job: JobId(2),
            attempt: Attempt(2),
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
    s.handle_runner_connected(sid(1), runner("a", 4), t);
    s.handle_job_submitted(job(1, "/elsewhere"), t);
    s.schedule(t);
    assert!(s.drain_effects().is_empty());
    s.check_no_idle_match().unwrap();
    let mut b = runner("b", 1);
    b.repos = vec!["/elsewhere".into()];
    s.handle_runner_connected(sid(2), b, t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 1)]);
}

#[test]
fn waiting_reasons_come_from_the_connected_runners_and_their_slots() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.handle_job_submitted(job(3, "/unbuilt"), t);
    let reasons = |s: &Scheduler| -> Vec<(u64, WaitReason, u32)> {
        s.waiting()
            .into_iter()
            .map(|(id, w)| (id.0, w.reason, w.ahead))
            .collect()
    };
    let none = WaitReason::NoRunner { connected: 0 };
    assert_eq!(
        reasons(&s),
        vec![(1, none.clone(), 0), (2, none.clone(), 1), (3, none, 0)]
    );
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    // Before the pass, a free slot means the job is about to be assigned.
    assert_eq!(reasons(&s)[0].1, WaitReason::Assigning);
    s.schedule(t);
    s.drain_effects();
    s.handle_job_submitted(job(4, REPO), t);
    let busy = WaitReason::AllBusy {
        matching: 2,
        slots: 2,
    };
    assert_eq!(
        reasons(&s),
        vec![(3, WaitReason::NoRunner { connected: 2 }, 0), (4, busy, 0)]
    );
    assert!(
        WaitReason::NoRunner { connected: 2 }
            .describe()
            .contains("no connected runner lists this repository")
    );
    // A job whose runner was lost says how many attempts are gone.
    s.handle_runner_disconnected(sid(1), "gone", t);
    s.handle_tick(t + TIMEOUT * 2);
    let lost: Vec<u32> = s.waiting().iter().map(|(_, w)| w.lost_attempts).collect();
    assert!(lost.contains(&1), "{lost:?}");
}

#[test]
fn cancel_queued_and_running() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_job_submitted(job(1, REPO), t);
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::Cancelled);
    assert_eq!(
        s.drain_effects(),
        vec![Effect::Finish {
            job: j(1),
            status: FinalStatus::Cancelled,
            message: "cancelled by a user while queued".into()
        }]
    );
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::NotActive);

    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();
    assert_eq!(s.handle_cancel(j(2), t), CancelOutcome::Cancelling);
    assert_eq!(
        s.drain_effects(),
        vec![Effect::Cancel {
            session: sid(1),
            job: j(2),
            attempt: a(1)
        }]
    );
    // Whatever the runner reports, the job ends cancelled.
    assert!(matches!(
        s.handle_result(sid(1), j(2), a(1), FinalStatus::Passed, "", t),
        ResultDecision::Accept {
            status: FinalStatus::Cancelled,
            ..
        }
    ));
    s.handle_result_stored(j(2), a(1));

    // A cancelled job whose runner is lost ends cancelled, not requeued.
    s.handle_job_submitted(job(3, REPO), t);
    s.schedule(t);
    s.drain_effects();
    s.handle_cancel(j(3), t);
    s.handle_runner_disconnected(sid(1), "connection closed", t);
    assert!(s.drain_effects().iter().any(|e| matches!(
        e,
        Effect::Finish {
            job: JobId(3),
            status: FinalStatus::Cancelled,
            ..
        }
    )));
}

#[test]
fn a_runner_whose_connection_broke_keeps_its_job_by_reconnecting_within_the_grace() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);

    s.handle_runner_closed(sid(1), "connection reset by peer", t);
    assert!(s.drain_effects().is_empty(), "nothing revoked at the reset");
    assert_eq!(s.next_orphan_deadline(), Some(t + GRACE));
    s.schedule(t);
    assert!(
        assigns(&s.drain_effects()).is_empty(),
        "the job is not offered to b while a may come back"
    );

    let back = t + GRACE / 2;
    let mut hello = runner("a", 1);
    hello.leases = vec![(j(1), a(1))];
    s.handle_runner_connected(sid(3), hello, back);
    assert_eq!(s.next_orphan_deadline(), None, "claimed back");
    s.handle_tick(t + GRACE * 2);
    s.schedule(t + GRACE * 2);
    assert!(s.drain_effects().is_empty(), "kept: no requeue, no cancel");
    assert!(matches!(
        s.handle_result(sid(3), j(1), a(1), FinalStatus::Passed, "", back),
        ResultDecision::Accept { .. }
    ));
    s.check_invariants().unwrap();
}

#[test]
fn a_runner_that_does_not_reconnect_within_the_grace_has_its_job_moved() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);

    s.handle_runner_closed(sid(1), "connection closed by the peer", t);
    s.handle_tick(t + GRACE - Duration::from_millis(1));
    assert!(s.drain_effects().is_empty(), "still within the grace");
    s.handle_tick(t + GRACE);
    let effects = s.drain_effects();
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Requeue { job: JobId(1), attempt: Attempt(1), reason, .. }
                if reason.contains("runner a did not come back within 200ms")
        )),
        "{effects:?}"
    );
    s.schedule(t + GRACE);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 2)]);
    // Its late result is stale now.
    assert!(matches!(
        s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "", t + GRACE),
        ResultDecision::Revoked { .. }
    ));
}

#[test]
fn with_no_grace_a_closed_connection_revokes_at_once() {
    let t = Instant::now();
    let mut s = Scheduler::new(SchedulerConfig {
        runner_timeout: TIMEOUT,
        disconnect_grace: Duration::ZERO,
        max_attempts: 3,
        job_timeout: JOB_TIMEOUT,
        quarantine_after: QUARANTINE_AFTER,
        quarantine_for: QUARANTINE_FOR,
    });
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    s.drain_effects();
    s.handle_runner_closed(sid(1), "connection reset by peer", t);
    assert!(requeued(&s.drain_effects(), 1));
}

#[test]
fn assignment_spreads_over_least_loaded_runners() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 4), t);
    s.handle_runner_connected(sid(2), runner("b", 4), t);
    for id in 1..=4 {
        s.handle_job_submitted(job(id, REPO), t);
    }
    s.schedule(t);
    let per: BTreeMap<u64, usize> =
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
    /// The runner's connection closed or broke under it (FIN, RST).
    Closed {
        name: usize,
    },
    /// The dispatcher closed the runner for its own store failure.
    Release {
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
    /// The store answers the oldest result write in flight.
    StoreAnswer {
        ok: bool,
    },
    /// The store refuses the oldest assignment in flight.
    AssignFails,
    Started {
        name: usize,
        job: usize,
        delta: i8,
    },
    Cancel {
        job: usize,
    },
    /// The runner sent `Drain`.
    Drain {
        name: usize,
    },
    /// The runner handed a lease back.
    HandBack {
        name: usize,
        job: usize,
        delta: i8,
    },
    Restart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..REPOS.len()).prop_map(|repo| Event::Submit { repo }),
        2 => (0..NAMES.len(), 1u32..3, 1u8..4, prop::collection::vec((0usize..8, -1i8..2), 0..3))
            .prop_map(|(name, slots, repos, list)| Event::Connect { name, slots, repos, list }),
        1 => (0..NAMES.len()).prop_map(|name| Event::Disconnect { name }),
        1 => (0..NAMES.len()).prop_map(|name| Event::Release { name }),
        1 => (0..NAMES.len()).prop_map(|name| Event::Closed { name }),
        3 => (0..NAMES.len()).prop_map(|name| Event::Frame { name }),
        2 => (0u64..4000).prop_map(|ms| Event::Advance { ms }),
        3 => (0..NAMES.len(), 0usize..8, -1i8..2, 0u8..5)
            .prop_map(|(name, job, delta, status)| Event::Result { name, job, delta, status }),
        3 => any::<bool>().prop_map(|ok| Event::StoreAnswer { ok }),
        1 => Just(Event::AssignFails),
        1 => (0..NAMES.len(), 0usize..8, -1i8..2)
            .prop_map(|(name, job, delta)| Event::Started { name, job, delta }),
        1 => (0usize..8).prop_map(|job| Event::Cancel { job }),
        1 => (0..NAMES.len()).prop_map(|name| Event::Drain { name }),
        2 => (0..NAMES.len(), 0usize..8, -1i8..2)
            .prop_map(|(name, job, delta)| Event::HandBack { name, job, delta }),
        1 => Just(Event::Restart),
    ]
}

/// What the test knows from the outside: the effects and decisions seen.
#[derive(Default)]
struct Model {
    /// job → attempt per the last Assign not since revoked.
    live: HashMap<JobId, Attempt>,
    /// job → the runner name its live lease belongs to.
    holders: HashMap<JobId, String>,
    /// Highest attempt ever assigned per job (the store's).
    assigned: HashMap<JobId, Attempt>,
    finals: HashMap<JobId, FinalStatus>,
    sessions: HashMap<usize, SessionId>,
    next_session: u64,
    jobs: Vec<JobSpec>,
    /// Accepted results whose store write has not answered yet.
    writing: Vec<(JobId, Attempt, FinalStatus)>,
    /// Assignments emitted whose store write the test may still fail.
    assigning: Vec<(JobId, Attempt)>,
    /// Sessions that sent `Drain`: none may be given a job.
    draining: std::collections::BTreeSet<SessionId>,
}

impl Model {
    fn absorb(&mut self, effects: Vec<Effect>) -> Result<(), TestCaseError> {
        for e in effects {
            match e {
                Effect::Assign {
                    assignment,
                    runner,
                    session,
                } => {
                    prop_assert!(
                        !self.draining.contains(&session),
                        "assigned to draining session {}",
                        session
                    );
                    let (job, attempt) = (assignment.job, assignment.attempt);
                    self.holders.insert(job, runner);
                    let prev = self.assigned.insert(job, attempt).unwrap_or(a(0));
                    prop_assert!(attempt > prev, "attempts grow: {prev} then {attempt}");
                    prop_assert!(!self.finals.contains_key(&job), "assigned after final");
                    self.live.insert(job, attempt);
                    self.assigning.push((job, attempt));
                }
                Effect::Requeue { job, attempt, .. } => {
                    prop_assert_eq!(self.live.remove(&job), Some(attempt));
                    prop_assert!(
                        !self.writing.iter().any(|w| w.0 == job),
                        "job {} requeued while its result is being written",
                        job
                    );
                }
                Effect::Finish { job, status, .. } => {
                    self.live.remove(&job);
                    let prev = self.finals.insert(job, status);
                    prop_assert!(prev.is_none(), "job {} finished twice", job);
                }
                Effect::Cancel { .. } | Effect::Disconnect { .. } => {}
            }
        }
        Ok(())
    }

    fn attempt_of(&self, job: JobId, delta: i8) -> Attempt {
        let current = self.assigned.get(&job).copied().unwrap_or(a(1));
        a(current.0.saturating_add_signed(i32::from(delta)))
    }
}

fn connect(
    s: &mut Scheduler,
    m: &mut Model,
    now: Instant,
    name: usize,
    slots: u32,
    repos: u8,
    list: Vec<(usize, i8)>,
) {
    let session = sid(m.next_session);
    m.next_session += 1;
    let leases = list
        .into_iter()
        .map(|(job, delta)| {
            let id = j(job as u64 + 1);
            (id, a(m.attempt_of(id, delta).0.max(1)))
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
        session,
        RunnerHello {
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

fn result(
    s: &mut Scheduler,
    m: &mut Model,
    now: Instant,
    (name, job, delta, status): (usize, usize, i8, u8),
) -> Result<(), TestCaseError> {
    let session = m.sessions.get(&name).copied().unwrap_or(sid(999));
    let id = j(job as u64 + 1);
    let attempt = m.attempt_of(id, delta);
    // Status 4: the runner's fetch or checkout failed (infrastructure).
    let infrastructure = status == 4;
    let status = [
        FinalStatus::Passed,
        FinalStatus::Failed,
        FinalStatus::Error,
        FinalStatus::Cancelled,
        FinalStatus::Error,
    ][status as usize];
    // Effects emitted before the result are applied first, as the service
    // does.
    m.absorb(s.drain_effects())?;
    // Live, and reported by a connected session of the runner holding it.
    let was_live = m.live.get(&id) == Some(&attempt)
        && m.sessions.contains_key(&name)
        && m.holders.get(&id).map(String::as_str) == Some(NAMES[name]);
    let in_flight = m.writing.iter().any(|w| w.0 == id && w.1 == attempt);
    let decision = if infrastructure {
        s.handle_infra_failure(session, id, attempt, "unreachable", now)
    } else {
        s.handle_result(session, id, attempt, status, "", now)
    };
    match decision {
        ResultDecision::Accept { status, .. } => {
            prop_assert!(
                was_live && !in_flight,
                "accepted job {} attempt {}",
                id,
                attempt
            );
            m.writing.push((id, attempt, status));
        }
        ResultDecision::Pending => prop_assert!(in_flight, "pending without a write"),
        ResultDecision::Retried { .. } => {
            prop_assert!(infrastructure, "handle_result retried");
            prop_assert!(
                was_live && !in_flight,
                "retried job {} attempt {}",
                id,
                attempt
            );
            // The attempt is over: requeued or ended, never still live.
            m.absorb(s.drain_effects())?;
            prop_assert!(!m.live.contains_key(&id), "job {} live after a retry", id);
        }
        ResultDecision::Revoked { .. } => {
            prop_assert!(!was_live, "refused the live lease of job {}", id);
        }
        ResultDecision::Unknown => {
            prop_assert!(!was_live);
            prop_assert!(
                m.finals.contains_key(&id) || id.0 > m.jobs.len() as u64,
                "active job {} unknown",
                id
            );
        }
    }
    Ok(())
}

fn store_answer(
    s: &mut Scheduler,
    m: &mut Model,
    now: Instant,
    ok: bool,
) -> Result<(), TestCaseError> {
    if m.writing.is_empty() {
        return Ok(());
    }
    let (id, attempt, status) = m.writing.remove(0);
    if ok {
        s.handle_result_stored(id, attempt);
        m.live.remove(&id);
        let prev = m.finals.insert(id, status);
        prop_assert!(prev.is_none(), "job {} finished twice", id);
        prop_assert!(!s.knows_job(id));
    } else {
        s.handle_result_failed(id, attempt, now);
        prop_assert!(s.is_live(id, attempt), "job {} not running again", id);
    }
    Ok(())
}

fn assign_fails(s: &mut Scheduler, m: &mut Model) -> Result<(), TestCaseError> {
    m.absorb(s.drain_effects())?;
    let Some((id, attempt)) = m.assigning.pop() else {
        return Ok(());
    };
    // Only the newest assignment may still be unrecorded; older ones were
    // written (the applier goes in order).
    m.assigning.clear();
    if s.handle_assign_failed(id, attempt) {
        prop_assert_eq!(m.live.remove(&id), Some(attempt));
        let previous = a(attempt.0 - 1);
        if previous.0 == 0 {
            m.assigned.remove(&id);
        } else {
            m.assigned.insert(id, previous);
        }
    }
    m.absorb(s.drain_effects())
}

/// The dispatcher restarts: the store (the model) says which jobs are
/// queued or running; runners are all gone, writes in flight are lost.
fn restart(s: &mut Scheduler, m: &mut Model, now: Instant) -> Result<(), TestCaseError> {
    m.absorb(s.drain_effects())?;
    m.writing.clear();
    m.assigning.clear();
    let mut queued = vec![];
    let mut running = vec![];
    for spec in &m.jobs {
        if m.finals.contains_key(&spec.id) {
            continue;
        }
        let mut spec = spec.clone();
        spec.attempt = m.assigned.get(&spec.id).copied().unwrap_or(a(0));
        if m.live.contains_key(&spec.id) {
            let name = NAMES[spec.id.0 as usize % NAMES.len()].to_owned();
            m.holders.insert(spec.id, name.clone());
            running.push((spec, name));
        } else {
            queued.push(spec);
        }
    }
    *s = sched(2);
    s.handle_recovered(queued, running, now);
    m.sessions.clear();
    Ok(())
}

fn step(
    s: &mut Scheduler,
    m: &mut Model,
    now: &mut Instant,
    ev: Event,
) -> Result<(), TestCaseError> {
    match ev {
        Event::Submit { repo } => {
            let spec = job(m.jobs.len() as u64 + 1, REPOS[repo]);
            m.jobs.push(spec.clone());
            s.handle_job_submitted(spec, *now);
        }
        Event::Connect {
            name,
            slots,
            repos,
            list,
        } => connect(s, m, *now, name, slots, repos, list),
        Event::Disconnect { name } => {
            if let Some(session) = m.sessions.remove(&name) {
                s.handle_runner_disconnected(session, "closed", *now);
            }
        }
        Event::Closed { name } => {
            if let Some(session) = m.sessions.remove(&name) {
                s.handle_runner_closed(session, "connection reset", *now);
                prop_assert!(
                    s.drain_effects().is_empty(),
                    "a closed connection decided something before its grace"
                );
            }
        }
        Event::Release { name } => {
            if let Some(session) = m.sessions.remove(&name) {
                s.handle_runner_released(session, *now);
                prop_assert!(s.drain_effects().is_empty(), "a release decided something");
            }
        }
        Event::Frame { name } => {
            if let Some(session) = m.sessions.get(&name) {
                s.handle_frame(*session, *now);
            }
        }
        Event::Advance { ms } => {
            *now += Duration::from_millis(ms);
            s.handle_tick(*now);
        }
        Event::Result {
            name,
            job,
            delta,
            status,
        } => result(s, m, *now, (name, job, delta, status))?,
        Event::StoreAnswer { ok } => store_answer(s, m, *now, ok)?,
        Event::AssignFails => assign_fails(s, m)?,
        Event::Started { name, job, delta } => {
            let session = m.sessions.get(&name).copied().unwrap_or(sid(999));
            let id = j(job as u64 + 1);
            let attempt = m.attempt_of(id, delta);
            m.absorb(s.drain_effects())?;
            let accepted = s.handle_started(session, id, attempt, *now);
            prop_assert_eq!(accepted, m.live.get(&id) == Some(&attempt));
        }
        Event::Cancel { job } => {
            s.handle_cancel(j(job as u64 + 1), *now);
        }
        Event::Drain { name } => {
            if let Some(session) = m.sessions.get(&name) {
                s.handle_runner_draining(*session, *now);
                m.draining.insert(*session);
            }
        }
        Event::HandBack { name, job, delta } => {
            let session = m.sessions.get(&name).copied().unwrap_or(sid(999));
            let id = j(job as u64 + 1);
            let attempt = m.attempt_of(id, delta);
            m.absorb(s.drain_effects())?;
            let accepted = s.handle_hand_back(session, id, attempt, "draining", *now);
            if accepted {
                prop_assert_eq!(m.live.get(&id), Some(&attempt));
                prop_assert_eq!(m.holders.get(&id).map(String::as_str), Some(NAMES[name]));
                prop_assert!(
                    !m.writing.iter().any(|w| w.0 == id),
                    "a finishing job was handed back"
                );
            }
        }
        Event::Restart => restart(s, m, *now)?,
    }
    Ok(())
}

fn run_events(events: Vec<Event>) -> Result<(), TestCaseError> {
    let mut now = Instant::now();
    let mut s = sched(2);
    let mut m = Model {
        next_session: 1,
        ..Model::default()
    };
    for ev in events {
        step(&mut s, &mut m, &mut now, ev)?;
        s.check_invariants().map_err(TestCaseError::fail)?;
        s.schedule(now);
        s.check_invariants().map_err(TestCaseError::fail)?;
        s.check_no_idle_match().map_err(TestCaseError::fail)?;
        m.absorb(s.drain_effects())?;
    }
    // Every job is either still active in the scheduler or final, never
    // both; a job whose result is being written is still active.
    for spec in &m.jobs {
        prop_assert_ne!(s.knows_job(spec.id), m.finals.contains_key(&spec.id));
    }
    for (id, attempt, _) in &m.writing {
        prop_assert!(s.is_live(*id, *attempt), "job {} left while finishing", id);
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

#[test]
fn an_attempt_past_the_job_timeout_is_cancelled_then_ended_without_its_runner() {
    let t0 = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t0);
    s.handle_runner_connected(sid(2), runner("b", 1), t0);
    s.handle_job_submitted(job(1, REPO), t0);
    s.handle_job_submitted(job(2, REPO), t0);
    s.schedule(t0);
    let placed = assigns(&s.drain_effects());
    assert_eq!(placed.len(), 2, "{placed:?}");
    let on = |job: u64| sid(placed.iter().find(|p| p.1 == job).unwrap().0);
    let alive = |s: &mut Scheduler, at: Instant| {
        s.handle_frame(sid(1), at);
        s.handle_frame(sid(2), at);
    };

    let before = t0 + JOB_TIMEOUT - Duration::from_millis(1);
    alive(&mut s, before);
    s.handle_tick(before);
    assert!(s.drain_effects().is_empty(), "not yet");

    // At the timeout both runners are told to cancel.
    let due = t0 + JOB_TIMEOUT;
    alive(&mut s, due);
    s.handle_tick(due);
    let effects = s.drain_effects();
    for id in [1, 2] {
        assert!(
            effects.contains(&Effect::Cancel {
                session: on(id),
                job: j(id),
                attempt: a(1),
            }),
            "{effects:?}"
        );
    }
    // Job 1's runner stops it: whatever it says, the job ends error.
    match s.handle_result(on(1), j(1), a(1), FinalStatus::Cancelled, "killed", due) {
        ResultDecision::Accept { status, message } => {
            assert_eq!(status, FinalStatus::Error);
            assert!(
                message.contains("--job-timeout") && message.contains("killed"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    s.handle_result_stored(j(1), a(1));

    // Job 2's runner never answers: a runner timeout later it ends error
    // without it, and its late result changes nothing.
    let later = due + TIMEOUT;
    alive(&mut s, later);
    s.handle_tick(later);
    let effects = s.drain_effects();
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::Finish { job, status: FinalStatus::Error, message }
                if *job == j(2) && message.contains("did not stop it")
        )),
        "{effects:?}"
    );
    assert_eq!(
        s.handle_result(on(2), j(2), a(1), FinalStatus::Passed, "", later),
        ResultDecision::Unknown
    );
    assert_eq!(s.counts(), (0, 0));
    s.check_invariants().unwrap();
}

mod drain;
mod infra;
