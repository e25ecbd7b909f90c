//! The fake forge's pure model: the forge kinds, the repositories and
//! tokens it knows, what each forge's status API accepts and answers, the
//! record of every call, and the fault plan. No IO, no sockets, and no clock
//! reads: callers pass `now`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A forge whose status API and webhooks are emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    /// GitHub (REST v3; the API at the root, as `api.github.com`).
    GitHub,
    /// Gitea (`/api/v1`).
    Gitea,
    /// Forgejo: Gitea's API (`/api/v1`), its own webhook headers.
    Forgejo,
    /// GitLab (`/api/v4`).
    GitLab,
}

impl ForgeKind {
    /// Every kind, for tests that run one story per forge.
    pub const ALL: [ForgeKind; 4] = [
        ForgeKind::GitHub,
        ForgeKind::Gitea,
        ForgeKind::Forgejo,
        ForgeKind::GitLab,
    ];

    /// The API family serving this kind's statuses.
    pub fn api(self) -> Api {
        match self {
            ForgeKind::GitHub => Api::GitHub,
            ForgeKind::Gitea | ForgeKind::Forgejo => Api::Gitea,
            ForgeKind::GitLab => Api::GitLab,
        }
    }

    /// The lower-case name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "github",
            ForgeKind::Gitea => "gitea",
            ForgeKind::Forgejo => "forgejo",
            ForgeKind::GitLab => "gitlab",
        }
    }
}

impl fmt::Display for ForgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ForgeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ForgeKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown forge `{s}` (github, gitea, forgejo or gitlab)"))
    }
}

/// The three status APIs (Gitea and Forgejo share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /repos/{owner}/{repo}/statuses/{sha}`.
    GitHub,
    /// `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`.
    Gitea,
    /// `POST /api/v4/projects/{id}/statuses/{sha}`.
    GitLab,
}

/// GitHub's documentation link, sent in its error bodies.
const GITHUB_DOC: &str = "https://docs.github.com/rest/commits/statuses#create-a-commit-status";
/// GitHub refuses a longer description with 422.
pub const GITHUB_MAX_DESCRIPTION: usize = 140;
/// GitHub keeps at most this many statuses per (sha, context).
pub const GITHUB_MAX_STATUSES_PER_CONTEXT: u32 = 1000;
/// GitLab's limit on `name` and `ref`.
pub const GITLAB_MAX_NAME: usize = 255;
/// The user every accepted status is attributed to.
pub const BOT_LOGIN: &str = "surveil-bot";

/// The states each API accepts, as its documentation lists them.
pub fn valid_states(api: Api) -> &'static [&'static str] {
    match api {
        Api::GitHub => &["error", "failure", "pending", "success"],
        Api::Gitea => &["pending", "success", "error", "failure", "warning"],
        Api::GitLab => &[
            "pending", "running", "success", "failed", "canceled", "skipped",
        ],
    }
}

/// A repository the fake forge knows. Built from a [`RepoSpec`] by
/// [`FakeForge::add_repo`](crate::FakeForge::add_repo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    /// Which forge hosts it.
    pub kind: ForgeKind,
    /// `owner/name` (GitHub, Gitea, Forgejo) or the GitLab
    /// `path_with_namespace` (`group/sub/project`).
    pub path: String,
    /// The numeric id (the GitLab project id; also in every payload).
    pub id: u64,
    /// The HTTP(S) clone URL payloads carry.
    pub clone_url: String,
    /// The SSH clone URL payloads carry.
    pub ssh_url: String,
    /// The repository's web page.
    pub web_url: String,
    /// The default branch.
    pub default_branch: String,
}

impl Repo {
    /// The owner (namespace) part of the path.
    pub fn owner(&self) -> &str {
        self.path.rsplit_once('/').map_or("", |(owner, _)| owner)
    }

    /// The last part of the path.
    pub fn name(&self) -> &str {
        self.path
            .rsplit_once('/')
            .map_or(self.path.as_str(), |(_, name)| name)
    }
}

/// What to register: a repository, its tokens and, optionally, the only
/// commits it has.
#[derive(Debug, Clone)]
pub struct RepoSpec {
    pub(crate) kind: ForgeKind,
    pub(crate) path: String,
    pub(crate) write_tokens: Vec<String>,
    pub(crate) read_tokens: Vec<String>,
    pub(crate) clone_url: Option<String>,
    pub(crate) commits: Option<Vec<String>>,
}

