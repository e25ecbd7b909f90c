//! Drains: a runner that says it drains gets nothing more, and what it
//! gives back is queued again without costing the job an attempt.

use super::*;

fn requeues(effects: &[Effect]) -> Vec<(u64, u32, bool)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Requeue {
                job,
                attempt,
                handed_back,
                ..
            } => Some((job.0, attempt.0, *handed_back)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_draining_runner_gets_no_new_job_and_the_queue_says_why() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 2), t);
    assert!(s.handle_runner_draining(sid(1), t), "first Drain");
    assert!(
        !s.handle_runner_draining(sid(1), t),
        "a second changes nothing"
    );
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert!(
        assigns(&s.drain_effects()).is_empty(),
        "a has free slots but drains"
    );
    s.check_no_idle_match().unwrap();
    assert_eq!(s.draining_count(), 1);
    assert!(s.runners()[0].draining);
    let [(_, waiting)] = &s.waiting()[..] else {
        panic!("one job waits");
    };
    assert_eq!(waiting.reason.code(), "draining");
    assert_eq!(
        waiting.reason.describe(),
        "the runner that builds it (a) is draining (shutting down)"
    );

    // Another runner takes it; a's reconnect (a restart) serves again.
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 1)]);
    s.handle_runner_connected(sid(3), runner("a", 2), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(3, 2, 1)]);
    s.check_invariants().unwrap();
}

#[test]
fn a_handed_back_lease_is_queued_again_without_counting_the_attempt() {
    let t = Instant::now();
    // One attempt allowed: a counted loss would end the job `error`.
    let mut s = sched(1);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);
    s.handle_runner_draining(sid(1), t);

    assert!(
        !s.handle_hand_back(sid(2), j(1), a(1), "x", t),
        "not from another session"
    );
    assert!(
        !s.handle_hand_back(sid(1), j(1), a(2), "x", t),
        "not for another attempt"
    );
    assert!(s.drain_effects().is_empty());
    assert!(s.handle_hand_back(
        sid(1),
        j(1),
        a(1),
        "runner a shutting down: never started",
        t
    ));
    assert_eq!(requeues(&s.drain_effects()), vec![(1, 1, true)]);
    assert_eq!(s.counts(), (1, 0), "queued again, a's slot free");
    assert_eq!(
        s.waiting()[0].1.lost_attempts,
        0,
        "the attempt does not count"
    );
    s.check_invariants().unwrap();

    // Handed back again by the next runner's drain: still not counted.
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 2)]);
    s.handle_runner_draining(sid(2), t);
    assert!(s.handle_hand_back(sid(2), j(1), a(2), "cut off", t));
    assert_eq!(requeues(&s.drain_effects()), vec![(1, 2, true)]);

    // A counted loss then still has its one attempt left.
    s.handle_runner_connected(sid(3), runner("c", 1), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(3, 1, 3)]);
    s.handle_runner_disconnected(sid(3), "gone", t);
    let effects = s.drain_effects();
    assert!(
        effects.iter().any(
            |e| matches!(e, Effect::Finish { status: FinalStatus::Error, message, .. }
                if message.contains("gave up after 1 attempts"))
        ),
        "the one counted loss uses the budget: {effects:?}"
    );
}

#[test]
fn a_hand_back_of_a_job_being_cancelled_ends_it_cancelled() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    s.drain_effects();
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::Cancelling);
    s.drain_effects();
    assert!(s.handle_hand_back(sid(1), j(1), a(1), "cut off", t));
    let effects = s.drain_effects();
    assert!(
        matches!(
            &effects[..],
            [Effect::Finish {
                status: FinalStatus::Cancelled,
                ..
            }]
        ),
        "{effects:?}"
    );
    assert!(!s.knows_job(j(1)));
}

#[test]
fn a_finishing_or_orphaned_lease_cannot_be_handed_back() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 2), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();
    let decision = s.handle_result(sid(1), j(1), a(1), FinalStatus::Passed, "", t);
    assert!(matches!(decision, ResultDecision::Accept { .. }));
    assert!(
        !s.handle_hand_back(sid(1), j(1), a(1), "x", t),
        "its result is being recorded"
    );
    s.handle_runner_closed(sid(1), "reset", t);
    assert!(!s.handle_hand_back(sid(1), j(2), a(1), "x", t), "orphaned");
    assert!(requeues(&s.drain_effects()).is_empty());
    s.check_invariants().unwrap();
}
