//! Test fixtures: scratch git repositories (the `git` CLI for set-up only),
//! a fake dispatcher speaking the real protocol with the real dedupe rule
//! (one job per (repo, commit)), a running observer, bounded waiting, and
//! captured logs.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use surveil_observer::Config;
use surveil_proto::{Connection, Msg, RejectCode, Role, SubmitAck, Welcome};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The longest any test waits for something to happen.
pub const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- repos

pub struct TestRepo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestRepo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("repo");
        std::fs::create_dir(&path).expect("repo dir");
        let path = std::fs::canonicalize(&path).expect("canonical repo path");
        let repo = TestRepo { _dir: dir, path };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The repository's name as the observer submits it.
    pub fn name(&self) -> String {
        self.path.to_str().expect("utf-8 path").to_owned()
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.path)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// Commits on whatever HEAD is and returns the full commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    /// Makes `n` commits on top of `base` without moving `main`, then moves
    /// `main` to the last of them in one ref update (as a push does).
    pub fn push_commits(&self, base: &str, n: usize) -> Vec<String> {
        self.git(&["checkout", "-q", "--detach", base]);
        let commits: Vec<String> = (1..=n)
            .map(|i| self.commit(&format!("pushed {i}")))
            .collect();
        let tip = commits.last().expect("n > 0");
        self.git(&["update-ref", "refs/heads/main", tip]);
        self.git(&["checkout", "-q", "main"]);
        commits
    }
}

// ---------------------------------------------------------- dispatcher

/// One `Submit` the fake dispatcher answered.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub repo: String,
    pub branch: String,
    pub commits: Vec<String>,
    pub job_ids: Vec<u64>,
}

/// What survives a dispatcher restart, as the real store does.
#[derive(Default)]
pub struct Store {
    jobs: HashMap<(String, String), u64>,
    pub submits: Vec<Submitted>,
    /// How many of the next submits get an ack with no job ids (a broken
    /// dispatcher), recorded with empty `job_ids`.
    pub bad_acks: usize,
    /// The store epoch sent in `Welcome`.
    pub epoch: String,
}

impl Store {
    pub fn distinct_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// What a restore from a backup taken after the first `keep` jobs
    /// does: the later jobs are gone (their ids are handed out again), and
    /// the store's epoch is `epoch` (the backup's, when the restore step
    /// was forgotten).
    pub fn restore(&mut self, keep: u64, epoch: &str) {
        self.jobs.retain(|_, id| *id <= keep);
        self.epoch = epoch.to_owned();
    }

    pub fn knows(&self, repo: &str, commit: &str) -> bool {
        self.jobs
            .contains_key(&(repo.to_owned(), commit.to_owned()))
    }
}

/// A dispatcher good enough for an observer: handshake, then every
/// `Submit` answered with one job id per commit, a known (repo, commit)
/// keeping its id.
pub struct FakeDispatcher {
    pub addr: SocketAddr,
    pub store: Arc<Mutex<Store>>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl FakeDispatcher {
    pub async fn start() -> Self {
        Self::start_with("127.0.0.1:0".parse().expect("addr"), Arc::default(), None).await
    }

    /// Starts on `addr` (a port used before, for a restart) with `store`;
    /// with `token`, a `Hello` carrying another token is rejected.
    pub async fn start_with(
        addr: SocketAddr,
        store: Arc<Mutex<Store>>,
        token: Option<String>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind fake dispatcher");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let (store2, stop2) = (store.clone(), stop.clone());
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (store, token) = (store2.clone(), token.clone());
                        connections.spawn(serve(stream, store, token));
                    }
                }
            }
            // Dropping the set aborts the sessions and closes their sockets.
            connections.shutdown().await;
        });
        FakeDispatcher {
            addr,
            store,
            stop,
            tasks,
        }
    }

    /// Stops listening and closes every connection; returns the store so a
    /// restart can keep it.
    pub async fn stop(mut self) -> Arc<Mutex<Store>> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.store
    }

    pub fn submits(&self) -> Vec<Submitted> {
        self.store.lock().expect("store").submits.clone()
    }

    /// Every commit submitted so far, in order, with repetitions.
    pub fn submitted_commits(&self) -> Vec<String> {
        self.submits().into_iter().flat_map(|s| s.commits).collect()
    }
}

