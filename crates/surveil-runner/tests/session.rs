//! The runner against a fake dispatcher over real sockets: each test is a
//! story about what the dispatcher sees.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use surveil_proto::{
    Assign, Cancel, Connection, Hello, JobFinished, JobStatus, Lease, Msg, Ping, ResultAck, Stream,
    TaskStatus, Welcome,
};
use surveil_runner::sandbox::Isolation;
use surveil_runner::{Config, Runner};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

struct FakeDispatcher {
    listener: TcpListener,
}

impl FakeDispatcher {
    async fn bind() -> Self {
        FakeDispatcher {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    /// Accepts the runner's next connection and welcomes it.
    async fn accept(&self) -> Peer {
        let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the runner connects")
            .unwrap();
        let mut conn = Connection::new(stream);
        let hello = conn.accept_hello(WAIT).await.expect("a valid Hello");
        conn.send(Welcome {
            session_id: "s".into(),
            // No pings unless a test sends them: silence is not death here.
            heartbeat_interval_ms: 0,
            runner_timeout_ms: 5000,
            server_version: "fake".into(),
            epoch: "fa".repeat(16),
        })
        .await
        .unwrap();
        Peer { conn, hello }
    }
}

struct Peer {
    conn: Connection<TcpStream>,
    hello: Hello,
}

impl Peer {
    async fn send(&mut self, msg: impl Into<surveil_proto::Envelope>) {
        self.conn.send(msg).await.unwrap();
    }

    async fn recv(&mut self) -> Msg {
        tokio::time::timeout(WAIT, self.conn.recv())
            .await
            .expect("the runner sends something in time")
            .unwrap()
            .expect("the runner keeps the connection open")
    }

    /// Receives until a `JobFinished` arrives; returns it and what came
    /// before.
    async fn until_finished(&mut self) -> (JobFinished, Vec<Msg>) {
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Msg::JobFinished(f) => return (f, before),
                other => before.push(other),
            }
        }
    }

    /// Receives until `pick` takes a message; returns what it made of it
    /// and what came before.
    async fn until<T>(&mut self, mut pick: impl FnMut(&Msg) -> Option<T>) -> (T, Vec<Msg>) {
        let mut before = Vec::new();
        loop {
            let msg = self.recv().await;
            match pick(&msg) {
                Some(found) => return (found, before),
                None => before.push(msg),
            }
        }
    }

    /// Pings and collects everything up to the Pong: a barrier proving the
    /// runner sent nothing else in between that we have not seen.
    async fn barrier(&mut self, seq: u64) -> Vec<Msg> {
        self.send(Ping { seq }).await;
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Msg::Pong(p) if p.seq == seq => return seen,
                other => seen.push(other),
            }
        }
    }
}

/// Test set-up only: the git CLI builds the repository.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A repository whose one commit has `pipeline` as `.surveil.toml`.
fn repo_with(dir: &Path, pipeline: &str) -> (String, String) {
    git(dir, &["init", "-q"]);
    std::fs::write(dir.join(".surveil.toml"), pipeline).unwrap();
    std::fs::write(dir.join("README"), "hello\n").unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "one"]);
    let commit = git(dir, &["rev-parse", "HEAD"]);
    let repo = std::fs::canonicalize(dir)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    (repo, commit)
}

struct Started {
    graceful: CancellationToken,
    immediate: CancellationToken,
    handle: JoinHandle<()>,
    work: PathBuf,
}

impl Started {
    async fn stop(self) {
        self.graceful.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the runner stops after the drain")
            .unwrap();
    }
}

/// Tasks run in the bubblewrap sandbox where it works here; elsewhere the
/// tests say so and run them unsandboxed.
fn isolation() -> Isolation {
    static DETECTED: OnceLock<Isolation> = OnceLock::new();
    DETECTED
        .get_or_init(|| {
            Isolation::detect(std::env::var_os("PATH").as_deref()).unwrap_or_else(|e| {
                eprintln!("NOTE: {e}; these runners run their tasks with --unsandboxed");
                Isolation::Unsandboxed
            })
        })
        .clone()
}

