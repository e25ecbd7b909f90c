//! A dispatcher started in-process on 127.0.0.1:0, and fake peers (runners,
//! clients) written with `surveil_proto::Connection`. Every wait is bounded.
//!
//! Shared by the `it` and `failpoints` test binaries; each uses a part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use surveil_dispatcher::Config;
use surveil_dispatcher::store::JobStore;
use surveil_proto::*;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(15);
pub const REPO: &str = "/srv/git/app";

pub fn commit(n: u64) -> String {
    format!("{n:040x}")
}

/// Settings with short liveness intervals, so timeouts happen in about a
/// second of real time.
pub fn fast_config(dir: &Path) -> Config {
    let mut config = Config::for_state_dir(dir);
    config.heartbeat_interval = Duration::from_millis(100);
    config.runner_timeout = Duration::from_millis(1000);
    config.handshake_timeout = Duration::from_millis(500);
    config
}

pub struct Dispatcher {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Dispatcher {
    pub async fn start(config: Config) -> Dispatcher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(surveil_dispatcher::run(config, listener, shutdown.clone()));
        Dispatcher {
            addr,
            shutdown,
            handle,
        }
    }

    /// A dispatcher on a store the test opened (to reach its hooks).
    pub async fn start_on(config: Config, store: Arc<dyn JobStore>) -> Dispatcher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(surveil_dispatcher::serve_with_store(
            config,
            store,
            listener,
            shutdown.clone(),
        ));
        Dispatcher {
            addr,
            shutdown,
            handle,
        }
    }

    /// [`Dispatcher::start_on`] with [`surveil_dispatcher::Hooks`] (a
    /// watchdog gate the test watches).
    pub async fn start_hooked(
        config: Config,
        store: Arc<dyn JobStore>,
        hooks: surveil_dispatcher::Hooks,
    ) -> Dispatcher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(surveil_dispatcher::serve_with_store_hooked(
            config,
            store,
            listener,
            shutdown.clone(),
            hooks,
        ));
        Dispatcher {
            addr,
            shutdown,
            handle,
        }
    }

    /// A dispatcher with its HTTP side on 127.0.0.1:0; also returns the
    /// HTTP base URL (`http://127.0.0.1:PORT`).
    pub async fn start_http(config: Config) -> (Dispatcher, String) {
        let store = surveil_dispatcher::store::SqliteStore::open(&config.state_dir).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{}", http.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(surveil_dispatcher::serve_with_http(
            config,
            Arc::new(store),
            listener,
            http,
            shutdown.clone(),
        ));
        let d = Dispatcher {
            addr,
            shutdown,
            handle,
        };
        (d, base)
    }

    /// Waits for the dispatcher to return by itself (it was not told to
    /// stop), and gives its answer.
    pub async fn exited(self) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the dispatcher returns in time")
            .expect("dispatcher task did not panic")
    }

    /// Cancels and waits for a clean return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("dispatcher stops in time")
            .expect("dispatcher task did not panic")
            .expect("dispatcher returned Ok");
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, Hello::new(Role::Client, "test-client")).await
    }

    /// A client presenting `token`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let mut hello = Hello::new(Role::Client, "test-client");
        hello.token = token.to_owned();
        Client::connect(self.addr, hello).await
    }

    /// A runner of [`REPO`] presenting `token`.
    pub async fn runner_with_token(&self, name: &str, slots: u32, token: &str) -> FakeRunner {
        let mut hello = Hello::new(Role::Runner, name);
        hello.slots = slots;
        hello.repos = vec![REPO.to_owned()];
        hello.token = token.to_owned();
        FakeRunner::connect(self.addr, hello).await
    }

    pub async fn runner(&self, name: &str, slots: u32) -> FakeRunner {
        self.runner_with_leases(name, slots, vec![]).await
    }

    pub async fn runner_with_leases(
        &self,
        name: &str,
        slots: u32,
        leases: Vec<Lease>,
    ) -> FakeRunner {
        let mut hello = Hello::new(Role::Runner, name);
        hello.slots = slots;
        hello.repos = vec![REPO.to_owned()];
        hello.leases = leases;
        FakeRunner::connect(self.addr, hello).await
    }
}

pub async fn handshake(
    addr: SocketAddr,
    hello: Hello,
) -> Result<(Connection<TcpStream>, Welcome), HandshakeError> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = Connection::new(stream);
    let welcome = conn.client_handshake(hello, WAIT).await?;
    Ok((conn, welcome))
}

