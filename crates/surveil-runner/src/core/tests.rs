//! Unit and property tests of the runner's session core: no sockets, no
//! tasks, time advanced by hand, jitter fixed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use surveil_proto::{Cancel, Error, Ping, ResultAck, Stream, SubmitAck};

use super::*;

const REPO: &str = "/srv/git/app";
const MS: Duration = Duration::from_millis(1);
const DRAIN: Duration = Duration::from_secs(2);

fn config(slots: u32) -> Config {
    let mut config = Config::new("/work", vec![REPO.into()]);
    config.name = "ci-1".into();
    config.token = Some("tok".into());
    config.slots = slots;
    config.labels = vec!["linux".into()];
    config.drain_timeout = DRAIN;
    config
}

/// Jitter pinned to the top of each step: delays are 100, 200, 400… ms.
fn backoff() -> Backoff {
    Backoff::with_random(100 * MS, 3000 * MS, || 1.0)
}

/// The store epoch of the dispatcher the tests talk to, unless they say.
const EPOCH: &str = "e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1";

fn core(slots: u32, pending: Vec<JobFinished>, t0: Instant) -> RunnerCore {
    let pending = pending
        .into_iter()
        .map(|result| Stamped {
            result,
            epoch: EPOCH.into(),
        })
        .collect();
    RunnerCore::new(&config(slots), backoff(), pending, t0)
}

fn actions(core: &mut RunnerCore) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn sent(actions: &[Action]) -> Vec<Msg> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(Envelope { msg: Some(msg) }) => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn hello_of(actions: &[Action]) -> Option<&Hello> {
    actions.iter().find_map(|a| match a {
        Action::Dial(hello) => Some(hello),
        _ => None,
    })
}

fn lease_keys(hello: &Hello) -> Vec<LeaseKey> {
    hello.leases.iter().map(|l| (l.job_id, l.attempt)).collect()
}

fn welcome(heartbeat_ms: u32) -> Welcome {
    Welcome {
        session_id: "s".into(),
        heartbeat_interval_ms: heartbeat_ms,
        runner_timeout_ms: 500,
        server_version: "test".into(),
        epoch: EPOCH.into(),
    }
}

fn welcome_in(epoch: &str) -> Welcome {
    Welcome {
        epoch: epoch.into(),
        ..welcome(0)
    }
}

fn assign(job_id: u64, repo: &str) -> Msg {
    Msg::Assign(Assign {
        job_id,
        attempt: 1,
        repo: repo.into(),
        branch: "main".into(),
        commit: format!("{job_id:040x}"),
        ..Assign::default()
    })
}

fn result(job_id: u64, attempt: u32, status: JobStatus) -> JobFinished {
    JobFinished {
        job_id,
        attempt,
        status: status as i32,
        message: String::new(),
        tasks: vec![],
        infrastructure: false,
        commit: format!("{job_id:040x}"),
    }
}

fn ack(job_id: u64, accepted: bool) -> Msg {
    Msg::ResultAck(ResultAck {
        job_id,
        attempt: 1,
        accepted,
        message: String::new(),
    })
}

fn log(job_id: u64, offset: u64, data: &'static [u8]) -> Log {
    Log {
        job_id,
        attempt: 1,
        task: 0,
        stream: Stream::Stdout as i32,
        offset,
        data: data.into(),
    }
}

fn dropped() -> Event {
    Event::Disconnected {
        reason: "test".into(),
        unsent: None,
    }
}