impl RepoSpec {
    /// A repository `path` (`owner/name`, or a GitLab group path) on `kind`.
    pub fn new(kind: ForgeKind, path: impl Into<String>) -> Self {
        RepoSpec {
            kind,
            path: path.into(),
            write_tokens: Vec::new(),
            read_tokens: Vec::new(),
            clone_url: None,
            commits: None,
        }
    }

    /// A token allowed to create statuses here.
    pub fn write_token(mut self, token: impl Into<String>) -> Self {
        self.write_tokens.push(token.into());
        self
    }

    /// A token that authenticates but may not create statuses here (403).
    pub fn read_token(mut self, token: impl Into<String>) -> Self {
        self.read_tokens.push(token.into());
        self
    }

    /// The clone URL webhook payloads name (default: a URL on the forge).
    pub fn clone_url(mut self, url: impl Into<String>) -> Self {
        self.clone_url = Some(url.into());
        self
    }

    /// Restricts the commits statuses may name; any other sha is refused
    /// as the forge refuses an unknown commit. Default: any well-formed sha.
    pub fn known_commits<I, S>(mut self, commits: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.commits = Some(commits.into_iter().map(Into::into).collect());
        self
    }
}

/// A registered repository with its access lists.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) repo: Repo,
    write_tokens: Vec<String>,
    read_tokens: Vec<String>,
    commits: Option<Vec<String>>,
}

/// Every repository the forge serves.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Vec<Entry>,
    /// Ids are never reused, even when a repository is registered again.
    issued: u64,
}

impl Registry {
    pub(crate) fn add(&mut self, spec: RepoSpec, base_url: &str) -> Repo {
        let id = 1000 + self.issued;
        self.issued += 1;
        let web_url = format!("{base_url}/{}", spec.path);
        let repo = Repo {
            kind: spec.kind,
            clone_url: spec.clone_url.unwrap_or_else(|| format!("{web_url}.git")),
            ssh_url: format!("ssh://git@127.0.0.1/{}.git", spec.path),
            web_url,
            path: spec.path,
            id,
            default_branch: "main".to_owned(),
        };
        self.entries
            .retain(|e| !same_repo(&e.repo, repo.kind, &repo.path));
        self.entries.push(Entry {
            repo: repo.clone(),
            write_tokens: spec.write_tokens,
            read_tokens: spec.read_tokens,
            commits: spec.commits,
        });
        repo
    }

    /// The repository an API path names: `owner/name` for GitHub and
    /// Gitea, a project id or path for GitLab.
    pub(crate) fn find(&self, api: Api, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| {
            e.repo.kind.api() == api
                && (e.repo.path.eq_ignore_ascii_case(key)
                    || (api == Api::GitLab && key.parse() == Ok(e.repo.id)))
        })
    }

    pub(crate) fn repos(&self) -> Vec<Repo> {
        self.entries.iter().map(|e| e.repo.clone()).collect()
    }

    /// Whether any repository of this API knows the token.
    fn knows(&self, api: Api, token: &str) -> bool {
        self.entries.iter().any(|e| {
            e.repo.kind.api() == api
                && (e.write_tokens.iter().any(|t| t == token)
                    || e.read_tokens.iter().any(|t| t == token))
        })
    }
}

fn same_repo(repo: &Repo, kind: ForgeKind, path: &str) -> bool {
    repo.kind.api() == kind.api() && repo.path.eq_ignore_ascii_case(path)
}

/// How a call's credentials fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// A token allowed to write statuses on this repository.
    Ok,
    /// No credentials in the headers this API reads.
    Missing,
    /// A token this forge does not know.
    Unknown,
    /// A known token without write access here.
    Forbidden,
}