fn config(dispatch: &str, work: &Path, repos: Vec<String>) -> Config {
    let mut config = Config::new(work, repos);
    config.isolation = isolation();
    config.dispatch = vec![dispatch.to_owned()];
    config.name = "ci-test".into();
    config.base_env = surveil_common::Secret::new(
        std::env::var_os("PATH")
            .map(|p| vec![("PATH".into(), p)])
            .unwrap_or_default(),
    );
    config.kill_grace = Duration::from_millis(300);
    config.reconnect_max = Duration::from_millis(200);
    config
}

fn start(config: Config) -> Started {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("debug")
        .try_init();
    let work = config.work_dir.clone();
    let runner = Runner::prepare(config).unwrap();
    let graceful = CancellationToken::new();
    let immediate = CancellationToken::new();
    let handle = tokio::spawn(runner.run(graceful.clone(), immediate.clone()));
    Started {
        graceful,
        immediate,
        handle,
        work,
    }
}

fn assign(job_id: u64, repo: &str, commit: &str) -> Assign {
    Assign {
        job_id,
        attempt: 1,
        repo: repo.to_owned(),
        branch: "main".into(),
        commit: commit.to_owned(),
        ..Assign::default()
    }
}

fn logs_text(msgs: &[Msg], stream: Stream) -> String {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Log(l) if l.stream == stream as i32 => {
                Some(String::from_utf8_lossy(&l.data).into_owned())
            }
            _ => None,
        })
        .collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn outbox_file(work: &Path, job: u64, attempt: u32) -> PathBuf {
    work.join("outbox").join(format!("{job}-{attempt}.pb"))
}

#[tokio::test]
async fn a_full_job_passes_with_streamed_logs_and_task_results() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"build\"\nrun = \"cat README\"\n[[task]]\nname = \"test\"\nrun = \"echo ok >&2\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    assert_eq!(peer.hello.name, "ci-test");
    assert_eq!(peer.hello.slots, 1);
    assert_eq!(peer.hello.repos, std::slice::from_ref(&repo));
    assert!(peer.hello.leases.is_empty());

    assert!(
        peer.barrier(1).await.is_empty(),
        "Ping is answered with Pong"
    );
    peer.send(assign(1, &repo, &commit)).await;
    let (finished, before) = peer.until_finished().await;
    assert!(matches!(before.first(), Some(Msg::Started(s)) if s.job_id == 1 && s.attempt == 1));
    assert_eq!(finished.status(), JobStatus::Passed, "{finished:?}");
    assert_eq!(finished.message, "");
    let tasks: Vec<_> = finished
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), t.status(), t.exit_code))
        .collect();
    assert_eq!(
        tasks,
        [
            ("build", TaskStatus::Passed, Some(0)),
            ("test", TaskStatus::Passed, Some(0))
        ]
    );
    assert_eq!(logs_text(&before, Stream::Stdout), "hello\n");
    assert_eq!(logs_text(&before, Stream::Stderr), "ok\n");
    assert!(logs_text(&before, Stream::System).contains(&format!("checking out {commit}")));
    let system = logs_text(&before, Stream::System);
    assert!(
        system.contains(&format!("isolation: {}\n", isolation().describe())),
        "every job's log says how its tasks are isolated: {system}"
    );
    let mut next = 0;
    for msg in &before {
        if let Msg::Log(l) = msg {
            assert_eq!(l.offset, next);
            next += l.data.len() as u64;
        }
    }

    assert!(
        outbox_file(work.path(), 1, 1).exists(),
        "stored before the ack"
    );
    peer.send(ResultAck {
        job_id: 1,
        attempt: 1,
        accepted: true,
        message: String::new(),
    })
    .await;
    wait_for("the acked result to leave the outbox", || {
        !outbox_file(work.path(), 1, 1).exists()
    })
    .await;
    assert!(
        !work.path().join("jobs/1-1").exists(),
        "work dir removed after the job"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_refused_repository_is_never_checked_out() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(src.path(), "[[task]]\nname = \"a\"\nrun = \"true\"\n");
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(
        &fake.addr(),
        work.path(),
        vec!["/srv/git/other".into()],
    ));
    let mut peer = fake.accept().await;
    peer.send(assign(3, &repo, &commit)).await;
    let (finished, before) = peer.until_finished().await;
    assert!(before.is_empty(), "no Started, no logs: {before:?}");
    assert_eq!(finished.status(), JobStatus::Error);
    assert_eq!(
        finished.message,
        format!("runner ci-test does not build repository {repo} (its REPO list: /srv/git/other)")
    );
    let mirrors: Vec<_> = std::fs::read_dir(work.path().join("mirrors"))
        .unwrap()
        .collect();
    assert!(mirrors.is_empty(), "no mirror was created");
    assert!(!work.path().join("jobs/3-1").exists());
    runner.stop().await;
}

