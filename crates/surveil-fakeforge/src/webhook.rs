//! Webhooks as the forges send them: payloads shaped as each forge
//! documents them (the fields a CI reads are exact, the rest is
//! representative), the headers, the signature (right, wrong or missing),
//! and the HTTP POST. It keeps no state: the forge records deliveries.

use std::time::{Duration, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

pub use crate::client::SendError;
use crate::model::{ForgeKind, Repo, rfc3339};

/// The sha a push names as `before` for a new branch, or `after` for a
/// deleted one.
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// The most of a receiver's answer kept in a [`Delivery`].
const MAX_RESPONSE_KEPT: usize = 64 * 1024;

/// What happened to a pull (merge) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrAction {
    /// Opened (GitLab `open`).
    Opened,
    /// New commits on its head (GitHub `synchronize`, Gitea
    /// `synchronized`, GitLab `update` with `oldrev`).
    Synchronized,
    /// Reopened.
    Reopened,
    /// Closed without merging.
    Closed,
}

/// Which signature a webhook carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signature {
    /// Computed with the webhook's secret (GitLab: the secret itself).
    #[default]
    Valid,
    /// Computed with another secret (GitLab: another token).
    Wrong,
    /// No signature header at all.
    Missing,
}

/// The event a webhook reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEvent {
    /// A push to a branch or tag.
    Push {
        /// `refs/heads/…` or `refs/tags/…`.
        git_ref: String,
        /// The previous tip (zeros for a new ref).
        before: String,
        /// The new tip.
        after: String,
        /// The pushed commits, oldest first.
        commits: Vec<String>,
    },
    /// A pull request (GitLab: merge request) event.
    PullRequest {
        /// What happened.
        action: PrAction,
        /// Its number (GitLab: `iid`).
        number: u64,
        /// The head branch.
        head_ref: String,
        /// The head commit.
        head_sha: String,
        /// The base (target) branch.
        base_ref: String,
        /// The base commit.
        base_sha: String,
        /// The previous head, for a synchronize.
        before: Option<String>,
        /// The fork the head lives in (default: the repository itself).
        head_repo: Option<Box<Repo>>,
    },
    /// A branch deleted (GitHub and GitLab: a push to zeros; Gitea and
    /// Forgejo: a `delete` event).
    DeleteBranch {
        /// The branch name.
        branch: String,
        /// Its last tip.
        before: String,
    },
    /// Any other event, by name, with its body.
    Other {
        /// The event header's value.
        name: String,
        /// The payload.
        body: Value,
    },
}

/// One webhook, ready to render or send. The delivery id is drawn when it
/// is built, so sending the same value twice is a replay.
#[derive(Debug, Clone)]
pub struct Webhook {
    repo: Repo,
    event: HookEvent,
    secret: String,
    signature: Signature,
    delivery_id: String,
    at: SystemTime,
}

/// A rendered webhook: what goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Header names (lower case) and values, in sending order.
    pub headers: Vec<(String, String)>,
    /// The raw JSON body the signature covers.
    pub body: Vec<u8>,
}

impl Rendered {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The headers as an [`http::HeaderMap`], as a server sees them.
    pub fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                map.append(name, value);
            }
        }
        map
    }
}

/// A random RFC 4122 version-4 UUID, as forges use for delivery ids.
pub fn new_uuid() -> String {
    let n =
        (rand::random::<u128>() & !(0xf000 << 64) | (0x4000 << 64)) & !(0xc << 60) | (0x8 << 60);
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The lower-case hex HMAC-SHA256 of `body` under `secret`, as GitHub
/// (after `sha256=`), Gitea and Forgejo send it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn full_ref(branch: &str) -> String {
    if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    }
}

impl Webhook {
    fn new(repo: &Repo, event: HookEvent) -> Self {
        Webhook {
            repo: repo.clone(),
            event,
            secret: String::new(),
            signature: Signature::Valid,
            delivery_id: new_uuid(),
            at: SystemTime::now(),
        }
    }

    /// A push moving `branch` (or a full `refs/…` name) from `before` to
    /// `after`, reporting `after` as the only new commit.
    pub fn push(repo: &Repo, branch: &str, before: &str, after: &str) -> Self {
        Webhook::new(
            repo,
            HookEvent::Push {
                git_ref: full_ref(branch),
                before: before.to_owned(),
                after: after.to_owned(),
                commits: vec![after.to_owned()],
            },
        )
    }

    /// A pull request event; give [`before`](Self::before) for a
    /// synchronize (GitLab sends `oldrev` only then).
    pub fn pull_request(
        repo: &Repo,
        action: PrAction,
        number: u64,
        (head_ref, head_sha): (&str, &str),
        (base_ref, base_sha): (&str, &str),
    ) -> Self {
        Webhook::new(
            repo,
            HookEvent::PullRequest {
                action,
                number,
                head_ref: head_ref.to_owned(),
                head_sha: head_sha.to_owned(),
                base_ref: base_ref.to_owned(),
                base_sha: base_sha.to_owned(),
                before: None,
                head_repo: None,
            },
        )
    }

