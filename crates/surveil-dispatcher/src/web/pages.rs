//! The server-rendered pages (maud): home, repositories, a job with its
//! log, runners, status, and sign-in; readable without JavaScript, with
//! `assets/app.js` for live updates. Every asset is compiled into the
//! binary. Pages are built from the same service calls and view structs
//! as the JSON API; a page never computes what the service can answer.
//!
//! Layout: this file holds the routes, the shared layout, formatting, the
//! error page, sign-in and the action forms; `home`, `job`, `repo` and
//! `fleet` (runners and status) render one page each.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::App;
use super::api::{ApiError, job_id};
use super::auth::{Refusal, Who};
use crate::auth::Access;
use crate::domain::JobStatus;

mod fleet;
mod home;
mod job;
mod repo;

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");
const ICON: &str = include_str!("assets/icon.svg");

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(home::page))
        .route("/repos", get(repo::list))
        .route("/repos/{key}", get(repo::page))
        .route("/jobs/{id}", get(job::page))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/rerun", post(rerun))
        .route("/runners", get(fleet::runners))
        .route("/status", get(fleet::status))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .merge(asset_routes())
}

/// The embedded stylesheet, script and icon (a standby serves them too).
pub fn asset_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/assets/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .route(
            "/assets/app.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route("/favicon.svg", get(|| asset("image/svg+xml", ICON)))
        // Browsers ask for it whatever the page links; a 404 would show
        // as a console error.
        .route("/favicon.ico", get(|| asset("image/svg+xml", ICON)))
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// A page's failure, shown as a page with its status code.
pub struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(err: ApiError) -> PageError {
        PageError(err)
    }
}

impl From<crate::service::ServiceError> for PageError {
    fn from(err: crate::service::ServiceError) -> PageError {
        PageError(err.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let ApiError { status, message } = self.0;
        let title = status.canonical_reason().unwrap_or("Error");
        let body = html! {
            h1 { (status.as_u16()) " " (title) }
            p.error { (message) }
            @if status == StatusCode::UNAUTHORIZED {
                p { a href="/login" { "Sign in" } " with a token this dispatcher knows to continue." }
            }
        };
        (status, layout(title, &Who::Anonymous, "", body)).into_response()
    }
}

pub type PageResult = Result<Markup, PageError>;

/// The caller, if they may read pages.
pub fn viewer(app: &App, headers: &HeaderMap) -> Result<Who, PageError> {
    Ok(super::api::reader(app, headers)?)
}

/// The page frame: header, navigation, sign-in state, `body` in `<main>`.
/// `live` names what the script follows (`events`, or empty for nothing).
pub fn layout(title: &str, who: &Who, live: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Surveil" }
                link rel="icon" href="/favicon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/app.js" defer {}
            }
            body data-live=(live) {
                header.top {
                    a.brand href="/" { "Surveil" }
                    nav {
                        a href="/" { "Home" }
                        a href="/repos" { "Repositories" }
                        a href="/runners" { "Runners" }
                        a href="/status" { "Status" }
                    }
                    div.who {
                        @match (who.csrf(), who.identity()) {
                            (Some(csrf), Some(identity)) => form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                span.muted #identity { (identity.label()) }
                                " "
                                button type="submit" { "Sign out" }
                            },
                            (_, Some(identity)) => span.muted #identity { (identity.label()) },
                            _ => a href="/login" { "Sign in" },
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// A status as a coloured label.
pub fn status_label(status: JobStatus) -> Markup {
    html! { span class={ "status s-" (status.label()) } { (status.label()) } }
}

/// Milliseconds as `2h 5m`, `3m 12s` or `4.2s`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s / 60 % 60),
    }
}

/// How long ago `then_ms` was, from `now_ms`.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    format!(
        "{} ago",
        duration(now_ms.saturating_sub(then_ms) / 1000 * 1000)
    )
}

/// The first 12 hex digits of a commit.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only a local path may be a sign-in's destination (no open redirect).
fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

fn login_page(next: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        &Who::Anonymous,
        "",
        html! {
            h1 { "Sign in" }
            p.muted { "Sign in with the operator token or a client token from the tokens file: scope operate may cancel and rerun jobs, scope read may read them. Reading needs no sign-in where the dispatcher allows it." }
            @if let Some(error) = error { p.error #login-error { (error) } }
            form.login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

async fn login_form(Query(q): Query<LoginQuery>) -> Markup {
    login_page(local_path(q.next.as_deref()), None)
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(app): State<Arc<App>>, Form(form): Form<LoginForm>) -> Response {
    let next = local_path(form.next.as_deref()).to_owned();
    match app.auth.sign_in(&form.token) {
        Ok(cookie) => {
            let mut response = Redirect::to(&next).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(SET_COOKIE, value);
            }
            response
        }
        Err(refusal) => {
            let message = match refusal {
                Refusal::NoTokenConfigured | Refusal::Forbidden(_) => {
                    ApiError::refused(&refusal).message
                }
                Refusal::Unauthenticated | Refusal::Csrf => {
                    "that is not a token this dispatcher knows".to_owned()
                }
            };
            (StatusCode::UNAUTHORIZED, login_page(&next, Some(&message))).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    let who = app.auth.identify(&headers);
    if who.csrf().is_some() {
        app.auth
            .check_write(&who, Access::Read, form.csrf.as_deref())
            .map_err(|r| ApiError::refused(&r))?;
    }
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&app.auth.sign_out(&headers)) {
        response.headers_mut().insert(SET_COOKIE, value);
    }
    Ok(response)
}

/// The job page's cancel button: needs a signed-in session and its CSRF
/// token; back to the job page, which shows what happened.
async fn cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    let who = app.auth.identify(&headers);
    app.auth
        .check_write(&who, Access::Operate, form.csrf.as_deref())
        .map_err(|r| ApiError::refused(&r))?;
    let id = job_id(&id)?;
    let reply = app.service.cancel(id).await?;
    if reply.job.is_none() {
        return Err(ApiError::not_found(format!("no job {id}")).into());
    }
    if !reply.ok {
        return Err(ApiError::new(StatusCode::CONFLICT, reply.message).into());
    }
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

async fn rerun(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    let who = app.auth.identify(&headers);
    app.auth
        .check_write(&who, Access::Operate, form.csrf.as_deref())
        .map_err(|r| ApiError::refused(&r))?;
    let id = job_id(&id)?;
    let reply = app.service.rerun(id).await?;
    match reply.outcome {
        crate::service::RerunOutcome::Queued => {
            Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
        }
        crate::service::RerunOutcome::Active => {
            Err(ApiError::new(StatusCode::CONFLICT, reply.message).into())
        }
        crate::service::RerunOutcome::Unknown => Err(ApiError::not_found(reply.message).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_would_write_them() {
        assert_eq!(duration(4_200), "4.2s");
        assert_eq!(duration(192_000), "3m 12s");
        assert_eq!(duration(7_500_000), "2h 5m");
        assert_eq!(local_path(Some("//evil.example")), "/");
        assert_eq!(local_path(Some("/jobs/3")), "/jobs/3");
    }
}
