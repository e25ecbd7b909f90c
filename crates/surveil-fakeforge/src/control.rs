//! The control API under `/_fakeforge/`: the library's handle as JSON, for
//! a test that runs the forge as a separate process. It only translates;
//! every decision is the library's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::Shared;
use crate::model::{Fault, ForgeKind, Repo, RepoSpec, Scope};
use crate::webhook::{PrAction, Signature, Webhook};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_fakeforge/calls", get(calls).delete(clear))
        .route("/_fakeforge/deliveries", get(deliveries))
        .route("/_fakeforge/repos", get(repos).post(add_repo))
        .route("/_fakeforge/faults", post(add_fault).delete(clear_faults))
        .route("/_fakeforge/down", post(down))
        .route("/_fakeforge/webhooks", post(send_webhook))
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("duration `{text}`: {e}"))
}

async fn calls(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().calls.clone()).into_response()
}

async fn clear(State(shared): State<Arc<Shared>>) -> StatusCode {
    let mut state = shared.lock();
    state.calls.clear();
    state.deliveries.clear();
    StatusCode::NO_CONTENT
}

async fn deliveries(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().deliveries.clone()).into_response()
}

async fn repos(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().registry.repos()).into_response()
}

#[derive(Deserialize)]
struct AddRepo {
    kind: ForgeKind,
    path: String,
    #[serde(default)]
    write_tokens: Vec<String>,
    #[serde(default)]
    read_tokens: Vec<String>,
    clone_url: Option<String>,
}

async fn add_repo(State(shared): State<Arc<Shared>>, Json(req): Json<AddRepo>) -> Response {
    let mut spec = RepoSpec::new(req.kind, req.path);
    for token in req.write_tokens {
        spec = spec.write_token(token);
    }
    for token in req.read_tokens {
        spec = spec.read_token(token);
    }
    if let Some(url) = req.clone_url {
        spec = spec.clone_url(url);
    }
    (StatusCode::CREATED, Json(shared.add_repo(spec))).into_response()
}

#[derive(Deserialize)]
struct AddFault {
    fault: Fault,
    /// For the next N calls...
    calls: Option<u32>,
    /// ...or for this long (`30s`).
    #[serde(rename = "for")]
    duration: Option<String>,
}

async fn add_fault(State(shared): State<Arc<Shared>>, Json(req): Json<AddFault>) -> Response {
    let scope = match (req.calls, req.duration) {
        (Some(n), None) => Scope::Calls(n),
        (None, Some(text)) => match parse_duration(&text) {
            Ok(d) => Scope::Until(Instant::now() + d),
            Err(message) => return bad_request(message),
        },
        _ => return bad_request("give exactly one of `calls` and `for`".to_owned()),
    };
    shared.inject(req.fault, scope);
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Down {
    #[serde(rename = "for")]
    duration: String,
}

async fn down(State(shared): State<Arc<Shared>>, Json(req): Json<Down>) -> Response {
    match parse_duration(&req.duration) {
        Ok(d) => {
            shared.down(Some(Instant::now() + d));
            StatusCode::ACCEPTED.into_response()
        }
        Err(message) => bad_request(message),
    }
}

/// A webhook to send: the repository by forge and path, the event and its
/// fields, and the delivery options.
#[derive(Deserialize)]
struct SendHook {
    url: String,
    kind: ForgeKind,
    repo: String,
    secret: String,
    /// `push`, `pull_request`, `delete` or `ping`.
    event: String,
    branch: Option<String>,
    before: Option<String>,
    after: Option<String>,
    action: Option<PrAction>,
    number: Option<u64>,
    head_ref: Option<String>,
    head_sha: Option<String>,
    base_ref: Option<String>,
    base_sha: Option<String>,
    #[serde(default)]
    signature: Signature,
    delivery_id: Option<String>,
    /// A path on the same forge the payload names instead.
    naming: Option<String>,
}

fn find_repo(shared: &Shared, kind: ForgeKind, path: &str) -> Result<Repo, String> {
    shared
        .lock()
        .registry
        .repos()
        .into_iter()
        .find(|r| r.kind == kind && r.path == path)
        .ok_or_else(|| format!("no {kind} repository `{path}` registered"))
}

fn build_hook(shared: &Shared, req: &SendHook) -> Result<Webhook, String> {
    let repo = find_repo(shared, req.kind, &req.repo)?;
    let need = |field: &Option<String>, name: &str| {
        field
            .clone()
            .ok_or_else(|| format!("`{}` needs `{name}`", req.event))
    };
    let mut hook = match req.event.as_str() {
        "push" => Webhook::push(
            &repo,
            &need(&req.branch, "branch")?,
            &need(&req.before, "before")?,
            &need(&req.after, "after")?,
        ),
        "delete" => Webhook::delete_branch(
            &repo,
            &need(&req.branch, "branch")?,
            &need(&req.before, "before")?,
        ),
        "ping" => Webhook::ping(&repo),
        "pull_request" | "merge_request" => {
            let head = (
                need(&req.head_ref, "head_ref")?,
                need(&req.head_sha, "head_sha")?,
            );
            let base = (
                need(&req.base_ref, "base_ref")?,
                need(&req.base_sha, "base_sha")?,
            );
            let hook = Webhook::pull_request(
                &repo,
                req.action.unwrap_or(PrAction::Opened),
                req.number
                    .ok_or_else(|| "a pull request needs `number`".to_owned())?,
                (&head.0, &head.1),
                (&base.0, &base.1),
            );
            match &req.before {
                Some(before) => hook.before(before),
                None => hook,
            }
        }
        other => {
            return Err(format!(
                "unknown event `{other}` (push, pull_request, delete, ping)"
            ));
        }
    };
    hook = hook.secret(req.secret.clone()).signature(req.signature);
    if let Some(id) = &req.delivery_id {
        hook = hook.delivery_id(id.clone());
    }
    if let Some(path) = &req.naming {
        let other = shared
            .lock()
            .registry
            .repos()
            .into_iter()
            .find(|r| &r.path == path)
            .unwrap_or_else(|| Repo {
                path: path.clone(),
                clone_url: format!("{}/{path}.git", shared.base_url),
                web_url: format!("{}/{path}", shared.base_url),
                id: repo.id + 100_000,
                ..repo.clone()
            });
        hook = hook.naming(&other);
    }
    Ok(hook)
}

async fn send_webhook(State(shared): State<Arc<Shared>>, Json(req): Json<SendHook>) -> Response {
    match build_hook(&shared, &req) {
        Ok(hook) => Json(shared.send(&req.url, &hook).await).into_response(),
        Err(message) => bad_request(message),
    }
}
