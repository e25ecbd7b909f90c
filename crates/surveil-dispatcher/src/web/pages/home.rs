//! The home page: running jobs with their elapsed time and progress
//! against the branch's last passed run, queued jobs each with why it
//! waits (the scheduler's answer, via `Service::waiting`), and recent
//! results.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use http::HeaderMap;
use maud::{Markup, html};

use super::{PageResult, ago, duration, layout, short, status_label, viewer};
use crate::domain::{Job, JobFilter, JobId, JobStatus, Waiting};
use crate::service::unix_ms;
use crate::web::App;

/// Jobs shown per section.
const SECTION: u32 = 50;
/// Recent results shown.
const RECENT: usize = 20;

fn filter(status: Option<JobStatus>, limit: u32) -> JobFilter {
    JobFilter {
        status,
        limit: Some(limit),
        ..JobFilter::default()
    }
}

/// How long the branch's last passed run took, if it has one.
async fn last_passed(app: &App, job: &Job) -> Option<u64> {
    let passed = app
        .service
        .list_jobs(&JobFilter {
            repo: Some(job.repo.clone()),
            branch: Some(job.branch.clone()),
            status: Some(JobStatus::Final(crate::domain::FinalStatus::Passed)),
            limit: Some(1),
            ..JobFilter::default()
        })
        .await
        .ok()?;
    let last = passed.first()?;
    Some(last.finished_at_ms?.saturating_sub(last.started_at_ms?))
}

pub async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> PageResult {
    let who = viewer(&app, &headers)?;
    let running = app
        .service
        .list_jobs(&filter(Some(JobStatus::Running), SECTION))
        .await?;
    let mut queued = app
        .service
        .list_jobs(&filter(Some(JobStatus::Queued), SECTION))
        .await?;
    queued.reverse(); // oldest first: the next to run on top
    let recent: Vec<Job> = app
        .service
        .list_jobs(&filter(None, SECTION))
        .await?
        .into_iter()
        .filter(|j| j.status.is_final())
        .take(RECENT)
        .collect();
    let waiting: HashMap<JobId, Waiting> = app.service.waiting().into_iter().collect();
    let mut expected = HashMap::new();
    for job in &running {
        expected.insert(job.id, last_passed(&app, job).await);
    }
    let now = unix_ms();
    let body = html! {
        h1 { "Builds" }
        section #running {
            h2 { "Running " span.count { (running.len()) } }
            @if running.is_empty() { p.muted { "Nothing is running." } }
            @else { (running_table(&running, &expected, now)) }
        }
        section #queued {
            h2 { "Queued " span.count { (queued.len()) } }
            @if queued.is_empty() { p.muted { "Nothing is waiting." } }
            @else { (queued_table(&queued, &waiting, now)) }
        }
        section #recent {
            h2 { "Recent results" }
            @if recent.is_empty() { p.muted { "No job has finished yet." } }
            @else { (recent_table(&recent, now)) }
        }
    };
    Ok(layout("Builds", &who, "events", body))
}

fn job_cells(job: &Job) -> Markup {
    html! {
        td { a href={ "/jobs/" (job.id) } { "#" (job.id) } }
        td.repo { a href={ "/repos/" (crate::web::views::repo_key(&job.repo)) } { (job.repo) } }
        td { (job.branch) }
        td { code { (short(job.commit.as_str())) } }
    }
}

fn running_table(jobs: &[Job], expected: &HashMap<JobId, Option<u64>>, now: u64) -> Markup {
    html! {
        div.scroll { table {
            thead { tr { th { "Job" } th { "Repository" } th { "Branch" } th { "Commit" } th { "Runner" } th { "Elapsed" } th { "Progress" } } }
            tbody { @for job in jobs {
                @let elapsed = job.started_at_ms.map(|s| now.saturating_sub(s));
                @let typical = expected.get(&job.id).copied().flatten().filter(|d| *d > 0);
                tr data-job=(job.id) {
                    (job_cells(job))
                    td { (job.runner.as_deref().unwrap_or("—")) }
                    td { (elapsed.map(duration).unwrap_or_else(|| "—".to_owned())) }
                    td { @match (elapsed, typical) {
                        (Some(e), Some(t)) => {
                            @let pct = (e.saturating_mul(100) / t).min(100);
                            progress max="100" value=(pct) title={ (pct) "% of the last passed run (" (duration(t)) ")" } { (pct) "%" }
                            " " span.muted { (if e > t { format!("over {}", duration(t)) } else { format!("of {}", duration(t)) }) }
                        },
                        _ => span.muted { "no passed run to compare" },
                    } }
                }
            } }
        } }
    }
}

fn queued_table(jobs: &[Job], waiting: &HashMap<JobId, Waiting>, now: u64) -> Markup {
    html! {
        div.scroll { table {
            thead { tr { th { "Job" } th { "Repository" } th { "Branch" } th { "Commit" } th { "Queued" } th { "Why it waits" } } }
            tbody { @for job in jobs {
                tr data-job=(job.id) {
                    (job_cells(job))
                    td { (ago(job.queued_at_ms, now)) }
                    td.reason { @match waiting.get(&job.id) {
                        Some(w) => {
                            span class={ "why w-" (w.reason.code()) } { (w.reason.describe()) }
                            @if w.ahead > 0 { br; span.muted { (w.ahead) " older job(s) of this repository first" } }
                            @if w.lost_attempts > 0 { br; span.muted { (w.lost_attempts) " of " (w.max_attempts) " attempts lost to runners that went away" } }
                        },
                        None => span.muted { "being recorded" },
                    } }
                }
            } }
        } }
    }
}

fn recent_table(jobs: &[Job], now: u64) -> Markup {
    html! {
        div.scroll { table {
            thead { tr { th { "Job" } th { "Repository" } th { "Branch" } th { "Commit" } th { "Result" } th { "Took" } th { "Finished" } } }
            tbody { @for job in jobs {
                tr data-job=(job.id) {
                    (job_cells(job))
                    td { (status_label(job.status)) }
                    td { @match (job.started_at_ms, job.finished_at_ms) {
                        (Some(s), Some(f)) => (duration(f.saturating_sub(s))),
                        _ => "—",
                    } }
                    td { (job.finished_at_ms.map(|f| ago(f, now)).unwrap_or_default()) }
                }
            } }
        } }
    }
}
