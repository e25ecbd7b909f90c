//! Who is asking, and may they: a credential the dispatcher knows (the
//! shared `--token-file` token, or an entry of `--tokens-file` with its
//! role and scope) as a bearer header or through a signed-in session
//! cookie, with a CSRF token for every state-changing form or
//! cookie-authenticated POST. What each credential may do is the
//! protocol's one policy ([`Identity::allows`]): a client token with
//! scope `read` reads, one with scope `operate` also cancels, reruns and
//! submits, an observer token submits, a runner token does none of these.
//!
//! Reading is anonymous on a loopback listener or with
//! `--http-public-read`; writing never is, and without a configured
//! credential nothing can be written over HTTP at all (a browser on the
//! same machine could otherwise be made to post to localhost by any web
//! page). A credential revoked in the tokens file stops working at once,
//! for bearer requests and signed-in sessions alike. This file decides; it
//! renders nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE};
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::auth::{Access, Authenticator, Identity, Kind};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "surveil_session";
/// The header a cookie-authenticated API call carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a sign-in lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first (a flood of sign-ins with
/// a valid token is the only way to fill it).
const MAX_SESSIONS: usize = 1024;

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// No valid credentials.
    Anonymous,
    /// A credential in an `Authorization: Bearer` header: no CSRF check
    /// needed (a browser never adds that header on its own).
    Bearer(Identity),
    /// A signed-in browser session, with its CSRF token.
    Session {
        /// Whose credential signed it in.
        identity: Identity,
        /// The token its forms must carry.
        csrf: String,
    },
}

impl Who {
    /// The credential behind the request, if any.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Who::Anonymous => None,
            Who::Bearer(identity) | Who::Session { identity, .. } => Some(identity),
        }
    }

    /// Whether this credential may cancel and rerun (the pages show those
    /// buttons only then).
    pub fn is_operator(&self) -> bool {
        self.identity()
            .is_some_and(|i| i.allows(Access::Operate).is_ok())
    }

    /// The CSRF token to put in forms, when signed in with a cookie.
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Who::Session { csrf, .. } => Some(csrf),
            _ => None,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The dispatcher has no credential: nothing can be written over HTTP.
    NoTokenConfigured,
    /// No (valid) credentials.
    Unauthenticated,
    /// A valid credential without the right: why, naming what it is and
    /// what the request needs.
    Forbidden(String),
    /// A session's request without its CSRF token.
    Csrf,
}

struct Session {
    identity: Identity,
    csrf: String,
    expires: Instant,
}

