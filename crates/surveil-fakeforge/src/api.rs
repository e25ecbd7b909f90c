//! The three status APIs as axum routes: read the request into the model's
//! shape, let [`decide`] judge it under the state lock, answer. Holding a
//! hung request is the only waiting done here; the lock is never held
//! across an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::Shared;
use crate::model::{self, Api, BOT_LOGIN, Call, Fault, ForgeKind, Refusal, StatusRequest, rfc3339};

/// The longest a hung request is held; far beyond any client timeout a
/// test configures, short enough that a forgotten fault ends by itself.
pub const HANG_CAP: Duration = Duration::from_secs(300);

/// The routes of all three APIs.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/repos/{owner}/{repo}/statuses/{sha}", post(github))
        .route("/api/v1/repos/{owner}/{repo}/statuses/{sha}", post(gitea))
        .route("/api/v4/projects/{id}/statuses/{sha}", post(gitlab))
}

async fn github(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = format!("{owner}/{repo}");
    create(
        shared,
        Api::GitHub,
        key,
        sha,
        &headers,
        &HashMap::new(),
        &body,
    )
    .await
}

async fn gitea(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = format!("{owner}/{repo}");
    create(
        shared,
        Api::Gitea,
        key,
        sha,
        &headers,
        &HashMap::new(),
        &body,
    )
    .await
}

async fn gitlab(
    State(shared): State<Arc<Shared>>,
    Path((id, sha)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create(shared, Api::GitLab, id, sha, &headers, &query, &body).await
}

/// What to answer, decided under the lock.
enum Answer {
    Created(Value),
    Refused(Refusal),
    Fault(Fault),
}

/// One status request as received, before judgement.
pub(crate) struct Incoming<'a> {
    pub(crate) api: Api,
    pub(crate) repo: String,
    pub(crate) sha: String,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: Result<StatusRequest, Refusal>,
}

async fn create(
    shared: Arc<Shared>,
    api: Api,
    repo: String,
    sha: String,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let incoming = Incoming {
        api,
        repo,
        sha,
        headers,
        body: parse_body(api, headers, query, body),
    };
    let answer = {
        let mut state = shared.state.lock().expect("fake forge state");
        let answer = decide(&mut state, incoming, Instant::now(), SystemTime::now());
        shared.changed.notify_waiters();
        answer
    };
    match answer {
        Answer::Created(body) => (StatusCode::CREATED, axum::Json(body)).into_response(),
        Answer::Refused(refusal) => json_response(refusal.status, &[], refusal.body),
        Answer::Fault(fault) => match model::fault_answer(fault) {
            Some(answer) => json_response(answer.code, &answer.headers, answer.body),
            None => {
                tokio::select! {
                    () = tokio::time::sleep(HANG_CAP) => {}
                    () = shared.shutdown.cancelled() => {}
                }
                StatusCode::GATEWAY_TIMEOUT.into_response()
            }
        },
    }
}

