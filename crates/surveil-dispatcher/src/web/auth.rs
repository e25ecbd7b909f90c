//! Who is asking, and may they: the operator token as a bearer header or
//! through a signed-in session cookie, with a CSRF token for every
//! state-changing form or cookie-authenticated POST.
//!
//! Reading is anonymous on a loopback listener or with
//! `--http-public-read`; writing never is, and without a configured token
//! nothing can be written over HTTP at all (a browser on the same machine
//! could otherwise be made to post to localhost by any web page). This
//! file decides; it renders nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE};
use rand::Rng;
use subtle::ConstantTimeEq;
use surveil_common::Secret;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "surveil_session";
/// The header a cookie-authenticated API call carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a sign-in lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first (a flood of sign-ins with
/// the right token is the only way to fill it).
const MAX_SESSIONS: usize = 1024;

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// No valid credentials.
    Anonymous,
    /// The operator token in an `Authorization: Bearer` header: no CSRF
    /// check needed (a browser never adds that header on its own).
    Bearer,
    /// A signed-in browser session, with its CSRF token.
    Session {
        /// The token its forms must carry.
        csrf: String,
    },
}

impl Who {
    /// Whether this is the operator.
    pub fn is_operator(&self) -> bool {
        !matches!(self, Who::Anonymous)
    }

    /// The CSRF token to put in forms, when signed in with a cookie.
    pub fn csrf(&self) -> Option<&str> {
        match self {
            Who::Session { csrf } => Some(csrf),
            _ => None,
        }
    }
}

/// Why a write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The dispatcher has no token: nothing can be written over HTTP.
    NoTokenConfigured,
    /// No (valid) credentials.
    Unauthenticated,
    /// A session's request without its CSRF token.
    Csrf,
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// The token, the read policy and the signed-in sessions.
pub struct Auth {
    token: Option<Secret>,
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
    /// `anonymous_read`: whether reading needs no credentials;
    /// `secure_cookie`: served over TLS, so the cookie is `Secure`.
    pub fn new(token: Option<Secret>, anonymous_read: bool, secure_cookie: bool) -> Auth {
        Auth {
            token,
            anonymous_read,
            secure_cookie,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn token_matches(&self, presented: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| same(t.expose().as_str(), presented.trim()))
    }

    /// Who sent these headers: a valid bearer token first, then a live
    /// session cookie.
    pub fn identify(&self, headers: &HeaderMap) -> Who {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer.is_some_and(|b| self.token_matches(b)) {
            return Who::Bearer;
        }
        let Some(id) = session_cookie(headers) else {
            return Who::Anonymous;
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(id).map_or(Who::Anonymous, |s| Who::Session {
            csrf: s.csrf.clone(),
        })
    }

    /// Whether `who` may read.
    pub fn can_read(&self, who: &Who) -> bool {
        self.anonymous_read || who.is_operator()
    }

    /// Whether `who` may write; `csrf` is the token the request carried
    /// (a form field or the `X-CSRF-Token` header).
    pub fn check_write(&self, who: &Who, csrf: Option<&str>) -> Result<(), Refusal> {
        if self.token.is_none() {
            return Err(Refusal::NoTokenConfigured);
        }
        match who {
            Who::Anonymous => Err(Refusal::Unauthenticated),
            Who::Bearer => Ok(()),
            Who::Session { csrf: expected } => match csrf {
                Some(given) if same(expected, given) => Ok(()),
                _ => Err(Refusal::Csrf),
            },
        }
    }

    /// Signs in with `token`: the `Set-Cookie` value of a new session, or
    /// `Err` for a wrong token (or none configured).
    pub fn sign_in(&self, token: &str) -> Result<String, Refusal> {
        if self.token.is_none() {
            return Err(Refusal::NoTokenConfigured);
        }
        if !self.token_matches(token) {
            return Err(Refusal::Unauthenticated);
        }
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
        sessions.insert(
            id.clone(),
            Session {
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
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_session_and_csrf_decide_writes() {
        let auth = Auth::new(Some(Secret::new("s3cret".to_owned())), false, true);
        let anon = auth.identify(&HeaderMap::new());
        assert_eq!(anon, Who::Anonymous);
        assert!(!auth.can_read(&anon));
        assert_eq!(auth.check_write(&anon, None), Err(Refusal::Unauthenticated));
        let wrong = auth.identify(&headers(&[("authorization", "Bearer nope".into())]));
        assert_eq!(wrong, Who::Anonymous);
        let bearer = auth.identify(&headers(&[("authorization", "Bearer s3cret".into())]));
        assert_eq!(auth.check_write(&bearer, None), Ok(()));

        assert_eq!(auth.sign_in("nope"), Err(Refusal::Unauthenticated));
        let cookie = auth.sign_in("s3cret").unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.ends_with("; Secure"), "{cookie}");
        let pair = cookie.split(';').next().unwrap().to_owned();
        let h = headers(&[("cookie", format!("other=1; {pair}"))]);
        let who = auth.identify(&h);
        let csrf = who.csrf().unwrap().to_owned();
        assert_eq!(auth.check_write(&who, None), Err(Refusal::Csrf));
        assert_eq!(auth.check_write(&who, Some("forged")), Err(Refusal::Csrf));
        assert_eq!(auth.check_write(&who, Some(&csrf)), Ok(()));
        assert!(auth.sign_out(&h).contains("Max-Age=0"));
        assert_eq!(auth.identify(&h), Who::Anonymous);
    }

    #[test]
    fn without_a_token_reading_may_be_anonymous_but_writing_is_never_possible() {
        let auth = Auth::new(None, true, false);
        let anon = auth.identify(&headers(&[("authorization", "Bearer x".into())]));
        assert!(auth.can_read(&anon));
        assert_eq!(
            auth.check_write(&anon, None),
            Err(Refusal::NoTokenConfigured)
        );
        assert_eq!(auth.sign_in(""), Err(Refusal::NoTokenConfigured));
    }
}
