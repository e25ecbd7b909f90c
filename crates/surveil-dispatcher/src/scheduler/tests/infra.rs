//! Infrastructure failures and quarantine: a runner whose fetch or
//! checkout failed loses the attempt, not the build; the job runs again,
//! elsewhere if it can; a runner failing again and again is left alone for
//! a while.

use super::*;

const UNREACHABLE: &str = "repository /srv/git/app is unreachable: connection refused";

fn infra(s: &mut Scheduler, session: u64, job: u64, attempt: u32, t: Instant) -> ResultDecision {
    s.handle_infra_failure(sid(session), j(job), a(attempt), UNREACHABLE, t)
}

fn retried(decision: &ResultDecision) -> bool {
    matches!(decision, ResultDecision::Retried { .. })
}

fn finished(effects: &[Effect]) -> Vec<(u64, FinalStatus, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Finish {
                job,
                status,
                message,
            } => Some((job.0, *status, message.clone())),
            _ => None,
        })
        .collect()
}

fn view<'a>(views: &'a [ConnectedRunner], name: &str) -> &'a ConnectedRunner {
    views.iter().find(|r| r.name == name).expect("connected")
}

/// Runner `a` (session 1) takes the next job and fails it for
/// infrastructure; returns the decision and the effects it emitted.
fn fail_on_a(s: &mut Scheduler, t: Instant) -> (ResultDecision, Vec<Effect>) {
    s.schedule(t);
    let [(1, id, attempt)] = assigns(&s.drain_effects())[..] else {
        panic!("expected one assignment to a");
    };
    let decision = infra(s, 1, id, attempt, t);
    s.check_invariants().unwrap();
    (decision, s.drain_effects())
}

#[test]
fn an_infrastructure_failure_requeues_the_job_and_the_next_attempt_prefers_another_runner() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    // Both are idle: the tie goes to the lower session.
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);

    let decision = infra(&mut s, 1, 1, 1, t);
    assert!(retried(&decision), "{decision:?}");
    let effects = s.drain_effects();
    assert_eq!(
        effects,
        vec![Effect::Requeue {
            job: j(1),
            attempt: a(1),
            reason: format!("infrastructure failure on runner a: {UNREACHABLE}"),
            handed_back: false,
        }]
    );
    assert_eq!(s.counts(), (1, 0), "queued again, a's slot free");
    s.check_invariants().unwrap();
    // a and b are both idle again, but a just failed this job: b gets it.
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 2)]);
    s.check_no_idle_match().unwrap();
    assert!(matches!(
        s.handle_result(sid(2), j(1), a(2), FinalStatus::Passed, "", t),
        ResultDecision::Accept {
            status: FinalStatus::Passed,
            ..
        }
    ));
    assert_eq!(view(&s.runners(), "a").infra_failures, 1);
}

#[test]
fn the_runner_that_failed_still_gets_the_job_when_no_other_is_free() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1), (2, 2, 1)]);
    assert!(retried(&infra(&mut s, 1, 1, 1, t)));
    s.drain_effects();
    // b is busy: a preference is not a ban, and no job waits while a
    // runner that may take it is idle.
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 2)]);
    s.check_no_idle_match().unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn infrastructure_failures_count_towards_max_attempts_and_the_give_up_names_the_last() {
    let t = Instant::now();
    let mut s = sched(2);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    let (decision, effects) = fail_on_a(&mut s, t);
    assert!(retried(&decision));
    assert!(requeued(&effects, 1));
    let (decision, effects) = fail_on_a(&mut s, t);
    let ResultDecision::Retried { message } = decision else {
        panic!("{decision:?}");
    };
    assert!(message.contains("out of attempts"), "{message}");
    assert_eq!(
        finished(&effects),
        vec![(
            1,
            FinalStatus::Error,
            format!(
                "gave up after 2 attempts (--max-attempts); the last: infrastructure failure on runner a: {UNREACHABLE}"
            )
        )]
    );
    assert!(!s.knows_job(j(1)));
    s.check_invariants().unwrap();
}

#[test]
fn an_infrastructure_failure_of_a_cancelled_job_ends_it_cancelled() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    s.drain_effects();
    assert_eq!(s.handle_cancel(j(1), t), CancelOutcome::Cancelling);
    s.drain_effects();
    assert_eq!(
        infra(&mut s, 1, 1, 1, t),
        ResultDecision::Accept {
            status: FinalStatus::Cancelled,
            message: format!("cancelled by a user: {UNREACHABLE}"),
        }
    );
    assert!(
        s.drain_effects().is_empty(),
        "no requeue of a cancelled job"
    );
}