async fn serve(stream: tokio::net::TcpStream, store: Arc<Mutex<Store>>, token: Option<String>) {
    let mut conn = Connection::new(stream);
    let Ok(hello) = conn.accept_hello(Duration::from_secs(5)).await else {
        return;
    };
    assert_eq!(
        hello.role(),
        Role::Observer,
        "only observers talk to this fake"
    );
    assert_eq!(hello.repos.len(), 1, "an observer names its one repository");
    if let Some(token) = token
        && hello.token != token
    {
        conn.reject(RejectCode::BadToken, "wrong token").await;
        return;
    }
    let epoch = store.lock().expect("store").epoch.clone();
    let welcome = Welcome {
        session_id: "fake".into(),
        heartbeat_interval_ms: 1000,
        runner_timeout_ms: 5000,
        server_version: "fake".into(),
        epoch,
    };
    if conn.send(welcome).await.is_err() {
        return;
    }
    while let Ok(Some(msg)) = conn.recv().await {
        let Msg::Submit(submit) = msg else { continue };
        let (job_ids, created) = record(&mut store.lock().expect("store"), submit);
        if conn.send(SubmitAck { job_ids, created }).await.is_err() {
            return;
        }
    }
}

/// Gives each commit its job (the existing one for a known (repo,
/// commit)), records the submit, and returns the ids to ack with: none at
/// all while `bad_acks` lasts. Ids continue after the highest one known,
/// as a restored store's do.
fn record(store: &mut Store, submit: surveil_proto::Submit) -> (Vec<u64>, Vec<bool>) {
    let (job_ids, created): (Vec<u64>, Vec<bool>) = if store.bad_acks > 0 {
        store.bad_acks -= 1;
        (Vec::new(), Vec::new())
    } else {
        submit
            .commits
            .iter()
            .map(|commit| {
                let next = store.jobs.values().max().copied().unwrap_or(0) + 1;
                let key = (submit.repo.clone(), commit.clone());
                match store.jobs.get(&key) {
                    Some(id) => (*id, false),
                    None => {
                        store.jobs.insert(key, next);
                        (next, true)
                    }
                }
            })
            .unzip()
    };
    store.submits.push(Submitted {
        repo: submit.repo,
        branch: submit.branch,
        commits: submit.commits,
        job_ids: job_ids.clone(),
    });
    (job_ids, created)
}

/// A port that was free a moment ago, for a dispatcher started later.
pub async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

// ------------------------------------------------------------ observer

pub struct RunningObserver {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningObserver {
    pub fn start(config: Config) -> Self {
        logs();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(surveil_observer::run(config, shutdown.clone()));
        RunningObserver { shutdown, task }
    }

    /// Cancels it and expects a clean stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("observer stops promptly")
            .expect("observer task");
        result.expect("observer ends without error");
    }

    /// Waits for it to end on its own and returns its result.
    pub async fn join(self) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("observer ends")
            .expect("observer task")
    }
}

/// A configuration for `repo` talking to `dispatch`, with quick retries.
pub fn config(repo: &TestRepo, state_dir: &Path, dispatch: SocketAddr) -> Config {
    let mut config = Config::new(repo.name(), state_dir);
    config.dispatch = vec![dispatch.to_string()];
    config.interval = Duration::from_millis(200);
    config.retry_min = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(300);
    config
}

/// The cursor the observer wrote for `repo`'s `main`.
pub fn cursor(state_dir: &Path, repo: &TestRepo) -> Option<String> {
    surveil_observer::cursor::CursorFile::new(state_dir)
        .load(&repo.name(), "main")
        .expect("cursor file readable")
        .map(|c| c.commit.to_string())
}

/// Polls `check` every 20 ms until it gives a value, failing the test
/// with `what` after [`WAIT`].
pub async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- logs

#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Whether a captured line mentions both `scope` (e.g. the repository
    /// path, in the observer's span) and `needle`.
    pub fn contains(&self, scope: &str, needle: &str) -> bool {
        let text = String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned();
        text.lines()
            .any(|l| l.contains(scope) && l.contains(needle))
    }
}

/// The process-wide captured log (installed on first use).
pub fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    })
    .clone()
}
