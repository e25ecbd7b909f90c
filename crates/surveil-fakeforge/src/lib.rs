//! A fake forge for tests: GitHub, Gitea/Forgejo and GitLab commit-status
//! APIs on 127.0.0.1, a record of every call, faults on demand, and signed
//! webhooks sent to a URL. Test-only; never shipped.
//!
//! # What it emulates
//!
//! - **Statuses in**, with each API's paths, auth headers, bodies, states,
//!   limits and answers as their documentation gives them:
//!   - GitHub `POST /repos/{owner}/{repo}/statuses/{sha}` at the root (as
//!     `api.github.com`): `Authorization: Bearer …` or `token …`, a
//!     `User-Agent` (403 without), an `Accept` that allows JSON (415
//!     otherwise); states `error failure pending success`; description at
//!     most 140 characters; 1000 statuses per (sha, context); 422 for a
//!     bad body or unknown commit.
//!   - Gitea and Forgejo `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`:
//!     `Authorization: token …` or `Bearer …`; states `pending success
//!     error failure warning`; the answer's state field is `status`.
//!   - GitLab `POST /api/v4/projects/{id}/statuses/{sha}` (`{id}` numeric
//!     or the URL-encoded path): `PRIVATE-TOKEN` or `Authorization: Bearer`;
//!     fields from the query, a form or JSON; states `pending running
//!     success failed canceled skipped`; `name` (else `context`, default
//!     `default`) and `ref` at most 255 characters; and GitLab's state
//!     machine: a repeated `pending`, or `pending` after `running`, is
//!     `400 Cannot transition status via :enqueue from :…`.
//!   - 201 with the documented body on success; 401 (no or unknown token),
//!     403 (a token without write access), 404 (unknown repository), 400 or
//!     422 (bad body) otherwise.
//! - **A record of every call** ([`Call`]): forge, repository, sha, state,
//!   context, target URL, description, auth outcome, headers a client must
//!   send, injected fault, answer, in arrival order.
//! - **Faults** ([`Fault`], [`Scope`]): 5xx, 429 with `Retry-After`, or a
//!   request held unanswered, for the next N calls or for a time; and
//!   [`down_for`](FakeForge::down_for): the port closed (connections
//!   refused, open ones dropped), then listening again on the same port.
//! - **Webhooks out** ([`Webhook`]): GitHub `push`, `pull_request`, `ping`;
//!   Gitea and Forgejo `push`, `pull_request`, `delete`; GitLab `Push
//!   Hook`, `Tag Push Hook`, `Merge Request Hook`; with each forge's headers
//!   (delivery id, `X-Hub-Signature-256`, `X-Gitea-Signature` /
//!   `X-Forgejo-Signature`, `X-Gitlab-Token`), and options for a wrong or
//!   missing signature, a replayed delivery id, a payload naming another
//!   repository.
//!
//! # What it does not
//!
//! No git hosting (point a repository's clone URL at a real git server),
//! no TLS (tests reach it over plain HTTP on loopback), no listing of
//! statuses, no checks API, no pagination or rate-limit headers beyond a
//! 429's, no SHA-1 `X-Hub-Signature`, no webhook retries of its own. Error
//! messages follow the forges' where known and are otherwise its own.
//!
//! # Layout
//!
//! - [`model`]: forge kinds, repositories and tokens, validation, the call
//!   record, the fault plan; pure.
//! - `api`: the axum routes of the three APIs.
//! - `server`: the accept loop and the down mode.
//! - [`webhook`] and `payload`: rendering, signing and sending webhooks.
//! - [`client`]: a bare HTTP/1.1 client (webhooks; tests' status calls).
//! - `control`: a JSON API under `/_fakeforge/` so a test driving the
//!   `surveil-fakeforge` binary (e.g. `cargo xtask e2e`) can do all of the
//!   above from another process.
//!
//! # The binary
//!
//! `surveil-fakeforge [--listen 127.0.0.1:0] [--repo KIND:PATH[=CLONE_URL]]…
//! [--token-file F] [--url-file F]` prints `surveil-fakeforge listening on
//! http://127.0.0.1:PORT` once serving and exits 0 on SIGTERM. Its control
//! API: `GET|DELETE /_fakeforge/calls`, `GET /_fakeforge/deliveries`,
//! `GET|POST /_fakeforge/repos` (`{"kind", "path", "write_tokens",
//! "read_tokens", "clone_url"}`), `POST|DELETE /_fakeforge/faults`
//! (`{"fault": {"kind": "status", "code": 500} | {"kind": "rate_limited",
//! "retry_after": "3s"} | {"kind": "hang"}, "calls": N}` or `"for": "30s"`),
//! `POST /_fakeforge/down` (`{"for": "30s"}`), and `POST
//! /_fakeforge/webhooks` (`{"url", "kind", "repo", "secret", "event":
//! "push" | "pull_request" | "delete" | "ping", "branch", "before",
//! "after", "action", "number", "head_ref", "head_sha", "base_ref",
//! "base_sha", "signature": "valid" | "wrong" | "missing", "delivery_id",
//! "naming"}`), answering the [`Delivery`].

mod api;
pub mod client;
mod control;
pub mod model;
mod payload;
mod server;
pub mod webhook;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use crate::api::HANG_CAP;
pub use crate::model::{Auth, Call, Fault, ForgeKind, Repo, RepoSpec, Scope, is_full_sha};
pub use crate::webhook::{
    Delivery, HookEvent, PrAction, Rendered, SendError, Signature, Webhook, ZERO_SHA, sign,
};

use crate::server::Availability;

