//! How every client (runner, observer, `surveil`) reaches the dispatcher:
//! the `--dispatch HOST:PORT[,HOST:PORT…]` flag, then [`dial`]: TCP, TLS
//! when configured, and the protocol handshake, bounded in time, with
//! failures that say what to fix (the TLS hint when the two ends
//! disagree); and [`Dialer`], which finds the leader among several
//! dispatchers (high availability): it follows a standby's `NOT_LEADER`
//! reject to the address it names and tries the other addresses when one
//! cannot be reached.
//!
//! It stops at `Welcome`: what a role does on the connection afterwards is
//! its own crate's business. A [`Dialer`] round tries each address once
//! and never sleeps; callers own their [`Backoff`](crate::Backoff) between
//! rounds.

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
    /// The dispatcher's address, `host:port`; with several dispatchers on
    /// one PostgreSQL, all of them (comma-separated or the flag repeated):
    /// the client finds the leader among them.
    #[arg(long, env = "SURVEIL_DISPATCH", default_value = DEFAULT_DISPATCH,
          value_name = "ADDR", value_parser = parse_addr, value_delimiter = ',')]
    pub dispatch: Vec<String>,
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
        let first = self
            .dispatch
            .first()
            .map_or(DEFAULT_DISPATCH, String::as_str);
        self.tls.load(first)
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
    /// Where a standby that refused us with `NOT_LEADER` says the leader
    /// is; `None` for any other failure, or while it knows no leader.
    pub fn leader_addr(&self) -> Option<&str> {
        match self {
            DialError::Rejected(HandshakeError::Rejected {
                code: RejectCode::NotLeader,
                leader_addr,
                ..
            }) if !leader_addr.is_empty() => Some(leader_addr),
            _ => None,
        }
    }

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

/// The dispatchers a client may dial (`--dispatch`, in the order given)
/// and which one answered last: with one address it is [`dial`] and
/// nothing more; with several it finds the leader.
///
/// A round ([`Dialer::dial`]) tries each address once, starting with the
/// one that answered last, or with the next one after a connection to it
/// was lost ([`Dialer::lost`]), so a dead machine costs one attempt per
/// failure, not every round. A `NOT_LEADER` reject is followed at once to
/// the `leader_addr` it names, whether or not that address is in the list:
/// it is the address the leader's operator advertises (`--advertise`), and
/// the connection is held to the same token and TLS checks as any other.
#[derive(Debug, Clone)]
pub struct Dialer {
    addrs: Vec<String>,
    tls: Option<ClientTls>,
    timeout: Duration,
    /// Where the next round starts.
    next: usize,
    /// The address of the last connection made, if it was not lost since.
    current: Option<String>,
    /// Whether a standby answered in the last round (`NOT_LEADER`): a
    /// failover is under way, and the next round should come soon.
    standby_seen: bool,
}

impl Dialer {
    /// A dialer over `addrs` (an empty list means [`DEFAULT_DISPATCH`]);
    /// each connection attempt and each handshake gets `timeout`.
    pub fn new(addrs: Vec<String>, tls: Option<ClientTls>, timeout: Duration) -> Self {
        let addrs = if addrs.is_empty() {
            vec![DEFAULT_DISPATCH.to_owned()]
        } else {
            addrs
        };
        Dialer {
            addrs,
            tls,
            timeout,
            next: 0,
            current: None,
            standby_seen: false,
        }
    }

    /// Whether a dispatcher answered as a standby (`NOT_LEADER`) in the
    /// last round that failed: dispatchers are up but none leads yet (a
    /// failover is under way, at most a leader term long), so a caller
    /// dials again soon instead of backing off further.
    pub fn saw_standby(&self) -> bool {
        self.standby_seen
    }

    /// The configured addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The address of the connection the last round made.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Says the connection the last round made was lost: the next round
    /// starts with the following address (the lost one may be a machine
    /// that no longer answers at all).
    pub fn lost(&mut self) {
        if self.current.take().is_some() {
            self.next = (self.next + 1) % self.addrs.len();
        }
    }

    /// One round: each address once from where the last round left off,
    /// following a `NOT_LEADER` reject to the leader it names. Returns the
    /// first connection welcomed, or the first error that retrying cannot
    /// fix ([`DialError::is_fatal`]), or the last error of the round.
    pub async fn dial(&mut self, hello: Hello) -> Result<Dialed, DialError> {
        self.current = None;
        self.standby_seen = false;
        let count = self.addrs.len();
        let mut tried: Vec<String> = Vec::with_capacity(count + 1);
        let mut last = None;
        for step in 0..count {
            let index = (self.next + step) % count;
            let addr = self.addrs[index].clone();
            if tried.contains(&addr) {
                continue;
            }
            let err = match self.attempt(&addr, &hello, &mut tried).await {
                Ok(dialed) => return Ok(dialed),
                Err(err) => err,
            };
            if err.is_fatal() {
                return Err(err);
            }
            self.standby_seen |= err.reject_code() == Some(RejectCode::NotLeader);
            let leader = err.leader_addr().map(str::to_owned);
            last = Some(err);
            let Some(leader) = leader.filter(|l| !tried.contains(l)) else {
                continue;
            };
            tracing::debug!(standby = %addr, leader = %leader, "following the standby to the leader");
            match self.attempt(&leader, &hello, &mut tried).await {
                Ok(dialed) => return Ok(dialed),
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => {
                    self.standby_seen |= err.reject_code() == Some(RejectCode::NotLeader);
                    last = Some(err);
                }
            }
        }
        Err(last.expect("a round tries at least one address"))
    }

