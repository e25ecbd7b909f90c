//! Webhook payloads into forge-neutral hints: which repository, which ref,
//! what sha the forge claims it now points to (or that it was deleted),
//! and the delivery id. Only the fields a CI needs are read, each named by
//! its full path when it is missing or malformed; events that move no ref
//! (ping, issues, a relabelled pull request) are [`Parsed::Ignored`].

use http::HeaderMap;
use serde_json::Value;

use super::{ForgeKind, MAX_DELIVERY_ID_LEN};

/// What a pull (merge) request event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrAction {
    /// Opened (GitHub and Gitea `opened`, GitLab `open`).
    Opened,
    /// New commits on its head (GitHub `synchronize`, Gitea
    /// `synchronized`, GitLab `update` with `oldrev`).
    Synchronized,
    /// Reopened.
    Reopened,
    /// Closed or merged: its ref need not be watched any more.
    Closed,
}

/// The kind of event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A push, a branch or tag deletion.
    Push,
    /// A pull request (GitLab: merge request).
    PullRequest {
        /// Its number (GitLab: the `iid`).
        number: u64,
        /// What happened.
        action: PrAction,
        /// The branch its head comes from (maybe in a fork).
        head_branch: String,
        /// The branch it targets.
        base_branch: String,
    },
}

/// How the ref moved, as the forge claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It points to `new` (a hint: fetch the ref to know).
    Updated {
        /// The claimed new tip.
        new: String,
        /// The claimed previous tip (`None` for a new ref).
        old: Option<String>,
    },
    /// It was deleted.
    Deleted {
        /// Its last tip, when the forge says.
        old: Option<String>,
    },
}

/// The repository a payload names (untrusted until matched against the
/// configured one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// `owner/name`, or GitLab's `path_with_namespace`.
    pub full_name: String,
    /// The clone URLs it gives, HTTP(S) first.
    pub clone_urls: Vec<String>,
    /// Its web page, when given.
    pub web_url: Option<String>,
    /// The forge's numeric id (GitLab's project id), when given.
    pub id: Option<u64>,
}

/// A verified webhook's hint: look at this ref of this repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// The forge.
    pub forge: ForgeKind,
    /// The delivery id, to recognise a repeated delivery.
    pub delivery: Option<String>,
    /// Push or pull request.
    pub event: Event,
    /// The repository it names.
    pub repository: Repository,
    /// The full ref: `refs/heads/x`, `refs/tags/v1`, `refs/pull/N/head`,
    /// `refs/merge-requests/N/head`.
    pub git_ref: String,
    /// How it moved.
    pub change: Change,
}

/// An authentic webhook that asks for nothing (answer it 2xx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The forge.
    pub forge: ForgeKind,
    /// The event header's value.
    pub event: String,
    /// The delivery id.
    pub delivery: Option<String>,
    /// Why nothing is to be done.
    pub reason: String,
}

/// What a verified webhook means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A ref to look at.
    Hint(Hint),
    /// Nothing to do.
    Ignored(Ignored),
}

