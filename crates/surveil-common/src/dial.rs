//! How every client (runner, observer, `surveil`) reaches the dispatcher:
//! the `--dispatch HOST:PORT` value parser, then [`dial`]: TCP, TLS when
//! configured, and the protocol handshake, bounded in time, with failures
//! that say what to fix (the TLS hint when the two ends disagree).
//!
//! It stops at `Welcome`: what a role does on the connection afterwards is
//! its own crate's business. It never retries; callers own their
//! [`Backoff`](crate::Backoff).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use surveil_proto::{Connection, HandshakeError, Hello, RejectCode, Welcome};

use crate::Secret;
use crate::tls::{self, ClientTls, ClientTlsArgs, TlsError};

/// The default `--dispatch`.
pub const DEFAULT_DISPATCH: &str = "127.0.0.1:9000";

/// The flags with which every client (runner, observer, `surveil`) says
/// where the dispatcher is and how to prove who it is; flatten it into the
/// binary's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct DispatchArgs {
    /// The dispatcher's address, `host:port`.
    #[arg(long, env = "SURVEIL_DISPATCH", default_value = DEFAULT_DISPATCH,
          value_name = "ADDR", value_parser = parse_addr)]
    pub dispatch: String,
    /// File holding the dispatcher's shared secret (surrounding whitespace
    /// trimmed); without it, the SURVEIL_TOKEN environment variable.
    #[arg(long, env = "SURVEIL_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    // --tls-ca, --tls-cert, --tls-key, --tls-server-name.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    // Only there to refuse `--token VALUE` with the reason.
    #[command(flatten)]
    pub refuse_token: crate::RefuseTokenFlag,
}

impl DispatchArgs {
    /// The token from `--token-file` or `SURVEIL_TOKEN`; errors name the
    /// flag.
    pub fn token(&self) -> anyhow::Result<Option<Secret>> {
        let token = crate::read_token(self.token_file.as_deref()).context("--token-file")?;
        Ok(token.map(Secret::from))
    }

    /// The TLS the flags ask for, `None` without `--tls-ca`.
    pub fn tls(&self) -> Result<Option<ClientTls>, TlsError> {
        self.tls.load(&self.dispatch)
    }
}

/// A handshaken connection to the dispatcher.
pub type Dialed = (Connection<tls::Stream>, Welcome);

/// Why [`dial`] failed. Messages leave out their `source`: print the whole
/// chain (`{:#}` through anyhow, or [`crate::error_chain`]) to say it once.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection (or the TLS handshake on it) failed.
    #[error("cannot reach dispatcher at {addr}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// Why; for TLS, a message naming the flag to check.
        source: std::io::Error,
    },
    /// Connecting (TCP and TLS) took longer than allowed.
    #[error("cannot reach dispatcher at {addr}: no answer within {timeout:?}")]
    Timeout {
        /// The address dialled.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The dispatcher answered the `Hello` with a `Reject`; its display is
    /// the proto crate's "dispatcher rejected the connection (CODE): …".
    #[error(transparent)]
    Rejected(HandshakeError),
    /// The handshake failed some other way (timeout, garbage, a close).
    #[error("handshake with dispatcher at {addr} failed{hint}", hint = hint(.source))]
    Handshake {
        /// The address dialled.
        addr: String,
        /// Why.
        source: HandshakeError,
    },
}

impl DialError {
    /// The dispatcher's reason code, when it refused the `Hello`.
    pub fn reject_code(&self) -> Option<RejectCode> {
        match self {
            DialError::Rejected(HandshakeError::Rejected { code, .. }) => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying cannot help until someone changes the
    /// configuration: a wrong token, protocol version or role, a
    /// credential not allowed this role, a name bound to another identity.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self.reject_code(),
            Some(
                RejectCode::BadToken
                    | RejectCode::UnsupportedVersion
                    | RejectCode::BadRole
                    | RejectCode::RoleNotAllowed
                    | RejectCode::NameBound
            )
        )
    }
}

/// What mismatched transports explain about a failed handshake, as a
/// parenthesis to append, or nothing.
fn hint(err: &HandshakeError) -> String {
    tls::handshake_hint(err)
        .map(|hint| format!(" ({hint})"))
        .unwrap_or_default()
}