/// The dispatcher's credentials, the read policy and the signed-in
/// sessions.
pub struct Auth {
    credentials: Arc<Authenticator>,
    anonymous_read: bool,
    secure_cookie: bool,
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Auth {
    /// `credentials`: the protocol port's, so both sides know the same
    /// tokens; `anonymous_read`: whether reading needs no credentials;
    /// `secure_cookie`: served over TLS, so the cookie is `Secure`.
    pub fn new(credentials: Arc<Authenticator>, anonymous_read: bool, secure_cookie: bool) -> Auth {
        Auth {
            credentials,
            anonymous_read,
            secure_cookie,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The identity of a presented token; `None` for a wrong one, and for
    /// none at all (anonymous access is decided by `anonymous_read`, not
    /// by the credentials: an HTTP listener is never "loopback only" for
    /// a browser).
    fn token_identity(&self, presented: &str) -> Option<Identity> {
        let presented = presented.trim();
        if presented.is_empty() {
            return None;
        }
        self.credentials
            .authenticate(presented)
            .ok()
            .filter(|i| i.kind != Kind::Anonymous)
    }

    /// Who sent these headers: a valid bearer token first, then a live
    /// session cookie whose credential still holds.
    pub fn identify(&self, headers: &HeaderMap) -> Who {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(identity) = bearer.and_then(|b| self.token_identity(b)) {
            return Who::Bearer(identity);
        }
        let Some(id) = session_cookie(headers) else {
            return Who::Anonymous;
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now && self.credentials.still_valid(&s.identity));
        sessions.get(id).map_or(Who::Anonymous, |s| Who::Session {
            identity: s.identity.clone(),
            csrf: s.csrf.clone(),
        })
    }

    /// Whether `who` may read.
    pub fn can_read(&self, who: &Who) -> bool {
        self.anonymous_read
            || who
                .identity()
                .is_some_and(|i| i.allows(Access::Read).is_ok())
    }

    /// Whether `who` may make a request needing `access`; `csrf` is the
    /// token the request carried (a form field or the `X-CSRF-Token`
    /// header).
    pub fn check_write(
        &self,
        who: &Who,
        access: Access,
        csrf: Option<&str>,
    ) -> Result<(), Refusal> {
        if !self.credentials.has_tokens() {
            return Err(Refusal::NoTokenConfigured);
        }
        let identity = match who {
            Who::Anonymous => return Err(Refusal::Unauthenticated),
            Who::Bearer(identity) => identity,
            Who::Session {
                identity,
                csrf: expected,
            } => match csrf {
                Some(given) if same(expected, given) => identity,
                _ => return Err(Refusal::Csrf),
            },
        };
        identity
            .allows(access)
            .map_err(|denied| Refusal::Forbidden(denied.0))
    }

    /// Signs in with `token`: the `Set-Cookie` value of a new session, or
    /// `Err` for a wrong token (or none configured), or a credential that
    /// may not even read (a runner's or an observer's).
    pub fn sign_in(&self, token: &str) -> Result<String, Refusal> {
        if !self.credentials.has_tokens() {
            return Err(Refusal::NoTokenConfigured);
        }
        let identity = self.token_identity(token).ok_or(Refusal::Unauthenticated)?;
        identity
            .allows(Access::Read)
            .map_err(|denied| Refusal::Forbidden(denied.0))?;
        let id = random_hex();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        tracing::info!(identity = %identity.label(), "http: signed in");
        sessions.insert(
            id.clone(),
            Session {
                identity,
                csrf: random_hex(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        Ok(self.cookie(&id, SESSION_TTL.as_secs()))
    }

    /// Ends the session these headers carry; the `Set-Cookie` value that
    /// clears the cookie.
    pub fn sign_out(&self, headers: &HeaderMap) -> String {
        if let Some(id) = session_cookie(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        self.cookie("", 0)
    }

    fn cookie(&self, value: &str, max_age: u64) -> String {
        format!(
            "{COOKIE_NAME}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
            if self.secure_cookie { "; Secure" } else { "" }
        )
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use surveil_common::Secret;
    use surveil_common::tokens::{self, Role, Scope};

    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn bearer(token: &str) -> HeaderMap {
        headers(&[("authorization", format!("Bearer {token}"))])
    }

    fn shared(token: Option<&str>) -> Arc<Authenticator> {
        Arc::new(Authenticator::new(token.map(Secret::from), None, false).unwrap())
    }

    #[test]
    fn bearer_session_and_csrf_decide_writes() {
        let auth = Auth::new(shared(Some("s3cret")), false, true);
        let anon = auth.identify(&HeaderMap::new());
        assert_eq!(anon, Who::Anonymous);
        assert!(!auth.can_read(&anon));
        assert_eq!(
            auth.check_write(&anon, Access::Operate, None),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(auth.identify(&bearer("nope")), Who::Anonymous);
        let who = auth.identify(&bearer("s3cret"));
        assert!(who.is_operator());
        assert_eq!(auth.check_write(&who, Access::Operate, None), Ok(()));

        assert_eq!(auth.sign_in("nope"), Err(Refusal::Unauthenticated));
        let cookie = auth.sign_in("s3cret").unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.ends_with("; Secure"), "{cookie}");
        let pair = cookie.split(';').next().unwrap().to_owned();
        let h = headers(&[("cookie", format!("other=1; {pair}"))]);
        let who = auth.identify(&h);
        let csrf = who.csrf().unwrap().to_owned();
        assert_eq!(
            auth.check_write(&who, Access::Operate, None),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            auth.check_write(&who, Access::Operate, Some("forged")),
            Err(Refusal::Csrf)
        );
        assert_eq!(auth.check_write(&who, Access::Operate, Some(&csrf)), Ok(()));
        assert!(auth.sign_out(&h).contains("Max-Age=0"));
        assert_eq!(auth.identify(&h), Who::Anonymous);
    }

    #[test]
    fn without_a_token_reading_may_be_anonymous_but_writing_is_never_possible() {
        let auth = Auth::new(shared(None), true, false);
        let anon = auth.identify(&bearer("x"));
        assert_eq!(anon, Who::Anonymous, "no credential: no bearer is anyone");
        assert!(auth.can_read(&anon));
        assert_eq!(
            auth.check_write(&anon, Access::Submit, None),
            Err(Refusal::NoTokenConfigured)
        );
        assert_eq!(auth.sign_in(""), Err(Refusal::NoTokenConfigured));
    }

    #[test]
    fn tokens_file_credentials_act_within_their_role_and_scope_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let reader = tokens::add(&path, "reader", Role::Client, Some(Scope::Read)).unwrap();
        let operator = tokens::add(&path, "op", Role::Client, Some(Scope::Operate)).unwrap();
        let observer = tokens::add(&path, "obs", Role::Observer, None).unwrap();
        let runner = tokens::add(&path, "ci-1", Role::Runner, None).unwrap();
        let credentials = Arc::new(Authenticator::new(None, Some(&path), false).unwrap());
        let auth = Auth::new(Arc::clone(&credentials), false, false);
        let who = |s: &Secret| auth.identify(&bearer(s.expose()));

        let r = who(&reader);
        assert!(auth.can_read(&r) && !r.is_operator());
        let Err(Refusal::Forbidden(why)) = auth.check_write(&r, Access::Operate, None) else {
            panic!("a read-scoped token may not cancel");
        };
        assert!(
            why.contains("token:reader") && why.contains("scope operate"),
            "{why}"
        );
        let op = who(&operator);
        assert!(op.is_operator());
        assert_eq!(auth.check_write(&op, Access::Operate, None), Ok(()));
        assert_eq!(auth.check_write(&op, Access::Submit, None), Ok(()));
        let obs = who(&observer);
        assert!(
            !auth.can_read(&obs),
            "an observer token submits, it does not read"
        );
        assert_eq!(auth.check_write(&obs, Access::Submit, None), Ok(()));
        assert!(matches!(
            auth.check_write(&obs, Access::Operate, None),
            Err(Refusal::Forbidden(_))
        ));
        let ci = who(&runner);
        assert!(!auth.can_read(&ci));
        assert!(matches!(
            auth.sign_in(runner.expose()),
            Err(Refusal::Forbidden(_))
        ));

        // A session signed in with the operator's token dies with it.
        let cookie = auth.sign_in(operator.expose()).unwrap();
        let pair = cookie.split(';').next().unwrap().to_owned();
        let h = headers(&[("cookie", pair)]);
        assert!(auth.identify(&h).is_operator());
        tokens::revoke(&path, "op").unwrap();
        credentials.reload().unwrap();
        assert_eq!(auth.identify(&h), Who::Anonymous, "the session ended");
        assert_eq!(who(&operator), Who::Anonymous, "the bearer token too");
        assert!(auth.can_read(&who(&reader)), "others are untouched");
    }
}