/// The token a request carries, in the headers and schemes the API reads
/// (`None` for none, or one in a scheme the API does not take).
pub(crate) fn token_of(
    api: Api,
    authorization: Option<&str>,
    private_token: Option<&str>,
) -> Option<String> {
    if api == Api::GitLab
        && let Some(token) = private_token.map(str::trim).filter(|t| !t.is_empty())
    {
        return Some(token.to_owned());
    }
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let scheme_ok = match api {
        Api::GitHub | Api::Gitea => {
            scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")
        }
        Api::GitLab => scheme.eq_ignore_ascii_case("bearer"),
    };
    let token = token.trim();
    (scheme_ok && !token.is_empty()).then(|| token.to_owned())
}

/// Judges a token against a repository (`None`: the repository is unknown,
/// so only "known at all" can be said).
pub(crate) fn judge(
    registry: &Registry,
    api: Api,
    entry: Option<&Entry>,
    token: Option<&str>,
) -> Auth {
    let Some(token) = token else {
        return Auth::Missing;
    };
    if !registry.knows(api, token) {
        return Auth::Unknown;
    }
    match entry {
        Some(e) if e.write_tokens.iter().any(|t| t == token) => Auth::Ok,
        Some(_) => Auth::Forbidden,
        None => Auth::Ok,
    }
}

/// A status creation request, every API's fields in one shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StatusRequest {
    pub(crate) state: Option<String>,
    pub(crate) target_url: Option<String>,
    pub(crate) description: Option<String>,
    /// GitHub/Gitea `context`; GitLab `name`, else `context`.
    pub(crate) context: Option<String>,
    /// GitLab's `ref`.
    pub(crate) git_ref: Option<String>,
}

/// An answer that is not a success: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Refusal {
    fn new(status: u16, body: Value) -> Self {
        Refusal { status, body }
    }

    /// A one-line reason for the call record.
    pub(crate) fn reason(&self) -> String {
        let pick = |key: &str| {
            self.body.get(key).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        let mut reason = pick("message")
            .or_else(|| pick("error"))
            .unwrap_or_default();
        if let Some(Value::Array(errors)) = self.body.get("errors")
            && let Some(first) = errors.first().and_then(|e| e.get("message"))
        {
            reason = format!("{reason}: {}", first.as_str().unwrap_or_default());
        }
        reason
    }
}

/// The refusal for failed authentication or authorisation.
pub(crate) fn auth_refusal(api: Api, auth: Auth) -> Option<Refusal> {
    let status = match auth {
        Auth::Ok => return None,
        Auth::Missing | Auth::Unknown => 401,
        Auth::Forbidden => 403,
    };
    let body = match (api, auth) {
        (Api::GitHub, Auth::Missing) => github_error("Requires authentication"),
        (Api::GitHub, Auth::Unknown) => github_error("Bad credentials"),
        (Api::GitHub, _) => github_error("Resource not accessible by personal access token"),
        (Api::Gitea, Auth::Missing) => gitea_error("token is required"),
        (Api::Gitea, Auth::Unknown) => gitea_error("user does not exist [uid: 0, name: ]"),
        (Api::Gitea, _) => gitea_error("user should have a permission to write to this repository"),
        (Api::GitLab, Auth::Forbidden) => json!({"message": "403 Forbidden"}),
        (Api::GitLab, _) => json!({"message": "401 Unauthorized"}),
    };
    Some(Refusal::new(status, body))
}

/// The refusal for a repository the forge does not have.
pub(crate) fn not_found(api: Api) -> Refusal {
    let body = match api {
        Api::GitHub => github_error("Not Found"),
        Api::Gitea => gitea_error("The target couldn't be found."),
        Api::GitLab => json!({"message": "404 Project Not Found"}),
    };
    Refusal::new(404, body)
}

/// What GitHub answers a request without a `User-Agent`.
pub(crate) fn github_no_user_agent() -> Refusal {
    Refusal::new(
        403,
        json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required)."}),
    )
}

/// What GitHub answers an `Accept` it cannot produce.
pub(crate) fn github_bad_accept(accept: &str) -> Refusal {
    Refusal::new(
        415,
        github_error(&format!(
            "Unsupported 'Accept' header: '{accept}'. Must accept 'application/json'."
        )),
    )
}

/// Whether GitHub can answer this `Accept` with JSON.
pub(crate) fn github_accepts(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let media = part.split(';').next().unwrap_or("").trim();
        matches!(
            media,
            "*/*" | "application/*" | "application/json" | "application/vnd.github+json"
        ) || (media.starts_with("application/vnd.github.") && media.ends_with("+json"))
    })
}

