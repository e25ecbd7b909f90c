//! High availability on a real PostgreSQL: two dispatchers on one
//! database elect one leader; the standby answers `status` naming it and
//! refuses sessions with `NOT_LEADER`; when the leader dies, the standby
//! takes over and a runner keeps its running job; when the leader is cut
//! off from the database, it stops serving and its late writes are refused
//! (asserted on the rows).

use std::net::SocketAddr;
use std::time::Duration;

use surveil_dispatcher::Config;
use surveil_dispatcher::config::StoreConfig;
use surveil_dispatcher::store::PostgresOptions;
use surveil_proto::*;
use surveil_tests::postgres;
use surveil_tests::relay::Relay;
use tokio::net::TcpStream;

use crate::harness::*;

/// A dispatcher on a runtime of its own, so that it can die as a process
/// does: dropping the runtime drops every task and socket it had at once.
struct Node {
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Node {
    fn start(config: Config) -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        let handle = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            surveil_dispatcher::run(config, listener, stop).await
        });
        Node {
            addr,
            rt: Some(rt),
            shutdown,
            handle,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(self.addr, Hello::new(Role::Client, "test-client")).await
    }

    async fn runner_with_leases(&self, name: &str, leases: Vec<Lease>) -> FakeRunner {
        let mut hello = Hello::new(Role::Runner, name);
        hello.slots = 1;
        hello.repos = vec![REPO.to_owned()];
        hello.leases = leases;
        FakeRunner::connect(self.addr, hello).await
    }

    /// Dies as SIGKILL would make it: nothing runs any more, no resign.
    fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("dispatcher stops in time")
            .expect("dispatcher task did not panic");
        result.expect("dispatcher returned Ok");
        self.kill();
    }

    /// Waits for it to stop on its own with an error; returns its text.
    async fn wait_failed(mut self) -> String {
        let result = tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("dispatcher stops in time")
            .expect("dispatcher task did not panic");
        let text = format!("{:#}", result.expect_err("dispatcher returned an error"));
        self.kill();
        text
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

const TTL: Duration = Duration::from_millis(2000);

fn pg_config(dir: &std::path::Path, url: String) -> Config {
    let pg = postgres::shared().expect("checked");
    let mut config = fast_config(dir);
    let mut options = PostgresOptions::new(url);
    options.password = Some(pg.password().to_owned().into());
    options.leader_ttl = TTL;
    options.pool_size = 4;
    config.store = StoreConfig::Postgres(options);
    config
}

/// Polls `status` on `addr` until it says this dispatcher leads.
async fn wait_leader(addr: SocketAddr) -> GetStatusReply {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut client = Client::connect(addr, Hello::new(Role::Client, "probe")).await;
        let status = client.status().await;
        if !status.standby && status.leader_term > 0 {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never led: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first frame a runner's Hello gets from `addr`.
async fn hello_answer(addr: SocketAddr, name: &str) -> Msg {
    let mut conn = Connection::new(TcpStream::connect(addr).await.unwrap());
    let mut hello = Hello::new(Role::Runner, name);
    hello.slots = 1;
    hello.repos = vec![REPO.to_owned()];
    conn.send(hello).await.unwrap();
    tokio::time::timeout(WAIT, conn.recv())
        .await
        .expect("an answer in time")
        .expect("a valid frame")
        .expect("a frame, not a close")
}

fn log(job: u64, attempt: u32, offset: u64, data: &[u8]) -> Log {
    Log {
        job_id: job,
        attempt,
        task: 0,
        stream: Stream::Stdout as i32,
        offset,
        data: data.to_vec().into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_dead_leader_and_the_running_job_is_kept() {
    let Some(pg) = postgres::require("HA failover") else {
        return;
    };
    let db = pg.create_database().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Node::start(pg_config(dir_a.path(), pg.url(&db)));
    let first = wait_leader(a.addr).await;
    assert_eq!(first.leader_addr, a.addr.to_string());
    let b = Node::start(pg_config(dir_b.path(), pg.url(&db)));

    // The standby names the leader, and refuses runners with its address.
    let deadline = tokio::time::Instant::now() + WAIT;
    let standby = loop {
        let status = b.client().await.status().await;
        if !status.leader_addr.is_empty() || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(standby.standby, "{standby:?}");
    assert_eq!(
        (standby.leader_addr.as_str(), standby.leader_term),
        (a.addr.to_string().as_str(), first.leader_term)
    );
    match hello_answer(b.addr, "ci-1").await {
        Msg::Reject(r) => {
            assert_eq!(r.code(), RejectCode::NotLeader);
            assert_eq!(r.leader_addr, a.addr.to_string());
            assert!(r.message.contains("standby"), "{}", r.message);
        }
        other => panic!("expected Reject, got {other:?}"),
    }

    // A job runs on the leader.
    let mut client = a.client().await;
    let job = client.submit(&[commit(1)]).await[0];
    let mut runner = a.runner_with_leases("ci-1", vec![]).await;
    let assign = runner.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (job, 1));
    runner.send(log(job, 1, 0, b"before ")).await;
    client
        .wait_job(job, "running", |j| j.status() == JobStatus::Running)
        .await;
    drop(client);
    // Logs have no ack: wait until the chunk is stored before the crash.
    let deadline = tokio::time::Instant::now() + WAIT;
    while pg.psql(&db, "SELECT count(*) FROM log_chunks").unwrap() != "1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first chunk was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The leader dies without resigning (its task and connections dropped,
    // as a SIGKILL would); the standby takes over after the term expires.
    a.kill();
    runner.close();
    let second = wait_leader(b.addr).await;
    assert!(second.leader_term > first.leader_term);
    assert_eq!(second.leader_addr, b.addr.to_string());

    // The runner reconnects to the new leader with its lease: kept, not rerun.
    let mut runner = b
        .runner_with_leases(
            "ci-1",
            vec![Lease {
                job_id: job,
                attempt: 1,
            }],
        )
        .await;
    runner.send(log(job, 1, 7, b"after")).await;
    assert!(runner.finish(job, 1, JobStatus::Passed).await.accepted);
    let mut client = b.client().await;
    let done = client
        .wait_job(job, "passed", |j| j.status() == JobStatus::Passed)
        .await;
    assert_eq!(done.attempt, 1, "the job was not run again");
    assert_eq!(
        pg.psql(&db, &format!("SELECT string_agg(encode(data, 'escape'), '' ORDER BY log_offset) FROM log_chunks WHERE job_id = {job}")).unwrap(),
        "before after"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_steps_down_and_its_late_writes_are_refused() {
    let Some(pg) = postgres::require("HA partition") else {
        return;
    };
    let db = pg.create_database().unwrap();
    let upstream = pg.addr();
    let relay = tokio::task::spawn_blocking(move || Relay::start(upstream))
        .await
        .unwrap()
        .unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Node::start(pg_config(dir_a.path(), pg.url_via(relay.addr(), &db)));
    let first = wait_leader(a.addr).await;
    let b = Node::start(pg_config(dir_b.path(), pg.url(&db)));

    let mut client = a.client().await;
    let job = client.submit(&[commit(1)]).await[0];
    let mut runner = a.runner_with_leases("ci-1", vec![]).await;
    runner.expect_assign().await;
    runner.send(log(job, 1, 0, b"kept")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while pg.psql(&db, "SELECT count(*) FROM log_chunks").unwrap() != "1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first chunk was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cut: the leader can neither renew nor write; what it takes now waits.
    relay.partition();
    runner.send(log(job, 1, 4, b" late")).await;
    // It stops serving: its connections close (bounded wait, not a timing
    // assertion: the bench measures how fast).
    assert_eq!(
        tokio::time::timeout(WAIT, client.conn.recv())
            .await
            .expect("the leader closes its clients")
            .ok()
            .flatten(),
        None
    );
    let second = wait_leader(b.addr).await;
    assert!(second.leader_term > first.leader_term);

    // Heal: the old leader's held writes reach the database now, and are
    // refused by the term check.
    relay.heal();
    let err = a.wait_failed().await;
    assert!(err.contains("lost the leader term"), "{err}");
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM log_chunks").unwrap(),
        "1",
        "the late chunk was refused"
    );
    assert_eq!(
        pg.psql(
            &db,
            &format!("SELECT log_end FROM attempts WHERE job_id = {job}")
        )
        .unwrap(),
        "4"
    );
    assert_eq!(
        pg.psql(&db, "SELECT addr FROM leader").unwrap(),
        b.addr.to_string()
    );
    runner.close();
    b.stop().await;
    tokio::task::spawn_blocking(move || drop(relay))
        .await
        .unwrap();
}

/// A free loopback address for a node's HTTP side (bound, read, released).
fn free_http_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn http_get(url: &str) -> (reqwest::StatusCode, String) {
    let r = http_client()
        .build()
        .unwrap()
        .get(url)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_answers_http_naming_the_leader_and_serves_it_all_once_elected() {
    let Some(pg) = postgres::require("HA over HTTP") else {
        return;
    };
    let db = pg.create_database().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (http_a, http_b) = (free_http_addr(), free_http_addr());
    let mut config_a = pg_config(dir_a.path(), pg.url(&db));
    config_a.http.listen = Some(http_a);
    config_a.http.explicit = true;
    let a = Node::start(config_a);
    wait_leader(a.addr).await;
    let mut config_b = pg_config(dir_b.path(), pg.url(&db));
    config_b.http.listen = Some(http_b);
    config_b.http.explicit = true;
    let b = Node::start(config_b);

    // The standby's status names the leader once it has read the term.
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        let (code, body) = http_get(&format!("http://{http_b}/api/v1/status")).await;
        if code == reqwest::StatusCode::OK {
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            if status["leader"]["addr"].is_string() {
                break status;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["leader"]["standby"], true, "{status}");
    assert_eq!(status["leader"]["addr"], a.addr.to_string(), "{status}");
    let (code, body) = http_get(&format!("http://{http_a}/api/v1/status")).await;
    assert_eq!(code, reqwest::StatusCode::OK, "{body}");
    let leader: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(leader["leader"]["standby"], false, "{leader}");

    // Every other API route is 503 naming the leader; pages say so.
    let (code, body) = http_get(&format!("http://{http_b}/api/v1/jobs")).await;
    assert_eq!(code, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        refusal,
        serde_json::json!({ "error": "not the leader", "leader": a.addr.to_string() })
    );
    let (code, page) = http_get(&format!("http://{http_b}/")).await;
    assert_eq!(code, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.contains("standby"), "{page}");
    assert!(page.contains(&a.addr.to_string()), "{page}");

    // Once elected, the same HTTP address serves the leader's API.
    a.kill();
    wait_leader(b.addr).await;
    let (code, body) = http_get(&format!("http://{http_b}/api/v1/jobs")).await;
    assert_eq!(code, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body.trim(), "[]");
    let (code, body) = http_get(&format!("http://{http_b}/api/v1/status")).await;
    assert_eq!(code, reqwest::StatusCode::OK, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["leader"]["standby"], false, "{status}");
    b.stop().await;
}