#[tokio::test]
async fn a_result_produced_while_the_dispatcher_is_away_is_delivered_exactly_once() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"a\"\nrun = \"sleep 0.3; echo done\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    peer.send(assign(4, &repo, &commit)).await;
    assert!(matches!(peer.recv().await, Msg::Started(_)));
    drop(peer); // the dispatcher goes away mid-job

    wait_for("the result in the outbox", || {
        outbox_file(work.path(), 4, 1).exists()
    })
    .await;
    let mut peer = fake.accept().await;
    assert!(
        peer.hello.leases.contains(&Lease {
            job_id: 4,
            attempt: 1
        }),
        "{:?}",
        peer.hello.leases
    );
    let (finished, before) = peer.until_finished().await;
    assert_eq!(finished.status(), JobStatus::Passed);
    assert!(
        logs_text(&before, Stream::Stdout).contains("done"),
        "logs are resent: {before:?}"
    );
    peer.send(ResultAck {
        job_id: 4,
        attempt: 1,
        accepted: true,
        message: String::new(),
    })
    .await;
    let after = peer.barrier(9).await;
    assert!(
        !after.iter().any(|m| matches!(m, Msg::JobFinished(_))),
        "the result was sent twice on one connection: {after:?}"
    );
    wait_for("the acked result to leave the outbox", || {
        !outbox_file(work.path(), 4, 1).exists()
    })
    .await;

    // A later reconnect does not bring it back.
    drop(peer);
    let mut peer = fake.accept().await;
    assert!(peer.hello.leases.is_empty(), "{:?}", peer.hello.leases);
    let after = peer.barrier(10).await;
    assert!(
        !after.iter().any(|m| matches!(m, Msg::JobFinished(_))),
        "{after:?}"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_reconnect_keeps_the_lease_and_the_job_is_not_rerun() {
    let src = tempfile::tempdir().unwrap();
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("runs");
    let (repo, commit) = repo_with(
        src.path(),
        &format!(
            "[[task]]\nname = \"a\"\nrun = \"echo run >> {}; echo started; sleep 1\"\n",
            marker.display()
        ),
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let mut config = config(&fake.addr(), work.path(), vec![repo.clone()]);
    // The task counts its runs in a file outside its checkout, which no
    // sandbox would let it write.
    config.isolation = Isolation::Unsandboxed;
    let runner = start(config);
    let mut peer = fake.accept().await;
    peer.send(assign(5, &repo, &commit)).await;
    loop {
        if let Msg::Log(l) = peer.recv().await
            && l.data.as_ref() == b"started\n"
        {
            break;
        }
    }
    drop(peer);

    let mut peer = fake.accept().await;
    assert_eq!(
        peer.hello.leases,
        [Lease {
            job_id: 5,
            attempt: 1
        }]
    );
    // A dispatcher that re-sends the assignment must not get a second run.
    peer.send(assign(5, &repo, &commit)).await;
    let (finished, before) = peer.until_finished().await;
    assert!(
        !before.iter().any(|m| matches!(m, Msg::Started(_))),
        "{before:?}"
    );
    assert_eq!(finished.status(), JobStatus::Passed);
    peer.send(ResultAck {
        job_id: 5,
        attempt: 1,
        accepted: true,
        message: String::new(),
    })
    .await;
    peer.barrier(2).await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "the task ran once"
    );
    runner.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_reports_cancelled() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"long\"\nrun = \"echo started; sleep 100\"\n[[task]]\nname = \"after\"\nrun = \"true\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    peer.send(assign(6, &repo, &commit)).await;
    loop {
        if let Msg::Log(l) = peer.recv().await
            && l.data.as_ref() == b"started\n"
        {
            break;
        }
    }
    peer.send(Cancel {
        job_id: 6,
        attempt: 1,
    })
    .await;
    let (finished, _) = peer.until_finished().await;
    assert_eq!(finished.status(), JobStatus::Cancelled);
    assert_eq!(finished.message, "cancelled by the dispatcher");
    assert_eq!(finished.tasks[0].status(), TaskStatus::Cancelled);
    assert_eq!(finished.tasks[1].status(), TaskStatus::Skipped);
    runner.stop().await;
}

#[tokio::test]
async fn a_bad_pipeline_file_ends_the_job_error_naming_file_line_and_problem() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"a\"\ntmeout = \"5s\"\nrun = \"true\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    peer.send(assign(7, &repo, &commit)).await;
    let (finished, before) = peer.until_finished().await;
    assert_eq!(finished.status(), JobStatus::Error);
    assert!(
        finished
            .message
            .starts_with(".surveil.toml: line 3, column 1: unknown field `tmeout`"),
        "{}",
        finished.message
    );
    assert!(
        logs_text(&before, Stream::System)
            .contains(&format!("pipeline error: {}", finished.message)),
        "{before:?}"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_missing_commit_ends_the_job_error_saying_which() {
    let src = tempfile::tempdir().unwrap();
    let (repo, _) = repo_with(src.path(), "[[task]]\nname = \"a\"\nrun = \"true\"\n");
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    let missing = "1".repeat(40);
    peer.send(assign(8, &repo, &missing)).await;
    let (finished, _) = peer.until_finished().await;
    assert_eq!(finished.status(), JobStatus::Error);
    assert!(
        finished
            .message
            .starts_with(&format!("commit {missing} not found in repository {repo}")),
        "{}",
        finished.message
    );
    runner.stop().await;
}

#[tokio::test]
async fn results_left_by_an_earlier_run_are_resent_and_a_refused_one_is_dropped() {
    let work = tempfile::tempdir().unwrap();
    let outbox = surveil_runner::outbox::Outbox::open(&work.path().join("outbox")).unwrap();
    outbox
        .store(
            &JobFinished {
                job_id: 11,
                attempt: 2,
                status: JobStatus::Passed as i32,
                message: String::new(),
                tasks: vec![],
                infrastructure: false,
                commit: String::new(),
            },
            "",
        )
        .unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(
        &fake.addr(),
        work.path(),
        vec!["/srv/git/app".into()],
    ));
    let mut peer = fake.accept().await;
    assert_eq!(
        peer.hello.leases,
        [Lease {
            job_id: 11,
            attempt: 2
        }]
    );
    let (finished, _) = peer.until_finished().await;
    assert_eq!((finished.job_id, finished.attempt), (11, 2));
    peer.send(ResultAck {
        job_id: 11,
        attempt: 2,
        accepted: false,
        message: "attempt 2 was revoked".into(),
    })
    .await;
    wait_for("the refused result to leave the outbox", || {
        !outbox_file(work.path(), 11, 2).exists()
    })
    .await;
    drop(peer);
    let mut peer = fake.accept().await;
    assert!(peer.hello.leases.is_empty());
    assert!(peer.barrier(3).await.is_empty());
    runner.stop().await;
}

#[tokio::test]
async fn drain_says_so_and_hands_back_what_it_does_not_finish() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"long\"\nrun = \"echo started; sleep 100\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let mut cfg = config(&fake.addr(), work.path(), vec![repo.clone()]);
    cfg.drain_timeout = Duration::from_millis(500);
    let runner = start(cfg);
    let mut peer = fake.accept().await;
    peer.send(assign(20, &repo, &commit)).await;
    loop {
        if let Msg::Log(l) = peer.recv().await
            && l.data.as_ref() == b"started\n"
        {
            break;
        }
    }
    runner.graceful.cancel();
    let (deadline_ms, _) = peer
        .until(|m| match m {
            Msg::Drain(d) => Some(d.deadline_ms),
            _ => None,
        })
        .await;
    assert!((1..=500).contains(&deadline_ms), "{deadline_ms}");
    // An assignment that crossed the Drain is handed back, not started.
    peer.send(assign(21, &repo, &commit)).await;
    let (back, before) = peer
        .until(|m| match m {
            Msg::HandBack(h) if h.job_id == 21 => Some(h.clone()),
            _ => None,
        })
        .await;
    assert!(!back.started, "{back:?}");
    assert!(
        !before
            .iter()
            .any(|m| matches!(m, Msg::Started(s) if s.job_id == 21))
    );
    // Job 20 outlives the drain timeout: killed and handed back.
    let (cut, before) = peer
        .until(|m| match m {
            Msg::HandBack(h) if h.job_id == 20 => Some(h.clone()),
            _ => None,
        })
        .await;
    assert!(cut.started, "{cut:?}");
    assert!(cut.reason.contains("drain timeout"), "{}", cut.reason);
    assert!(
        !before.iter().any(|m| matches!(m, Msg::JobFinished(_))),
        "no verdict on a job that did not fail: {before:?}"
    );
    tokio::time::timeout(WAIT, runner.handle)
        .await
        .expect("the runner exits")
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, peer.conn.recv())
            .await
            .expect("closed in time")
        {
            Ok(None) | Err(_) => break,
            Ok(Some(Msg::JobFinished(f))) => panic!("unexpected result {f:?}"),
            Ok(Some(_)) => {}
        }
    }
    assert!(!runner.work.join("jobs/21-1").exists());
    assert!(!runner.work.join("jobs/20-1").exists());
    let outbox: Vec<_> = std::fs::read_dir(runner.work.join("outbox"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        outbox.iter().all(|n| !n.to_string_lossy().ends_with(".pb")),
        "no cancelled verdict kept for the next start: {outbox:?}"
    );
}

