//! The repositories list and one repository's page: its key (badges),
//! each branch's latest result with its badge, the history of its jobs,
//! the pass rate and a duration chart drawn as inline SVG.

use std::sync::Arc;

use axum::extract::{Path, State};
use http::HeaderMap;
use maud::{Markup, PreEscaped, html};

use super::{PageResult, ago, duration, layout, short, status_label, viewer};
use crate::domain::{FinalStatus, Job, JobFilter, JobStatus};
use crate::service::unix_ms;
use crate::web::App;
use crate::web::api::ApiError;
use crate::web::views::{self, repo_key};

/// Jobs of the history (and the chart's bars).
const HISTORY: u32 = 50;

pub async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> PageResult {
    let who = viewer(&app, &headers)?;
    let repos = views::repos(&app.service.branches().await?);
    let body = html! {
        h1 { "Repositories" }
        @if repos.is_empty() { p.muted { "No job was submitted yet." } }
        @for r in &repos {
            section.repo {
                h2 { a href={ "/repos/" (r.key) } { (r.repo) } }
                p.muted { "key " code { (r.key) } }
                ul.branches { @for b in &r.branches {
                    li { (b.branch) ": " span class={ "status s-" (b.latest.status) } { (b.latest.status) }
                         " " a href={ "/jobs/" (b.latest.id) } { "#" (b.latest.id) } }
                } }
            }
        }
    };
    Ok(layout("Repositories", &who, "events", body))
}

pub async fn page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> PageResult {
    let who = viewer(&app, &headers)?;
    let heads = app.service.branches().await?;
    let branches: Vec<_> = heads.iter().filter(|h| repo_key(&h.repo) == key).collect();
    let Some(repo) = branches.first().map(|h| h.repo.clone()) else {
        return Err(ApiError::not_found(format!("no repository with the key `{key}`")).into());
    };
    let history = app
        .service
        .list_jobs(&JobFilter {
            repo: Some(repo.clone()),
            limit: Some(HISTORY),
            ..JobFilter::default()
        })
        .await?;
    let now = unix_ms();
    let finals: Vec<&Job> = history.iter().filter(|j| j.status.is_final()).collect();
    let passed = finals
        .iter()
        .filter(|j| j.status == JobStatus::Final(FinalStatus::Passed))
        .count();
    let body = html! {
        h1 { (repo) }
        p { "Key " code #repo-key { (key) } " — badge: " code { "/badge/" (key) "/BRANCH.svg" } }
        section {
            h2 { "Branches" }
            div.scroll { table {
                thead { tr { th { "Branch" } th { "Latest" } th { "Job" } th { "Badge" } } }
                tbody { @for b in &branches {
                    tr {
                        td { (b.branch) }
                        td { (status_label(b.latest.status)) }
                        td { a href={ "/jobs/" (b.latest.id) } { "#" (b.latest.id) } }
                        td { img src={ "/badge/" (key) "/" (b.branch) ".svg" } alt={ "build " (b.latest.status) }; }
                    }
                } }
            } }
        }
        section {
            h2 { "History" }
            @if finals.is_empty() { p.muted { "No finished job yet." } } @else {
                p #pass-rate { "Pass rate " strong { (passed * 100 / finals.len()) "%" } " of the last " (finals.len()) " finished jobs." }
                (chart(&finals))
            }
            div.scroll { table {
                thead { tr { th { "Job" } th { "Branch" } th { "Commit" } th { "Status" } th { "Took" } th { "Queued" } } }
                tbody { @for j in &history {
                    tr {
                        td { a href={ "/jobs/" (j.id) } { "#" (j.id) } }
                        td { (j.branch) }
                        td { code { (short(j.commit.as_str())) } }
                        td { (status_label(j.status)) }
                        td { @match (j.started_at_ms, j.finished_at_ms) { (Some(s), Some(f)) => (duration(f.saturating_sub(s))), _ => "—" } }
                        td { (ago(j.queued_at_ms, now)) }
                    }
                } }
            } }
        }
    };
    Ok(layout(&repo, &who, "events", body))
}

/// Bars of the finished jobs' durations, oldest on the left, coloured by
/// result; each bar says its job and duration on hover.
fn chart(jobs: &[&Job]) -> Markup {
    let bars: Vec<(u64, u64, &'static str)> = jobs
        .iter()
        .rev()
        .map(|j| {
            let took = match (j.started_at_ms, j.finished_at_ms) {
                (Some(s), Some(f)) => f.saturating_sub(s),
                _ => 0,
            };
            (j.id.0, took, j.status.label())
        })
        .collect();
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let (w, h, bw) = (600u64, 120u64, 600 / bars.len().max(1) as u64);
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" preserveAspectRatio="none" role="img" aria-label="durations of the last {} jobs">"#,
        bars.len()
    );
    for (i, (id, took, status)) in bars.iter().enumerate() {
        let bh = (took * (h - 4) / max).max(2);
        svg.push_str(&format!(
            r#"<rect class="bar s-{status}" x="{}" y="{}" width="{}" height="{bh}"><title>#{id}: {} ({status})</title></rect>"#,
            i as u64 * bw + 1,
            h - bh,
            bw.saturating_sub(2).max(1),
            duration(*took),
        ));
    }
    svg.push_str("</svg>");
    html! { figure { (PreEscaped(svg)) figcaption.muted { "Duration of each finished job; the tallest took " (duration(max)) "." } } }
}
