//! High availability over real processes: two dispatchers on one real
//! PostgreSQL, and a runner, an observer and the CLI each given both
//! addresses. The leader is SIGKILLed with two jobs running; the standby
//! takes over, the runner follows it with its leases, and both jobs finish
//! on their first attempt (one finished while no leader was up, so its
//! result waited in the runner's outbox). The observer's next commit
//! reaches the new leader, and the CLI answers whichever order its
//! addresses come in.

use std::path::PathBuf;

use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, Cli, Daemon, wait_for};
use surveil_tests::postgres;
use surveil_tests::probe::{Probe, describe, status_of};

use crate::common::{POLL, STEP, Scene, bins};

/// Short, so the story takes seconds, yet long enough that a leader on a
/// loaded machine still renews in time (at 2s, a debug build sharing two
/// cores with parallel builds was seen to miss its renewals and step down).
const LEADER_TTL: &str = "5s";

fn store_args(url: &str, password_file: &std::path::Path) -> Vec<String> {
    [
        "--store",
        url,
        "--store-password-file",
        &password_file.display().to_string(),
        "--leader-ttl",
        LEADER_TTL,
        "--heartbeat-interval",
        "200ms",
        "--runner-timeout",
        "5s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Waits until the dispatcher `probe` asks leads.
fn wait_leading(probe: &Probe, what: &str) {
    wait_for(what, STEP, POLL, || {
        let status = probe.status()?;
        Ok((!status.standby && status.leader_term > 0).then_some(()))
    })
    .unwrap();
}

/// A second dispatcher beside the scene's, on the same database.
fn start_standby(s: &Scene, args: &[String]) -> (String, Daemon, Probe) {
    let addr = format!("127.0.0.1:{}", cluster::stable_port().unwrap());
    let state = s.path().join("dispatcher-b");
    std::fs::create_dir_all(&state).unwrap();
    let mut argv = vec![
        "--listen".to_owned(),
        addr.clone(),
        "--state-dir".to_owned(),
        state.display().to_string(),
    ];
    argv.extend(args.iter().cloned());
    let daemon = Daemon::start(
        "dispatcher-b",
        &bins().dispatcher,
        argv,
        vec![],
        s.path().join("dispatcher-b.log"),
    )
    .unwrap();
    let probe = Probe::new(&addr).unwrap();
    wait_for("the standby to name the leader", STEP, POLL, || {
        let status = probe.status()?;
        Ok((status.standby && !status.leader_addr.is_empty()).then_some(()))
    })
    .unwrap();
    (addr, daemon, probe)
}

fn start_observer(s: &Scene, dispatch: &[&str]) -> Daemon {
    let state = s.path().join("observer");
    std::fs::create_dir_all(&state).unwrap();
    let mut argv = Vec::new();
    // Repeated, where the runner's list is comma-separated: both forms.
    for addr in dispatch {
        argv.extend(["--dispatch".to_owned(), (*addr).to_owned()]);
    }
    argv.extend(
        [
            "--state-dir",
            &state.display().to_string(),
            "--every-commit",
            "--interval",
            "100ms",
            &s.repo,
        ]
        .map(str::to_owned),
    );
    Daemon::start(
        "observer",
        &bins().observer,
        argv,
        vec![],
        s.path().join("observer.log"),
    )
    .unwrap()
}

/// `surveil status --json`'s leader address through `dispatch`.
fn cli_leader(cli: &Cli) -> (String, bool) {
    let status = cli.json(&["status"]).unwrap();
    let leader = &status["leader"];
    (
        leader["addr"].as_str().unwrap_or_default().to_owned(),
        leader["standby"].as_bool().unwrap_or(true),
    )
}

fn cli(dispatch: String) -> Cli {
    Cli {
        bin: bins().cli.clone(),
        dispatch,
    }
}

#[test]
fn clients_given_both_addresses_follow_the_leader_through_a_sigkill() {
    let Some(pg) = postgres::require("HA clients story") else {
        return;
    };
    let db = pg.create_database().unwrap();
    let args = store_args(&pg.url(&db), pg.password_file());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = Scene::new(&argv).unwrap();
    wait_leading(&s.probe, "the first dispatcher to lead");
    let a = s.addr.clone();
    let (b, _standby, probe_b) = start_standby(&s, &args);

    // Standby first in every list: the clients must find the leader.
    let isolation = cluster::runner_isolation_args();
    let mut runner_args: Vec<&str> = isolation.iter().map(String::as_str).collect();
    runner_args.extend(["--slots", "2"]);
    s.add_runner_with("r1", &format!("{b},{a}"), &runner_args, &[])
        .unwrap();
    s.wait_runners(&["r1"]).unwrap();
    let _observer = start_observer(&s, &[&b, &a]);
    let (gate_1, gate_2): (PathBuf, PathBuf) = (s.gate("one"), s.gate("two"));
    let first = s.commit_gated("one", &gate_1).unwrap();
    let second = s.commit_gated("two", &gate_2).unwrap();
    let job_of = |probe: &Probe, commit: &str| {
        wait_for("the commit's job", STEP, POLL, || probe.job_of(commit)).unwrap()
    };
    let (job_1, job_2) = (job_of(&s.probe, &first).id, job_of(&s.probe, &second).id);
    s.wait_running(job_1).unwrap();
    s.wait_running(job_2).unwrap();

    // The CLI answers in either order, and `status` describes the leader.
    for dispatch in [format!("{a},{b}"), format!("{b},{a}")] {
        let cli = cli(dispatch.clone());
        assert_eq!(
            cli_leader(&cli),
            (a.clone(), false),
            "--dispatch {dispatch}"
        );
        assert_eq!(cli.jobs().unwrap().len(), 2, "--dispatch {dispatch}");
    }
    // One address is still one dispatcher: the standby says it is one.
    assert_eq!(cli_leader(&cli(b.clone())), (a.clone(), true));

    // The leader dies with both jobs running; job 1 ends while no leader
    // is up (its result waits in the runner's outbox).
    s.dispatcher.kill().unwrap();
    s.open(&gate_1).unwrap();
    wait_leading(&probe_b, "the standby to take over");
    wait_for("r1 to reconnect to the new leader", STEP, POLL, || {
        Ok((probe_b.runners()?.len() == 1).then_some(()))
    })
    .unwrap();
    s.open(&gate_2).unwrap();
    for job in [job_1, job_2] {
        let done = wait_for(&format!("job {job} to finish"), STEP, POLL, || {
            Ok(probe_b.job(job)?.filter(|j| status_of(j).is_final()))
        })
        .unwrap();
        assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
        assert_eq!(done.attempt, 1, "job {job} was not run again");
        assert_eq!(
            pg.psql(
                &db,
                &format!("SELECT count(*) FROM attempts WHERE job_id = {job}")
            )
            .unwrap(),
            "1",
            "job {job} has one attempt"
        );
    }
    assert!(s.outbox("r1").is_empty(), "{:?}", s.outbox("r1"));

    // The observer's next commit reaches the new leader and runs there.
    let third = s.commit_quick("three").unwrap();
    let job_3 = job_of(&probe_b, &third).id;
    let done = wait_for("job 3 to finish", STEP, POLL, || {
        Ok(probe_b.job(job_3)?.filter(|j| status_of(j).is_final()))
    })
    .unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));

    // The dead leader first in the list costs the CLI nothing but a try.
    let cli = cli(format!("{a},{b}"));
    assert_eq!(cli_leader(&cli), (b.clone(), false));
    assert_eq!(cli.jobs().unwrap().len(), 3);
}