/// A core with one slot, connected at `t0` (no pings), its dial drained.
fn connected(t0: Instant) -> RunnerCore {
    let mut c = core(1, vec![], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    actions(&mut c);
    c
}

#[test]
fn dials_at_once_with_the_runner_and_every_lease_it_holds() {
    let t0 = Instant::now();
    let pending = vec![
        result(9, 2, JobStatus::Passed),
        result(3, 1, JobStatus::Failed),
    ];
    let mut c = core(2, pending, t0);
    let first = actions(&mut c);
    let hello = hello_of(&first).expect("a dial at start");
    assert_eq!(
        (hello.name.as_str(), hello.token.as_str(), hello.slots),
        ("ci-1", "tok", 2)
    );
    assert_eq!(hello.repos, [REPO]);
    assert_eq!(hello.labels, ["linux"]);
    assert_eq!(lease_keys(hello), [(3, 1), (9, 2)]);
    assert_eq!(c.deadline(), None, "waiting for the dial's outcome");

    c.handle(Event::Connected(welcome(0)), t0);
    let resent: Vec<LeaseKey> = sent(&actions(&mut c))
        .into_iter()
        .filter_map(|m| match m {
            Msg::JobFinished(f) => Some((f.job_id, f.attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(
        resent,
        [(3, 1), (9, 2)],
        "results from the outbox go out first thing"
    );
}

#[test]
fn a_result_is_held_until_acked_and_resent_after_every_reconnect() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(4, REPO)), t0);
    assert_eq!(
        actions(&mut c),
        [Action::Start {
            assign: match assign(4, REPO) {
                Msg::Assign(a) => a,
                _ => unreachable!(),
            },
            epoch: EPOCH.into(),
        }]
    );
    c.handle(
        Event::Job(JobEvent::Finished(result(4, 1, JobStatus::Passed))),
        t0,
    );
    assert!(matches!(&sent(&actions(&mut c))[..], [Msg::JobFinished(f)] if f.job_id == 4));

    let mut t = t0;
    for _ in 0..3 {
        c.handle(dropped(), t);
        t += Duration::from_secs(1);
        c.handle(Event::Tick, t);
        let dial = actions(&mut c);
        assert_eq!(
            lease_keys(hello_of(&dial).unwrap()),
            [(4, 1)],
            "listed while held"
        );
        c.handle(Event::Connected(welcome(0)), t);
        let again = sent(&actions(&mut c));
        assert!(
            matches!(&again[..], [Msg::JobFinished(f)] if f.job_id == 4),
            "resent after the reconnect: {again:?}"
        );
    }
    c.handle(Event::Frame(ack(4, true)), t);
    assert_eq!(
        actions(&mut c),
        [Action::Forget {
            job_id: 4,
            attempt: 1
        }]
    );
    c.handle(Event::Frame(ack(4, true)), t);
    assert_eq!(actions(&mut c), [], "a second ack forgets nothing");
    c.handle(dropped(), t);
    c.handle(Event::Tick, t + Duration::from_secs(1));
    assert!(lease_keys(hello_of(&actions(&mut c)).unwrap()).is_empty());
    c.handle(Event::Connected(welcome(0)), t + Duration::from_secs(1));
    assert!(
        sent(&actions(&mut c)).is_empty(),
        "an acked result is never resent"
    );
}

#[test]
fn a_refused_result_is_dropped_like_an_accepted_one() {
    let t0 = Instant::now();
    let mut c = core(1, vec![result(11, 2, JobStatus::Passed)], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    actions(&mut c);
    c.handle(
        Event::Frame(Msg::ResultAck(ResultAck {
            job_id: 11,
            attempt: 2,
            accepted: false,
            message: "revoked".into(),
        })),
        t0,
    );
    assert_eq!(
        actions(&mut c),
        [Action::Forget {
            job_id: 11,
            attempt: 2
        }]
    );
    assert!(c.leases().is_empty());
}

#[test]
fn backoff_grows_across_failed_dials_and_resets_on_connect() {
    let t0 = Instant::now();
    let mut c = core(1, vec![], t0);
    actions(&mut c);
    let mut t = t0;
    for expected in [100, 200, 400, 800, 1600, 3000, 3000] {
        c.handle(Event::DialFailed("refused".into()), t);
        assert_eq!(c.deadline(), Some(t + expected * MS));
        c.handle(Event::Tick, t + expected * MS - MS);
        assert!(actions(&mut c).is_empty(), "no dial before the delay");
        t += expected * MS;
        c.handle(Event::Tick, t);
        assert!(
            hello_of(&actions(&mut c)).is_some(),
            "a dial after {expected} ms"
        );
    }
    c.handle(Event::Connected(welcome(0)), t);
    c.handle(dropped(), t);
    assert_eq!(c.deadline(), Some(t + 100 * MS), "reset by the connection");
}

#[test]
fn while_a_standby_answers_the_runner_dials_again_soon_without_backing_off() {
    let t0 = Instant::now();
    let mut c = core(1, vec![], t0);
    actions(&mut c);
    let mut t = t0;
    c.handle(Event::DialFailed("refused".into()), t);
    t += 100 * MS;
    c.handle(Event::Tick, t);
    actions(&mut c);
    for _ in 0..10 {
        c.handle(Event::NoLeaderYet("NOT_LEADER".into()), t);
        assert_eq!(c.deadline(), Some(t + FAILOVER_RETRY), "a steady pause");
        t += FAILOVER_RETRY;
        c.handle(Event::Tick, t);
        assert!(hello_of(&actions(&mut c)).is_some());
    }
    c.handle(Event::DialFailed("refused".into()), t);
    assert_eq!(
        c.deadline(),
        Some(t + 200 * MS),
        "the backoff goes on where it was once nobody answers"
    );
}

#[test]
fn jobs_beyond_the_slots_wait_and_start_as_slots_free() {
    let t0 = Instant::now();
    let mut c = core(2, vec![], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    for job in [40, 41, 42] {
        c.handle(Event::Frame(assign(job, REPO)), t0);
    }
    let started: Vec<u64> = actions(&mut c)
        .iter()
        .filter_map(|a| match a {
            Action::Start { assign: a, .. } => Some(a.job_id),
            _ => None,
        })
        .collect();
    assert_eq!(started, [40, 41]);
    assert_eq!(
        c.leases(),
        [(40, 1), (41, 1), (42, 1)],
        "the queued one is held too"
    );
    c.handle(
        Event::Job(JobEvent::Finished(result(41, 1, JobStatus::Passed))),
        t0,
    );
    let next = actions(&mut c);
    assert!(
        next.iter()
            .any(|a| matches!(a, Action::Start { assign: a, .. } if a.job_id == 42)),
        "{next:?}"
    );
}

#[test]
fn an_assignment_already_held_is_not_run_again() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(5, REPO)), t0);
    assert_eq!(actions(&mut c).len(), 1);
    c.handle(Event::Frame(assign(5, REPO)), t0);
    assert!(actions(&mut c).is_empty(), "running: not again");
    c.handle(
        Event::Job(JobEvent::Finished(result(5, 1, JobStatus::Passed))),
        t0,
    );
    actions(&mut c);
    c.handle(Event::Frame(assign(5, REPO)), t0);
    assert!(
        actions(&mut c).is_empty(),
        "finished, not yet acked: not again"
    );
}

#[test]
fn a_repository_not_built_here_is_refused_without_running() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(3, "/srv/git/other")), t0);
    let acts = actions(&mut c);
    let [
        Action::Store {
            result: refused, ..
        },
    ] = &acts[..]
    else {
        panic!("{acts:?}");
    };
    assert_eq!(refused.status(), JobStatus::Error);
    assert_eq!(refused.commit, format!("{:040x}", 3), "it names its commit");
    assert_eq!(
        refused.message,
        "runner ci-1 does not build repository /srv/git/other (its REPO list: /srv/git/app)"
    );
    assert_eq!(c.leases(), [(3, 1)], "held while it is being stored");
    c.handle(Event::Job(JobEvent::Finished(refused.clone())), t0);
    assert!(matches!(&sent(&actions(&mut c))[..], [Msg::JobFinished(f)] if f.job_id == 3));
}

