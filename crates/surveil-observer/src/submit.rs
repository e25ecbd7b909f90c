//! The observer's one connection to the dispatcher: dial, handshake as
//! `ROLE_OBSERVER`, send a `Submit`, wait for its `SubmitAck`, and check the
//! ack has one job id per commit. Also the jittered, capped backoff between
//! attempts.
//!
//! It never reads the repository or the cursor, and never retries on its
//! own: the caller decides what to resend (it recomputes from the cursor).

use std::time::Duration;

use surveil_common::tls::{self, ClientTls};
use surveil_proto::{
    Connection, ConnectionError, HandshakeError, Hello, Msg, Pong, RejectCode, Role, Submit,
    Welcome,
};

/// How long dialing the dispatcher may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the dispatcher may take to answer `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the dispatcher may take to make a submit durable and ack it.
/// Generous: it commits to disk with fsync first.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a submit (or connecting for one) failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The dispatcher could not be reached.
    #[error("cannot connect to the dispatcher at {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Dialing took longer than allowed.
    #[error("connecting to the dispatcher at {addr} timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout {
        /// The address dialed.
        addr: String,
    },
    /// The handshake failed or was refused.
    #[error("handshake with the dispatcher failed: {0}{hint}", hint = hint(.0))]
    Handshake(#[from] HandshakeError),
    /// Sending failed.
    #[error("sending to the dispatcher failed: {0}")]
    Send(#[from] surveil_proto::CodecError),
    /// Receiving failed.
    #[error("receiving from the dispatcher failed: {0}")]
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
        matches!(
            self,
            SubmitError::Handshake(HandshakeError::Rejected {
                code: RejectCode::BadToken | RejectCode::UnsupportedVersion | RejectCode::BadRole,
                ..
            })
        )
    }
}

/// What mismatched transports explain about a failed handshake.
fn hint(err: &HandshakeError) -> String {
    tls::handshake_hint(err)
        .map(|hint| format!(" ({hint})"))
        .unwrap_or_default()
}

/// Who the observer says it is in its `Hello`, and how it reaches the
/// dispatcher. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Identity {
    /// Free-form name, for the dispatcher's logs.
    pub name: String,
    /// The repository watched, as submitted.
    pub repo: String,
    /// The shared secret, if the dispatcher wants one.
    pub token: Option<String>,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("repo", &self.repo)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// The connection to the dispatcher, dialed when first needed and again
/// after it is lost.
pub struct Link {
    addr: String,
    identity: Identity,
    conn: Option<Connection<tls::Stream>>,
}

impl Link {
    /// A link to the dispatcher at `addr` (`host:port`); nothing is dialed
    /// yet.
    pub fn new(addr: String, identity: Identity) -> Self {
        Link {
            addr,
            identity,
            conn: None,
        }
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
        let dial = tls::connect(&self.addr, self.identity.tls.as_ref());
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| SubmitError::ConnectTimeout {
                addr: self.addr.clone(),
            })?
            .map_err(|source| SubmitError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let mut conn = Connection::new(stream);
        let mut hello = Hello::new(Role::Observer, self.identity.name.clone());
        hello.repos = vec![self.identity.repo.clone()];
        hello.token = self.identity.token.clone().unwrap_or_default();
        let Welcome { session_id, .. } = conn.client_handshake(hello, HANDSHAKE_TIMEOUT).await?;
        tracing::info!(addr = %self.addr, session = %session_id, "connected to the dispatcher");
        self.conn = Some(conn);
        Ok(())
    }

    /// Submits `commits` (oldest first) of `branch` and returns their job
    /// ids, one per commit in the same order, once the dispatcher has made
    /// them durable. On any error the connection is dropped; the next call
    /// dials again.
    pub async fn submit(
        &mut self,
        branch: &str,
        commits: &[String],
    ) -> Result<Vec<u64>, SubmitError> {
        self.connect().await?;
        let result = self.exchange(branch, commits).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        branch: &str,
        commits: &[String],
    ) -> Result<Vec<u64>, SubmitError> {
        let conn = self.conn.as_mut().ok_or(SubmitError::Closed)?;
        conn.send(Submit {
            repo: self.identity.repo.clone(),
            branch: branch.to_owned(),
            commits: commits.to_vec(),
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
        Ok(ack.job_ids)
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

/// Exponential backoff with jitter between `min` and a cap, so a fleet of
/// observers does not reconnect in step after a dispatcher restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next delay: a random point in the upper half of the current
    /// step, which then doubles (capped).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.max);
        let low = step / 2;
        low + step.saturating_sub(low).mul_f64(rand::random::<f64>())
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_jittered_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(1) && d >= Duration::from_millis(50),
                "{d:?}"
            );
        }
        let capped = b.next_delay();
        assert!(capped >= Duration::from_millis(500), "{capped:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_configuration_rejects_are_fatal() {
        let rejected = |code| {
            SubmitError::Handshake(HandshakeError::Rejected {
                code,
                message: String::new(),
            })
        };
        assert!(rejected(RejectCode::BadToken).is_fatal());
        assert!(!rejected(RejectCode::ShuttingDown).is_fatal());
        assert!(!SubmitError::Closed.is_fatal());
    }
}
