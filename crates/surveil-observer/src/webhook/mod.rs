//! Webhooks in, the pure part: given a request's raw body, its headers and
//! the repository's secret, say whether the request is authentic
//! ([`verify`]) and what it hints at ([`Verified::parse`]): a push or a
//! pull/merge request moving a ref, on GitHub, Gitea, Forgejo or GitLab.
//!
//! No IO, no clock, no state. The listener, the body size cap (see
//! [`MAX_BODY_BYTES`]), the durable record of delivery ids and the fetch
//! belong to the server that calls this. A [`Hint`] is never trusted for
//! what to build: the observer fetches the ref itself from its configured
//! URL, so a forged or replayed payload can at most make it look.
//!
//! **Invariant:** a payload is parsed only through [`Verified`], which only
//! [`verify`] and [`verify_with`] make, after the signature held.

mod payload;
mod verify;

pub use payload::{Change, Event, Hint, Ignored, ParseError, Parsed, PrAction, Repository};
pub use verify::{Secret, SignatureProblem, Verified, VerifyError, verify, verify_with};

use http::HeaderMap;

/// The largest body a webhook server should read (then answer 413).
/// GitHub caps its payloads at 25 MB; a push of many commits comes close,
/// and a smaller cap would refuse it, losing the hint.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;

/// The longest delivery id accepted (forges send 36-character UUIDs).
pub const MAX_DELIVERY_ID_LEN: usize = 200;

/// The forge a webhook came from, by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForgeKind {
    /// GitHub (`X-GitHub-Event`).
    GitHub,
    /// Gitea (`X-Gitea-Event`).
    Gitea,
    /// Forgejo (`X-Forgejo-Event`).
    Forgejo,
    /// GitLab (`X-Gitlab-Event`).
    GitLab,
}

impl std::fmt::Display for ForgeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForgeKind::GitHub => "GitHub",
            ForgeKind::Gitea => "Gitea",
            ForgeKind::Forgejo => "Forgejo",
            ForgeKind::GitLab => "GitLab",
        })
    }
}

impl ForgeKind {
    /// The header naming the event.
    pub fn event_header(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "x-github-event",
            ForgeKind::Gitea => "x-gitea-event",
            ForgeKind::Forgejo => "x-forgejo-event",
            ForgeKind::GitLab => "x-gitlab-event",
        }
    }

    /// The header carrying the signature (GitLab: the secret itself).
    pub fn signature_header(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "x-hub-signature-256",
            ForgeKind::Gitea => "x-gitea-signature",
            ForgeKind::Forgejo => "x-forgejo-signature",
            ForgeKind::GitLab => "x-gitlab-token",
        }
    }

    /// The headers carrying the delivery id, first found wins (GitLab's
    /// `Idempotency-Key` stays the same when a delivery is retried).
    pub fn delivery_headers(self) -> &'static [&'static str] {
        match self {
            ForgeKind::GitHub => &["x-github-delivery"],
            ForgeKind::Gitea => &["x-gitea-delivery"],
            ForgeKind::Forgejo => &["x-forgejo-delivery"],
            ForgeKind::GitLab => &["idempotency-key", "x-gitlab-event-uuid"],
        }
    }
}

/// The forge whose event header the request carries. Gitea sends GitHub's
/// and Gogs' headers too, and Forgejo sends Gitea's, so the most specific
/// wins: Forgejo, then Gitea, then GitLab, then GitHub.
pub fn detect(headers: &HeaderMap) -> Option<ForgeKind> {
    [
        ForgeKind::Forgejo,
        ForgeKind::Gitea,
        ForgeKind::GitLab,
        ForgeKind::GitHub,
    ]
    .into_iter()
    .find(|kind| headers.contains_key(kind.event_header()))
}

#[cfg(test)]
mod tests;