#[test]
fn cancel_stops_a_running_job_and_ends_a_queued_one_without_running_it() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(6, REPO)), t0);
    c.handle(Event::Frame(assign(7, REPO)), t0);
    actions(&mut c);
    c.handle(
        Event::Frame(Msg::Cancel(Cancel {
            job_id: 6,
            attempt: 1,
        })),
        t0,
    );
    assert_eq!(
        actions(&mut c),
        [Action::Cancel {
            job_id: 6,
            attempt: 1,
            reason: "cancelled by the dispatcher".into()
        }]
    );
    c.handle(
        Event::Frame(Msg::Cancel(Cancel {
            job_id: 7,
            attempt: 1,
        })),
        t0,
    );
    let acts = actions(&mut c);
    assert!(
        matches!(&acts[..], [Action::Store { result: f, .. }] if f.job_id == 7
            && f.status() == JobStatus::Cancelled
            && f.message == "cancelled by the dispatcher before it started"),
        "{acts:?}"
    );
    c.handle(
        Event::Frame(Msg::Cancel(Cancel {
            job_id: 99,
            attempt: 1,
        })),
        t0,
    );
    assert!(actions(&mut c).is_empty(), "nothing for an unknown lease");
}

#[test]
fn logs_and_started_while_disconnected_are_sent_after_the_handshake() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(8, REPO)), t0);
    actions(&mut c);
    c.handle(dropped(), t0);
    c.handle(
        Event::Job(JobEvent::Started(Started {
            job_id: 8,
            attempt: 1,
        })),
        t0,
    );
    c.handle(Event::Job(JobEvent::Log(log(8, 0, b"one\n"))), t0);
    assert!(
        sent(&actions(&mut c)).is_empty(),
        "nothing is sent while down"
    );
    c.handle(Event::Tick, t0 + Duration::from_secs(1));
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0 + Duration::from_secs(1));
    let after = sent(&actions(&mut c));
    assert!(
        matches!(&after[..], [Msg::Started(s), Msg::Log(l)] if s.job_id == 8 && l.offset == 0),
        "{after:?}"
    );
    // Once sent, a later reconnect resends the log (idempotent by offset)
    // but not the Started.
    c.handle(dropped(), t0 + Duration::from_secs(1));
    c.handle(Event::Tick, t0 + Duration::from_secs(2));
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0 + Duration::from_secs(2));
    assert!(matches!(&sent(&actions(&mut c))[..], [Msg::Log(_)]));
}

#[test]
fn a_started_whose_write_failed_goes_out_after_the_reconnect() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(9, REPO)), t0);
    actions(&mut c);
    c.handle(
        Event::Job(JobEvent::Started(Started {
            job_id: 9,
            attempt: 1,
        })),
        t0,
    );
    let acts = actions(&mut c);
    let [Action::Send(frame)] = &acts[..] else {
        panic!("{acts:?}");
    };
    c.handle(
        Event::Disconnected {
            reason: "write failed".into(),
            unsent: Some(frame.clone()),
        },
        t0,
    );
    c.handle(Event::Tick, t0 + Duration::from_secs(1));
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0 + Duration::from_secs(1));
    assert!(matches!(&sent(&actions(&mut c))[..], [Msg::Started(s)] if s.job_id == 9));
}

fn resend(job_id: u64, log_offset: Option<u64>, result: bool, retry_after_ms: u32) -> Msg {
    Msg::Resend(Resend {
        job_id,
        attempt: 1,
        log_offset,
        result,
        retry_after_ms,
        message: "store: disk full".into(),
        started: false,
    })
}

#[test]
fn a_resend_sends_the_log_from_its_offset_and_the_result_later_on_the_same_connection() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(8, REPO)), t0);
    actions(&mut c);
    for (offset, data) in [(0, &b"aaa"[..]), (3, b"bbb"), (6, b"ccc")] {
        let chunk = Log {
            data: data.to_vec().into(),
            ..log(8, offset, b"")
        };
        c.handle(Event::Job(JobEvent::Log(chunk)), t0);
    }
    c.handle(
        Event::Job(JobEvent::Finished(result(8, 1, JobStatus::Passed))),
        t0,
    );
    actions(&mut c);

    c.handle(Event::Frame(resend(8, Some(3), true, 500)), t0);
    assert!(sent(&actions(&mut c)).is_empty(), "not before retry_after");
    assert_eq!(c.deadline(), Some(t0 + 500 * MS), "woken for it");
    c.handle(Event::Tick, t0 + 500 * MS);
    let acts = actions(&mut c);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::Disconnect | Action::Dial(_))),
        "the connection stays: {acts:?}"
    );
    let frames = sent(&acts);
    assert!(
        matches!(&frames[..], [Msg::Log(a), Msg::Log(b), Msg::JobFinished(f)]
            if a.offset == 3 && b.offset == 6 && f.job_id == 8),
        "{frames:?}"
    );
    c.handle(Event::Tick, t0 + 2000 * MS);
    assert!(sent(&actions(&mut c)).is_empty(), "sent once");

    // A resend for an attempt no longer held (acked meanwhile) is ignored.
    c.handle(Event::Frame(ack(8, true)), t0 + 2000 * MS);
    actions(&mut c);
    c.handle(Event::Frame(resend(8, Some(0), true, 0)), t0 + 2000 * MS);
    c.handle(Event::Tick, t0 + 3000 * MS);
    assert!(sent(&actions(&mut c)).is_empty());
}

