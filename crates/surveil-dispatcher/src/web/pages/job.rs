//! A job's page: commit, branch, attempt, why it waits, the tasks with
//! status, duration and exit code, and the ANSI-coloured log with a line
//! anchor per line (`#L120`) and a raw download; for a signed-in operator
//! the cancel button. The script appends new log lines live from the
//! log stream, resuming at the offset this page was rendered up to. Every
//! attempt is listed with a link to its own log; a signed-in operator can
//! rerun a finished job.

use std::sync::Arc;

use axum::extract::{Path, State};
use http::HeaderMap;
use maud::{Markup, PreEscaped, html};

use super::{PageError, PageResult, ago, duration, layout, short, status_label, viewer};
use crate::domain::{AttemptRecord, Job, JobStatus};
use crate::service::{LogEvent, unix_ms};
use crate::web::App;
use crate::web::ansi::{Style, line_to_html};
use crate::web::api::{ApiError, job_id};
use crate::web::auth::Who;

/// The most log a page renders; past it the page links the raw log.
const PAGE_LOG: usize = 4 << 20;

pub async fn page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult {
    let who = viewer(&app, &headers)?;
    let id = job_id(&id)?;
    let job = app
        .service
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    let waiting = if job.status == JobStatus::Queued {
        app.service
            .waiting()
            .into_iter()
            .find(|(j, _)| *j == id)
            .map(|(_, w)| w)
    } else {
        None
    };
    let attempts = app.service.attempts(id).await?;
    let (log, end, complete) = read_log(&app, &job).await?;
    let live = !job.status.is_final() && complete;
    let body = html! {
        div #job-head { (head(&job, waiting.as_ref(), &app)) }
        div #actions { (actions(&job, &who)) }
        section #tasks { (tasks(&job)) }
        @if attempts.len() > 1 { section #attempts { (attempt_list(&job, &attempts)) } }
        section.log-section {
            h2 { "Log " a.raw href={ "/api/v1/jobs/" (job.id) "/log" } download={ "job-" (job.id) ".log" } { "raw" } }
            @if !complete { p.muted { "The log is longer than this page shows: download the raw log for the rest." } }
            pre #log data-job=(job.id) data-offset=(end) data-live=(if live { "true" } else { "false" }) {
                (log_lines(&log))
            }
            p #follow.muted hidden { "Following the log; scroll up to stop." }
        }
    };
    Ok(layout(&format!("Job {}", job.id), &who, "", body))
}

/// The log from the start, up to [`PAGE_LOG`]: (text, offset reached,
/// whether that is all of it).
async fn read_log(app: &App, job: &Job) -> Result<(Vec<u8>, u64, bool), PageError> {
    let mut follow = app.service.follow_log(job.id, 0, false);
    let mut log = Vec::new();
    loop {
        match follow.next().await.map_err(ApiError::from)? {
            LogEvent::Bytes { data, offset, .. } => {
                log.extend_from_slice(&data);
                if log.len() >= PAGE_LOG {
                    return Ok((log, offset + data.len() as u64, false));
                }
            }
            LogEvent::End { offset, .. } => return Ok((log, offset, true)),
            LogEvent::NotFound => {
                return Err(ApiError::not_found(format!("no job {}", job.id)).into());
            }
        }
    }
}

/// One element per line, each with its anchor; a last line without its
/// newline yet is left open for the script to continue.
fn log_lines(log: &[u8]) -> Markup {
    let text = String::from_utf8_lossy(log);
    let mut style = Style::default();
    let mut out = String::with_capacity(text.len() * 2);
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.len() - 1;
    for (i, line) in lines.iter().enumerate() {
        if i == last && line.is_empty() {
            break;
        }
        let n = i + 1;
        let tail = if i == last { " data-open=\"true\"" } else { "" };
        out.push_str(&format!(
            "<span class=\"line\" id=\"L{n}\"{tail}><a class=\"ln\" href=\"#L{n}\">{n}</a><span class=\"lt\">{}</span></span>",
            line_to_html(line, &mut style)
        ));
    }
    PreEscaped(out)
}