    /// A branch deletion, in the form the forge sends it.
    pub fn delete_branch(repo: &Repo, branch: &str, before: &str) -> Self {
        Webhook::new(
            repo,
            HookEvent::DeleteBranch {
                branch: branch.to_owned(),
                before: before.to_owned(),
            },
        )
    }

    /// GitHub's `ping`, sent when a webhook is created.
    pub fn ping(repo: &Repo) -> Self {
        let body = json!({
            "zen": "Keep it logically awesome.",
            "hook_id": 1,
            "hook": {"type": "Repository", "id": 1, "active": true, "events": ["push", "pull_request"],
                     "config": {"content_type": "json", "insecure_ssl": "0", "url": "http://127.0.0.1/"}},
            "repository": github_repo(repo),
            "sender": github_user(),
        });
        Webhook::new(
            repo,
            HookEvent::Other {
                name: "ping".to_owned(),
                body,
            },
        )
    }

    /// Any event by name with its body (for events a receiver ignores).
    pub fn other(repo: &Repo, name: &str, body: Value) -> Self {
        Webhook::new(
            repo,
            HookEvent::Other {
                name: name.to_owned(),
                body,
            },
        )
    }

    /// The secret configured on the forge's webhook.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// Sends a right, wrong or no signature.
    pub fn signature(mut self, signature: Signature) -> Self {
        self.signature = signature;
        self
    }

    /// Uses this delivery id (to replay an earlier delivery).
    pub fn delivery_id(mut self, id: impl Into<String>) -> Self {
        self.delivery_id = id.into();
        self
    }

    /// Draws a fresh delivery id (the same event, delivered anew).
    pub fn new_delivery(mut self) -> Self {
        self.delivery_id = new_uuid();
        self
    }

    /// The payload names `other` instead of the repository the hook
    /// belongs to (its headers and secret stay the same).
    pub fn naming(mut self, other: &Repo) -> Self {
        self.repo = Repo {
            kind: self.repo.kind,
            ..other.clone()
        };
        self
    }

    /// The pushed commits, oldest first (a push only).
    pub fn commits<I: IntoIterator<Item = S>, S: Into<String>>(mut self, list: I) -> Self {
        if let HookEvent::Push { commits, .. } = &mut self.event {
            *commits = list.into_iter().map(Into::into).collect();
        }
        self
    }

    /// The previous head of a synchronized pull request.
    pub fn before(mut self, sha: &str) -> Self {
        if let HookEvent::PullRequest { before, .. } = &mut self.event {
            *before = Some(sha.to_owned());
        }
        self
    }

    /// The pull request's head lives in the fork `fork`.
    pub fn from_fork(mut self, fork: &Repo) -> Self {
        if let HookEvent::PullRequest { head_repo, .. } = &mut self.event {
            *head_repo = Some(Box::new(fork.clone()));
        }
        self
    }

    /// The delivery id.
    pub fn id(&self) -> &str {
        &self.delivery_id
    }

    /// Which signature it carries.
    pub fn signature_kind(&self) -> Signature {
        self.signature
    }

    /// The forge sending it.
    pub fn kind(&self) -> ForgeKind {
        self.repo.kind
    }

    /// The event header's value (`push`, `pull_request`, `Push Hook`…).
    pub fn event_name(&self) -> String {
        let kind = self.repo.kind;
        match (&self.event, kind) {
            (HookEvent::Other { name, .. }, _) => name.clone(),
            (HookEvent::Push { git_ref, .. }, ForgeKind::GitLab)
                if git_ref.starts_with("refs/tags/") =>
            {
                "Tag Push Hook".to_owned()
            }
            (HookEvent::Push { .. } | HookEvent::DeleteBranch { .. }, ForgeKind::GitLab) => {
                "Push Hook".to_owned()
            }
            (HookEvent::PullRequest { .. }, ForgeKind::GitLab) => "Merge Request Hook".to_owned(),
            (HookEvent::DeleteBranch { .. }, ForgeKind::Gitea | ForgeKind::Forgejo) => {
                "delete".to_owned()
            }
            (HookEvent::Push { .. } | HookEvent::DeleteBranch { .. }, _) => "push".to_owned(),
            (HookEvent::PullRequest { .. }, _) => "pull_request".to_owned(),
        }
    }

    /// The body and headers as the forge would send them.
    pub fn render(&self) -> Rendered {
        let body = crate::payload::body(&self.repo, &self.event, self.at);
        let body = serde_json::to_vec(&body).expect("JSON values serialise");
        let headers = self.headers(&body);
        Rendered { headers, body }
    }