#[test]
fn a_resend_past_the_retained_log_fills_the_hole_with_a_note() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(8, REPO)), t0);
    actions(&mut c);
    // More than the retained bytes: the oldest chunks are dropped.
    let big = vec![b'x'; 64 * 1024];
    let chunks = LOG_RETAIN_BYTES / big.len() + 2;
    for n in 0..chunks {
        let chunk = Log {
            data: big.clone().into(),
            ..log(8, (n * big.len()) as u64, b"")
        };
        c.handle(Event::Job(JobEvent::Log(chunk)), t0);
    }
    actions(&mut c);
    c.handle(Event::Frame(resend(8, Some(0), false, 0)), t0);
    let frames = sent(&actions(&mut c));
    let Some(Msg::Log(note)) = frames.first() else {
        panic!("{frames:?}");
    };
    let Some(Msg::Log(oldest)) = frames.get(1) else {
        panic!("{frames:?}");
    };
    assert_eq!((note.offset, note.stream()), (0, Stream::System));
    assert!(
        note.offset + note.data.len() as u64 <= oldest.offset,
        "no overlap"
    );
    assert!(
        String::from_utf8_lossy(&note.data).contains("lost"),
        "{note:?}"
    );
    assert_eq!(frames.len(), 1 + LOG_RETAIN_BYTES / big.len());
}

#[test]
fn resends_wait_for_the_next_handshake_once_the_connection_drops() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(8, REPO)), t0);
    actions(&mut c);
    c.handle(
        Event::Job(JobEvent::Finished(result(8, 1, JobStatus::Passed))),
        t0,
    );
    actions(&mut c);
    c.handle(Event::Frame(resend(8, None, true, 100)), t0);
    c.handle(dropped(), t0);
    c.handle(Event::Tick, t0 + 1000 * MS);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0 + 1000 * MS);
    // The handshake's own resend, once.
    assert!(matches!(&sent(&actions(&mut c))[..], [Msg::JobFinished(f)] if f.job_id == 8));
    c.handle(Event::Tick, t0 + 2000 * MS);
    assert!(sent(&actions(&mut c)).is_empty());
}

#[test]
fn pings_are_answered_and_silence_ends_the_connection() {
    let t0 = Instant::now();
    let mut c = core(1, vec![], t0);
    actions(&mut c);
    // 4 × 100 ms of pings is less than the 500 ms runner timeout.
    c.handle(Event::Connected(welcome(100)), t0);
    assert_eq!(c.deadline(), Some(t0 + 500 * MS));
    c.handle(Event::Frame(Msg::Ping(Ping { seq: 7 })), t0 + 300 * MS);
    assert_eq!(sent(&actions(&mut c)), [Msg::Pong(Pong { seq: 7 })]);
    assert_eq!(
        c.deadline(),
        Some(t0 + 800 * MS),
        "a frame renews the limit"
    );
    c.handle(Event::Tick, t0 + 800 * MS);
    assert_eq!(actions(&mut c), [Action::Disconnect]);
    assert!(!c.is_connected());
    assert_eq!(
        c.deadline(),
        Some(t0 + 900 * MS),
        "redial after the backoff"
    );
}

#[test]
fn an_unexpected_message_is_answered_with_error_then_the_connection_closes() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(Msg::SubmitAck(SubmitAck::default())), t0);
    let acts = actions(&mut c);
    assert!(
        matches!(&acts[..], [Action::Send(Envelope { msg: Some(Msg::Error(e)) }), Action::Disconnect]
            if e.message == "a runner does not accept SubmitAck"),
        "{acts:?}"
    );
    let mut c = connected(t0);
    c.handle(
        Event::Frame(Msg::Error(Error {
            message: "bad".into(),
        })),
        t0,
    );
    assert_eq!(actions(&mut c), [Action::Disconnect]);
}

fn hand_back_of(job_id: u64, started: bool, what: &str) -> Msg {
    Msg::HandBack(HandBack {
        job_id,
        attempt: 1,
        started,
        reason: format!("runner ci-1 shutting down: {what}"),
    })
}

#[test]
fn drain_tells_the_dispatcher_and_hands_back_what_it_will_not_finish() {
    let t0 = Instant::now();
    let mut c = core(1, vec![], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    c.handle(Event::Frame(assign(20, REPO)), t0);
    c.handle(Event::Frame(assign(22, REPO)), t0);
    actions(&mut c);
    assert_eq!(c.leases(), [(20, 1), (22, 1)], "22 waits for the one slot");
    c.handle(Event::Shutdown(Stop::Graceful), t0);
    assert_eq!(
        sent(&actions(&mut c)),
        [
            Msg::Drain(Drain { deadline_ms: 2000 }),
            hand_back_of(22, false, "never started"),
        ],
        "the drain is announced, and the job never started is given back"
    );
    c.handle(Event::Frame(assign(21, REPO)), t0);
    assert_eq!(
        actions(&mut c),
        [Action::Send(
            hand_back_of(21, false, "assigned while it drained; never started").into()
        )],
        "an assignment that crossed the Drain is given back, not started"
    );
    assert_eq!(c.leases(), [(20, 1)]);
    assert_eq!(c.deadline(), Some(t0 + DRAIN));
    c.handle(Event::Tick, t0 + DRAIN);
    let reason = "runner shut down: the job did not finish within the drain timeout (2s)";
    assert_eq!(
        actions(&mut c),
        [Action::Cancel {
            job_id: 20,
            attempt: 1,
            reason: reason.into()
        }]
    );
    let mut killed = result(20, 1, JobStatus::Cancelled);
    killed.message = reason.into();
    c.handle(Event::Job(JobEvent::Finished(killed)), t0 + DRAIN);
    assert_eq!(
        actions(&mut c),
        [
            Action::Forget {
                job_id: 20,
                attempt: 1
            },
            Action::Send(hand_back_of(20, true, reason).into()),
        ],
        "the cut-off job is handed back, not reported cancelled"
    );
    assert!(c.is_done(), "nothing is left to deliver");
    assert!(c.unacknowledged().is_empty());
}

#[test]
fn a_job_that_ends_on_its_own_as_the_drain_cuts_it_off_is_reported() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(20, REPO)), t0);
    c.handle(Event::Shutdown(Stop::Graceful), t0);
    c.handle(Event::Tick, t0 + DRAIN);
    actions(&mut c);
    c.handle(
        Event::Job(JobEvent::Finished(result(20, 1, JobStatus::Passed))),
        t0 + DRAIN,
    );
    assert_eq!(
        sent(&actions(&mut c)),
        [Msg::JobFinished(result(20, 1, JobStatus::Passed))]
    );
    assert!(!c.is_done(), "the result waits for its ack");
    c.handle(Event::Frame(ack(20, true)), t0 + DRAIN);
    assert!(c.is_done());
}

