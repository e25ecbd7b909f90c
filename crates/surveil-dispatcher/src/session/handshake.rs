//! A connection's first steps: TLS (when configured), a valid `Hello`
//! within the handshake timeout, the token, the role's own checks, then
//! `Welcome` with a new session id. Whatever is refused here gets a
//! `Reject` naming the problem (or, when no frame can be exchanged, only a
//! log line), and never reaches the service.

use std::net::SocketAddr;
use std::time::Duration;

use subtle::ConstantTimeEq;
use surveil_common::tls::{self, AcceptError};
use surveil_proto::{Codec, Connection, Hello, RejectCode, Role, Welcome};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::domain::{RunnerHello, SessionId};
use crate::wire;
use crate::{Config, Daemon};

/// A connection past its handshake.
pub(super) struct Accepted {
    pub conn: Connection<tls::Stream>,
    pub role: Role,
    /// For a runner, its checked `Hello`.
    pub runner: Option<RunnerHello>,
    pub session: SessionId,
}

/// Runs the handshake; `None` when the connection was refused (and is to
/// be dropped).
pub(super) async fn accept(
    daemon: &Daemon,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Option<Accepted> {
    let config = &daemon.config;
    // One deadline covers the TLS handshake and the Hello.
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let stream = secure(config, stream, deadline).await?;
    let mut conn = Connection::with_codec(stream, Codec::with_max_frame(config.max_frame));
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let hello = match conn.accept_hello(remaining).await {
        Ok(hello) => hello,
        Err(err) => {
            tracing::info!(error = %err, "handshake failed");
            return None;
        }
    };
    let runner = match check(daemon, &hello, peer, shutdown) {
        Ok(runner) => runner,
        Err((code, problem)) => {
            if code == RejectCode::BadToken {
                tracing::warn!(name = %hello.name, "wrong token");
            }
            conn.reject(code, problem).await;
            return None;
        }
    };
    let session = daemon.service.new_session();
    let welcome = Welcome {
        session_id: format!("s-{session}"),
        heartbeat_interval_ms: millis_u32(config.heartbeat_interval),
        runner_timeout_ms: millis_u32(config.runner_timeout),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    if let Err(err) = conn.send(welcome).await {
        tracing::info!(error = %err, "peer left during the handshake");
        return None;
    }
    Some(Accepted {
        conn,
        role: hello.role(),
        runner,
        session,
    })
}

/// What is wrong with a well-formed `Hello`, if anything: the reject to
/// answer with. For a runner, its checked `Hello`.
fn check(
    daemon: &Daemon,
    hello: &Hello,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Option<RunnerHello>, (RejectCode, &'static str)> {
    if !token_ok(&daemon.config, hello) {
        return Err((
            RejectCode::BadToken,
            "the token does not match the dispatcher's; check --token-file or SURVEIL_TOKEN",
        ));
    }
    let runner = if hello.role() == Role::Runner {
        Some(wire::runner_hello(hello, peer.to_string()).map_err(|p| (RejectCode::BadRole, p))?)
    } else {
        None
    };
    if shutdown.is_cancelled() {
        return Err((
            RejectCode::ShuttingDown,
            "the dispatcher is shutting down; retry later",
        ));
    }
    Ok(runner)
}

/// Whether `hello` carries the configured token (constant time).
pub(super) fn token_ok(config: &Config, hello: &Hello) -> bool {
    config.token.as_ref().is_none_or(|expected| {
        bool::from(expected.expose().as_bytes().ct_eq(hello.token.as_bytes()))
    })
}

/// TLS when configured; on a plaintext port, a TLS hello is refused at
/// once (it would otherwise wait out the handshake timeout).
pub(super) async fn secure(
    config: &Config,
    stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Option<tls::Stream> {
    let Some(server_tls) = &config.tls else {
        let _ = stream.set_nodelay(true);
        // A silent or closing peer is left to `accept_hello`, which
        // answers it with the right `Reject`.
        if let Ok(Ok(Some(true))) =
            tokio::time::timeout_at(deadline, tls::starts_tls(&stream)).await
        {
            tracing::warn!(error = %AcceptError::TlsOnPlaintextPort, "handshake failed");
            return None;
        }
        return Some(tls::Stream::Plain(stream));
    };
    match tokio::time::timeout_at(deadline, tls::accept(stream, Some(server_tls))).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err @ (AcceptError::PlaintextOnTlsPort | AcceptError::TlsOnPlaintextPort))) => {
            tracing::warn!(error = %err, "handshake failed");
            None
        }
        Ok(Err(err)) => {
            tracing::info!(error = %err, "handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(
                timeout = ?config.handshake_timeout,
                "handshake failed: no TLS handshake within the handshake timeout"
            );
            None
        }
    }
}

pub(super) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
