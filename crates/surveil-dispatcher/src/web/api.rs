//! The JSON API under `/api/v1/` and the plain-text log: each handler
//! parses its request into domain arguments, checks who asks, calls one
//! service operation and maps the answer; every error is a JSON
//! `{"error": …}` with its status code, built in one place
//! ([`ApiError`]). No handler touches the store or the scheduler.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use http::header::{CONTENT_TYPE, LINK, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::App;
use super::auth::{CSRF_HEADER, Refusal, Who};
use super::views::{self, JobJson, RunnerJson, StatusJson};
use crate::auth::Access;
use crate::domain::{CommitId, JobFilter, JobId, JobStatus, Origin, Submission};
use crate::service::{LogEvent, RerunOutcome, ServiceError};

/// Jobs a page lists when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;
/// The most jobs one page lists.
pub const MAX_LIMIT: u32 = 500;

/// An error answer: a status code and what is wrong, as
/// `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the dispatcher is shutting down",
        )
    }

    pub fn refused(refusal: &Refusal) -> ApiError {
        match refusal {
            Refusal::NoTokenConfigured => ApiError::new(
                StatusCode::FORBIDDEN,
                "this dispatcher has no token: start it with --token-file or --tokens-file to allow writes over HTTP",
            ),
            Refusal::Unauthenticated => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this needs a token the dispatcher knows: send `Authorization: Bearer <token>` or sign in",
            ),
            Refusal::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, why.clone()),
            Refusal::Csrf => ApiError::new(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the page and try again",
            ),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> ApiError {
        match err {
            ServiceError::Invalid(message) => ApiError::bad_request(message),
            ServiceError::Store(err) => {
                tracing::warn!(error = %err, "http: the store failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> ApiError {
        ServiceError::Store(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/log", get(read_log))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/rerun", post(rerun))
        .route("/api/v1/submit", post(submit))
        .route("/api/v1/runners", get(runners))
        .route("/api/v1/status", get(status))
        .route("/api/v1/repos", get(repos))
}

/// The caller, if they may read.
pub fn reader(app: &App, headers: &HeaderMap) -> ApiResult<Who> {
    let who = app.auth.identify(headers);
    if app.auth.can_read(&who) {
        Ok(who)
    } else {
        Err(ApiError::refused(&Refusal::Unauthenticated))
    }
}

/// Checks the caller may make a request needing `access` through the API
/// (a bearer token, or a session with its CSRF token in `X-CSRF-Token`).
fn writer(app: &App, headers: &HeaderMap, access: Access) -> ApiResult<()> {
    let who = app.auth.identify(headers);
    let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    app.auth
        .check_write(&who, access, csrf)
        .map_err(|r| ApiError::refused(&r))
}

/// A job id from the path.
pub fn job_id(text: &str) -> ApiResult<JobId> {
    text.parse::<u64>()
        .map(JobId)
        .map_err(|_| ApiError::bad_request(format!("`{text}` is not a job id (a number)")))
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> ApiResult<T> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("`{name}={text}` is not a number")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub status: Option<String>,
    pub before: Option<String>,
    pub limit: Option<String>,
}

impl ListQuery {
    /// The filter this query asks for, validated.
    pub fn filter(&self) -> ApiResult<JobFilter> {
        let status = match self.status.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(JobStatus::from_label(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`status={s}` is not a status (queued, running, passed, failed, error, cancelled)"
                ))
            })?),
        };
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(l) => number("limit", l)?,
        };
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "`limit={limit}` is out of range: 1 to {MAX_LIMIT}"
            )));
        }
        Ok(JobFilter {
            repo: self.repo.clone().filter(|r| !r.is_empty()),
            branch: self.branch.clone().filter(|b| !b.is_empty()),
            status,
            before: self
                .before
                .as_deref()
                .map(|b| number("before", b).map(JobId))
                .transpose()?,
            limit: Some(limit),
            pull_request: None,
        })
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string of the page after the one whose last job is `last`.
pub fn next_query(filter: &JobFilter, last: JobId) -> String {
    let mut parts = Vec::new();
    if let Some(repo) = &filter.repo {
        parts.push(format!("repo={}", encode(repo)));
    }
    if let Some(branch) = &filter.branch {
        parts.push(format!("branch={}", encode(branch)));
    }
    if let Some(status) = filter.status {
        parts.push(format!("status={}", status.label()));
    }
    parts.push(format!("before={last}"));
    parts.push(format!("limit={}", filter.limit.unwrap_or(DEFAULT_LIMIT)));
    parts.join("&")
}

async fn list_jobs(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    reader(&app, &headers)?;
    let filter = query(q)?.filter()?;
    let jobs = app.service.list_jobs(&filter).await?;
    let waiting: HashMap<JobId, _> = if jobs.iter().any(|j| j.status == JobStatus::Queued) {
        app.service.waiting().into_iter().collect()
    } else {
        HashMap::new()
    };
    let body: Vec<JobJson> = jobs
        .iter()
        .map(|j| JobJson::new(j, waiting.get(&j.id)))
        .collect();
    let mut response = Json(body).into_response();
    let full = filter.limit.is_some_and(|l| jobs.len() >= l as usize);
    if let (true, Some(last)) = (full, jobs.last()) {
        let link = format!(
            "</api/v1/jobs?{}>; rel=\"next\"",
            next_query(&filter, last.id)
        );
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(LINK, value);
        }
    }
    Ok(response)
}