#[test]
fn a_reconnect_during_the_drain_announces_it_again() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(20, REPO)), t0);
    c.handle(Event::Shutdown(Stop::Graceful), t0);
    actions(&mut c);
    c.handle(dropped(), t0 + 100 * MS);
    c.handle(Event::Tick, t0 + 200 * MS);
    let dial = actions(&mut c);
    assert_eq!(lease_keys(hello_of(&dial).unwrap()), [(20, 1)]);
    c.handle(Event::Connected(welcome(0)), t0 + 500 * MS);
    assert!(
        sent(&actions(&mut c)).contains(&Msg::Drain(Drain { deadline_ms: 1500 })),
        "the new session is told too, with the time left"
    );
}

#[test]
fn a_second_signal_cuts_off_at_once_and_hands_back() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(30, REPO)), t0);
    actions(&mut c);
    c.handle(Event::Shutdown(Stop::Graceful), t0);
    actions(&mut c);
    c.handle(Event::Shutdown(Stop::Immediate), t0);
    assert_eq!(
        actions(&mut c),
        [Action::Cancel {
            job_id: 30,
            attempt: 1,
            reason: "runner stopped at once by a second shutdown signal".into()
        }]
    );
    c.handle(Event::Tick, t0 + DRAIN);
    assert!(
        actions(&mut c).is_empty(),
        "cancelled once, not again at the drain deadline"
    );
    c.handle(
        Event::Job(JobEvent::Finished(result(30, 1, JobStatus::Cancelled))),
        t0 + DRAIN,
    );
    assert!(
        sent(&actions(&mut c))
            .iter()
            .any(|m| matches!(m, Msg::HandBack(h) if h.job_id == 30 && h.started)),
        "handed back"
    );
    assert!(c.is_done());
}

#[test]
fn a_cut_off_job_whose_hand_back_cannot_be_sent_is_given_up_not_reported() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Frame(assign(30, REPO)), t0);
    c.handle(Event::Shutdown(Stop::Immediate), t0);
    c.handle(dropped(), t0);
    actions(&mut c);
    c.handle(
        Event::Job(JobEvent::Finished(result(30, 1, JobStatus::Cancelled))),
        t0 + MS,
    );
    let acts = actions(&mut c);
    assert!(sent(&acts).is_empty(), "{acts:?}");
    assert!(acts.contains(&Action::Forget {
        job_id: 30,
        attempt: 1
    }));
    assert!(c.is_done());
    assert!(
        c.unacknowledged().is_empty(),
        "no cancelled verdict is kept for the next start: the lease expires at the dispatcher"
    );
}

#[test]
fn an_idle_runner_is_done_at_the_first_signal() {
    let t0 = Instant::now();
    let mut c = connected(t0);
    c.handle(Event::Shutdown(Stop::Graceful), t0);
    assert!(c.is_done());
    assert_eq!(c.deadline(), None);
}

const EPOCH2: &str = "e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2";

fn assign_for(job_id: u64, commit: &str) -> Msg {
    Msg::Assign(Assign {
        job_id,
        attempt: 1,
        repo: REPO.into(),
        branch: "main".into(),
        commit: commit.into(),
        ..Assign::default()
    })
}

fn started_jobs(acts: &[Action]) -> Vec<(u64, String, String)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Start { assign, epoch } => {
                Some((assign.job_id, assign.commit.clone(), epoch.clone()))
            }
            _ => None,
        })
        .collect()
}

fn results_sent(acts: &[Action]) -> Vec<LeaseKey> {
    sent(acts)
        .into_iter()
        .filter_map(|m| match m {
            Msg::JobFinished(f) => Some((f.job_id, f.attempt)),
            _ => None,
        })
        .collect()
}

