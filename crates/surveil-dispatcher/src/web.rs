//! The dispatcher's HTTP side: the JSON API under `/api/v1/`, live logs
//! and events over SSE, the server-rendered pages, badges and `/metrics`,
//! on its own listener (`--http-listen`), plaintext or with the protocol
//! port's TLS certificate.
//!
//! Every handler calls the same [`Service`] operations as the protocol
//! sessions, with domain types: this module never touches the scheduler,
//! the store or a protobuf type, and it knows nothing of protocol
//! sessions. It owns the accept loop, the router, authentication (bearer
//! token, session cookie and CSRF) and the mapping of service errors to
//! status codes.
//!
//! Layout: `api` (JSON and plain-text handlers), `sse` (log and event
//! streams), `pages` (HTML), `auth`, `views` (the JSON shapes pages and
//! API share), `badge`, `ansi` (log colours to HTML), [`metrics`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use surveil_common::tls::ServerTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::service::Service;

mod ansi;
mod api;
mod auth;
mod badge;
pub mod metrics;
mod pages;
mod sse;
pub(crate) mod standby;
mod views;

pub use metrics::Metrics;

/// How long a connection has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight (streams end at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The HTTP side's settings, validated with the dispatcher's.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Where to listen; `None` (`--http-listen off`) disables HTTP.
    pub listen: Option<SocketAddr>,
    /// Whether the address was given (flag or environment): only then is
    /// failing to bind it a startup error; the default address is skipped
    /// with a warning, so that several dispatchers can share a host.
    pub explicit: bool,
    /// Anonymous reading on a non-loopback address (`--http-public-read`).
    pub public_read: bool,
}

/// What every handler shares.
pub(crate) struct App {
    pub service: Arc<Service>,
    pub auth: auth::Auth,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the daemon shuts down: streams end, new requests get
    /// 503.
    pub shutdown: CancellationToken,
    /// The dispatcher's `--max-attempts`, for the pages.
    pub max_attempts: u32,
}

/// What [`serve`] needs besides the service and the listener.
pub struct HttpParts {
    /// The protocol port's credentials (the shared token, the tokens
    /// file); without any, nothing can be written over HTTP.
    pub credentials: Arc<crate::auth::Authenticator>,
    /// The protocol port's TLS, reused.
    pub tls: Option<ServerTls>,
    /// Whether anonymous clients may read.
    pub anonymous_read: bool,
    /// The dispatcher's `--max-attempts`.
    pub max_attempts: u32,
}

/// Serves HTTP on `listener` until `shutdown`, then lets requests in
/// flight finish (bounded by a grace period) and returns.
pub async fn serve(
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    parts: HttpParts,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    let app = Arc::new(App {
        service,
        auth: auth::Auth::new(parts.credentials, parts.anonymous_read, parts.tls.is_some()),
        metrics,
        shutdown: shutdown.clone(),
        max_attempts: parts.max_attempts,
    });
    let scheme = if parts.tls.is_some() { "https" } else { "http" };
    if let Some(addr) = addr {
        tracing::info!(url = %format!("{scheme}://{addr}/"), "http serving");
    }
    accept_loop(&listener, router(app), parts.tls, &shutdown).await;
}

/// Accepts HTTP connections on `listener` and serves `router` on them
/// until `shutdown`, then lets requests in flight finish (bounded by a
/// grace period). Borrows the listener: a standby hands it on to the
/// leader it becomes.
async fn accept_loop(
    listener: &TcpListener,
    router: Router,
    tls: Option<ServerTls>,
    shutdown: &CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "http accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let tls = tls.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(
            async move {
                let stream = match tokio::time::timeout(
                    TLS_HANDSHAKE_TIMEOUT,
                    surveil_common::tls::accept(stream, tls.as_ref()),
                )
                .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => return tracing::debug!(error = %err, "http connection refused"),
                    Err(_) => return tracing::debug!("http connection: handshake timed out"),
                };
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(err) = watcher.watch(conn).await {
                    tracing::debug!(error = %err, "http connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("http", %peer)),
        );
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http requests still running after the shutdown grace period");
    }
    tracing::info!("http stopped");
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(sse::routes())
        .merge(pages::routes())
        .merge(badge::routes())
        .merge(metrics::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), guard))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

/// An unknown path: JSON under `/api/`, a page elsewhere.
async fn not_found(uri: http::Uri) -> Response {
    let error = api::ApiError::not_found(format!("no such page or API route: {}", uri.path()));
    if uri.path().starts_with("/api/") {
        error.into_response()
    } else {
        pages::PageError::from(error).into_response()
    }
}

/// Counts every request by route and code, and answers 503 once the
/// dispatcher is shutting down.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = if app.shutdown.is_cancelled() {
        api::ApiError::unavailable().into_response()
    } else {
        next.run(request).await
    };
    app.metrics.http_request(&route, response.status().as_u16());
    response
}
