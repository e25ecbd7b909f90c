//! A blocking client of the dispatcher's query protocol for the benchmark:
//! one TCP connection speaking `surveil-proto` directly, so polling a job
//! every few milliseconds costs one frame each way rather than a process
//! spawn. It only asks; it never changes what the dispatcher records except
//! by `CancelJob`, which the scenarios use to clear a slow job between runs,
//! and `Submit`, which fills the store for the HTTP scenarios.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use surveil_proto::{
    CancelJob, Connection, Envelope, GetJob, GetStatus, GetStatusReply, Hello, JobInfo, ListJobs,
    ListRunners, Msg, Pong, Role, RunnerInfo, Submit,
};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    rt: Runtime,
    conn: Connection<TcpStream>,
}

impl Client {
    /// Connects and completes the handshake as a client.
    pub fn connect(addr: &str) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let conn = rt.block_on(async {
            let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
                .await
                .context("connecting timed out")??;
            stream.set_nodelay(true)?;
            let mut conn = Connection::new(stream);
            conn.client_handshake(Hello::new(Role::Client, "bench"), TIMEOUT)
                .await?;
            anyhow::Ok(conn)
        })?;
        Ok(Client { rt, conn })
    }

    /// Connects, retrying for up to `deadline` while the dispatcher starts.
    pub fn connect_within(addr: &str, deadline: Duration) -> Result<Client> {
        surveil_tests::cluster::wait_for(
            "the dispatcher to accept a client",
            deadline,
            Duration::from_millis(10),
            || Client::connect(addr).map(Some),
        )
    }

    fn request(&mut self, msg: impl Into<Envelope>) -> Result<Msg> {
        let msg = msg.into();
        let conn = &mut self.conn;
        self.rt.block_on(async {
            tokio::time::timeout(TIMEOUT, async {
                conn.send(msg).await?;
                loop {
                    match conn.recv().await? {
                        Some(Msg::Ping(ping)) => conn.send(Pong { seq: ping.seq }).await?,
                        Some(reply) => return Ok(reply),
                        None => bail!("the dispatcher closed the connection"),
                    }
                }
            })
            .await
            .context("the dispatcher did not answer within 10 s")?
        })
    }

    pub fn job(&mut self, id: u64) -> Result<Option<JobInfo>> {
        match self.request(GetJob { job_id: id })? {
            Msg::GetJobReply(reply) => Ok(reply.job),
            other => bail!("GetJob answered with {}", other.name()),
        }
    }

    /// Jobs newest first; `limit` 0 means all.
    pub fn jobs(&mut self, repo: Option<&str>, limit: u32) -> Result<Vec<JobInfo>> {
        let query = ListJobs {
            repo: repo.map(str::to_owned),
            status: 0,
            limit,
            ..ListJobs::default()
        };
        match self.request(query)? {
            Msg::ListJobsReply(reply) => Ok(reply.jobs),
            other => bail!("ListJobs answered with {}", other.name()),
        }
    }

    pub fn status(&mut self) -> Result<GetStatusReply> {
        match self.request(GetStatus {})? {
            Msg::GetStatusReply(reply) => Ok(reply),
            other => bail!("GetStatus answered with {}", other.name()),
        }
    }

    pub fn runners(&mut self) -> Result<Vec<RunnerInfo>> {
        match self.request(ListRunners {})? {
            Msg::ListRunnersReply(reply) => Ok(reply.runners),
            other => bail!("ListRunners answered with {}", other.name()),
        }
    }

    /// Submits `commits` of `repo` on `branch` in one request.
    pub fn submit(&mut self, repo: &str, branch: &str, commits: Vec<String>) -> Result<Vec<u64>> {
        let submit = Submit {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            commits,
            ..Submit::default()
        };
        match self.request(submit)? {
            Msg::SubmitAck(ack) => Ok(ack.job_ids),
            other => bail!("Submit answered with {}", other.name()),
        }
    }

    pub fn cancel(&mut self, id: u64) -> Result<()> {
        match self.request(CancelJob { job_id: id })? {
            Msg::CancelJobReply(_) => Ok(()),
            other => bail!("CancelJob answered with {}", other.name()),
        }
    }
}