/// The dispatcher's store was restored from a backup and given a new
/// epoch: whatever the runner holds from the old one (an unacknowledged
/// result, a running job, one not started) names jobs of another store
/// life. All are dropped: the result is never sent and leaves the outbox,
/// the running job is killed and its end forgotten, the queued one never
/// starts; the same (job, attempt) assigned anew under the new epoch runs
/// once the killed one has ended, stamped with the new epoch.
#[test]
fn a_welcome_with_another_epoch_drops_and_kills_what_the_old_one_assigned() {
    let t0 = Instant::now();
    let mut c = core(1, vec![result(9, 1, JobStatus::Passed)], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    assert_eq!(results_sent(&actions(&mut c)), [(9, 1)]);
    c.handle(Event::Frame(assign(4, REPO)), t0);
    c.handle(Event::Frame(assign(5, REPO)), t0);
    assert_eq!(
        started_jobs(&actions(&mut c)),
        [(4, format!("{:040x}", 4), EPOCH.to_owned())],
        "one slot: job 5 waits"
    );
    c.handle(dropped(), t0);
    let t1 = t0 + Duration::from_secs(1);
    c.handle(Event::Tick, t1);
    let dial = actions(&mut c);
    let hello = hello_of(&dial).expect("a dial");
    assert_eq!(lease_keys(hello), [(4, 1), (5, 1), (9, 1)]);
    assert_eq!(hello.epoch, EPOCH, "the leases' epoch is named");

    c.handle(Event::Connected(welcome_in(EPOCH2)), t1);
    let acts = actions(&mut c);
    assert_eq!(
        results_sent(&acts),
        [],
        "no result of the old epoch is sent"
    );
    assert!(
        acts.contains(&Action::Forget {
            job_id: 9,
            attempt: 1
        }),
        "the old result leaves the outbox: {acts:?}"
    );
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Cancel {
                job_id: 4,
                attempt: 1,
                ..
            }
        )),
        "the old epoch's running job is killed: {acts:?}"
    );
    assert!(started_jobs(&acts).is_empty(), "job 5 is not started");
    assert_eq!(c.leases(), [], "nothing of the old epoch is held");
    assert_eq!(c.epoch(), EPOCH2);
    c.check_invariants();

    // The restored store hands (4, 1) out again, for another commit,
    // while the killed job is still ending: it waits for its slot.
    let other = "ab".repeat(20);
    c.handle(Event::Frame(assign_for(4, &other)), t1);
    assert!(started_jobs(&actions(&mut c)).is_empty());
    c.handle(
        Event::Job(JobEvent::Finished(result(4, 1, JobStatus::Cancelled))),
        t1,
    );
    let acts = actions(&mut c);
    assert_eq!(
        results_sent(&acts),
        [],
        "the killed job's end is not reported"
    );
    assert!(acts.contains(&Action::Forget {
        job_id: 4,
        attempt: 1
    }));
    assert_eq!(
        started_jobs(&acts),
        [(4, other.clone(), EPOCH2.to_owned())],
        "the new assignment runs under the new epoch"
    );
    let mut finished = result(4, 1, JobStatus::Passed);
    finished.commit = other;
    c.handle(Event::Job(JobEvent::Finished(finished)), t1);
    assert_eq!(results_sent(&actions(&mut c)), [(4, 1)]);
    c.handle(dropped(), t1);
    c.handle(Event::Tick, t1 + Duration::from_secs(1));
    let dial = actions(&mut c);
    let hello = hello_of(&dial).unwrap();
    assert_eq!(
        (lease_keys(hello), hello.epoch.as_str()),
        (vec![(4, 1)], EPOCH2)
    );
}

/// The restore step was forgotten: the epoch is the same, but the store
/// hands a (job, attempt) the runner holds out again for another commit.
/// The held one (its result unacknowledged, or its job running) belongs to
/// the lost history and is dropped; the new assignment runs.
#[test]
fn an_assignment_of_a_held_lease_for_another_commit_drops_the_held_one() {
    let t0 = Instant::now();
    let mut c = core(1, vec![result(3, 1, JobStatus::Passed)], t0);
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0);
    assert_eq!(results_sent(&actions(&mut c)), [(3, 1)]);
    let other = "cd".repeat(20);
    c.handle(Event::Frame(assign_for(3, &other)), t0);
    let acts = actions(&mut c);
    assert!(acts.contains(&Action::Forget {
        job_id: 3,
        attempt: 1
    }));
    assert_eq!(started_jobs(&acts), [(3, other.clone(), EPOCH.to_owned())]);
    // The refusal of the old result (the dispatcher checks its commit)
    // does not touch the new run.
    c.handle(Event::Frame(ack(3, false)), t0);
    assert!(actions(&mut c).is_empty());
    assert_eq!(c.leases(), [(3, 1)]);

    // The same for a running job: killed, then the new one starts.
    let third = "ef".repeat(20);
    c.handle(Event::Frame(assign_for(3, &third)), t0);
    let acts = actions(&mut c);
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Cancel {
                job_id: 3,
                attempt: 1,
                ..
            }
        )),
        "{acts:?}"
    );
    assert!(started_jobs(&acts).is_empty(), "waits for the killed one");
    c.handle(
        Event::Job(JobEvent::Finished(result(3, 1, JobStatus::Cancelled))),
        t0,
    );
    let acts = actions(&mut c);
    assert_eq!(results_sent(&acts), []);
    assert_eq!(started_jobs(&acts), [(3, third, EPOCH.to_owned())]);
    c.check_invariants();
    // The same assignment again (a resend) is not run twice.
    c.handle(Event::Frame(assign_for(3, &"ef".repeat(20))), t0);
    assert!(actions(&mut c).is_empty());
}