pub struct Client {
    pub conn: Connection<TcpStream>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, hello: Hello) -> Client {
        let (conn, _) = handshake(addr, hello).await.expect("client handshake");
        Client { conn }
    }

    pub async fn recv(&mut self) -> Option<Msg> {
        tokio::time::timeout(WAIT, self.conn.recv())
            .await
            .expect("reply in time")
            .expect("valid frame")
    }

    pub async fn call(&mut self, msg: impl Into<Envelope>) -> Msg {
        self.conn.send(msg).await.unwrap();
        self.recv().await.expect("a reply, not a close")
    }

    pub async fn submit(&mut self, commits: &[String]) -> Vec<u64> {
        self.submit_to(REPO, commits).await
    }

    pub async fn submit_to(&mut self, repo: &str, commits: &[String]) -> Vec<u64> {
        match self
            .call(Submit {
                repo: repo.to_owned(),
                branch: "main".to_owned(),
                commits: commits.to_vec(),
                ..Submit::default()
            })
            .await
        {
            Msg::SubmitAck(ack) => ack.job_ids,
            other => panic!("expected SubmitAck, got {other:?}"),
        }
    }

    pub async fn job(&mut self, id: u64) -> Option<JobInfo> {
        match self.call(GetJob { job_id: id }).await {
            Msg::GetJobReply(r) => r.job,
            other => panic!("expected GetJobReply, got {other:?}"),
        }
    }

    /// Reads a job's log (its latest attempt) from `offset`, without
    /// following: the contiguous bytes stored there.
    pub async fn read_log(&mut self, id: u64, offset: u64) -> Vec<u8> {
        self.conn
            .send(ReadLog {
                job_id: id,
                offset,
                follow: false,
                ..ReadLog::default()
            })
            .await
            .unwrap();
        let mut log = Vec::new();
        loop {
            match self.recv().await {
                Some(Msg::ReadLogReply(r)) => {
                    log.extend_from_slice(&r.data);
                    if r.end {
                        return log;
                    }
                }
                other => panic!("expected ReadLogReply, got {other:?}"),
            }
        }
    }

    pub async fn status(&mut self) -> GetStatusReply {
        match self.call(GetStatus {}).await {
            Msg::GetStatusReply(r) => r,
            other => panic!("expected GetStatusReply, got {other:?}"),
        }
    }

    /// Polls the job until `done` holds, for at most [`WAIT`].
    pub async fn wait_job(
        &mut self,
        id: u64,
        what: &str,
        done: impl Fn(&JobInfo) -> bool,
    ) -> JobInfo {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let job = self.job(id).await.expect("job exists");
            if done(&job) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never became {what}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A runner driven by the test. A background task answers `Ping`s (unless
/// made silent) and hands every other message to the test.
pub struct FakeRunner {
    out: mpsc::Sender<Envelope>,
    inbox: mpsc::Receiver<Option<Msg>>,
    silent: Arc<AtomicBool>,
    /// Pings received so far.
    pub pings: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeRunner {
    pub async fn connect(addr: SocketAddr, hello: Hello) -> FakeRunner {
        let (conn, _) = handshake(addr, hello).await.expect("runner handshake");
        let (mut reader, mut writer) = conn.split();
        let (out, mut out_rx) = mpsc::channel::<Envelope>(64);
        let (inbox_tx, inbox) = mpsc::channel(1024);
        let silent = Arc::new(AtomicBool::new(false));
        let writer_task = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if writer.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let pong = out.clone();
        let quiet = silent.clone();
        let pings = Arc::new(AtomicU64::new(0));
        let pinged = pings.clone();
        let reader_task = tokio::spawn(async move {
            loop {
                match reader.recv().await {
                    Ok(Some(Msg::Ping(ping))) => {
                        pinged.fetch_add(1, Ordering::SeqCst);
                        if !quiet.load(Ordering::SeqCst) {
                            let _ = pong.send(Pong { seq: ping.seq }.into()).await;
                        }
                    }
                    Ok(Some(msg)) => {
                        if inbox_tx.send(Some(msg)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        let _ = inbox_tx.send(None).await;
                        return;
                    }
                }
            }
        });
        FakeRunner {
            out,
            inbox,
            silent,
            pings,
            tasks: vec![writer_task, reader_task],
        }
    }

    /// Stops answering pings (and sending anything).
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    pub async fn send(&self, msg: impl Into<Envelope>) {
        self.out
            .send(msg.into())
            .await
            .expect("runner writer alive");
    }

    /// The next non-Ping message; `None` when the dispatcher closed.
    pub async fn recv(&mut self) -> Option<Msg> {
        tokio::time::timeout(WAIT, self.inbox.recv())
            .await
            .expect("a message in time")
            .flatten()
    }

    /// Whether a message arrives within `within` (for "nothing is sent").
    pub async fn recv_within(&mut self, within: Duration) -> Option<Option<Msg>> {
        tokio::time::timeout(within, self.inbox.recv())
            .await
            .ok()
            .map(Option::flatten)
    }

    pub async fn expect_assign(&mut self) -> Assign {
        match self.recv().await {
            Some(Msg::Assign(a)) => a,
            other => panic!("expected Assign, got {other:?}"),
        }
    }

    pub async fn finish(&mut self, job: u64, attempt: u32, status: JobStatus) -> ResultAck {
        self.finish_commit(job, attempt, status, "").await
    }

    /// [`finish`](Self::finish), naming the commit built (`""`: none, as
    /// a runner from before `JobFinished.commit`).
    pub async fn finish_commit(
        &mut self,
        job: u64,
        attempt: u32,
        status: JobStatus,
        commit: &str,
    ) -> ResultAck {
        self.send(JobFinished {
            commit: commit.to_owned(),
            job_id: job,
            attempt,
            status: status as i32,
            message: String::new(),
            infrastructure: false,
            tasks: vec![TaskResult {
                name: "unit".into(),
                status: TaskStatus::Passed as i32,
                exit_code: Some(0),
                signal: None,
                duration_ms: 5,
                message: String::new(),
                ..TaskResult::default()
            }],
        })
        .await;
        loop {
            match self.recv().await {
                Some(Msg::ResultAck(ack)) => return ack,
                Some(Msg::Cancel(_)) => continue,
                other => panic!("expected ResultAck, got {other:?}"),
            }
        }
    }

    /// Closes the connection at once.
    pub fn close(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for FakeRunner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An HTTP client for the tests: the workspace's reqwest has no TLS
/// provider of its own, so ring is installed first.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}