fn head(job: &Job, waiting: Option<&crate::domain::Waiting>, app: &App) -> Markup {
    let now = unix_ms();
    let key = crate::web::views::repo_key(&job.repo);
    html! {
        h1 { "Job #" (job.id) " " span #job-status data-status=(job.status.label()) { (status_label(job.status)) } }
        dl.facts {
            dt { "Repository" } dd { a href={ "/repos/" (key) } { (job.repo) } }
            dt { "Branch" } dd { (job.branch) }
            dt { "Commit" } dd { code title=(job.commit) { (short(job.commit.as_str())) } }
            dt { "Attempt" } dd {
                (job.attempt.0)
                @if job.attempt.0 > job.rerun_base.0 + 1 {
                    span.muted { " (" (job.attempt.0 - job.rerun_base.0 - 1) " lost before in this run; at most " (app.max_attempts) ")" }
                }
                @if job.rerun_base.0 > 0 { span.muted { " (rerun after attempt " (job.rerun_base.0) ")" } }
            }
            dt { "Runner" } dd { (job.runner.as_deref().unwrap_or("—")) }
            dt { "Queued" } dd { (ago(job.queued_at_ms, now)) }
            @if let Some(s) = job.started_at_ms { dt { "Started" } dd { (ago(s, now)) } }
            @if let (Some(s), Some(f)) = (job.started_at_ms, job.finished_at_ms) {
                dt { "Took" } dd { (duration(f.saturating_sub(s))) }
            }
            @if let Some(m) = job.message.as_deref().filter(|m| !m.is_empty()) { dt { "Message" } dd { (m) } }
            @if let Some(w) = waiting { dt { "Waiting" } dd.reason #why { (w.reason.describe()) } }
        }
    }
}

fn actions(job: &Job, who: &Who) -> Markup {
    html! {
        @if let (Some(csrf), true) = (who.csrf(), who.is_operator()) {
            @if !job.status.is_final() {
                form.inline method="post" action={ "/jobs/" (job.id) "/cancel" } {
                    input type="hidden" name="csrf" value=(csrf);
                    button #cancel.danger type="submit" { "Cancel" }
                }
            } @else {
                form.inline method="post" action={ "/jobs/" (job.id) "/rerun" } {
                    input type="hidden" name="csrf" value=(csrf);
                    button #rerun type="submit" { "Rerun" }
                }
            }
        } @else if let Some(identity) = who.identity() {
            p.muted { "Signed in as " (identity.label()) ", which may not cancel or rerun jobs (that needs scope operate)." }
        } @else if !job.status.is_final() {
            p.muted { a href={ "/login?next=/jobs/" (job.id) } { "Sign in" } " to cancel this job." }
        } @else {
            p.muted { a href={ "/login?next=/jobs/" (job.id) } { "Sign in" } " to rerun this job." }
        }
    }
}

/// Every attempt, newest first, each linking its own raw log.
fn attempt_list(job: &Job, attempts: &[AttemptRecord]) -> Markup {
    html! {
        h2 { "Attempts" }
        div.scroll { table {
            thead { tr { th { "#" } th { "Runner" } th { "Status" } th { "Took" } th { "Log" } th { "Note" } } }
            tbody { @for a in attempts.iter().rev() {
                tr.attempt data-attempt=(a.attempt.0) {
                    td { (a.attempt.0) @if a.attempt == job.attempt { span.muted { " (latest)" } } }
                    td { (a.runner) }
                    td { span class={ "status s-" (a.status.label()) } { (a.status.label()) } }
                    td { @match (a.started_at_ms.or(Some(a.assigned_at_ms)), a.finished_at_ms) {
                        (Some(s), Some(f)) => (duration(f.saturating_sub(s))),
                        _ => "—",
                    } }
                    td { a href={ "/api/v1/jobs/" (job.id) "/log?attempt=" (a.attempt.0) } { "log" } }
                    td { (a.message.as_deref().unwrap_or("")) }
                }
            } }
        } }
    }
}

fn tasks(job: &Job) -> Markup {
    html! {
        h2 { "Tasks" }
        @if job.tasks.is_empty() {
            p.muted { @if job.status.is_final() { "No task results were recorded." } @else { "Task results appear when the job ends." } }
        } @else {
            div.scroll { table {
                thead { tr { th { "Task" } th { "Status" } th { "Duration" } th { "Exit" } th { "Note" } } }
                tbody { @for t in &job.tasks {
                    tr {
                        td { (t.name) }
                        td { span class={ "status s-" (t.status.label()) } { (t.status.label()) } }
                        td { (duration(t.duration_ms)) }
                        td { @match (t.exit_code, t.signal) {
                            (Some(code), _) => (code),
                            (None, Some(sig)) => { "signal " (sig) },
                            _ => "—",
                        } }
                        td { (t.message) }
                    }
                } }
            } }
        }
    }
}