async fn get_job(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<JobJson>> {
    reader(&app, &headers)?;
    let id = job_id(&id)?;
    let job = app
        .service
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    let waiting = if job.status == JobStatus::Queued {
        app.service.waiting().into_iter().find(|(j, _)| *j == id)
    } else {
        None
    };
    let attempts = app.service.attempts(id).await?;
    Ok(Json(
        JobJson::new(&job, waiting.as_ref().map(|(_, w)| w)).with_attempts(&attempts),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    from: Option<String>,
    attempt: Option<String>,
}

/// The log as plain text from `?from=BYTE` to its end so far; the
/// `X-Surveil-Log-Attempt` header says whose attempt's log it is.
async fn read_log(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Response> {
    reader(&app, &headers)?;
    let id = job_id(&id)?;
    let q = query(q)?;
    let from = match q.from {
        Some(f) => number("from", &f)?,
        None => 0,
    };
    let attempt = match q.attempt {
        Some(a) => Some(attempt_number(&a)?),
        None => None,
    };
    let mut follow = app.service.follow_attempt_log(id, attempt, from, false);
    let first = follow.next().await?;
    let attempt = match &first {
        LogEvent::NotFound => return Err(ApiError::not_found(format!("no job {id}"))),
        LogEvent::Bytes { attempt, .. } | LogEvent::End { attempt, .. } => *attempt,
    };
    let pieces = stream::unfold((Some(first), follow), |(pending, mut follow)| async move {
        let event = match pending {
            Some(event) => event,
            None => match follow.next().await {
                Ok(event) => event,
                Err(err) => return Some((Err(std::io::Error::other(err)), (None, follow))),
            },
        };
        match event {
            LogEvent::Bytes { data, .. } => Some((Ok(data), (None, follow))),
            _ => None,
        }
    });
    let mut response = Body::from_stream(pieces).into_response();
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-surveil-log-attempt", HeaderValue::from(attempt.0));
    Ok(response)
}

/// `?attempt=N`: a positive attempt number.
fn attempt_number(text: &str) -> ApiResult<crate::domain::Attempt> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(crate::domain::Attempt(n)),
        _ => Err(ApiError::bad_request(format!(
            "attempt={text}: not an attempt number (1 is the first)"
        ))),
    }
}

async fn rerun(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    writer(&app, &headers, Access::Operate)?;
    let id = job_id(&id)?;
    let reply = app.service.rerun(id).await?;
    match reply.outcome {
        RerunOutcome::Unknown => Err(ApiError::not_found(reply.message)),
        RerunOutcome::Active => Err(ApiError::new(StatusCode::CONFLICT, reply.message)),
        RerunOutcome::Queued => {
            let attempts = app.service.attempts(id).await?;
            let job = reply
                .job
                .as_ref()
                .map(|j| JobJson::new(j, None).with_attempts(&attempts));
            Ok(Json(json!({ "ok": true, "message": reply.message, "job": job })).into_response())
        }
    }
}

async fn cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    writer(&app, &headers, Access::Operate)?;
    let id = job_id(&id)?;
    let reply = app.service.cancel(id).await?;
    let Some(job) = &reply.job else {
        return Err(ApiError::not_found(format!("no job {id}")));
    };
    if !reply.ok {
        return Err(ApiError::new(StatusCode::CONFLICT, reply.message));
    }
    Ok(Json(json!({
        "ok": true,
        "message": reply.message,
        "job": JobJson::new(job, None),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    repo: String,
    #[serde(default = "main_branch")]
    branch: String,
    commits: Vec<String>,
}

fn main_branch() -> String {
    "main".to_owned()
}

async fn submit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    writer(&app, &headers, Access::Submit)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if body.commits.is_empty() {
        return Err(ApiError::bad_request(
            "`commits` is empty: name at least one commit",
        ));
    }
    let commits = body
        .commits
        .iter()
        .map(|c| CommitId::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::bad_request(format!("commits: {e}")))?;
    let rows = app
        .service
        .submit(&Submission {
            repo: body.repo,
            origin: Origin::branch(&body.branch),
            commits,
        })
        .await?;
    Ok(Json(
        json!({ "job_ids": rows.iter().map(|r| r.id.0).collect::<Vec<_>>() }),
    ))
}

async fn runners(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<RunnerJson>>> {
    reader(&app, &headers)?;
    Ok(Json(
        app.service.runners().iter().map(RunnerJson::from).collect(),
    ))
}

async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<StatusJson>> {
    reader(&app, &headers)?;
    Ok(Json(StatusJson::from(&app.service.status())))
}

async fn repos(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<views::RepoJson>>> {
    reader(&app, &headers)?;
    Ok(Json(views::repos(&app.service.branches().await?)))
}