/// Why a webhook's payload or headers cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No forge event header.
    #[error("not a forge webhook: no event header")]
    NotAWebhook,
    /// The body is not a JSON object.
    #[error("{forge} {event} payload is not a JSON object: {reason}")]
    NotJson {
        /// The forge.
        forge: ForgeKind,
        /// The event.
        event: String,
        /// What the JSON parser said.
        reason: String,
    },
    /// A field is missing or has the wrong type or form.
    #[error("{forge} {event} payload: `{field}` {problem}")]
    Field {
        /// The forge.
        forge: ForgeKind,
        /// The event.
        event: String,
        /// Its path, e.g. `repository.clone_url`.
        field: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The delivery id header is unusable.
    #[error("{forge} webhook: {header} {problem}")]
    Delivery {
        /// The forge.
        forge: ForgeKind,
        /// The header.
        header: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// A payload with the context its errors need.
struct Doc<'a> {
    forge: ForgeKind,
    event: &'a str,
    root: Value,
}

impl<'a> Doc<'a> {
    fn new(forge: ForgeKind, event: &'a str, body: &[u8]) -> Result<Self, ParseError> {
        let not_json = |reason: String| ParseError::NotJson {
            forge,
            event: event.to_owned(),
            reason,
        };
        match serde_json::from_slice(body) {
            Ok(root @ Value::Object(_)) => Ok(Doc { forge, event, root }),
            Ok(_) => Err(not_json("the top level is not an object".to_owned())),
            Err(err) => Err(not_json(err.to_string())),
        }
    }

    fn error(&self, field: &str, problem: &'static str) -> ParseError {
        ParseError::Field {
            forge: self.forge,
            event: self.event.to_owned(),
            field: field.to_owned(),
            problem,
        }
    }

    /// The value at a dotted path; `None` when absent or null.
    fn get(&self, path: &str) -> Option<&Value> {
        path.split('.')
            .try_fold(&self.root, |v, key| v.get(key))
            .filter(|v| !v.is_null())
    }

    fn opt_str(&self, path: &str) -> Result<Option<&str>, ParseError> {
        match self.get(path) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(path, "is not a string")),
        }
    }

    fn str(&self, path: &str) -> Result<&str, ParseError> {
        self.opt_str(path)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.error(path, "is missing"))
    }

    fn opt_u64(&self, path: &str) -> Result<Option<u64>, ParseError> {
        match self.get(path) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(path, "is not a whole number")),
        }
    }

    fn u64(&self, path: &str) -> Result<u64, ParseError> {
        self.opt_u64(path)?
            .ok_or_else(|| self.error(path, "is missing"))
    }

    /// A full commit id; the all-zero id (no commit) reads as `None`.
    fn sha(&self, path: &str) -> Result<Option<String>, ParseError> {
        let sha = self.str(path)?;
        if !(matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(self.error(path, "is not a commit id (40 or 64 hex digits)"));
        }
        Ok((!sha.bytes().all(|b| b == b'0')).then(|| sha.to_ascii_lowercase()))
    }

    fn opt_sha(&self, path: &str) -> Result<Option<String>, ParseError> {
        match self.get(path) {
            None => Ok(None),
            Some(_) => self.sha(path),
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn delivery(forge: ForgeKind, headers: &HeaderMap) -> Result<Option<String>, ParseError> {
    for &name in forge.delivery_headers() {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let bad = |problem| ParseError::Delivery {
            forge,
            header: name,
            problem,
        };
        let id = value.to_str().map_err(|_| bad("is not ASCII text"))?.trim();
        if id.is_empty() {
            return Err(bad("is empty"));
        }
        if id.len() > MAX_DELIVERY_ID_LEN {
            return Err(bad("is longer than 200 characters"));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("has spaces or control characters"));
        }
        return Ok(Some(id.to_owned()));
    }
    Ok(None)
}

/// The repository a payload names, read before its signature is checked
/// (to choose the secret), so it must not be acted upon.
pub(super) fn repository(
    forge: ForgeKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Repository, ParseError> {
    let event = header(headers, forge.event_header()).ok_or(ParseError::NotAWebhook)?;
    let doc = Doc::new(forge, event, body)?;
    match forge {
        ForgeKind::GitLab => gitlab_project(&doc),
        _ => github_style_repository(&doc),
    }
}

/// Reads a verified webhook.
pub(super) fn parse(
    forge: ForgeKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Parsed, ParseError> {
    let event = header(headers, forge.event_header()).ok_or(ParseError::NotAWebhook)?;
    let delivery = delivery(forge, headers)?;
    let ignored = |reason: String| {
        Ok(Parsed::Ignored(Ignored {
            forge,
            event: event.to_owned(),
            delivery: delivery.clone(),
            reason,
        }))
    };
    let known = match forge {
        ForgeKind::GitLab => matches!(event, "Push Hook" | "Tag Push Hook" | "Merge Request Hook"),
        _ => matches!(
            event,
            "push" | "pull_request" | "pull_request_sync" | "delete"
        ),
    };
    if !known {
        return ignored(match event {
            "ping" => "a ping: the webhook is set up".to_owned(),
            _ => format!("`{event}` events move no ref"),
        });
    }
    let doc = Doc::new(forge, event, body)?;
    let read = match (forge, event) {
        (ForgeKind::GitLab, "Merge Request Hook") => gitlab_merge_request(&doc)?,
        (ForgeKind::GitLab, _) => Some(gitlab_push(&doc)?),
        (_, "delete") => delete(&doc)?,
        (_, "push") => Some(github_style_push(&doc)?),
        _ => github_style_pull_request(&doc)?,
    };
    match read {
        Some((event, repository, git_ref, change)) => Ok(Parsed::Hint(Hint {
            forge,
            delivery,
            event,
            repository,
            git_ref,
            change,
        })),
        None => ignored(ignore_reason(&doc)),
    }
}

fn ignore_reason(doc: &Doc<'_>) -> String {
    let text = |path| doc.get(path).and_then(Value::as_str).unwrap_or("?");
    if doc.event == "delete" {
        return format!(
            "the deletion of a `{}`, not a branch or tag",
            text("ref_type")
        );
    }
    match doc
        .get("action")
        .map_or_else(|| text("object_attributes.action"), |_| text("action"))
    {
        "update" => "a merge request update without new commits (no `oldrev`)".to_owned(),
        other => format!("action `{other}` does not move the pull request's head"),
    }
}

type Read = (Event, Repository, String, Change);

fn change(new: Option<String>, old: Option<String>) -> Change {
    match new {
        Some(new) => Change::Updated { new, old },
        None => Change::Deleted { old },
    }
}

/// GitHub's, Gitea's and Forgejo's `repository` object.
fn github_style_repository(doc: &Doc<'_>) -> Result<Repository, ParseError> {
    let mut clone_urls = vec![doc.str("repository.clone_url")?.to_owned()];
    if let Some(ssh) = doc.opt_str("repository.ssh_url")? {
        clone_urls.push(ssh.to_owned());
    }
    Ok(Repository {
        full_name: doc.str("repository.full_name")?.to_owned(),
        clone_urls,
        web_url: doc.opt_str("repository.html_url")?.map(str::to_owned),
        id: doc.opt_u64("repository.id")?,
    })
}

fn github_style_push(doc: &Doc<'_>) -> Result<Read, ParseError> {
    let git_ref = doc.str("ref")?;
    if !git_ref.starts_with("refs/") {
        return Err(doc.error("ref", "is not a full ref (refs/…)"));
    }
    let old = doc.sha("before")?;
    let mut new = doc.sha("after")?;
    if doc.get("deleted").and_then(Value::as_bool) == Some(true) {
        new = None;
    }
    let repository = github_style_repository(doc)?;
    Ok((
        Event::Push,
        repository,
        git_ref.to_owned(),
        change(new, old),
    ))
}

/// A `delete` event (GitHub, Gitea, Forgejo): `ref` is the short name.
fn delete(doc: &Doc<'_>) -> Result<Option<Read>, ParseError> {
    let name = doc.str("ref")?;
    let prefix = match doc.str("ref_type")? {
        "branch" => "refs/heads/",
        "tag" => "refs/tags/",
        _ => return Ok(None),
    };
    let repository = github_style_repository(doc)?;
    Ok(Some((
        Event::Push,
        repository,
        format!("{prefix}{name}"),
        Change::Deleted { old: None },
    )))
}

fn pr_action(action: &str) -> Option<PrAction> {
    match action {
        "opened" | "open" => Some(PrAction::Opened),
        "synchronize" | "synchronized" => Some(PrAction::Synchronized),
        "reopened" | "reopen" => Some(PrAction::Reopened),
        "closed" | "close" | "merge" => Some(PrAction::Closed),
        _ => None,
    }
}

fn github_style_pull_request(doc: &Doc<'_>) -> Result<Option<Read>, ParseError> {
    let Some(action) = pr_action(doc.str("action")?) else {
        return Ok(None);
    };
    let number = doc.u64("number")?;
    let new = doc.sha("pull_request.head.sha")?;
    if new.is_none() {
        return Err(doc.error("pull_request.head.sha", "is the zero id"));
    }
    let event = Event::PullRequest {
        number,
        action,
        head_branch: doc.str("pull_request.head.ref")?.to_owned(),
        base_branch: doc.str("pull_request.base.ref")?.to_owned(),
    };
    let old = doc.opt_sha("before")?;
    let repository = github_style_repository(doc)?;
    Ok(Some((
        event,
        repository,
        format!("refs/pull/{number}/head"),
        change(new, old),
    )))
}

fn gitlab_project(doc: &Doc<'_>) -> Result<Repository, ParseError> {
    let mut clone_urls = vec![doc.str("project.git_http_url")?.to_owned()];
    if let Some(ssh) = doc.opt_str("project.git_ssh_url")? {
        clone_urls.push(ssh.to_owned());
    }
    Ok(Repository {
        full_name: doc.str("project.path_with_namespace")?.to_owned(),
        clone_urls,
        web_url: doc.opt_str("project.web_url")?.map(str::to_owned),
        id: doc.opt_u64("project.id")?,
    })
}

fn gitlab_push(doc: &Doc<'_>) -> Result<Read, ParseError> {
    let git_ref = doc.str("ref")?;
    if !git_ref.starts_with("refs/") {
        return Err(doc.error("ref", "is not a full ref (refs/…)"));
    }
    let old = doc.sha("before")?;
    let after = doc.sha("after")?;
    // For an annotated tag `after` is the tag object; `checkout_sha` is
    // the commit.
    let new = match after {
        Some(after) => Some(doc.opt_sha("checkout_sha")?.unwrap_or(after)),
        None => None,
    };
    let repository = gitlab_project(doc)?;
    Ok((
        Event::Push,
        repository,
        git_ref.to_owned(),
        change(new, old),
    ))
}

fn gitlab_merge_request(doc: &Doc<'_>) -> Result<Option<Read>, ParseError> {
    let old = doc.opt_sha("object_attributes.oldrev")?;
    // `update` also fires for a new title or label; only `oldrev` says
    // the head moved.
    let action = match (doc.str("object_attributes.action")?, &old) {
        ("update", Some(_)) => PrAction::Synchronized,
        ("update", None) => return Ok(None),
        (other, _) => match pr_action(other) {
            Some(action) => action,
            None => return Ok(None),
        },
    };
    let number = doc.u64("object_attributes.iid")?;
    let new = doc.sha("object_attributes.last_commit.id")?;
    if new.is_none() {
        return Err(doc.error("object_attributes.last_commit.id", "is the zero id"));
    }
    let event = Event::PullRequest {
        number,
        action,
        head_branch: doc.str("object_attributes.source_branch")?.to_owned(),
        base_branch: doc.str("object_attributes.target_branch")?.to_owned(),
    };
    let repository = gitlab_project(doc)?;
    Ok(Some((
        event,
        repository,
        format!("refs/merge-requests/{number}/head"),
        change(new, old),
    )))
}