#[test]
fn only_the_live_lease_may_report_an_infrastructure_failure() {
    let t = Instant::now();
    let mut s = sched(3);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.schedule(t);
    assert_eq!(assigns(&s.drain_effects()), vec![(1, 1, 1)]);
    // Another runner, an old attempt, an unknown job: nothing changes.
    assert!(matches!(
        infra(&mut s, 2, 1, 1, t),
        ResultDecision::Revoked { .. }
    ));
    assert!(matches!(
        infra(&mut s, 1, 1, 7, t),
        ResultDecision::Revoked { .. }
    ));
    assert_eq!(infra(&mut s, 1, 9, 1, t), ResultDecision::Unknown);
    assert!(s.drain_effects().is_empty());
    assert_eq!(s.lease_holder(j(1), a(1)), Some(sid(1)));
    assert!(s.runners().iter().all(|r| r.infra_failures == 0));
}

#[test]
fn k_failures_in_a_row_quarantine_a_runner_until_the_tick_that_ends_it_doubling_each_time() {
    let t0 = Instant::now();
    let mut s = sched(10);
    s.handle_runner_connected(sid(1), runner("a", 1), t0);
    for id in 1..=5 {
        s.handle_job_submitted(job(id, REPO), t0);
    }
    // Jobs 1, 2, 3 each fail once on a (each then waits at attempt 1).
    for expect_quarantine in [false, false, true] {
        let (decision, _) = fail_on_a(&mut s, t0);
        let ResultDecision::Retried { message } = decision else {
            panic!("{decision:?}");
        };
        assert_eq!(
            message.contains("runner a is quarantined for 300s"),
            expect_quarantine,
            "{message}"
        );
    }
    let views = s.runners();
    assert_eq!(view(&views, "a").infra_failures, 3);
    assert_eq!(
        view(&views, "a").quarantined_until,
        Some(t0 + QUARANTINE_FOR)
    );
    assert_eq!(s.quarantined_count(), 1);

    // Quarantined: idle, yet given nothing, and that is no broken
    // invariant. The jobs say why they wait.
    s.schedule(t0);
    assert!(s.drain_effects().is_empty());
    s.check_no_idle_match().unwrap();
    let (_, waiting) = &s.waiting()[0];
    assert_eq!(
        waiting.reason,
        WaitReason::Quarantined {
            matching: 1,
            quarantined: vec!["a".to_owned()],
        }
    );
    assert_eq!(
        waiting.reason.describe(),
        "the runner that builds it (a) is quarantined after infrastructure failures"
    );

    let almost = t0 + QUARANTINE_FOR - Duration::from_millis(1);
    s.handle_frame(sid(1), almost);
    assert!(!s.handle_tick(almost), "not over yet");
    s.schedule(almost);
    assert!(s.drain_effects().is_empty());

    // Its end is a tick's business, and that tick asks for a pass.
    let t1 = t0 + QUARANTINE_FOR;
    s.handle_frame(sid(1), t1);
    assert!(s.handle_tick(t1), "the quarantine ends");
    assert_eq!(s.quarantined_count(), 0);
    assert_eq!(view(&s.runners(), "a").infra_failures, 3, "the count stays");

    // Still failing: the very next failure quarantines it again, for
    // twice as long.
    let (decision, _) = fail_on_a(&mut s, t1);
    let ResultDecision::Retried { message } = decision else {
        panic!("{decision:?}");
    };
    assert!(message.contains("quarantined for 600s"), "{message}");
    assert_eq!(
        view(&s.runners(), "a").quarantined_until,
        Some(t1 + 2 * QUARANTINE_FOR)
    );
    let t2 = t1 + 2 * QUARANTINE_FOR;
    s.handle_frame(sid(1), t2);
    assert!(s.handle_tick(t2));

    // Its disk was freed: a good result resets the count and the doubling.
    s.schedule(t2);
    let (id, attempt) = match assigns(&s.drain_effects())[..] {
        [(1, id, attempt)] => (id, attempt),
        ref other => panic!("{other:?}"),
    };
    assert!(matches!(
        s.handle_result(sid(1), j(id), a(attempt), FinalStatus::Failed, "", t2),
        ResultDecision::Accept { .. }
    ));
    s.handle_result_stored(j(id), a(attempt));
    let views = s.runners();
    assert_eq!(view(&views, "a").infra_failures, 0);
    assert_eq!(view(&views, "a").quarantined_until, None);
    for round in 1..=QUARANTINE_AFTER {
        let (decision, _) = fail_on_a(&mut s, t2);
        let ResultDecision::Retried { message } = decision else {
            panic!("{decision:?}");
        };
        assert_eq!(
            message.contains("quarantined for 300s"),
            round == QUARANTINE_AFTER,
            "round {round}, back to the first length: {message}"
        );
    }
    s.check_invariants().unwrap();
}

