//! Server-sent event streams: a job's log as it grows
//! (`/api/v1/jobs/{id}/log/stream`) and the dispatcher's job and runner
//! changes (`/api/v1/events`), for the pages' script and for anyone with
//! `curl -N`.
//!
//! A log event's `id:` is the byte offset right after its data, so a
//! reconnect with `Last-Event-ID` resumes exactly there: no byte twice,
//! none missed. Its data is the text as a JSON string (SSE cannot carry a
//! bare `\r`); a UTF-8 character split across chunks is held back until it
//! is whole, so the offset always falls on a character boundary. Streams
//! end when the dispatcher shuts down. Reading goes through the service's
//! `follow_log` and `events`; this file never polls.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::App;
use super::api::{ApiError, ApiResult, job_id, reader};
use crate::domain::Attempt;
use crate::service::{Event, JobChange, LogEvent, LogFollow, RunnerChange};

/// Comments sent on an idle stream so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/jobs/{id}/log/stream", get(log_stream))
        .route("/api/v1/events", get(events))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    from: Option<String>,
}

fn sse_response<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let h = response.headers_mut();
    // nginx and friends buffer responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

/// Where a log stream starts: after `Last-Event-ID` when reconnecting,
/// else `?from=`, else the beginning.
fn start_offset(headers: &HeaderMap, from: Option<&str>) -> ApiResult<u64> {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    match last.or(from) {
        None => Ok(0),
        Some(text) => text.trim().parse().map_err(|_| {
            ApiError::bad_request(format!("`{text}` is not a log offset (a byte count)"))
        }),
    }
}

async fn log_stream(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> ApiResult<Response> {
    reader(&app, &headers)?;
    let id = job_id(&id)?;
    let q = q
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))?;
    let offset = start_offset(&headers, q.from.as_deref())?;
    let mut follow = app.service.follow_log(id, offset, true);
    let first = follow.next().await?;
    if first == LogEvent::NotFound {
        return Err(ApiError::not_found(format!("no job {id}")));
    }
    let state = LogStream {
        follow,
        pending: Some(first),
        carry: Vec::new(),
        attempt: None,
        done: false,
    };
    let events = stream::unfold(state, LogStream::step)
        .flat_map(stream::iter)
        .map(Ok)
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(sse_response(events))
}

struct LogStream {
    follow: LogFollow,
    pending: Option<LogEvent>,
    /// The start of a UTF-8 character whose last bytes have not come yet.
    carry: Vec<u8>,
    attempt: Option<Attempt>,
    done: bool,
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is
/// not complete yet (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let needed = match b {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

impl LogStream {
    /// The events for the next piece of the log (several at an attempt
    /// change or the end).
    async fn step(mut self) -> Option<(Vec<SseEvent>, LogStream)> {
        if self.done {
            return None;
        }
        let event = match self.pending.take() {
            Some(event) => event,
            None => match self.follow.next().await {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(error = %err, "log stream: the store failed");
                    self.done = true;
                    let error = SseEvent::default()
                        .event("failure")
                        .data(format!("reading the log failed: {err}"));
                    return Some((vec![error], self));
                }
            },
        };
        let mut out = Vec::new();
        match event {
            LogEvent::Bytes {
                attempt,
                offset,
                data,
                ..
            } => {
                if self.attempt.is_some_and(|a| a != attempt) {
                    // A new attempt's log starts at 0; what was held back
                    // belonged to the lost attempt.
                    self.carry.clear();
                    out.push(attempt_event(attempt));
                }
                self.attempt = Some(attempt);
                let start = offset - self.carry.len() as u64;
                self.carry.extend_from_slice(&data);
                let cut = self.carry.len() - incomplete_tail(&self.carry);
                if cut > 0 {
                    let text = String::from_utf8_lossy(&self.carry[..cut]).into_owned();
                    out.push(text_event(start + cut as u64, &text));
                    self.carry.drain(..cut);
                }
            }
            LogEvent::End { offset, status, .. } => {
                if !self.carry.is_empty() {
                    let text = String::from_utf8_lossy(&self.carry).into_owned();
                    out.push(text_event(offset, &text));
                }
                out.push(
                    SseEvent::default()
                        .event("end")
                        .json_data(json!({ "status": status.label(), "offset": offset }))
                        .unwrap_or_default(),
                );
                self.done = true;
            }
            LogEvent::NotFound => self.done = true,
        }
        Some((out, self))
    }
}

fn text_event(end: u64, text: &str) -> SseEvent {
    SseEvent::default()
        .id(end.to_string())
        .json_data(text)
        .unwrap_or_default()
}

fn attempt_event(attempt: Attempt) -> SseEvent {
    SseEvent::default()
        .event("attempt")
        .id("0")
        .json_data(json!({ "attempt": attempt.0 }))
        .unwrap_or_default()
}

async fn events(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    reader(&app, &headers)?;
    let rx = app.service.events();
    let events = stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(event) => change_event(&event),
            Err(RecvError::Lagged(missed)) => {
                SseEvent::default().event("lagged").data(missed.to_string())
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    })
    .take_until(app.shutdown.clone().cancelled_owned());
    Ok(sse_response(events))
}

/// A job or runner change as an SSE event named `job` or `runner`.
fn change_event(event: &Event) -> SseEvent {
    let (name, data) = match event {
        Event::Job { id, change } => {
            let mut data = json!({ "id": id.0 });
            let (kind, extra) = match change {
                JobChange::Queued => ("queued", json!({})),
                JobChange::Assigned { attempt, runner } => (
                    "assigned",
                    json!({ "attempt": attempt.0, "runner": runner }),
                ),
                JobChange::Started { attempt } => ("started", json!({ "attempt": attempt.0 })),
                JobChange::Requeued { attempt } => ("requeued", json!({ "attempt": attempt.0 })),
                JobChange::CancelRequested => ("cancel_requested", json!({})),
                JobChange::Finished { status } => ("finished", json!({ "status": status.label() })),
            };
            data["change"] = kind.into();
            if let (Some(data), serde_json::Value::Object(extra)) = (data.as_object_mut(), extra) {
                data.extend(extra);
            }
            ("job", data)
        }
        Event::Runner { name, change, .. } => {
            let change = match change {
                RunnerChange::Connected => "connected",
                RunnerChange::Draining => "draining",
                RunnerChange::Disconnected => "disconnected",
            };
            ("runner", json!({ "name": name, "change": change }))
        }
    };
    SseEvent::default()
        .event(name)
        .json_data(data)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn a_split_utf8_character_is_held_back_until_whole() {
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&euro[..1]), 1);
        assert_eq!(incomplete_tail(&[b'a', euro[0], euro[1]]), 2);
        assert_eq!(incomplete_tail(euro), 0);
        assert_eq!(incomplete_tail(&[0xFF]), 0, "invalid bytes are not held");
    }
}