#[tokio::test]
async fn a_second_signal_cuts_running_jobs_off_at_once_and_hands_them_back() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(
        src.path(),
        "[[task]]\nname = \"long\"\nrun = \"echo started; sleep 100\"\n",
    );
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let runner = start(config(&fake.addr(), work.path(), vec![repo.clone()]));
    let mut peer = fake.accept().await;
    peer.send(assign(30, &repo, &commit)).await;
    loop {
        if let Msg::Log(l) = peer.recv().await
            && l.data.as_ref() == b"started\n"
        {
            break;
        }
    }
    // The default drain timeout is 5 minutes: only the second signal can
    // end this job within the test's bound.
    runner.graceful.cancel();
    runner.immediate.cancel();
    let (back, before) = peer
        .until(|m| match m {
            Msg::HandBack(h) => Some(h.clone()),
            _ => None,
        })
        .await;
    assert_eq!((back.job_id, back.started), (30, true));
    assert!(
        back.reason.contains("second shutdown signal"),
        "{}",
        back.reason
    );
    assert!(!before.iter().any(|m| matches!(m, Msg::JobFinished(_))));
    tokio::time::timeout(WAIT, runner.handle)
        .await
        .expect("the runner exits")
        .unwrap();
    assert!(!runner.work.join("jobs/30-1").exists());
}