/// Results from before epochs (an unstamped outbox file) cannot be told
/// apart: they are kept and take the first epoch welcomed with; and a
/// dispatcher that sends no epoch (one from before epochs) changes nothing.
#[test]
fn results_without_an_epoch_and_dispatchers_without_one_keep_what_is_held() {
    let t0 = Instant::now();
    let pending = vec![Stamped {
        result: result(8, 1, JobStatus::Passed),
        epoch: String::new(),
    }];
    let mut c = RunnerCore::new(&config(1), backoff(), pending, t0);
    let dial = actions(&mut c);
    assert_eq!(hello_of(&dial).unwrap().epoch, "", "no epoch known yet");
    c.handle(Event::Connected(welcome_in("")), t0);
    assert_eq!(results_sent(&actions(&mut c)), [(8, 1)]);
    assert_eq!(c.epoch(), "");
    c.handle(dropped(), t0);
    c.handle(Event::Tick, t0 + Duration::from_secs(1));
    actions(&mut c);
    c.handle(Event::Connected(welcome(0)), t0 + Duration::from_secs(1));
    assert_eq!(results_sent(&actions(&mut c)), [(8, 1)]);
    assert_eq!(c.epoch(), EPOCH);
    c.check_invariants();
}

#[test]
fn retained_log_keeps_the_newest_bytes() {
    let mut r = Retained::default();
    for i in 0..10u64 {
        r.push(Log {
            offset: i * 1024 * 1024,
            data: vec![0u8; 1024 * 1024].into(),
            ..Log::default()
        });
    }
    assert_eq!(r.bytes, LOG_RETAIN_BYTES);
    assert_eq!(r.dropped, 6 * 1024 * 1024);
    assert_eq!(r.chunks.front().map(|l| l.offset), Some(6 * 1024 * 1024));
}

/// One step of a random run. Indexes pick among the jobs in that state.
#[derive(Debug, Clone)]
enum Step {
    DialOk,
    DialFail,
    Drop,
    Assign { job: u64, here: bool },
    Cancel { job: u64 },
    Ack { job: u64, accepted: bool },
    Ping,
    Started(usize),
    Log(usize),
    Finish(usize),
    Stored(usize),
    Graceful,
    Immediate,
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::DialOk),
        1 => Just(Step::DialFail),
        1 => Just(Step::Drop),
        4 => (0..8u64, prop::bool::weighted(0.85)).prop_map(|(job, here)| Step::Assign { job, here }),
        1 => (0..8u64).prop_map(|job| Step::Cancel { job }),
        2 => (0..8u64, prop::bool::weighted(0.8)).prop_map(|(job, accepted)| Step::Ack { job, accepted }),
        1 => Just(Step::Ping),
        2 => (0..4usize).prop_map(Step::Started),
        2 => (0..4usize).prop_map(Step::Log),
        3 => (0..4usize).prop_map(Step::Finish),
        2 => (0..4usize).prop_map(Step::Stored),
        1 => Just(Step::Graceful),
        1 => Just(Step::Immediate),
        3 => (1..1500u64).prop_map(Step::Advance),
    ]
}

/// What the test knows from the actions it has seen: the shell's view.
#[derive(Debug, Default)]
struct World {
    connected: bool,
    dialing: bool,
    draining: bool,
    drain_deadline: Option<Instant>,
    running: BTreeSet<LeaseKey>,
    started: BTreeSet<LeaseKey>,
    started_unsent: BTreeSet<LeaseKey>,
    cancelled: BTreeSet<LeaseKey>,
    storing: BTreeMap<LeaseKey, JobFinished>,
    /// Results handed to the core and not yet acknowledged.
    results: BTreeSet<LeaseKey>,
    offsets: BTreeMap<LeaseKey, u64>,
    /// The held result the last step acknowledged.
    acked: Option<LeaseKey>,
}

fn nth<T: Clone>(set: impl IntoIterator<Item = T>, i: usize) -> Option<T> {
    let all: Vec<T> = set.into_iter().collect();
    (!all.is_empty()).then(|| all[i % all.len()].clone())
}

/// Turns a step into the event the shell would feed, updating the world.
fn event_for(step: &Step, w: &mut World, now: &mut Instant) -> Option<Event> {
    let frame = |msg| Some(Event::Frame(msg));
    match step.clone() {
        Step::DialOk if w.dialing => {
            w.dialing = false;
            w.connected = true;
            Some(Event::Connected(welcome(100)))
        }
        Step::DialFail if w.dialing => {
            w.dialing = false;
            Some(Event::DialFailed("refused".into()))
        }
        Step::Drop if w.connected => {
            w.connected = false;
            Some(dropped())
        }
        Step::Assign { job, here } if w.connected => {
            frame(assign(job, if here { REPO } else { "/elsewhere" }))
        }
        Step::Cancel { job } if w.connected => frame(Msg::Cancel(Cancel {
            job_id: job,
            attempt: 1,
        })),
        Step::Ack { job, accepted } if w.connected => {
            // An ack for a result not held (a duplicate) must change nothing.
            w.acked = w.results.remove(&(job, 1)).then_some((job, 1));
            frame(ack(job, accepted))
        }
        Step::Ping if w.connected => frame(Msg::Ping(Ping { seq: 1 })),
        Step::Started(i) => {
            let key = nth(w.running.difference(&w.started).copied(), i)?;
            w.started.insert(key);
            if !w.connected {
                w.started_unsent.insert(key);
            }
            Some(Event::Job(JobEvent::Started(Started {
                job_id: key.0,
                attempt: key.1,
            })))
        }
        Step::Log(i) => {
            let key = nth(w.started.iter().copied(), i)?;
            let offset = w.offsets.entry(key).or_default();
            let chunk = log(key.0, *offset, b"line\n");
            *offset += 5;
            Some(Event::Job(JobEvent::Log(chunk)))
        }
        Step::Finish(i) => {
            let key = nth(w.running.iter().copied(), i)?;
            w.running.remove(&key);
            w.started.remove(&key);
            w.started_unsent.remove(&key);
            w.results.insert(key);
            Some(Event::Job(JobEvent::Finished(result(
                key.0,
                key.1,
                JobStatus::Passed,
            ))))
        }
        Step::Stored(i) => {
            let key = nth(w.storing.keys().copied(), i)?;
            let stored = w.storing.remove(&key).expect("picked from storing");
            w.results.insert(key);
            Some(Event::Job(JobEvent::Finished(stored)))
        }
        Step::Graceful => {
            if !w.draining {
                w.drain_deadline = Some(*now + DRAIN);
            }
            w.draining = true;
            Some(Event::Shutdown(Stop::Graceful))
        }
        Step::Immediate => {
            w.draining = true;
            Some(Event::Shutdown(Stop::Immediate))
        }
        Step::Advance(ms) => {
            *now += Duration::from_millis(ms);
            Some(Event::Tick)
        }
        _ => None,
    }
}

