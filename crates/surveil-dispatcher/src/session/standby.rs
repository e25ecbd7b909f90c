//! A standby dispatcher's connections (high availability on PostgreSQL):
//! the same TLS and credential checks as the leader's handshake, then a client
//! may ask `GetStatus` (answered with who leads), and every other session
//! — runner, observer, or a client's other requests — is refused naming
//! the leader, so it dials there instead.
//!
//! A standby has no scheduler and never writes: this file must not reach
//! the service or the store.

use std::net::SocketAddr;
use std::sync::Arc;

use surveil_proto::{Codec, Connection, Envelope, Msg, Reject, RejectCode, Role, Welcome};
use tokio::net::TcpStream;

use super::handshake;
use crate::Config;
use crate::domain::{LeaderView, StatusView};
use crate::wire;

/// What a standby knows, shared by its connections.
pub(crate) struct Standby {
    pub config: Config,
    /// The same credentials the leader would check.
    pub auth: Arc<crate::auth::Authenticator>,
    /// The leader as last read from the database.
    pub leader: Arc<std::sync::Mutex<LeaderView>>,
    pub started: tokio::time::Instant,
    /// Cancelled once this dispatcher is elected: a standby's answers
    /// would then be wrong, so its open connections close.
    pub closed: tokio_util::sync::CancellationToken,
}

impl Standby {
    fn leader(&self) -> LeaderView {
        self.leader.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn status(&self) -> StatusView {
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            runners: 0,
            queued: 0,
            running: 0,
            supervisor_restarts: Default::default(),
            reassignments: 0,
            refused_results: 0,
            quarantined: 0,
            draining: 0,
            leader: Some(self.leader()),
            // A standby does not read the store: it knows no epoch.
            epoch: String::new(),
            // A standby writes nothing: its store has not failed it.
            store_healthy: true,
            store_failures: 0,
        }
    }
}

fn not_leader(leader: &LeaderView) -> Reject {
    let message = if leader.addr.is_empty() {
        "this dispatcher is a standby and no leader is elected yet; retry shortly".to_owned()
    } else {
        format!(
            "this dispatcher is a standby; the leader is at {} (term {})",
            leader.addr, leader.term
        )
    };
    Reject {
        code: RejectCode::NotLeader as i32,
        message,
        leader_addr: leader.addr.clone(),
    }
}

/// Serves one connection accepted by a standby.
pub(crate) async fn serve(standby: Arc<Standby>, stream: TcpStream, peer: SocketAddr) {
    let config = &standby.config;
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let Some(stream) = handshake::secure(config, stream, deadline).await else {
        return;
    };
    let mut conn = Connection::with_codec(stream, Codec::with_max_frame(config.max_frame));
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let hello = match conn.accept_hello(remaining).await {
        Ok(hello) => hello,
        Err(err) => {
            tracing::info!(%peer, error = %err, "handshake failed");
            return;
        }
    };
    let cert_names = conn.get_ref().peer_names();
    if let Err((code, problem)) = handshake::identify(&standby.auth, &hello, &cert_names) {
        tracing::warn!(%peer, name = %hello.name, role = ?hello.role(), reason = %problem, "credential refused");
        conn.reject(code, problem).await;
        return;
    }
    if hello.role() != Role::Client {
        let _ = conn.send(not_leader(&standby.leader())).await;
        return;
    }
    let welcome = Welcome {
        session_id: "standby".to_owned(),
        heartbeat_interval_ms: handshake::millis_u32(config.heartbeat_interval),
        runner_timeout_ms: handshake::millis_u32(config.runner_timeout),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        // Nothing a peer holds can be checked against a standby.
        epoch: String::new(),
    };
    if conn.send(welcome).await.is_err() {
        return;
    }
    loop {
        // A request other than GetStatus is refused as a Hello would be.
        let received = tokio::select! {
            received = conn.recv() => received,
            () = standby.closed.cancelled() => return,
        };
        let (reply, last): (Envelope, bool) = match received {
            Ok(Some(Msg::GetStatus(_))) => (wire::status_reply(standby.status()).into(), false),
            Ok(Some(Msg::Pong(_))) => continue,
            Ok(Some(_)) => (not_leader(&standby.leader()).into(), true),
            Ok(None) | Err(_) => return,
        };
        if conn.send(reply).await.is_err() || last {
            return;
        }
    }
}
