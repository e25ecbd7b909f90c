//! A blocking query client for tests that talk to a dispatcher directly over
//! the wire (`surveil_proto::Connection`), one short connection per request,
//! so it survives dispatcher restarts and each poll is bounded in time. It
//! only asks (and submits); it never plays a runner or an observer.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use surveil_proto::{
    Connection, Envelope, GetJob, GetStatus, GetStatusReply, Hello, JobInfo, JobStatus, ListJobs,
    ListRunners, Msg, Role, RunnerInfo, Submit,
};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

/// How long one request (connect, handshake, reply) may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Asks a dispatcher at `addr` as a `ROLE_CLIENT`.
pub struct Probe {
    rt: Runtime,
    addr: String,
    token: Option<String>,
}

impl Probe {
    pub fn new(addr: &str) -> Result<Probe> {
        Ok(Probe {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the probe's runtime")?,
            addr: addr.to_owned(),
            token: None,
        })
    }

    /// Sends this token in every `Hello`.
    pub fn with_token(mut self, token: &str) -> Probe {
        self.token = Some(token.to_owned());
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `future` on the probe's runtime (for tests that mix blocking
    /// polls with raw async connections).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// One request and its single reply.
    pub fn request(&self, msg: impl Into<Envelope>) -> Result<Msg> {
        let envelope = msg.into();
        let addr = self.addr.clone();
        let mut hello = Hello::new(Role::Client, "surveil-tests-probe");
        hello.token = self.token.clone().unwrap_or_default();
        self.rt.block_on(async move {
            tokio::time::timeout(REQUEST_DEADLINE, async move {
                let stream = TcpStream::connect(&addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                let mut conn = Connection::new(stream);
                conn.client_handshake(hello, REQUEST_DEADLINE).await?;
                conn.send(envelope).await?;
                match conn.recv().await? {
                    Some(reply) => Ok(reply),
                    None => bail!("the dispatcher closed the connection without a reply"),
                }
            })
            .await
            .with_context(|| format!("no reply within {REQUEST_DEADLINE:?}"))?
        })
    }

    /// Every job, newest first, page after page (a reply holds at most
    /// 1,000 jobs).
    pub fn jobs(&self) -> Result<Vec<JobInfo>> {
        let mut jobs: Vec<JobInfo> = Vec::new();
        let mut before = None;
        // Bounded: a million jobs is far past any story or soak.
        for _ in 0..1_000 {
            let query = ListJobs {
                before,
                ..ListJobs::default()
            };
            let reply = match self.request(query)? {
                Msg::ListJobsReply(reply) => reply,
                other => bail!("ListJobs answered with {}", other.name()),
            };
            before = reply.jobs.last().map(|j| j.id);
            jobs.extend(reply.jobs);
            if !reply.more || before.is_none() {
                return Ok(jobs);
            }
        }
        bail!("ListJobs kept saying more after 1,000 pages")
    }

    pub fn job(&self, job_id: u64) -> Result<Option<JobInfo>> {
        match self.request(GetJob { job_id })? {
            Msg::GetJobReply(reply) => Ok(reply.job),
            other => bail!("GetJob answered with {}", other.name()),
        }
    }

    /// The job of `commit`, if one was submitted.
    pub fn job_of(&self, commit: &str) -> Result<Option<JobInfo>> {
        Ok(self.jobs()?.into_iter().find(|j| j.commit == commit))
    }

    pub fn status(&self) -> Result<GetStatusReply> {
        match self.request(GetStatus {})? {
            Msg::GetStatusReply(reply) => Ok(reply),
            other => bail!("GetStatus answered with {}", other.name()),
        }
    }

    pub fn runners(&self) -> Result<Vec<RunnerInfo>> {
        match self.request(ListRunners {})? {
            Msg::ListRunnersReply(reply) => Ok(reply.runners),
            other => bail!("ListRunners answered with {}", other.name()),
        }
    }

    /// Submits `commits` of `repo` seen at the full ref `git_ref` (of
    /// pull request `pull_request`, when given) on `branch`; the job ids.
    pub fn submit_ref(
        &self,
        repo: &str,
        branch: &str,
        git_ref: &str,
        pull_request: Option<u64>,
        commits: &[&str],
    ) -> Result<Vec<u64>> {
        let submit = Submit {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            commits: commits.iter().map(|c| (*c).to_owned()).collect(),
            r#ref: git_ref.to_owned(),
            pull_request,
        };
        match self.request(submit)? {
            Msg::SubmitAck(ack) => Ok(ack.job_ids),
            other => bail!("Submit answered with {}", other.name()),
        }
    }

    /// Submits `commits` (oldest first) of `repo` on `branch`; the job ids.
    pub fn submit(&self, repo: &str, branch: &str, commits: &[&str]) -> Result<Vec<u64>> {
        let submit = Submit {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            commits: commits.iter().map(|c| (*c).to_owned()).collect(),
            ..Submit::default()
        };
        match self.request(submit)? {
            Msg::SubmitAck(ack) => Ok(ack.job_ids),
            other => bail!("Submit answered with {}", other.name()),
        }
    }
}

/// The job's status as a [`JobStatus`] (unknown values read as
/// unspecified).
pub fn status_of(job: &JobInfo) -> JobStatus {
    JobStatus::try_from(job.status).unwrap_or(JobStatus::Unspecified)
}

/// `status (attempt n on runner)` for assertion messages.
pub fn describe(job: &JobInfo) -> String {
    format!(
        "job {} {} (attempt {} on {}){}",
        job.id,
        status_of(job).label(),
        job.attempt,
        job.runner.as_deref().unwrap_or("-"),
        job.message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    )
}