    fn headers(&self, body: &[u8]) -> Vec<(String, String)> {
        let id = self.delivery_id.clone();
        let event = self.event_name();
        let signature = match self.signature {
            Signature::Valid => Some(sign(self.secret.as_bytes(), body)),
            Signature::Wrong => Some(sign(format!("not-{}", self.secret).as_bytes(), body)),
            Signature::Missing => None,
        };
        let mut h: Vec<(String, String)> = vec![("content-type".into(), "application/json".into())];
        let mut add = |name: &str, value: String| h.push((name.to_owned(), value));
        match self.repo.kind {
            ForgeKind::GitHub => {
                add("user-agent", "GitHub-Hookshot/fake".into());
                add("x-github-event", event);
                add("x-github-delivery", id);
                add("x-github-hook-id", "1".into());
                add(
                    "x-github-hook-installation-target-type",
                    "repository".into(),
                );
                add(
                    "x-github-hook-installation-target-id",
                    self.repo.id.to_string(),
                );
                if let Some(sig) = signature {
                    add("x-hub-signature-256", format!("sha256={sig}"));
                }
            }
            ForgeKind::Gitea | ForgeKind::Forgejo => {
                add("user-agent", "Go-http-client/1.1".into());
                let event_type = match &self.event {
                    HookEvent::PullRequest {
                        action: PrAction::Synchronized,
                        ..
                    } => "pull_request_sync".to_owned(),
                    _ => event.clone(),
                };
                // Gitea sends its own, Gogs' and GitHub's headers; Forgejo
                // adds its own on top.
                let mut families = vec!["gitea", "gogs"];
                if self.repo.kind == ForgeKind::Forgejo {
                    families.insert(0, "forgejo");
                }
                for family in families {
                    add(&format!("x-{family}-event"), event.clone());
                    add(&format!("x-{family}-event-type"), event_type.clone());
                    add(&format!("x-{family}-delivery"), id.clone());
                    if let Some(sig) = &signature {
                        add(&format!("x-{family}-signature"), sig.clone());
                    }
                }
                add("x-github-event", event);
                add("x-github-event-type", event_type);
                add("x-github-delivery", id);
                if let Some(sig) = signature {
                    add("x-hub-signature-256", format!("sha256={sig}"));
                }
            }
            ForgeKind::GitLab => {
                add("user-agent", "GitLab/17.0.0".into());
                add("x-gitlab-event", event);
                add("x-gitlab-instance", "http://127.0.0.1".into());
                add(
                    "x-gitlab-webhook-uuid",
                    "5bd7ab2c-0000-4000-8000-000000000001".into(),
                );
                add("x-gitlab-event-uuid", id.clone());
                add("idempotency-key", id);
                match self.signature {
                    Signature::Valid => add("x-gitlab-token", self.secret.clone()),
                    Signature::Wrong => add("x-gitlab-token", format!("not-{}", self.secret)),
                    Signature::Missing => {}
                }
            }
        }
        h
    }
}

pub(crate) fn github_user() -> Value {
    json!({"login": "octo-dev", "id": 7, "type": "User", "site_admin": false})
}

pub(crate) fn github_repo(repo: &Repo) -> Value {
    json!({
        "id": repo.id,
        "node_id": format!("R_{}", repo.id),
        "name": repo.name(),
        "full_name": repo.path,
        "private": false,
        "owner": {"login": repo.owner(), "name": repo.owner(), "id": 2, "type": "Organization"},
        "html_url": repo.web_url,
        "description": "a repository on the fake forge",
        "fork": false,
        "url": repo.web_url,
        "clone_url": repo.clone_url,
        "git_url": repo.clone_url.replacen("http", "git", 1),
        "ssh_url": repo.ssh_url,
        "default_branch": repo.default_branch,
        "visibility": "public",
    })
}

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The delivery id sent.
    pub id: String,
    /// The forge that sent it.
    pub forge: ForgeKind,
    /// The event header's value.
    pub event: String,
    /// Where it was sent.
    pub url: String,
    /// Which signature it carried.
    pub signature: Signature,
    /// When it was sent.
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// The receiver's status code (`None`: no answer).
    pub status: Option<u16>,
    /// The receiver's answer body (truncated to 64 KiB).
    pub response: String,
    /// Why there was no answer.
    pub error: Option<String>,
}

/// POSTs a rendered webhook and reads the answer: `(status, body)`.
pub async fn post(
    url: &str,
    rendered: &Rendered,
    timeout: Duration,
) -> Result<(u16, String), SendError> {
    let answer = crate::client::request(
        "POST",
        url,
        &rendered.headers,
        rendered.body.clone(),
        timeout,
    )
    .await?;
    let kept = &answer.body[..answer.body.len().min(MAX_RESPONSE_KEPT)];
    Ok((answer.status, String::from_utf8_lossy(kept).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_rfc_4231_test_case_2() {
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn uuids_are_version_4() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, new_uuid());
    }
}