/// Connects to `addr` (`host:port`), over TLS with `tls`, sends `hello`
/// and waits for `Welcome`. Connecting and the handshake each get
/// `timeout`: a dispatcher that accepts but never answers must not hang a
/// client.
pub async fn dial(
    addr: &str,
    tls: Option<&ClientTls>,
    hello: Hello,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let stream = tokio::time::timeout(timeout, tls::connect(addr, tls))
        .await
        .map_err(|_| DialError::Timeout {
            addr: addr.to_owned(),
            timeout,
        })?
        .map_err(|source| DialError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let mut conn = Connection::new(stream);
    match conn.client_handshake(hello, timeout).await {
        Ok(welcome) => Ok((conn, welcome)),
        Err(err @ HandshakeError::Rejected { .. }) => Err(DialError::Rejected(err)),
        Err(source) => Err(DialError::Handshake {
            addr: addr.to_owned(),
            source,
        }),
    }
}

/// The `--dispatch` value parser: `HOST:PORT` with a port from 1 to 65535.
/// Names are resolved when dialling, not here.
pub fn parse_addr(text: &str) -> Result<String, String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(text.to_owned())
        }
        _ => Err(format!("`{text}` is not HOST:PORT (e.g. 127.0.0.1:9000)")),
    }
}

#[cfg(test)]
mod tests {
    use surveil_proto::{Reject, Role};
    use tokio::net::TcpListener;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn addresses_need_a_host_and_a_port() {
        for ok in ["127.0.0.1:9000", "ci.example.org:1", "[::1]:65535"] {
            assert_eq!(parse_addr(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "nowhere",
            ":9000",
            "host:",
            "host:0",
            "host:65536",
            "host:http",
        ] {
            let err = parse_addr(bad).unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
    }

    /// A one-connection server that answers the Hello with `answer`.
    async fn server(answer: Option<Reject>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = Connection::new(tcp);
            conn.accept_hello(T).await.unwrap();
            match answer {
                Some(reject) => conn.reject(reject.code(), reject.message).await,
                None => conn.send(Welcome::default()).await.unwrap(),
            }
            // Hold the connection until the client is done with it.
            let _ = conn.recv().await;
        });
        addr
    }

    #[tokio::test]
    async fn a_welcome_completes_the_dial() {
        let addr = server(None).await;
        let (_conn, welcome) = dial(&addr, None, Hello::new(Role::Client, "t"), T)
            .await
            .unwrap();
        assert_eq!(welcome, Welcome::default());
    }

    #[tokio::test]
    async fn a_bad_token_is_fatal_and_says_so() {
        let addr = server(Some(Reject {
            code: RejectCode::BadToken as i32,
            message: "the token does not match".into(),
            ..Reject::default()
        }))
        .await;
        let err = dial(&addr, None, Hello::new(Role::Runner, "t"), T)
            .await
            .unwrap_err();
        assert!(err.is_fatal());
        assert_eq!(err.reject_code(), Some(RejectCode::BadToken));
        assert_eq!(
            err.to_string(),
            "dispatcher rejected the connection (REJECT_CODE_BAD_TOKEN): the token does not match"
        );
    }

    #[tokio::test]
    async fn shutting_down_is_worth_retrying() {
        let addr = server(Some(Reject {
            code: RejectCode::ShuttingDown as i32,
            message: "bye".into(),
            ..Reject::default()
        }))
        .await;
        let err = dial(&addr, None, Hello::new(Role::Observer, "t"), T)
            .await
            .unwrap_err();
        assert!(!err.is_fatal());
    }

    #[tokio::test]
    async fn nobody_listening_names_the_address_and_keeps_the_cause() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = dial(&addr, None, Hello::new(Role::Client, "t"), T)
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Connect { .. }), "{err}");
        assert!(!err.is_fatal());
        assert_eq!(
            err.to_string(),
            format!("cannot reach dispatcher at {addr}")
        );
        let chain = crate::error_chain(&err);
        assert!(
            chain.starts_with(&format!("cannot reach dispatcher at {addr}: ")),
            "{chain}"
        );
    }

    #[tokio::test]
    async fn plaintext_to_a_tls_dispatcher_gets_the_tls_hint() {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::tls::test_certs::write(dir.path());
        let tls = crate::tls::ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = crate::tls::accept(tcp, Some(&tls)).await;
        });
        let err = dial(&addr, None, Hello::new(Role::Client, "t"), T)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "handshake with dispatcher at {addr} failed ({})",
                crate::tls::PLAINTEXT_TO_TLS_HINT
            )
        );
    }

    #[tokio::test]
    async fn a_silent_dispatcher_times_out_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Accepted by the kernel's backlog, never answered.
        let short = Duration::from_millis(200);
        let err = dial(&addr, None, Hello::new(Role::Client, "t"), short)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DialError::Handshake {
                    source: HandshakeError::Timeout(_),
                    ..
                }
            ),
            "{err}"
        );
        drop(listener);
    }
}
