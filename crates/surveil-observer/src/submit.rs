//! The observer's one connection to the dispatcher: dial and handshake as
//! `ROLE_OBSERVER` (through `surveil_common::dial`), send a `Submit`, wait
//! for its `SubmitAck`, and check the ack has one job id per commit.
//!
//! It never reads the repository or the cursor, and never retries on its
//! own: the caller decides what to resend (it recomputes from the cursor)
//! and when (its `Backoff`).

use std::time::Duration;

use surveil_common::tls::{self, ClientTls};
use surveil_common::{DialError, Dialer, Secret};
use surveil_proto::{Connection, ConnectionError, Hello, Msg, Pong, Role, Submit};

/// How long dialing the dispatcher, and then the handshake, may each take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the dispatcher may take to make a submit durable and ack it.
/// Generous: it commits to disk with fsync first.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a submit (or connecting for one) failed. Messages leave out their
/// source; log them with `surveil_common::error_chain`.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The dispatcher could not be reached, or refused the handshake.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// Sending failed.
    #[error("sending to the dispatcher failed")]
    Send(#[from] surveil_proto::CodecError),
    /// Receiving failed.
    #[error("receiving from the dispatcher failed")]
    Recv(#[from] ConnectionError),
    /// The dispatcher closed the connection.
    #[error("the dispatcher closed the connection")]
    Closed,
    /// No `SubmitAck` arrived in time.
    #[error("no SubmitAck within {ACK_TIMEOUT:?}")]
    AckTimeout,
    /// The dispatcher reported an error and closed.
    #[error("the dispatcher reported an error: {0}")]
    Dispatcher(String),
    /// The dispatcher sent something an observer does not expect.
    #[error("unexpected {0} from the dispatcher while waiting for SubmitAck")]
    Unexpected(&'static str),
    /// The ack does not carry one job id per submitted commit.
    #[error("SubmitAck carries {got} job ids for {sent} commits")]
    AckMismatch {
        /// Commits submitted.
        sent: usize,
        /// Job ids received.
        got: usize,
    },
}

impl SubmitError {
    /// Whether retrying cannot help until someone changes the
    /// configuration: a wrong token, protocol version or role.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SubmitError::Dial(dial) if dial.is_fatal())
    }
}

/// Who the observer says it is in its `Hello`, and how it reaches the
/// dispatcher.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Free-form name, for the dispatcher's logs.
    pub name: String,
    /// The repository watched, as submitted.
    pub repo: String,
    /// The shared secret, if the dispatcher wants one.
    pub token: Option<Secret>,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
}

/// What the dispatcher acknowledged for one `Submit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    /// One job id per commit, in order.
    pub job_ids: Vec<u64>,
    /// Per commit: whether the submit created the job (the dispatcher's
    /// store did not know the commit). All false from a dispatcher that
    /// does not say.
    pub created: Vec<bool>,
}

/// The connection to the dispatcher, dialed when first needed and again
/// after it is lost (to the leader among the `--dispatch` addresses).
pub struct Link {
    dialer: Dialer,
    identity: Identity,
    conn: Option<Connection<tls::Stream>>,
    /// Counts handshakes, so the caller can tell a new connection.
    connections: u64,
    /// `Welcome.epoch` of the current (or last) connection.
    epoch: String,
}

impl Link {
    /// A link to the dispatcher at one of `addrs` (`host:port`); nothing
    /// is dialed yet.
    pub fn new(addrs: Vec<String>, identity: Identity) -> Self {
        Link {
            dialer: Dialer::new(addrs, identity.tls.clone(), CONNECT_TIMEOUT),
            identity,
            conn: None,
            connections: 0,
            epoch: String::new(),
        }
    }

