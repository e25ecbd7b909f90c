//! A connection's first steps: TLS (when configured), a valid `Hello`
//! within the handshake timeout, the credential (token or client
//! certificate) as an identity through `auth`, whether that identity may
//! take the role and, for a runner, the name, then `Welcome` with a new
//! session id. Whatever is refused here gets a `Reject` naming the problem
//! (`BAD_TOKEN`, `ROLE_NOT_ALLOWED`, `NAME_BOUND`...; or, when no frame can
//! be exchanged, only a log line), and never reaches the service.

use std::net::SocketAddr;
use std::time::Duration;

use surveil_common::tls::{self, AcceptError};
use surveil_proto::{Codec, Connection, Hello, RejectCode, Role, Welcome};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError, Authenticator, Identity};
use crate::domain::{RunnerHello, SessionId};
use crate::wire;
use crate::{Config, Daemon};

/// The frame limit until `Welcome`: a `Hello` listing a thousand
/// repositories fits.
pub(crate) const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// A connection past its handshake.
pub(super) struct Accepted {
    pub conn: Connection<tls::Stream>,
    pub role: Role,
    /// For a runner, its checked `Hello`.
    pub runner: Option<RunnerHello>,
    pub session: SessionId,
    /// Who it authenticated as (admitted to `auth`; the session must
    /// `leave` when it ends).
    pub identity: Identity,
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
    let pending = match daemon.limits.handshake(peer.ip()) {
        Ok(pending) => pending,
        Err(why) => {
            super::refuse_stream(config, stream, why).await;
            return None;
        }
    };
    // One deadline covers the TLS handshake and the Hello.
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let stream = secure(config, stream, deadline).await?;
    // Until the peer is known, a frame may not be large: a stranger cannot
    // make the dispatcher hold megabytes for its Hello.
    let mut conn = Connection::with_codec(
        stream,
        Codec::with_max_frame(HANDSHAKE_MAX_FRAME.min(config.max_frame)),
    );
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let hello = match conn.accept_hello(remaining).await {
        Ok(hello) => hello,
        Err(err) => {
            tracing::info!(error = %err, "handshake failed");
            return None;
        }
    };
    let cert_names = conn.get_ref().peer_names();
    let session = daemon.service.new_session();
    let (identity, runner) = match check(daemon, &hello, &cert_names, peer, shutdown) {
        Ok(checked) => checked,
        Err((code, problem)) => {
            match code {
                RejectCode::ShuttingDown => {}
                RejectCode::BadToken => {
                    tracing::warn!(name = %hello.name, role = ?hello.role(), "wrong token")
                }
                _ => {
                    tracing::warn!(name = %hello.name, role = ?hello.role(), reason = %problem, "credential refused")
                }
            }
            conn.reject(code, problem).await;
            return None;
        }
    };
    if let Err(err) =
        daemon
            .auth
            .admit(session, &identity, runner.as_ref().map(|r| r.name.as_str()))
    {
        tracing::warn!(name = %hello.name, identity = %identity.label(), reason = %err, "runner name refused");
        conn.reject(reject_code(&err), err.to_string()).await;
        return None;
    }
    conn.set_max_frame(config.max_frame);
    drop(pending);
    let welcome = Welcome {
        session_id: format!("s-{session}"),
        heartbeat_interval_ms: millis_u32(config.heartbeat_interval),
        runner_timeout_ms: millis_u32(config.runner_timeout),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        epoch: daemon.service.epoch().to_owned(),
    };
    if let Err(err) = conn.send(welcome).await {
        tracing::info!(error = %err, "peer left during the handshake");
        daemon.auth.leave(session);
        return None;
    }
    Some(Accepted {
        conn,
        role: hello.role(),
        runner,
        session,
        identity,
    })
}

fn reject_code(err: &AuthError) -> RejectCode {
    match err {
        AuthError::BadToken(_) => RejectCode::BadToken,
        AuthError::RoleNotAllowed(_) => RejectCode::RoleNotAllowed,
        AuthError::NameBound(_) => RejectCode::NameBound,
    }
}

/// What is wrong with a well-formed `Hello`, if anything: the reject to
/// answer with. Else its identity and, for a runner, its checked `Hello`.
fn check(
    daemon: &Daemon,
    hello: &Hello,
    cert_names: &[String],
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(Identity, Option<RunnerHello>), (RejectCode, String)> {
    let (identity, role) = identify(&daemon.auth, hello, cert_names)?;
    if role == auth::Role::Runner
        && !hello.leases.is_empty()
        && !hello.epoch.is_empty()
        && hello.epoch != daemon.service.epoch()
    {
        tracing::warn!(
            runner = %hello.name,
            leases = hello.leases.len(),
            runner_epoch = %hello.epoch,
            epoch = %daemon.service.epoch(),
            "the runner lists leases of another store epoch; ignored (they belong to another life of the store)"
        );
    }
    let runner = if role == auth::Role::Runner {
        Some(
            wire::runner_hello(hello, peer.to_string(), daemon.service.epoch())
                .map_err(|p| (RejectCode::BadRole, p.to_owned()))?,
        )
    } else {
        None
    };
    if shutdown.is_cancelled() {
        return Err((
            RejectCode::ShuttingDown,
            "the dispatcher is shutting down; retry later".to_owned(),
        ));
    }
    Ok((identity, runner))
}

/// The identity `hello`'s credential (or the client certificate) proves
/// and the role it asks for, if that identity may take it. A standby
/// checks credentials exactly as the leader does.
pub(super) fn identify(
    auth: &Authenticator,
    hello: &Hello,
    cert_names: &[String],
) -> Result<(Identity, auth::Role), (RejectCode, String)> {
    let refuse = |err: AuthError| (reject_code(&err), err.to_string());
    let identity = auth
        .authenticate_peer(&hello.token, cert_names)
        .map_err(refuse)?;
    let role = match hello.role() {
        Role::Runner => auth::Role::Runner,
        Role::Observer => auth::Role::Observer,
        Role::Client => auth::Role::Client,
        Role::Unspecified => {
            return Err((RejectCode::BadRole, "the Hello names no role".to_owned()));
        }
    };
    identity.may_connect_as(role).map_err(refuse)?;
    Ok((identity, role))
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