    async fn attempt(
        &mut self,
        addr: &str,
        hello: &Hello,
        tried: &mut Vec<String>,
    ) -> Result<Dialed, DialError> {
        tried.push(addr.to_owned());
        let dialed = dial(addr, self.tls.as_ref(), hello.clone(), self.timeout).await?;
        if let Some(index) = self.addrs.iter().position(|a| a == addr) {
            self.next = index;
        }
        self.current = Some(addr.to_owned());
        Ok(dialed)
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
                Some(reject) => conn.send(reject).await.unwrap(),
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

    fn not_leader(leader: &str) -> Reject {
        Reject {
            code: RejectCode::NotLeader as i32,
            message: "this dispatcher is a standby".into(),
            leader_addr: leader.to_owned(),
        }
    }

    async fn dead_addr() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn one_address_dials_as_before_and_keeps_its_error() {
        let dead = dead_addr().await;
        let mut dialer = Dialer::new(vec![dead.clone()], None, T);
        let err = dialer
            .dial(Hello::new(Role::Client, "t"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot reach dispatcher at {dead}")
        );
        assert_eq!(dialer.current(), None);
        let live = server(None).await;
        let mut dialer = Dialer::new(vec![live.clone()], None, T);
        dialer.dial(Hello::new(Role::Client, "t")).await.unwrap();
        assert_eq!(dialer.current(), Some(live.as_str()));
    }

    #[tokio::test]
    async fn a_standby_is_followed_to_the_leader_it_names() {
        let leader = server(None).await;
        let standby = server(Some(not_leader(&leader))).await;
        // The leader is not even in the list: its advertised address is
        // followed all the same.
        let mut dialer = Dialer::new(vec![standby], None, T);
        dialer.dial(Hello::new(Role::Runner, "t")).await.unwrap();
        assert_eq!(dialer.current(), Some(leader.as_str()));
    }

    #[tokio::test]
    async fn an_unreachable_address_is_skipped_and_a_lost_one_goes_last() {
        let dead = dead_addr().await;
        let first = server(None).await;
        let mut dialer = Dialer::new(vec![dead.clone(), first.clone()], None, T);
        dialer.dial(Hello::new(Role::Observer, "t")).await.unwrap();
        assert_eq!(dialer.current(), Some(first.as_str()));
        // The connection to `first` is lost; the next round starts after
        // it (with `dead`, which now answers).
        let listener = TcpListener::bind(dead.as_str()).await;
        let Ok(listener) = listener else {
            return; // the port was taken meanwhile: nothing left to check
        };
        let revived = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = Connection::new(tcp);
            conn.accept_hello(T).await.unwrap();
            conn.send(Welcome::default()).await.unwrap();
            let _ = conn.recv().await;
        });
        dialer.lost();
        dialer.dial(Hello::new(Role::Observer, "t")).await.unwrap();
        assert_eq!(dialer.current(), Some(dead.as_str()));
        revived.abort();
    }

    #[tokio::test]
    async fn a_standby_without_a_leader_and_no_other_address_fails_the_round() {
        let standby = server(Some(not_leader(""))).await;
        let dead = dead_addr().await;
        let mut dialer = Dialer::new(vec![standby, dead.clone()], None, T);
        let err = dialer
            .dial(Hello::new(Role::Runner, "t"))
            .await
            .unwrap_err();
        assert!(!err.is_fatal());
        // The round's last error: the second address.
        assert_eq!(
            err.to_string(),
            format!("cannot reach dispatcher at {dead}")
        );
        assert!(
            dialer.saw_standby(),
            "a standby answered: a failover is under way"
        );
        let mut only_dead = Dialer::new(vec![dead], None, T);
        only_dead
            .dial(Hello::new(Role::Runner, "t"))
            .await
            .unwrap_err();
        assert!(!only_dead.saw_standby());
    }

    #[tokio::test]
    async fn a_fatal_reject_ends_the_round() {
        let bad = server(Some(Reject {
            code: RejectCode::BadToken as i32,
            message: "the token does not match".into(),
            ..Reject::default()
        }))
        .await;
        let good = server(None).await;
        let mut dialer = Dialer::new(vec![bad, good], None, T);
        let err = dialer
            .dial(Hello::new(Role::Runner, "t"))
            .await
            .unwrap_err();
        assert_eq!(err.reject_code(), Some(RejectCode::BadToken));
    }

    #[test]
    fn the_flag_takes_a_list_comma_separated_or_repeated() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            connect: DispatchArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
                .map(|cli| cli.connect.dispatch)
        };
        assert_eq!(parse(&[]).unwrap(), [DEFAULT_DISPATCH]);
        assert_eq!(parse(&["--dispatch", "a:1"]).unwrap(), ["a:1"]);
        assert_eq!(parse(&["--dispatch", "a:1,b:2"]).unwrap(), ["a:1", "b:2"]);
        assert_eq!(
            parse(&["--dispatch", "a:1", "--dispatch", "b:2"]).unwrap(),
            ["a:1", "b:2"]
        );
        let err = parse(&["--dispatch", "a:1,nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nowhere` is not HOST:PORT"), "{err}");
    }
}