    /// How many handshakes have completed: a new number means a new
    /// connection, possibly to a dispatcher whose store changed.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// The store epoch the last `Welcome` named (empty from a dispatcher
    /// without epochs).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Whether a connection is currently open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Dials and completes the handshake unless already connected.
    pub async fn connect(&mut self) -> Result<(), SubmitError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let mut hello = Hello::new(Role::Observer, self.identity.name.clone());
        hello.repos = vec![self.identity.repo.clone()];
        if let Some(token) = &self.identity.token {
            hello.token = token.expose().clone();
        }
        // Dialling again means the last connection was lost.
        self.dialer.lost();
        let (conn, welcome) = self.dialer.dial(hello).await?;
        let addr = self.dialer.current().unwrap_or_default();
        tracing::info!(%addr, session = %welcome.session_id, epoch = %welcome.epoch, "connected to the dispatcher");
        self.conn = Some(conn);
        self.connections += 1;
        self.epoch = welcome.epoch;
        Ok(())
    }

    /// Submits `commits` (oldest first) of `branch` and returns their job
    /// ids, one per commit in the same order, and which of them it
    /// created, once the dispatcher has made them durable. On any error
    /// the connection is dropped; the next call dials again.
    pub async fn submit(&mut self, branch: &str, commits: &[String]) -> Result<Acked, SubmitError> {
        self.connect().await?;
        let result = self.exchange(branch, commits).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn exchange(&mut self, branch: &str, commits: &[String]) -> Result<Acked, SubmitError> {
        let conn = self.conn.as_mut().ok_or(SubmitError::Closed)?;
        conn.send(Submit {
            repo: self.identity.repo.clone(),
            branch: branch.to_owned(),
            commits: commits.to_vec(),
            r#ref: format!("refs/heads/{branch}"),
            pull_request: None,
        })
        .await?;
        let ack = tokio::time::timeout(ACK_TIMEOUT, async {
            loop {
                match conn.recv().await? {
                    Some(Msg::SubmitAck(ack)) => return Ok(ack),
                    Some(Msg::Ping(ping)) => conn.send(Pong { seq: ping.seq }).await?,
                    Some(Msg::Error(error)) => return Err(SubmitError::Dispatcher(error.message)),
                    Some(other) => return Err(SubmitError::Unexpected(other.name())),
                    None => return Err(SubmitError::Closed),
                }
            }
        })
        .await
        .map_err(|_| SubmitError::AckTimeout)??;
        if ack.job_ids.len() != commits.len() {
            return Err(SubmitError::AckMismatch {
                sent: commits.len(),
                got: ack.job_ids.len(),
            });
        }
        let created = if ack.created.len() == commits.len() {
            ack.created
        } else {
            vec![false; commits.len()]
        };
        Ok(Acked {
            job_ids: ack.job_ids,
            created,
        })
    }

    /// Waits while idle until the connection is lost, answering pings;
    /// never returns while not connected. Cancel-safe between frames.
    pub async fn closed(&mut self) -> SubmitError {
        let Some(conn) = self.conn.as_mut() else {
            return std::future::pending().await;
        };
        let error = loop {
            match conn.recv().await {
                Ok(Some(Msg::Ping(ping))) => {
                    if let Err(e) = conn.send(Pong { seq: ping.seq }).await {
                        break SubmitError::Send(e);
                    }
                }
                Ok(Some(Msg::Error(error))) => break SubmitError::Dispatcher(error.message),
                Ok(Some(other)) => break SubmitError::Unexpected(other.name()),
                Ok(None) => break SubmitError::Closed,
                Err(e) => break SubmitError::Recv(e),
            }
        };
        self.conn = None;
        error
    }
}

#[cfg(test)]
mod tests {
    use surveil_proto::{HandshakeError, RejectCode};

    use super::*;

    #[test]
    fn only_configuration_rejects_are_fatal() {
        let rejected = |code| {
            SubmitError::Dial(DialError::Rejected(HandshakeError::Rejected {
                code,
                message: String::new(),
                leader_addr: String::new(),
            }))
        };
        assert!(rejected(RejectCode::BadToken).is_fatal());
        assert!(!rejected(RejectCode::ShuttingDown).is_fatal());
        assert!(!SubmitError::Closed.is_fatal());
    }
}
