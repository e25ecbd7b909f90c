//! The CLI's side of the wire: one connection to the dispatcher, the
//! handshake as a client, then requests answered in order on that
//! connection. It turns replies into plain values and failures into
//! [`ClientError`]s that say what failed.
//!
//! It must not format anything for the user or decide exit codes: that is
//! `output.rs` and `main.rs`.

use std::time::Duration;

use surveil_common::tls;
use surveil_common::{DialError, Dialer, Secret};
use surveil_proto::{
    CancelJob, CancelJobReply, CodecError, Connection, ConnectionError, GetJob, GetStatus,
    GetStatusReply, Hello, JobInfo, ListJobs, ListRunners, Msg, Prune, PruneReply, ReadLog,
    ReadLogReply, RejectCode, RerunJob, RerunJobReply, Role, RunnerInfo, Submit,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// The name the CLI gives in its `Hello`, shown in the dispatcher's logs.
pub const CLIENT_NAME: &str = "surveil-cli";

/// How long connecting, and then the handshake, may each take: a
/// dispatcher that accepts but never answers must not hang a script.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a one-shot reply may take. Following a log has no such limit:
/// a task may print nothing for a long time.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `prune` waits: it may delete many attempts' logs.
pub const PRUNE_TIMEOUT: Duration = Duration::from_secs(600);

/// What went wrong talking to the dispatcher. Messages leave out their
/// `source`: `main` prints the whole chain (`{:#}`), so it is said once.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or the handshake failed, or the dispatcher refused us.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// Writing the request failed.
    #[error("sending {request} to the dispatcher failed")]
    Send {
        /// The request's message name.
        request: &'static str,
        /// Why it failed.
        source: CodecError,
    },
    /// Reading the reply failed.
    #[error("reading the dispatcher's answer to {request} failed")]
    Recv {
        /// The request's message name.
        request: &'static str,
        /// Why it failed.
        source: ConnectionError,
    },
    /// The dispatcher closed the connection before answering.
    #[error("the dispatcher closed the connection before answering {request}")]
    Closed {
        /// The request's message name.
        request: &'static str,
    },
    /// No reply arrived within [`REPLY_TIMEOUT`].
    #[error("the dispatcher did not answer {request} within {timeout:?}")]
    Timeout {
        /// The request's message name.
        request: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The dispatcher sent `Error` (it found our request invalid) and closed.
    #[error("the dispatcher refused {request}: {message}")]
    Refused {
        /// The request's message name.
        request: &'static str,
        /// Its explanation.
        message: String,
    },
    /// The dispatcher is a standby: it answers only `GetStatus` and
    /// refused `request` (high availability). Nothing was done.
    #[error("the dispatcher is a standby and refused {request}: {message}")]
    NotLeader {
        /// The request's message name.
        request: &'static str,
        /// Where the leader is, empty while the standby knows none.
        leader_addr: String,
        /// The standby's explanation.
        message: String,
    },
    /// The dispatcher answered with a message that does not answer the
    /// request.
    #[error("the dispatcher answered {request} with {got}, expected {expected}")]
    Unexpected {
        /// The request's message name.
        request: &'static str,
        /// The reply the request calls for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
}

/// A handshaken connection to the dispatcher, as a client.
#[derive(Debug)]
pub struct Client<S> {
    conn: Connection<S>,
}

impl Client<tls::Stream> {
    /// Dials the first of `dialer`'s addresses that answers, says `Hello`
    /// as a client with `token` (empty when `None`) and waits for
    /// `Welcome`. With TLS in `dialer`, the connection is TLS, checked
    /// against its CA.
    pub async fn connect(dialer: &mut Dialer, token: Option<&Secret>) -> Result<Self, ClientError> {
        let mut hello = Hello::new(Role::Client, CLIENT_NAME);
        if let Some(token) = token {
            hello.token = token.expose().clone();
        }
        let (conn, _welcome) = dialer.dial(hello).await?;
        Ok(Client { conn })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a connection whose handshake is already done.
    #[cfg(test)]
    pub fn from_connection(conn: Connection<S>) -> Self {
        Client { conn }
    }

    /// Jobs matching `query`, newest first.
    pub async fn list_jobs(&mut self, mut query: ListJobs) -> Result<Vec<JobInfo>, ClientError> {
        // The dispatcher answers in pages (each fits its frame limit): ask
        // for the next one below the last job until the limit is reached
        // or nothing more is left.
        let wanted = (query.limit > 0).then_some(query.limit as usize);
        let mut jobs: Vec<JobInfo> = Vec::new();
        loop {
            if let Some(wanted) = wanted {
                query.limit = u32::try_from(wanted - jobs.len()).unwrap_or(u32::MAX);
            }
            self.send("ListJobs", query.clone()).await?;
            let reply = match self.reply("ListJobs", Some(REPLY_TIMEOUT)).await? {
                Msg::ListJobsReply(reply) => reply,
                other => return Err(unexpected("ListJobs", "ListJobsReply", &other)),
            };
            let last = reply.jobs.last().map(|j| j.id);
            jobs.extend(reply.jobs);
            if !reply.more || wanted.is_some_and(|w| jobs.len() >= w) {
                return Ok(jobs);
            }
            match last {
                Some(id) => query.before = Some(id),
                None => {
                    return Err(ClientError::Refused {
                        request: "ListJobs",
                        message: "a single job does not fit the dispatcher's --max-frame".into(),
                    });
                }
            }
        }
    }

    /// One job; `None` when the dispatcher knows no such job.
    pub async fn get_job(&mut self, job_id: u64) -> Result<Option<JobInfo>, ClientError> {
        self.send("GetJob", GetJob { job_id }).await?;
        match self.reply("GetJob", Some(REPLY_TIMEOUT)).await? {
            Msg::GetJobReply(reply) => Ok(reply.job),
            other => Err(unexpected("GetJob", "GetJobReply", &other)),
        }
    }

    /// Starts reading a job's log from `offset`; then call
    /// [`next_log`](Self::next_log) until a reply has `end` set.
    pub async fn read_log(
        &mut self,
        job_id: u64,
        offset: u64,
        follow: bool,
        attempt: Option<u32>,
    ) -> Result<(), ClientError> {
        let request = ReadLog {
            job_id,
            offset,
            follow,
            attempt: attempt.unwrap_or(0),
        };
        self.send("ReadLog", request).await
    }

    /// The next reply to [`read_log`](Self::read_log). With `follow` it
    /// waits as long as the job runs; without, at most [`REPLY_TIMEOUT`].
    pub async fn next_log(&mut self, follow: bool) -> Result<ReadLogReply, ClientError> {
        let limit = (!follow).then_some(REPLY_TIMEOUT);
        match self.reply("ReadLog", limit).await? {
            Msg::ReadLogReply(reply) => Ok(reply),
            other => Err(unexpected("ReadLog", "ReadLogReply", &other)),
        }
    }

    /// The connected runners, by name.
    pub async fn list_runners(&mut self) -> Result<Vec<RunnerInfo>, ClientError> {
        self.send("ListRunners", ListRunners {}).await?;
        match self.reply("ListRunners", Some(REPLY_TIMEOUT)).await? {
            Msg::ListRunnersReply(reply) => Ok(reply.runners),
            other => Err(unexpected("ListRunners", "ListRunnersReply", &other)),
        }
    }

    /// The dispatcher's health figures.
    pub async fn status(&mut self) -> Result<GetStatusReply, ClientError> {
        self.send("GetStatus", GetStatus {}).await?;
        match self.reply("GetStatus", Some(REPLY_TIMEOUT)).await? {
            Msg::GetStatusReply(reply) => Ok(reply),
            other => Err(unexpected("GetStatus", "GetStatusReply", &other)),
        }
    }

    /// Submits `commits` (oldest first) of `repo` seen on `branch`; returns
    /// one job id per commit, in order, once the jobs are durable.
    pub async fn submit(
        &mut self,
        repo: &str,
        branch: &str,
        commits: Vec<String>,
    ) -> Result<Vec<u64>, ClientError> {
        let request = Submit {
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            commits,
            ..Submit::default()
        };
        self.send("Submit", request).await?;
        match self.reply("Submit", Some(REPLY_TIMEOUT)).await? {
            Msg::SubmitAck(ack) => Ok(ack.job_ids),
            other => Err(unexpected("Submit", "SubmitAck", &other)),
        }
    }

    /// Asks the dispatcher to delete old finished jobs' logs: by age, all
    /// but the newest `keep_jobs`, or (neither) as its `--retain-logs` says.
    pub async fn prune(
        &mut self,
        older_than_ms: Option<u64>,
        keep_jobs: Option<u64>,
    ) -> Result<PruneReply, ClientError> {
        self.send(
            "Prune",
            Prune {
                older_than_ms,
                keep_jobs,
            },
        )
        .await?;
        // Deleting a large backlog of logs takes longer than a lookup.
        match self.reply("Prune", Some(PRUNE_TIMEOUT)).await? {
            Msg::PruneReply(reply) => Ok(reply),
            other => Err(unexpected("Prune", "PruneReply", &other)),
        }
    }

    /// Asks the dispatcher to queue a new attempt of a finished job.
    pub async fn rerun(&mut self, job_id: u64) -> Result<RerunJobReply, ClientError> {
        self.send("RerunJob", RerunJob { job_id }).await?;
        match self.reply("RerunJob", Some(REPLY_TIMEOUT)).await? {
            Msg::RerunJobReply(reply) => Ok(reply),
            other => Err(unexpected("RerunJob", "RerunJobReply", &other)),
        }
    }

    /// Asks the dispatcher to cancel a job.
    pub async fn cancel(&mut self, job_id: u64) -> Result<CancelJobReply, ClientError> {
        self.send("CancelJob", CancelJob { job_id }).await?;
        match self.reply("CancelJob", Some(REPLY_TIMEOUT)).await? {
            Msg::CancelJobReply(reply) => Ok(reply),
            other => Err(unexpected("CancelJob", "CancelJobReply", &other)),
        }
    }

    async fn send(
        &mut self,
        request: &'static str,
        msg: impl Into<surveil_proto::Envelope>,
    ) -> Result<(), ClientError> {
        self.conn
            .send(msg)
            .await
            .map_err(|source| ClientError::Send { request, source })
    }

    /// The next message, with `Error` and a closed connection turned into
    /// errors naming `request`.
    async fn reply(
        &mut self,
        request: &'static str,
        limit: Option<Duration>,
    ) -> Result<Msg, ClientError> {
        let received = match limit {
            Some(timeout) => tokio::time::timeout(timeout, self.conn.recv())
                .await
                .map_err(|_| ClientError::Timeout { request, timeout })?,
            None => self.conn.recv().await,
        };
        match received {
            Ok(Some(Msg::Error(error))) => Err(ClientError::Refused {
                request,
                message: error.message,
            }),
            Ok(Some(Msg::Reject(reject))) if reject.code() == RejectCode::NotLeader => {
                Err(ClientError::NotLeader {
                    request,
                    leader_addr: reject.leader_addr,
                    message: reject.message,
                })
            }
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(ClientError::Closed { request }),
            Err(source) => Err(ClientError::Recv { request, source }),
        }
    }
}

fn unexpected(request: &'static str, expected: &'static str, got: &Msg) -> ClientError {
    ClientError::Unexpected {
        request,
        expected,
        got: got.name(),
    }
}

#[cfg(test)]
mod tests {
    use surveil_proto::{Error, GetJobReply, Pong, SubmitAck};

    use super::*;

    /// A client and the dispatcher's end of an in-memory connection, past
    /// the handshake.
    fn pair() -> (
        Client<tokio::io::DuplexStream>,
        Connection<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (
            Client::from_connection(Connection::new(a)),
            Connection::new(b),
        )
    }

    #[tokio::test]
    async fn requests_are_answered_in_order_on_one_connection() {
        let (mut client, mut server) = pair();
        let dispatcher = tokio::spawn(async move {
            let Ok(Some(Msg::Submit(submit))) = server.recv().await else {
                panic!("expected Submit");
            };
            assert_eq!(submit.commits.len(), 2);
            server
                .send(SubmitAck {
                    job_ids: vec![3, 4],
                    created: vec![true, true],
                })
                .await
                .unwrap();
            let Ok(Some(Msg::GetJob(get))) = server.recv().await else {
                panic!("expected GetJob");
            };
            assert_eq!(get.job_id, 4);
            server.send(GetJobReply { job: None }).await.unwrap();
        });
        let ids = client
            .submit("/r", "main", vec!["a".repeat(40), "b".repeat(40)])
            .await
            .unwrap();
        assert_eq!(ids, vec![3, 4]);
        assert_eq!(client.get_job(4).await.unwrap(), None);
        dispatcher.await.unwrap();
    }

    #[tokio::test]
    async fn error_wrong_reply_and_close_name_the_request() {
        let (mut client, mut server) = pair();
        let dispatcher = tokio::spawn(async move {
            let _ = server.recv().await;
            server
                .send(Error {
                    message: "clients may not send Pong".into(),
                })
                .await
                .unwrap();
            let _ = server.recv().await;
            server.send(Pong { seq: 1 }).await.unwrap();
        });
        let err = client.status().await.unwrap_err().to_string();
        assert_eq!(
            err,
            "the dispatcher refused GetStatus: clients may not send Pong"
        );
        let err = client.list_runners().await.unwrap_err().to_string();
        assert_eq!(
            err,
            "the dispatcher answered ListRunners with Pong, expected ListRunnersReply"
        );
        dispatcher.await.unwrap();
        let err = client.cancel(1).await.unwrap_err().to_string();
        assert!(
            err.contains("closed the connection before answering CancelJob")
                || err.contains("sending CancelJob"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_dispatcher_times_out_but_a_followed_log_waits() {
        let (mut client, _server) = pair();
        let err = client.get_job(1).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    request: "GetJob",
                    ..
                }
            ),
            "{err}"
        );
        client.read_log(1, 0, true, None).await.unwrap();
        let waited = tokio::time::timeout(REPLY_TIMEOUT * 10, client.next_log(true)).await;
        assert!(
            waited.is_err(),
            "a followed log must not time out on its own"
        );
    }
}
