//! The runners page (name, address, slots, running jobs, last seen,
//! health, labels, repositories) and the status page (version, uptime, queue,
//! supervisor restarts and counters).

use std::sync::Arc;

use axum::extract::State;
use http::HeaderMap;
use maud::html;

use super::{PageResult, ago, duration, layout, viewer};
use crate::service::unix_ms;
use crate::web::App;

pub async fn runners(State(app): State<Arc<App>>, headers: HeaderMap) -> PageResult {
    let who = viewer(&app, &headers)?;
    let runners = app.service.runners();
    let now = unix_ms();
    let body = html! {
        h1 { "Runners " span.count { (runners.len()) } }
        @if runners.is_empty() { p.muted { "No runner is connected." } } @else {
            div.scroll { table #runners {
                thead { tr { th { "Name" } th { "Address" } th { "Slots" } th { "Running" } th { "Last seen" } th { "Health" } th { "Labels" } th { "Repositories" } } }
                tbody { @for r in &runners {
                    tr {
                        td { strong { (r.name) } }
                        td { code { (r.addr) } }
                        td { (r.running.len()) " / " (r.slots) }
                        td { @for (i, j) in r.running.iter().enumerate() {
                            @if i > 0 { ", " } a href={ "/jobs/" (j) } { "#" (j) }
                        } }
                        td { (ago(r.last_seen_ms, now)) }
                        td.health { @if r.draining { strong.draining { "draining" } " " }
                            @if let Some(until) = r.quarantined_until_ms {
                            strong { "quarantined" } " for " (duration(until.saturating_sub(now)))
                            " (" (r.infra_failures) " infrastructure failures)"
                        } @else if r.infra_failures > 0 {
                            (r.infra_failures) " infrastructure failure(s)"
                        } @else if !r.draining { "ok" } }
                        td { (r.labels.join(", ")) }
                        td.repo { (r.repos.join(", ")) }
                    }
                } }
            } }
        }
    };
    Ok(layout("Runners", &who, "events", body))
}

pub async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> PageResult {
    let who = viewer(&app, &headers)?;
    let s = app.service.status();
    let body = html! {
        h1 { "Status" }
        dl.facts #status {
            dt { "Version" } dd { (s.version) }
            dt { "Up for" } dd { (duration(s.uptime_s * 1000)) }
            dt { "Runners connected" } dd { (s.runners) }
            dt { "Jobs queued" } dd { (s.queued) }
            dt { "Jobs running" } dd { (s.running) }
            dt { "Reassignments" } dd { (s.reassignments) }
            dt { "Refused results" } dd { (s.refused_results) }
            dt { "Quarantined runners" } dd { (s.quarantined) }
            dt { "Draining runners" } dd { (s.draining) }
        }
        h2 { "Supervisor restarts" }
        div.scroll { table {
            thead { tr { th { "Task" } th { "Restarts" } } }
            tbody { @for (task, n) in &s.supervisor_restarts { tr { td { (task) } td { (n) } } } }
        } }
        p.muted { "Metrics for Prometheus: " a href="/metrics" { "/metrics" } "." }
    };
    Ok(layout("Status", &who, "events", body))
}