fn json_response(code: u16, extra: &[(&'static str, String)], body: Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(body)).into_response();
    for (name, value) in extra {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Judges a request and records it, in arrival order.
fn decide(
    state: &mut crate::ForgeState,
    req: Incoming<'_>,
    now: Instant,
    at: SystemTime,
) -> Answer {
    let Incoming {
        api,
        repo,
        sha,
        headers,
        body,
    } = req;
    let token = model::token_of(
        api,
        header(headers, "authorization"),
        header(headers, "private-token"),
    );
    let entry = state.registry.find(api, &repo).cloned();
    let auth = model::judge(&state.registry, api, entry.as_ref(), token.as_deref());
    let fields = body.as_ref().ok().cloned().unwrap_or_default();
    let mut call = Call {
        seq: state.calls.len() as u64 + 1,
        at,
        forge: entry.as_ref().map_or(default_kind(api), |e| e.repo.kind),
        repo,
        sha,
        state: fields.state.clone(),
        context: fields.context.clone(),
        target_url: fields.target_url.clone(),
        description: fields.description.clone(),
        git_ref: fields.git_ref.clone(),
        auth,
        user_agent: header(headers, "user-agent").map(str::to_owned),
        accept: header(headers, "accept").map(str::to_owned),
        fault: None,
        status: None,
        error: None,
    };
    let answer = match state.faults.take(now) {
        Some(fault) => {
            call.fault = Some(fault);
            Answer::Fault(fault)
        }
        None => judge(state, &mut call, entry.as_ref(), api, body),
    };
    match &answer {
        Answer::Created(_) => call.status = Some(201),
        Answer::Refused(refusal) => {
            call.status = Some(refusal.status);
            call.error = Some(refusal.reason());
        }
        Answer::Fault(fault) => {
            call.status = model::fault_answer(*fault).map(|answer| answer.code);
            call.error = Some(format!("injected fault {fault:?}"));
        }
    }
    state.calls.push(call);
    answer
}

fn default_kind(api: Api) -> ForgeKind {
    match api {
        Api::GitHub => ForgeKind::GitHub,
        Api::Gitea => ForgeKind::Gitea,
        Api::GitLab => ForgeKind::GitLab,
    }
}

/// The checks in the order the forges make them: client headers,
/// credentials, repository, body, bookkeeping.
fn judge(
    state: &mut crate::ForgeState,
    call: &mut Call,
    entry: Option<&model::Entry>,
    api: Api,
    body: Result<StatusRequest, Refusal>,
) -> Answer {
    if api == Api::GitHub {
        match (&call.user_agent, &call.accept) {
            (None, _) => return Answer::Refused(model::github_no_user_agent()),
            (_, Some(accept)) if !model::github_accepts(accept) => {
                return Answer::Refused(model::github_bad_accept(accept));
            }
            _ => {}
        }
    }
    if let Some(refusal) = model::auth_refusal(api, call.auth) {
        return Answer::Refused(refusal);
    }
    let Some(entry) = entry else {
        return Answer::Refused(model::not_found(api));
    };
    let req = match body {
        Ok(req) => req,
        Err(refusal) => return Answer::Refused(refusal),
    };
    let context = match model::validate(api, entry, &call.sha, &req) {
        Ok(context) => context,
        Err(refusal) => return Answer::Refused(refusal),
    };
    call.context = Some(context.clone());
    match state
        .ledger
        .record(api, entry.repo.id, &call.sha, &context, &req)
    {
        Ok(id) => Answer::Created(created_body(api, &entry.repo, call, &req, id)),
        Err(refusal) => Answer::Refused(refusal),
    }
}

/// The documented 201 body of each API.
fn created_body(api: Api, repo: &model::Repo, call: &Call, req: &StatusRequest, id: u64) -> Value {
    let at = rfc3339::format(call.at);
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let user = json!({"login": BOT_LOGIN, "id": 1, "type": "Bot", "username": BOT_LOGIN});
    match api {
        Api::GitHub => json!({
            "url": format!("{}/statuses/{}", repo.web_url, call.sha),
            "avatar_url": null,
            "id": id,
            "node_id": format!("SC_{id}"),
            "state": req.state,
            "description": req.description,
            "target_url": req.target_url,
            "context": call.context,
            "created_at": at,
            "updated_at": at,
            "creator": user,
        }),
        Api::Gitea => json!({
            "id": id,
            "status": req.state,
            "target_url": text(&req.target_url),
            "description": text(&req.description),
            "url": format!("{}/commit/{}", repo.web_url, call.sha),
            "context": call.context,
            "creator": user,
            "created_at": at,
            "updated_at": at,
        }),
        Api::GitLab => {
            let finished = req.state.as_deref().is_some_and(model::gitlab_final);
            json!({
                "id": id,
                "sha": call.sha,
                "ref": req.git_ref,
                "status": req.state,
                "name": call.context,
                "target_url": req.target_url,
                "description": req.description,
                "created_at": at,
                "started_at": (req.state.as_deref() == Some("running")).then(|| at.clone()),
                "finished_at": finished.then(|| at.clone()),
                "allow_failure": false,
                "coverage": null,
                "author": {"id": 1, "username": BOT_LOGIN, "name": BOT_LOGIN, "state": "active"},
            })
        }
    }
}

/// Reads the request fields. GitHub and Gitea take a JSON body; GitLab
/// takes query parameters, a form or a JSON body (the body wins).
fn parse_body(
    api: Api,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<StatusRequest, Refusal> {
    let form = header(headers, "content-type")
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let mut fields: HashMap<String, Value> = query
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if api == Api::GitLab && form {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|e| body_refusal(api, format!("the form does not parse: {e}")))?;
        fields.extend(pairs.into_iter().map(|(k, v)| (k, Value::String(v))));
    } else if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => fields.extend(map),
            Ok(_) | Err(_) => {
                return Err(body_refusal(api, "Problems parsing JSON".to_owned()));
            }
        }
    }
    let text = |name: &str| -> Result<Option<String>, Refusal> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(body_refusal(
                api,
                format!("Invalid request.\n\nFor 'properties/{name}', {other} is not a string."),
            )),
        }
    };
    let context = match api {
        Api::GitLab => text("name")?.filter(|n| !n.is_empty()).or(text("context")?),
        _ => text("context")?,
    };
    Ok(StatusRequest {
        state: text("state")?,
        target_url: text("target_url")?,
        description: text("description")?,
        context,
        git_ref: if api == Api::GitLab {
            text("ref")?
        } else {
            None
        },
    })
}

fn body_refusal(api: Api, message: String) -> Refusal {
    let (status, body) = match api {
        Api::GitHub if message == "Problems parsing JSON" => (400, json!({"message": message})),
        Api::GitHub => (422, json!({"message": message})),
        Api::Gitea => (422, json!({"message": message})),
        Api::GitLab => (400, json!({"error": message})),
    };
    Refusal { status, body }
}