#[tokio::test]
async fn jobs_beyond_the_slots_wait_for_a_free_slot() {
    let src = tempfile::tempdir().unwrap();
    let (repo, commit) = repo_with(src.path(), "[[task]]\nname = \"a\"\nrun = \"sleep 0.3\"\n");
    let work = tempfile::tempdir().unwrap();
    let fake = FakeDispatcher::bind().await;
    let mut cfg = config(&fake.addr(), work.path(), vec![repo.clone()]);
    cfg.slots = 2;
    let runner = start(cfg);
    let mut peer = fake.accept().await;
    assert_eq!(peer.hello.slots, 2);
    for job in [40, 41, 42] {
        peer.send(assign(job, &repo, &commit)).await;
    }
    // Order of Started/JobFinished events: job 42 may only start once one
    // of the first two has finished.
    let mut order = Vec::new();
    while order.iter().filter(|(kind, _)| *kind == "finished").count() < 3 {
        match peer.recv().await {
            Msg::Started(s) => order.push(("started", s.job_id)),
            Msg::JobFinished(f) => {
                assert_eq!(f.status(), JobStatus::Passed, "{f:?}");
                peer.send(ResultAck {
                    job_id: f.job_id,
                    attempt: 1,
                    accepted: true,
                    message: String::new(),
                })
                .await;
                order.push(("finished", f.job_id));
            }
            _ => {}
        }
    }
    let started_42 = order.iter().position(|e| *e == ("started", 42)).unwrap();
    let first_finish = order
        .iter()
        .position(|(kind, _)| *kind == "finished")
        .unwrap();
    assert!(first_finish < started_42, "{order:?}");
    assert_eq!(&order[..2], [("started", 40), ("started", 41)], "{order:?}");
    runner.stop().await;
}