fn github_error(message: &str) -> Value {
    json!({"message": message, "documentation_url": GITHUB_DOC, "status": ""})
}

fn gitea_error(message: &str) -> Value {
    json!({"message": message, "url": "https://gitea.com/api/swagger"})
}

fn github_validation(field: &str, message: &str) -> Refusal {
    Refusal::new(
        422,
        json!({
            "message": "Validation Failed",
            "errors": [{"resource": "Status", "code": "custom", "field": field, "message": message}],
            "documentation_url": GITHUB_DOC,
            "status": "422",
        }),
    )
}

/// Whether `sha` is a full hexadecimal object id (SHA-1 or SHA-256).
pub fn is_full_sha(sha: &str) -> bool {
    matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_http_url(url: &str) -> bool {
    url.strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .is_some_and(|rest| !rest.is_empty())
}

/// Checks the body as the API does; `Ok(context)` is the context the
/// status is stored under (the API's default filled in).
pub(crate) fn validate(
    api: Api,
    entry: &Entry,
    sha: &str,
    req: &StatusRequest,
) -> Result<String, Refusal> {
    if !is_full_sha(sha)
        || entry
            .commits
            .as_ref()
            .is_some_and(|c| !c.iter().any(|k| k.eq_ignore_ascii_case(sha)))
    {
        return Err(match api {
            Api::GitHub => Refusal::new(
                422,
                github_error(&format!("No commit found for SHA: {sha}")),
            ),
            Api::Gitea => Refusal::new(404, gitea_error(&format!("sha not found: {sha}"))),
            Api::GitLab => Refusal::new(404, json!({"message": "404 Commit Not Found"})),
        });
    }
    let context = req
        .context
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let state_error = |message: String| match api {
        Api::GitHub => Refusal::new(422, github_error(&message)),
        Api::Gitea => Refusal::new(422, gitea_error(&message)),
        Api::GitLab => Refusal::new(400, json!({"error": message})),
    };
    match req.state.as_deref() {
        None | Some("") => {
            return Err(state_error(match api {
                Api::GitLab => "state is missing".to_owned(),
                _ => "Invalid request.\n\n\"state\" wasn't supplied.".to_owned(),
            }));
        }
        Some(state) if !valid_states(api).contains(&state) => {
            return Err(state_error(match api {
                Api::GitLab => "state does not have a valid value".to_owned(),
                _ => format!(
                    "Invalid request.\n\n{state:?} is not a member of {:?}.",
                    valid_states(api)
                ),
            }));
        }
        Some(_) => {}
    }
    validate_fields(api, req, &context)?;
    Ok(context)
}

fn validate_fields(api: Api, req: &StatusRequest, context: &str) -> Result<(), Refusal> {
    let target_url = req.target_url.as_deref().filter(|u| !u.is_empty());
    match api {
        Api::GitHub => {
            if req
                .description
                .as_ref()
                .is_some_and(|d| d.chars().count() > GITHUB_MAX_DESCRIPTION)
            {
                return Err(github_validation(
                    "description",
                    "description is too long (maximum is 140 characters)",
                ));
            }
            if target_url.is_some_and(|u| !is_http_url(u)) {
                return Err(github_validation(
                    "target_url",
                    "target_url must use http(s) scheme",
                ));
            }
        }
        Api::Gitea => {}
        Api::GitLab => {
            let too_long = |field: &str| {
                Refusal::new(
                    400,
                    json!({"message": {field: ["is too long (maximum is 255 characters)"]}}),
                )
            };
            if context.chars().count() > GITLAB_MAX_NAME {
                return Err(too_long("name"));
            }
            if req
                .git_ref
                .as_ref()
                .is_some_and(|r| r.chars().count() > GITLAB_MAX_NAME)
            {
                return Err(too_long("ref"));
            }
            if target_url.is_some_and(|u| !is_http_url(u)) {
                return Err(Refusal::new(
                    400,
                    json!({"message": {"target_url": ["is blocked: Only allowed schemes are http, https"]}}),
                ));
            }
        }
    }
    Ok(())
}

/// The event GitLab's commit-status state machine fires to reach `state`.
fn gitlab_event(state: &str) -> &'static str {
    match state {
        "pending" => "enqueue",
        "running" => "run",
        "success" => "success",
        "failed" => "drop",
        "canceled" => "cancel",
        _ => "skip",
    }
}

