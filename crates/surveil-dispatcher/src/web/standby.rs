//! The HTTP side of a standby dispatcher (high availability on
//! PostgreSQL): `/api/v1/status` answers naming the leader, every other
//! API route is 503 `{"error": "not the leader", "leader": ADDR}`, pages
//! say which dispatcher leads, and the stylesheet and icon still load so
//! that page is readable.
//!
//! A standby has no service and never writes: this file must not reach
//! the service or the store. It reads the leader through a shared view the
//! standby's campaign loop keeps current.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, Uri};
use maud::html;
use serde_json::json;
use surveil_common::tls::ServerTls;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::{Auth, Who};
use super::pages;
use super::views::{LeaderJson, StatusJson};
use crate::domain::LeaderView;

/// What a standby's HTTP handlers share.
struct StandbyApp {
    leader: Arc<Mutex<LeaderView>>,
    auth: Auth,
    started: Instant,
}

impl StandbyApp {
    fn leader(&self) -> LeaderView {
        self.leader.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// What a standby's HTTP side needs besides its listener.
pub(crate) struct StandbyParts {
    /// The leader as the campaign loop last read it.
    pub leader: Arc<Mutex<LeaderView>>,
    pub credentials: Arc<crate::auth::Authenticator>,
    pub tls: Option<ServerTls>,
    pub anonymous_read: bool,
}

/// Serves the standby's answers on `listener` until `done` (elected or
/// shut down); the listener stays open for the leader's HTTP side.
pub(crate) async fn serve(listener: &TcpListener, parts: StandbyParts, done: CancellationToken) {
    let app = Arc::new(StandbyApp {
        leader: parts.leader,
        auth: Auth::new(parts.credentials, parts.anonymous_read, parts.tls.is_some()),
        started: Instant::now(),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "http serving as a standby");
    }
    let router = Router::new()
        .route("/api/v1/status", get(status))
        .merge(pages::asset_routes())
        .fallback(not_leader)
        .with_state(app);
    super::accept_loop(listener, router, parts.tls, &done).await;
}

async fn status(State(app): State<Arc<StandbyApp>>, headers: HeaderMap) -> Response {
    if !app.auth.can_read(&app.auth.identify(&headers)) {
        return super::api::ApiError::refused(&super::auth::Refusal::Unauthenticated)
            .into_response();
    }
    let leader = app.leader();
    axum::Json(StatusJson {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: app.started.elapsed().as_secs(),
        runners: 0,
        queued: 0,
        running: 0,
        supervisor_restarts: Default::default(),
        reassignments: 0,
        refused_results: 0,
        quarantined: 0,
        draining: 0,
        leader: Some(LeaderJson::from(&leader)),
    })
    .into_response()
}

/// Every other route: 503 naming the leader, as JSON under `/api/` and
/// as a page elsewhere.
async fn not_leader(State(app): State<Arc<StandbyApp>>, uri: Uri) -> Response {
    let leader = app.leader();
    let addr = (!leader.addr.is_empty()).then(|| leader.addr.clone());
    if uri.path().starts_with("/api/") {
        let body = json!({ "error": "not the leader", "leader": addr });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    let body = html! {
        h1 { "Standby" }
        @match &addr {
            Some(addr) => p.error {
                "This dispatcher is a standby. The leader (term " (leader.term)
                ") serves the protocol at " code { (addr) }
                "; open its pages instead."
            },
            None => p.error { "This dispatcher is a standby and no leader is elected yet; retry shortly." },
        }
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        pages::layout("Standby", &Who::Anonymous, "", body),
    )
        .into_response()
}