#[test]
fn a_quarantine_outlives_a_reconnect_and_a_good_result_resets_the_count() {
    let t = Instant::now();
    let mut s = sched(10);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    for id in 1..=3 {
        s.handle_job_submitted(job(id, REPO), t);
        fail_on_a(&mut s, t);
    }
    assert_eq!(s.quarantined_count(), 1);
    // A new session under the same name does not start afresh.
    s.handle_runner_disconnected(sid(1), "connection closed", t);
    s.handle_runner_connected(sid(5), runner("a", 1), t);
    s.schedule(t);
    assert!(s.drain_effects().is_empty(), "still quarantined");
    assert_eq!(view(&s.runners(), "a").infra_failures, 3);

    // Two failures, then a result of the commit's own: no quarantine.
    let mut s = sched(10);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    for id in 1..=3 {
        s.handle_job_submitted(job(id, REPO), t);
    }
    fail_on_a(&mut s, t);
    fail_on_a(&mut s, t);
    s.handle_runner_disconnected(sid(1), "connection closed", t);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    assert_eq!(view(&s.runners(), "a").infra_failures, 2, "kept by name");
    s.schedule(t);
    let [(1, id, attempt)] = assigns(&s.drain_effects())[..] else {
        panic!("one assignment");
    };
    s.handle_result(
        sid(1),
        j(id),
        a(attempt),
        FinalStatus::Error,
        "bad pipeline",
        t,
    );
    s.handle_result_stored(j(id), a(attempt));
    assert_eq!(view(&s.runners(), "a").infra_failures, 0);
    for _ in 0..2 {
        s.schedule(t);
        let [(1, id, attempt)] = assigns(&s.drain_effects())[..] else {
            panic!("one assignment");
        };
        infra(&mut s, 1, id, attempt, t);
        s.drain_effects();
    }
    assert_eq!(s.quarantined_count(), 0, "2 in a row, not 3");
}

#[test]
fn a_quarantined_runner_is_named_while_the_others_are_busy_and_zero_turns_it_off() {
    let t = Instant::now();
    let mut s = sched(10);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    for id in 1..=3 {
        s.handle_job_submitted(job(id, REPO), t);
        fail_on_a(&mut s, t);
    }
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.schedule(t);
    // Job 1 failed three times on a; b takes it as attempt 4.
    assert_eq!(assigns(&s.drain_effects()), vec![(2, 1, 4)]);
    let (_, waiting) = &s.waiting()[0];
    assert_eq!(
        waiting.reason.describe(),
        "runner a is quarantined after infrastructure failures; the other 1 that build it is busy"
    );
    assert_eq!(waiting.reason.code(), "quarantined");

    let mut s = Scheduler::new(SchedulerConfig {
        quarantine_after: 0,
        ..s.config
    });
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    for id in 1..=5 {
        s.handle_job_submitted(job(id, REPO), t);
        fail_on_a(&mut s, t);
    }
    assert_eq!(s.quarantined_count(), 0);
    assert_eq!(view(&s.runners(), "a").infra_failures, 5);
}

#[test]
fn quarantines_double_up_to_an_hour() {
    let t = Instant::now();
    let mut s = sched(100);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    let mut now = t;
    let mut lengths = Vec::new();
    for id in 1..=12 {
        s.handle_job_submitted(job(id, REPO), now);
        s.schedule(now);
        let [(1, id, attempt)] = assigns(&s.drain_effects())[..] else {
            panic!("one assignment");
        };
        infra(&mut s, 1, id, attempt, now);
        s.drain_effects();
        if let Some(until) = view(&s.runners(), "a").quarantined_until {
            lengths.push(until - now);
            now = until;
            s.handle_frame(sid(1), now);
            assert!(s.handle_tick(now));
        }
    }
    let minutes: Vec<u64> = lengths.iter().map(|d| d.as_secs() / 60).collect();
    assert_eq!(&minutes[..], &[5, 10, 20, 40, 60, 60, 60, 60, 60, 60]);
}

#[test]
fn forgotten_names_are_dropped_but_connected_ones_kept() {
    let t = Instant::now();
    let mut s = sched(10);
    s.handle_runner_connected(sid(1), runner("a", 1), t);
    s.handle_runner_connected(sid(2), runner("b", 1), t);
    s.handle_job_submitted(job(1, REPO), t);
    s.handle_job_submitted(job(2, REPO), t);
    s.schedule(t);
    s.drain_effects();
    infra(&mut s, 1, 1, 1, t);
    infra(&mut s, 2, 2, 1, t);
    s.drain_effects();
    s.handle_runner_disconnected(sid(2), "gone", t);
    let later = t + MAX_QUARANTINE;
    s.handle_frame(sid(1), later);
    s.handle_tick(later);
    assert_eq!(s.health.len(), 1, "{:?}", s.health);
    assert!(s.health.contains_key("a"));
}