/// Checks one action against what the world knows, then applies it.
fn check_action(action: &Action, core: &RunnerCore, w: &mut World) -> Result<(), TestCaseError> {
    match action {
        Action::Dial(hello) => {
            prop_assert!(
                !w.connected && !w.dialing,
                "dial while connected or dialling"
            );
            let listed: BTreeSet<LeaseKey> = lease_keys(hello).into_iter().collect();
            for key in w.running.iter().chain(w.storing.keys()).chain(&w.results) {
                prop_assert!(
                    listed.contains(key),
                    "held lease {key:?} missing from Hello {listed:?}"
                );
            }
            w.dialing = true;
        }
        Action::Send(frame) => {
            prop_assert!(w.connected, "sent {frame:?} while not connected");
            match &frame.msg {
                Some(Msg::JobFinished(f)) => {
                    prop_assert!(
                        w.results.contains(&(f.job_id, f.attempt)),
                        "result of an unheld lease"
                    )
                }
                Some(Msg::Started(s)) => {
                    let key = (s.job_id, s.attempt);
                    prop_assert!(w.running.contains(&key), "Started of a job not running");
                    w.started_unsent.remove(&key);
                }
                Some(Msg::Log(l)) => prop_assert!(
                    w.running.contains(&(l.job_id, l.attempt))
                        || w.results.contains(&(l.job_id, l.attempt)),
                    "log of an unheld lease"
                ),
                _ => {}
            }
        }
        Action::Disconnect => {
            prop_assert!(w.connected);
            w.connected = false;
        }
        Action::Start { assign, .. } => {
            prop_assert!(!w.draining, "a job started during the drain");
            prop_assert_eq!(&assign.repo, REPO);
            let key = (assign.job_id, assign.attempt);
            prop_assert!(w.running.insert(key), "started twice");
            prop_assert!(
                !w.results.contains(&key),
                "started a job whose result is held"
            );
        }
        Action::Cancel {
            job_id, attempt, ..
        } => {
            prop_assert!(
                w.running.contains(&(*job_id, *attempt)),
                "cancel of a job not running"
            );
            w.cancelled.insert((*job_id, *attempt));
        }
        Action::Store { result, .. } => {
            let key = (result.job_id, result.attempt);
            prop_assert!(!w.running.contains(&key) && !w.results.contains(&key));
            w.storing.insert(key, result.clone());
        }
        Action::Forget { job_id, attempt } => {
            let key = (*job_id, *attempt);
            prop_assert_eq!(
                w.acked.take(),
                Some(key),
                "forgot a result not just acknowledged"
            );
            prop_assert!(!core.holds(key), "forgot a result still held");
        }
    }
    Ok(())
}

fn run_steps(steps: Vec<Step>, slots: u32) -> Result<(), TestCaseError> {
    let mut now = Instant::now();
    let mut core = core(slots, vec![], now);
    let mut w = World::default();
    for action in actions(&mut core) {
        check_action(&action, &core, &mut w)?;
    }
    for step in steps {
        let Some(event) = event_for(&step, &mut w, &mut now) else {
            continue;
        };
        let reconnect = matches!(event, Event::Connected(_));
        core.handle(event, now);
        let acts = actions(&mut core);
        for action in &acts {
            check_action(action, &core, &mut w)?;
        }
        core.check_invariants();
        prop_assert!(w.running.len() <= slots as usize);
        if reconnect {
            let resent: BTreeSet<LeaseKey> = sent(&acts)
                .iter()
                .filter_map(|m| match m {
                    Msg::JobFinished(f) => Some((f.job_id, f.attempt)),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(
                &resent,
                &w.results,
                "every held result is resent on reconnect"
            );
            prop_assert!(
                w.started_unsent.is_empty(),
                "a Started was not resent: {:?}",
                w.started_unsent
            );
        }
        if w.drain_deadline.is_some_and(|deadline| now >= deadline) {
            prop_assert!(
                w.running.is_subset(&w.cancelled),
                "running after the drain deadline without a cancel: {:?}",
                w.running.difference(&w.cancelled).collect::<Vec<_>>()
            );
        }
        let held: BTreeSet<LeaseKey> = core.leases().into_iter().collect();
        for key in w.running.iter().chain(w.storing.keys()).chain(&w.results) {
            prop_assert!(held.contains(key), "the core lost lease {key:?}");
        }
        if core.is_done() {
            prop_assert!(w.running.is_empty() && w.storing.is_empty());
            prop_assert!(w.draining, "done without a shutdown");
            prop_assert_eq!(core.deadline(), None);
            return Ok(());
        }
        if let Some(deadline) = core.deadline() {
            prop_assert!(
                deadline > now,
                "a deadline left in the past: the shell would spin"
            );
        }
        w.acked = None;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_for_random_runs(steps in prop::collection::vec(step(), 1..80), slots in 1..4u32) {
        run_steps(steps, slots)?;
    }
}
