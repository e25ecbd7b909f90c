//! The dispatcher's Prometheus metrics (prometheus-client) and `/metrics`.
//!
//! Three sources feed them, none of which changes what the dispatcher
//! does: the service's status at scrape time (queue, runners, counters),
//! its event stream (jobs finished, queue wait, job duration, read from
//! the store after each change), and [`MeteredStore`], a pass-through
//! store that times every write until its commit is acknowledged. The
//! HTTP router counts requests by route and code.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::App;
use super::api::{ApiError, ApiResult, reader};
use crate::domain::JobStatus;
use crate::service::{Event, JobChange, Service};

mod metered;
pub use metered::MeteredStore;

type Labels = Vec<(&'static str, String)>;

/// CI-scale buckets, in seconds: from a tenth of a second to four hours.
const CI_BUCKETS: [f64; 15] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

/// Every metric the dispatcher exports. See `docs/http.md` for the list.
pub struct Metrics {
    registry: Registry,
    jobs_queued: Gauge,
    jobs_running: Gauge,
    runners_connected: Gauge,
    runners_draining: Gauge,
    runners_quarantined: Gauge,
    jobs_finished: Family<Labels, Counter>,
    queue_wait: Histogram,
    job_duration: Histogram,
    reassignments: Counter,
    refused_results: Counter,
    supervisor_restarts: Family<Labels, Counter>,
    store_commit: Histogram,
    http_requests: Family<Labels, Counter>,
    /// Serialises scrapes, which bring the mirrored counters up to date.
    scrape: Mutex<()>,
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("surveil");
        let m = Metrics {
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            runners_connected: Gauge::default(),
            runners_draining: Gauge::default(),
            runners_quarantined: Gauge::default(),
            jobs_finished: Family::default(),
            queue_wait: Histogram::new(CI_BUCKETS),
            job_duration: Histogram::new(CI_BUCKETS),
            reassignments: Counter::default(),
            refused_results: Counter::default(),
            supervisor_restarts: Family::default(),
            store_commit: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            http_requests: Family::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "jobs_queued",
            "Jobs waiting for a runner",
            m.jobs_queued.clone(),
        );
        r.register(
            "jobs_running",
            "Jobs held by runners (or orphaned leases)",
            m.jobs_running.clone(),
        );
        r.register(
            "runners_connected",
            "Runners connected now",
            m.runners_connected.clone(),
        );
        r.register(
            "runners_draining",
            "Connected runners draining (they get no new job)",
            m.runners_draining.clone(),
        );
        r.register(
            "runners_quarantined",
            "Connected runners quarantined after infrastructure failures",
            m.runners_quarantined.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs that reached a final status, by status",
            m.jobs_finished.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time from submit to first assignment",
            m.queue_wait.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Time from assignment to final status",
            m.job_duration.clone(),
        );
        r.register(
            "reassignments",
            "Jobs requeued because their runner was lost",
            m.reassignments.clone(),
        );
        r.register(
            "refused_results",
            "Results refused because their attempt was revoked",
            m.refused_results.clone(),
        );
        r.register(
            "supervisor_restarts",
            "Restarts of a supervised task, by task",
            m.supervisor_restarts.clone(),
        );
        r.register(
            "store_commit_seconds",
            "Time a store write takes until its commit is acknowledged",
            m.store_commit.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            m.http_requests.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts one answered HTTP request.
    pub fn http_request(&self, route: &str, code: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("code", code.to_string()),
            ])
            .inc();
    }

    /// Times one store write.
    pub fn store_commit(&self, started: Instant) {
        self.store_commit.observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition, brought up to date with `service`'s status.
    pub fn render(&self, service: &Service) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let status = service.status();
        self.jobs_queued
            .set(i64::try_from(status.queued).unwrap_or(i64::MAX));
        self.jobs_running
            .set(i64::try_from(status.running).unwrap_or(i64::MAX));
        self.runners_connected.set(i64::from(status.runners));
        self.runners_draining.set(i64::from(status.draining));
        self.runners_quarantined.set(i64::from(status.quarantined));
        catch_up(&self.reassignments, status.reassignments);
        catch_up(&self.refused_results, status.refused_results);
        let restarts: BTreeMap<String, u64> = status.supervisor_restarts;
        for (task, n) in restarts {
            catch_up(
                &self
                    .supervisor_restarts
                    .get_or_create(&vec![("task", task)]),
                n,
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn job_event(&self, change: &JobChange) -> bool {
        match change {
            JobChange::Finished { status } => {
                self.jobs_finished
                    .get_or_create(&vec![("status", status.label().to_owned())])
                    .inc();
                true
            }
            JobChange::Assigned { attempt, .. } => attempt.0 == 1,
            _ => false,
        }
    }
}

/// Raises a mirrored counter to `value` (the service's own count).
fn catch_up(counter: &Counter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

fn seconds(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

/// Follows the service's events until `shutdown`: counts finished jobs
/// and observes queue waits and durations from the recorded times.
pub async fn observe(metrics: Arc<Metrics>, service: Arc<Service>, shutdown: CancellationToken) {
    let mut rx = service.events();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = rx.recv() => event,
        };
        let (id, change) = match event {
            Ok(Event::Job { id, change }) => (id, change),
            Ok(Event::Runner { .. }) => continue,
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "metrics: missed job events");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if !metrics.job_event(&change) {
            continue;
        }
        let Ok(Some(job)) = service.get_job(id).await else {
            continue;
        };
        match (job.status, job.started_at_ms, job.finished_at_ms) {
            (JobStatus::Final(_), Some(start), Some(end)) => {
                metrics.job_duration.observe(seconds(start, end));
            }
            (JobStatus::Running, Some(start), _) => {
                metrics.queue_wait.observe(seconds(job.queued_at_ms, start));
            }
            _ => {}
        }
    }
}

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    reader(&app, &headers).map_err(|e| ApiError::new(e.status, e.message))?;
    let mut response = app.metrics.render(&app.service).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}