/// GitLab keeps one live status per (project, sha, name, ref) while it is
/// pending or running, and refuses the transitions its state machine has
/// no edge for (a repeated `pending`, `running` back to `pending`). A
/// finished status is never changed: the next post starts a new one.
pub(crate) fn gitlab_transition(live: Option<&str>, next: &str) -> Result<(), Refusal> {
    let refused = match (live, next) {
        (Some(from @ ("pending" | "running")), "pending") => Some(from),
        (Some("running"), "running") => Some("running"),
        _ => None,
    };
    match refused {
        None => Ok(()),
        Some(from) => {
            let event = gitlab_event(next);
            Err(Refusal::new(
                400,
                json!({"message": format!(
                    "Cannot transition status via :{event} from :{from} (Reason(s): Status cannot transition via \"{event}\")"
                )}),
            ))
        }
    }
}

/// Whether a GitLab state ends a status (the next post starts a new one).
pub(crate) fn gitlab_final(state: &str) -> bool {
    !matches!(state, "pending" | "running")
}

/// A fault the forge injects instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Answer this HTTP status (500, 502, 503...) with a JSON error body.
    Status {
        /// The status code.
        code: u16,
    },
    /// Answer 429 with `Retry-After` (whole seconds, rounded up).
    RateLimited {
        /// What `Retry-After` says.
        #[serde(with = "humantime_serde_like")]
        retry_after: Duration,
    },
    /// Never answer: hold the request until the client gives up (or the
    /// forge shuts down).
    Hang,
}

/// How long a fault lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// For the next N status calls.
    Calls(u32),
    /// For every status call until this instant.
    Until(Instant),
}

/// The faults to inject, oldest first; the first still in force applies.
#[derive(Debug, Default)]
pub(crate) struct FaultPlan {
    entries: VecDeque<(Fault, Scope)>,
}

impl FaultPlan {
    pub(crate) fn push(&mut self, fault: Fault, scope: Scope) {
        self.entries.push_back((fault, scope));
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// The fault for a call arriving at `now`, using up one call of a
    /// counted fault.
    pub(crate) fn take(&mut self, now: Instant) -> Option<Fault> {
        self.entries.retain(|(_, scope)| match scope {
            Scope::Calls(n) => *n > 0,
            Scope::Until(end) => now < *end,
        });
        let (fault, scope) = self.entries.front_mut()?;
        let fault = *fault;
        if let Scope::Calls(n) = scope {
            *n -= 1;
        }
        Some(fault)
    }
}

/// An injected fault's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FaultAnswer {
    pub(crate) code: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Value,
}

/// What to answer for `fault` (`None`: never answer).
pub(crate) fn fault_answer(fault: Fault) -> Option<FaultAnswer> {
    match fault {
        Fault::Status { code } => Some(FaultAnswer {
            code,
            headers: Vec::new(),
            body: json!({"message": format!("fake forge: injected {code}")}),
        }),
        Fault::RateLimited { retry_after } => {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            Some(FaultAnswer {
                code: 429,
                headers: vec![
                    ("retry-after", seconds.to_string()),
                    ("x-ratelimit-remaining", "0".to_owned()),
                ],
                body: json!({"message": "API rate limit exceeded"}),
            })
        }
        Fault::Hang => None,
    }
}

/// One status API call, as the forge saw and answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Arrival order, from 1.
    pub seq: u64,
    /// Arrival time (wall clock).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// The forge addressed (for an unknown repository on `/api/v1`: gitea).
    pub forge: ForgeKind,
    /// `owner/name`, or the GitLab project id or path as given in the URL.
    pub repo: String,
    /// The commit named in the URL.
    pub sha: String,
    /// The state asked for.
    pub state: Option<String>,
    /// The context (GitLab: `name`, else `context`), default filled in
    /// when the call was valid.
    pub context: Option<String>,
    /// `target_url`.
    pub target_url: Option<String>,
    /// `description`.
    pub description: Option<String>,
    /// GitLab's `ref`.
    pub git_ref: Option<String>,
    /// How its credentials fared.
    pub auth: Auth,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// The `Accept` header.
    pub accept: Option<String>,
    /// The fault injected instead of an answer, if any.
    pub fault: Option<Fault>,
    /// The status code answered (`None`: hung, never answered).
    pub status: Option<u16>,
    /// Why it was refused, as the answer's message says.
    pub error: Option<String>,
}

