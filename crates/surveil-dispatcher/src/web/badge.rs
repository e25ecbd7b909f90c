//! Status badges: `GET /badge/{repository key}/{branch}.svg`, the newest
//! job of that branch in shields.io's flat style and colours, never
//! cached. An unknown repository or branch gets a grey "unknown" badge
//! with 404, so a README shows something sensible either way.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::App;
use super::api::{ApiResult, reader};
use super::views::repo_key;
use crate::domain::{FinalStatus, JobStatus};

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/badge/{key}/{*branch}", get(badge))
}

/// shields.io's colours for each status.
fn colour(status: Option<JobStatus>) -> &'static str {
    match status {
        Some(JobStatus::Final(FinalStatus::Passed)) => "#4c1",
        Some(JobStatus::Final(FinalStatus::Failed)) => "#e05d44",
        Some(JobStatus::Final(FinalStatus::Error)) => "#fe7d37",
        Some(JobStatus::Running) => "#007ec6",
        Some(JobStatus::Queued) => "#dfb317",
        Some(JobStatus::Final(FinalStatus::Cancelled)) | None => "#9f9f9f",
    }
}

/// Text width in pixels of Verdana 11px, near enough for ASCII labels.
fn width(text: &str) -> usize {
    text.chars().count() * 7 + 10
}

/// The badge's SVG: "build" on the left, the status on the right.
pub fn svg(status: Option<JobStatus>) -> String {
    let label = "build";
    let value = status.map_or("unknown", JobStatus::label);
    let (lw, vw) = (width(label), width(value));
    let total = lw + vw;
    let fill = colour(status);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{label}: {value}"><title>{label}: {value}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{total}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{vw}" height="20" fill="{fill}"/><rect width="{total}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{vx}" y="14">{value}</text></g></svg>"##,
        lx = lw / 2,
        vx = lw + vw / 2,
    )
}

async fn badge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((key, branch)): Path<(String, String)>,
) -> ApiResult<Response> {
    reader(&app, &headers)?;
    let branch = branch.strip_suffix(".svg").unwrap_or(&branch);
    let heads = app.service.branches().await?;
    let status = heads
        .iter()
        .find(|h| h.branch == branch && repo_key(&h.repo) == key)
        .map(|h| h.latest.status);
    let code = if status.is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    let mut response = (code, svg(status)).into_response();
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