/// How long a webhook POST may take before it is recorded as unanswered.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the forge remembers.
#[derive(Debug, Default)]
pub(crate) struct ForgeState {
    pub(crate) registry: model::Registry,
    pub(crate) calls: Vec<Call>,
    pub(crate) faults: model::FaultPlan,
    pub(crate) ledger: model::Ledger,
    pub(crate) deliveries: Vec<Delivery>,
}

/// What the routes and the handle share.
pub(crate) struct Shared {
    pub(crate) base_url: String,
    pub(crate) state: Mutex<ForgeState>,
    /// Woken after every call, for [`FakeForge::wait_for`].
    pub(crate) changed: Notify,
    pub(crate) availability: watch::Sender<Availability>,
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ForgeState> {
        self.state.lock().expect("fake forge state")
    }

    pub(crate) fn add_repo(&self, spec: RepoSpec) -> Repo {
        self.lock().registry.add(spec, &self.base_url)
    }

    pub(crate) fn inject(&self, fault: Fault, scope: Scope) {
        self.lock().faults.push(fault, scope);
    }

    pub(crate) fn down(&self, until: Option<Instant>) {
        self.availability.send_replace(Availability::Down(until));
    }

    pub(crate) async fn send(&self, url: &str, hook: &Webhook) -> Delivery {
        let rendered = hook.render();
        let at = std::time::SystemTime::now();
        let outcome = webhook::post(url, &rendered, WEBHOOK_TIMEOUT).await;
        let (status, response, error) = match outcome {
            Ok((status, body)) => (Some(status), body, None),
            Err(err) => (None, String::new(), Some(err.to_string())),
        };
        let delivery = Delivery {
            id: hook.id().to_owned(),
            forge: hook.kind(),
            event: hook.event_name(),
            url: url.to_owned(),
            signature: hook.signature_kind(),
            at,
            status,
            response,
            error,
        };
        self.lock().deliveries.push(delivery.clone());
        delivery
    }
}

/// A running fake forge; dropping it stops it.
pub struct FakeForge {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for FakeForge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeForge")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeForge {
    /// Starts a forge on 127.0.0.1 and a free port.
    pub async fn start() -> io::Result<Self> {
        FakeForge::bind("127.0.0.1:0").await
    }

    /// Starts a forge on `addr` (`host:port`).
    pub async fn bind(addr: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (availability, receiver) = watch::channel(Availability::Up);
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            state: Mutex::new(ForgeState::default()),
            changed: Notify::new(),
            availability,
            shutdown: CancellationToken::new(),
        });
        let router = api::routes()
            .merge(control::routes())
            .with_state(shared.clone());
        tokio::spawn(server::serve(
            listener,
            router,
            receiver,
            shared.shutdown.clone(),
        ));
        Ok(FakeForge { shared, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// The API base URL a client of `kind` is configured with: the root
    /// for GitHub, `/api/v1` for Gitea and Forgejo, `/api/v4` for GitLab.
    pub fn api_url(&self, kind: ForgeKind) -> String {
        match kind {
            ForgeKind::GitHub => self.shared.base_url.clone(),
            ForgeKind::Gitea | ForgeKind::Forgejo => format!("{}/api/v1", self.shared.base_url),
            ForgeKind::GitLab => format!("{}/api/v4", self.shared.base_url),
        }
    }

    /// Registers a repository (replacing one of the same API and path).
    pub fn add_repo(&self, spec: RepoSpec) -> Repo {
        self.shared.add_repo(spec)
    }

    /// Every registered repository.
    pub fn repos(&self) -> Vec<Repo> {
        self.shared.lock().registry.repos()
    }

    /// Every status call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The statuses the forge created (201), in arrival order.
    pub fn statuses(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::accepted).collect()
    }

    /// Forgets recorded calls and deliveries (repositories, statuses'
    /// bookkeeping and faults stay).
    pub fn clear_records(&self) {
        let mut state = self.shared.lock();
        state.calls.clear();
        state.deliveries.clear();
    }

    /// Waits until `done(calls)` holds, at most `timeout`; `Err` carries
    /// the calls seen when time ran out.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Call]) -> bool,
    ) -> Result<Vec<Call>, Vec<Call>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            let calls = self.calls();
            if done(&calls) {
                return Ok(calls);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.calls());
            }
        }
    }

    /// Injects `fault` into status calls while `scope` lasts (after any
    /// fault injected earlier runs out).
    pub fn inject(&self, fault: Fault, scope: Scope) {
        self.shared.inject(fault, scope);
    }

    /// `fault` for the next `calls` status calls.
    pub fn fail_next(&self, calls: u32, fault: Fault) {
        self.inject(fault, Scope::Calls(calls));
    }

    /// `fault` for every status call during `duration` from now.
    pub fn fail_for(&self, duration: Duration, fault: Fault) {
        self.inject(fault, Scope::Until(Instant::now() + duration));
    }

    /// Drops every injected fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Closes the port (connections refused, open ones dropped) for
    /// `duration`, then listens again on the same port.
    pub fn down_for(&self, duration: Duration) {
        self.shared.down(Some(Instant::now() + duration));
    }

    /// Closes the port until [`up`](Self::up).
    pub fn down(&self) {
        self.shared.down(None);
    }

    /// Listens again after [`down`](Self::down) or [`down_for`](Self::down_for).
    pub fn up(&self) {
        self.shared.availability.send_replace(Availability::Up);
    }

    /// Sends `hook` to `url` (plain `http://`) and records the delivery.
    pub async fn send(&self, url: &str, hook: &Webhook) -> Delivery {
        self.shared.send(url, hook).await
    }

    /// Every webhook delivery so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.clone()
    }
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}