impl Call {
    /// Whether the forge created the status (201).
    pub fn accepted(&self) -> bool {
        self.status == Some(201)
    }
}

/// Per-commit bookkeeping: GitHub's per-context count and GitLab's live
/// statuses.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    counts: HashMap<(u64, String, String), u32>,
    gitlab_live: HashMap<(u64, String, String, String), String>,
    next_id: u64,
}

impl Ledger {
    /// Applies a valid request to the ledger, or refuses it as the forge's
    /// bookkeeping would; returns the new status id.
    pub(crate) fn record(
        &mut self,
        api: Api,
        repo_id: u64,
        sha: &str,
        context: &str,
        req: &StatusRequest,
    ) -> Result<u64, Refusal> {
        let sha = sha.to_ascii_lowercase();
        let state = req.state.as_deref().unwrap_or_default();
        let key = (repo_id, sha.clone(), context.to_ascii_lowercase());
        let count = self.counts.get(&key).copied().unwrap_or(0);
        if api == Api::GitHub && count >= GITHUB_MAX_STATUSES_PER_CONTEXT {
            return Err(github_validation(
                "context",
                "This SHA and context has reached the maximum number of statuses.",
            ));
        }
        if api == Api::GitLab {
            let live_key = (
                repo_id,
                sha,
                context.to_owned(),
                req.git_ref.clone().unwrap_or_default(),
            );
            gitlab_transition(self.gitlab_live.get(&live_key).map(String::as_str), state)?;
            if gitlab_final(state) {
                self.gitlab_live.remove(&live_key);
            } else {
                self.gitlab_live.insert(live_key, state.to_owned());
            }
        }
        self.counts.insert(key, count + 1);
        self.next_id += 1;
        Ok(self.next_id)
    }
}

/// RFC 3339 with milliseconds, as the forges write times.
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn format(at: SystemTime) -> String {
        humantime::format_rfc3339_millis(at).to_string()
    }

    pub(crate) fn serialize<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*at))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations in JSON as humantime text (`"2s"`, `"500ms"`).
mod humantime_serde_like {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: ForgeKind) -> (Registry, Repo) {
        let mut registry = Registry::default();
        let repo = registry.add(
            RepoSpec::new(kind, "acme/app")
                .write_token("w")
                .read_token("r"),
            "http://forge",
        );
        (registry, repo)
    }

    fn req(state: &str) -> StatusRequest {
        StatusRequest {
            state: Some(state.to_owned()),
            ..StatusRequest::default()
        }
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn tokens_are_judged_per_api_and_repository() {
        let (registry, _) = entry(ForgeKind::GitHub);
        let e = registry.find(Api::GitHub, "ACME/app");
        assert!(e.is_some(), "names are case-insensitive");
        assert_eq!(judge(&registry, Api::GitHub, e, Some("w")), Auth::Ok);
        assert_eq!(judge(&registry, Api::GitHub, e, Some("r")), Auth::Forbidden);
        assert_eq!(judge(&registry, Api::GitHub, e, Some("x")), Auth::Unknown);
        assert_eq!(judge(&registry, Api::GitHub, e, None), Auth::Missing);
        assert_eq!(
            judge(&registry, Api::GitLab, None, Some("w")),
            Auth::Unknown
        );
    }

    #[test]
    fn registering_again_replaces_the_repository_with_a_fresh_id() {
        let mut registry = Registry::default();
        let first = registry.add(RepoSpec::new(ForgeKind::GitLab, "a/one"), "http://f");
        let second = registry.add(RepoSpec::new(ForgeKind::GitLab, "a/two"), "http://f");
        let again = registry.add(
            RepoSpec::new(ForgeKind::GitLab, "A/one").write_token("t"),
            "http://f",
        );
        assert_eq!(registry.repos().len(), 2);
        assert!(again.id != first.id && again.id != second.id);
        let found = registry.find(Api::GitLab, &again.id.to_string()).unwrap();
        assert_eq!(
            judge(&registry, Api::GitLab, Some(found), Some("t")),
            Auth::Ok
        );
    }

    #[test]
    fn auth_schemes_follow_each_api() {
        assert_eq!(
            token_of(Api::GitHub, Some("token abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_of(Api::GitHub, Some("Bearer abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(token_of(Api::GitHub, Some("Basic abc"), None), None);
        assert_eq!(
            token_of(Api::Gitea, Some("token abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_of(Api::GitLab, None, Some("abc")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_of(Api::GitLab, Some("Bearer abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(token_of(Api::GitLab, Some("token abc"), None), None);
    }

    #[test]
    fn states_are_each_forges_own() {
        let (registry, _) = entry(ForgeKind::GitLab);
        let e = registry.find(Api::GitLab, "1000").expect("by project id");
        assert!(validate(Api::GitLab, e, SHA, &req("running")).is_ok());
        let refused = validate(Api::GitLab, e, SHA, &req("failure")).unwrap_err();
        assert_eq!(refused.status, 400);
        assert_eq!(refused.reason(), "state does not have a valid value");
        let (registry, _) = entry(ForgeKind::GitHub);
        let e = registry.find(Api::GitHub, "acme/app").unwrap();
        assert_eq!(
            validate(Api::GitHub, e, SHA, &req("running"))
                .unwrap_err()
                .status,
            422
        );
        assert_eq!(
            validate(Api::GitHub, e, SHA, &req("failure")).unwrap(),
            "default"
        );
    }

    #[test]
    fn github_limits_the_description_and_the_url_scheme() {
        let (registry, _) = entry(ForgeKind::GitHub);
        let e = registry.find(Api::GitHub, "acme/app").unwrap();
        let mut r = req("success");
        r.description = Some("é".repeat(140));
        assert!(
            validate(Api::GitHub, e, SHA, &r).is_ok(),
            "140 characters, not bytes"
        );
        r.description = Some("x".repeat(141));
        let refused = validate(Api::GitHub, e, SHA, &r).unwrap_err();
        assert_eq!(refused.status, 422);
        assert!(
            refused.reason().contains("maximum is 140 characters"),
            "{}",
            refused.reason()
        );
        r.description = None;
        r.target_url = Some("ftp://ci/1".to_owned());
        assert_eq!(validate(Api::GitHub, e, SHA, &r).unwrap_err().status, 422);
    }

    #[test]
    fn gitlab_refuses_a_repeated_pending_but_restarts_after_a_final_state() {
        let mut ledger = Ledger::default();
        let post = |ledger: &mut Ledger, state: &str| {
            ledger
                .record(Api::GitLab, 1, SHA, "ci", &req(state))
                .map_err(|r| r.reason())
        };
        post(&mut ledger, "pending").unwrap();
        let err = post(&mut ledger, "pending").unwrap_err();
        assert!(
            err.contains("Cannot transition status via :enqueue from :pending"),
            "{err}"
        );
        post(&mut ledger, "running").unwrap();
        assert!(
            post(&mut ledger, "pending")
                .unwrap_err()
                .contains("from :running")
        );
        post(&mut ledger, "success").unwrap();
        post(&mut ledger, "pending").unwrap();
    }

    #[test]
    fn counted_and_timed_faults_run_out() {
        let now = Instant::now();
        let mut plan = FaultPlan::default();
        plan.push(Fault::Status { code: 500 }, Scope::Calls(2));
        plan.push(Fault::Hang, Scope::Until(now + Duration::from_secs(1)));
        assert_eq!(plan.take(now), Some(Fault::Status { code: 500 }));
        assert_eq!(plan.take(now), Some(Fault::Status { code: 500 }));
        assert_eq!(plan.take(now), Some(Fault::Hang));
        assert_eq!(plan.take(now + Duration::from_secs(1)), None);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let answer = fault_answer(Fault::RateLimited {
            retry_after: Duration::from_millis(1500),
        })
        .unwrap();
        assert_eq!(answer.code, 429);
        assert_eq!(answer.headers[0], ("retry-after", "2".to_owned()));
    }
}
