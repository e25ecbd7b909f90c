//! Who a peer is and what it may do, in domain terms: a credential (a
//! bearer token, or the names in a verified client certificate) becomes an
//! [`Identity`] with a role and, for clients, a scope; [`Identity::allows`]
//! is the one policy saying which [`Access`] each grants; runner names are
//! bound to their identity; and the sessions of an identity whose
//! credential is revoked are ended.
//!
//! The protocol handshake and the HTTP API both authenticate here
//! ([`Authenticator::authenticate`] for a bearer token), so the two cannot
//! disagree. Credentials come from the single `--token-file` ("one token,
//! all roles"), the `--tokens-file` (reloaded by [`Authenticator::reload`]
//! when it changes or on SIGHUP), and mutual TLS. No frames, no store:
//! sessions hand in what they were sent and a callback that closes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use subtle::ConstantTimeEq;
use surveil_common::Secret;
use surveil_common::tokens::{Entry, TokensFile};
pub use surveil_common::tokens::{Role, Scope};

use crate::domain::SessionId;

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Jobs, logs, runners, status, events.
    Read,
    /// Submit commits (observers, and clients with scope `operate`).
    Submit,
    /// Cancel, rerun, prune (clients with scope `operate`).
    Operate,
}

/// How an identity was proven.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No credential is configured (loopback only): everyone is the same.
    Anonymous,
    /// The single `--token-file` token.
    Shared,
    /// An entry of the tokens file, by the hash of its secret.
    Token {
        /// The entry's hash: revocation compares it with the file.
        sha256: String,
    },
    /// A client certificate signed by `--tls-client-ca`.
    Certificate {
        /// Its subject common names and DNS alternative names.
        names: Vec<String>,
    },
}

/// What an identity may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Every role, every scope, any runner name not bound to another
    /// identity: the shared token, anonymous loopback, or a certificate
    /// where no token credentials are configured.
    Everything,
    /// One role (and for a client, its scope).
    Only(Role, Option<Scope>),
}

/// An authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// How it was proven.
    pub kind: Kind,
    /// Its name: the token entry's, the certificate's first, or `shared`
    /// / `anonymous`.
    pub name: String,
    /// What it may do.
    pub grant: Grant,
}

/// Why a credential is refused; each maps to one `Reject` code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one the dispatcher does not know.
    #[error("{0}")]
    BadToken(&'static str),
    /// A valid credential used for a role it does not have.
    #[error("{0}")]
    RoleNotAllowed(String),
    /// A runner name bound to another identity.
    #[error("{0}")]
    NameBound(String),
}

/// An access an identity does not have, for a person.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl Identity {
    /// A short stable label: `token:NAME`, `cert:NAME`, `shared`,
    /// `anonymous`. Two sessions are "the same identity" when their labels
    /// are equal.
    pub fn label(&self) -> String {
        match &self.kind {
            Kind::Anonymous => "anonymous".to_owned(),
            Kind::Shared => "shared".to_owned(),
            Kind::Token { .. } => format!("token:{}", self.name),
            Kind::Certificate { .. } => format!("cert:{}", self.name),
        }
    }

    /// Whether it may connect as `role`.
    pub fn may_connect_as(&self, role: Role) -> Result<(), AuthError> {
        match self.grant {
            Grant::Everything => Ok(()),
            Grant::Only(own, _) if own == role => Ok(()),
            Grant::Only(own, _) => Err(AuthError::RoleNotAllowed(format!(
                "the credential {} is a {own} credential; it may not connect as a {role}",
                self.label()
            ))),
        }
    }

    /// The one policy of what each grant may do. Runners may do none of
    /// these (they only report on their own leases).
    pub fn allows(&self, access: Access) -> Result<(), Denied> {
        let allowed = match (self.grant, access) {
            (Grant::Everything, _)
            | (Grant::Only(Role::Client, Some(Scope::Operate)), _)
            | (Grant::Only(Role::Client, Some(Scope::Read)), Access::Read)
            | (Grant::Only(Role::Observer, _), Access::Submit) => true,
            (Grant::Only(..), _) => false,
        };
        if allowed {
            return Ok(());
        }
        let what = match access {
            Access::Read => "read jobs, logs, runners or status",
            Access::Submit => "submit commits",
            Access::Operate => "cancel, rerun or prune jobs",
        };
        let has = match self.grant {
            Grant::Only(Role::Client, Some(scope)) => {
                format!("a client credential with scope {scope}")
            }
            Grant::Only(role, _) => format!("a {role} credential"),
            Grant::Everything => "every right".to_owned(),
        };
        let needs = match access {
            Access::Read => "a client credential (scope read or operate)",
            Access::Submit => "an observer credential or a client one with scope operate",
            Access::Operate => "a client credential with scope operate",
        };
        Err(Denied(format!(
            "{} is {has} and may not {what}; that needs {needs}",
            self.label()
        )))
    }

    /// Whether this identity may call a runner `name`, given the names the
    /// tokens file binds to runner tokens.
    fn check_runner_name(&self, name: &str, table: &Table) -> Result<(), AuthError> {
        match &self.kind {
            Kind::Token { .. } if self.name == name => Ok(()),
            Kind::Token { .. } => Err(AuthError::NameBound(format!(
                "this token belongs to runner {:?}; it cannot connect as {name:?} (each runner's token carries its name)",
                self.name
            ))),
            Kind::Certificate { names } if names.iter().any(|n| n == name) => Ok(()),
            Kind::Certificate { names } => Err(AuthError::NameBound(format!(
                "the client certificate names {names:?}; a runner using it must be called by one of those names, not {name:?}"
            ))),
            Kind::Shared | Kind::Anonymous if table.runner_names.contains_key(name) => {
                Err(AuthError::NameBound(format!(
                    "the runner name {name:?} is bound to its own token in the tokens file; connect with that token"
                )))
            }
            Kind::Shared | Kind::Anonymous => Ok(()),
        }
    }
}

/// The tokens file, as loaded.
#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    /// Runner entries' names.
    runner_names: HashMap<String, usize>,
}

impl Table {
    fn new(file: TokensFile) -> Table {
        let runner_names = file
            .tokens
            .iter()
            .enumerate()
            .filter(|(_, e)| e.role == Role::Runner)
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Table {
            entries: file.tokens,
            runner_names,
        }
    }

    fn find(&self, presented_hash: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| bool::from(e.sha256.as_bytes().ct_eq(presented_hash.as_bytes())))
    }

    /// Whether a token identity is still what the file says.
    fn still_valid(&self, identity: &Identity) -> bool {
        let Kind::Token { sha256 } = &identity.kind else {
            return true;
        };
        self.entries.iter().any(|e| {
            e.sha256 == *sha256
                && e.name == identity.name
                && identity.grant == Grant::Only(e.role, e.scope)
        })
    }
}

/// Ends a session, telling the peer the reason (given by the session).
pub type EndSession = Box<dyn Fn(&str) + Send + Sync>;

/// A live session's identity and how to end it.
struct Live {
    identity: Identity,
    runner: Option<String>,
    end: Option<EndSession>,
    /// Revoked before the session attached its closer.
    revoked: Option<String>,
}

#[derive(Default)]
struct Sessions {
    live: HashMap<SessionId, Live>,
    /// Runner name → the session using it.
    runners: HashMap<String, SessionId>,
}

/// The dispatcher's credentials and the identities of its live sessions.
pub struct Authenticator {
    shared: Option<Secret>,
    tokens_path: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    mutual_tls: bool,
    sessions: Mutex<Sessions>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const NO_TOKEN: &str = "this dispatcher requires a token; set --token-file (or SURVEIL_TOKEN) to the token issued for this peer";
const UNKNOWN_TOKEN: &str = "the token does not match any of the dispatcher's; check --token-file or SURVEIL_TOKEN (a revoked token is refused too)";

impl Authenticator {
    /// Credentials from the shared token, the tokens file (read now) and
    /// whether client certificates are verified.
    pub fn new(
        shared: Option<Secret>,
        tokens_path: Option<&Path>,
        mutual_tls: bool,
    ) -> anyhow::Result<Authenticator> {
        let table = match tokens_path {
            Some(path) => Table::new(TokensFile::load(path)?),
            None => Table::default(),
        };
        Ok(Authenticator {
            shared,
            tokens_path: tokens_path.map(Path::to_owned),
            table: RwLock::new(Arc::new(table)),
            mutual_tls,
            sessions: Mutex::new(Sessions::default()),
        })
    }

    fn table(&self) -> Arc<Table> {
        Arc::clone(
            &self
                .table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Whether any token credential is configured.
    pub fn has_tokens(&self) -> bool {
        self.shared.is_some() || self.tokens_path.is_some()
    }

    /// A bearer token (the HTTP API's `Authorization: Bearer`, a `Hello`'s
    /// token) as an identity. An empty token is anonymous where no
    /// credential at all is configured (loopback only), else refused.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.authenticate_peer(token, &[])
    }

    /// [`authenticate`](Self::authenticate) with the names of the peer's
    /// verified client certificate (empty without mutual TLS): a `Hello`
    /// with no token is then the certificate's identity.
    pub fn authenticate_peer(
        &self,
        token: &str,
        cert_names: &[String],
    ) -> Result<Identity, AuthError> {
        if !token.is_empty() {
            let presented = surveil_common::tokens::hash(token);
            if let Some(entry) = self.table().find(&presented) {
                return Ok(Identity {
                    kind: Kind::Token {
                        sha256: entry.sha256.clone(),
                    },
                    name: entry.name.clone(),
                    grant: Grant::Only(entry.role, entry.scope),
                });
            }
            if let Some(shared) = &self.shared
                && bool::from(shared.expose().as_bytes().ct_eq(token.as_bytes()))
            {
                return Ok(Identity {
                    kind: Kind::Shared,
                    name: "shared".to_owned(),
                    grant: Grant::Everything,
                });
            }
            if self.has_tokens() {
                return Err(AuthError::BadToken(UNKNOWN_TOKEN));
            }
        }
        if let Some(first) = cert_names.first() {
            // Where tokens are configured they name the roles; a
            // certificate then proves a runner's name only.
            let grant = if self.has_tokens() {
                Grant::Only(Role::Runner, None)
            } else {
                Grant::Everything
            };
            return Ok(Identity {
                kind: Kind::Certificate {
                    names: cert_names.to_vec(),
                },
                name: first.clone(),
                grant,
            });
        }
        if self.has_tokens() || self.mutual_tls {
            return Err(AuthError::BadToken(NO_TOKEN));
        }
        Ok(Identity {
            kind: Kind::Anonymous,
            name: "anonymous".to_owned(),
            grant: Grant::Everything,
        })
    }

    /// Whether `identity` (proven earlier) still holds: a token identity
    /// whose entry was revoked or changed in the tokens file does not.
    pub fn still_valid(&self, identity: &Identity) -> bool {
        self.table().still_valid(identity)
    }

    /// Registers a session of `identity` (for a runner, under `runner`):
    /// refused when the name is bound to another identity, by the tokens
    /// file, a certificate, or a live session of someone else. A live
    /// session of the same identity is replaced as before.
    pub fn admit(
        &self,
        session: SessionId,
        identity: &Identity,
        runner: Option<&str>,
    ) -> Result<(), AuthError> {
        let table = self.table();
        let mut sessions = lock(&self.sessions);
        if let Some(name) = runner {
            identity.check_runner_name(name, &table)?;
            if let Some(other) = sessions.runners.get(name)
                && let Some(live) = sessions.live.get(other)
                && live.identity.label() != identity.label()
            {
                return Err(AuthError::NameBound(format!(
                    "runner {name:?} is connected under another identity; a session can only be replaced by its own credential"
                )));
            }
            sessions.runners.insert(name.to_owned(), session);
        }
        sessions.live.insert(
            session,
            Live {
                identity: identity.clone(),
                runner: runner.map(str::to_owned),
                end: None,
                revoked: None,
            },
        );
        Ok(())
    }

    /// Gives an admitted session the way to end it (with a reason the
    /// peer is told). If its credential was revoked in between, it ends
    /// at once.
    pub fn attach(&self, session: SessionId, end: EndSession) {
        let mut sessions = lock(&self.sessions);
        let Some(live) = sessions.live.get_mut(&session) else {
            return;
        };
        if let Some(reason) = &live.revoked {
            end(reason);
        }
        live.end = Some(end);
    }

    /// The session ended: forgets it (and its runner name, unless a newer
    /// session of the same identity took it over).
    pub fn leave(&self, session: SessionId) {
        let mut sessions = lock(&self.sessions);
        if let Some(live) = sessions.live.remove(&session)
            && let Some(name) = live.runner
            && sessions.runners.get(&name) == Some(&session)
        {
            sessions.runners.remove(&name);
        }
    }

    /// The identity label of the session, for listings.
    pub fn label_of(&self, session: SessionId) -> Option<String> {
        lock(&self.sessions)
            .live
            .get(&session)
            .map(|l| l.identity.label())
    }

    /// Reads the tokens file again; then every live session whose token
    /// is gone or changed (or whose runner name is now bound to a token it
    /// does not hold) is ended. Returns how many. On an unreadable or
    /// invalid file the credentials in force stay, and the error is
    /// returned for the log.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.tokens_path else {
            return Ok(0);
        };
        let table = Arc::new(Table::new(TokensFile::load(path)?));
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&table);
        let mut ended = 0;
        let mut sessions = lock(&self.sessions);
        for live in sessions.live.values_mut() {
            if live.revoked.is_some() {
                continue;
            }
            let bound = live
                .runner
                .as_deref()
                .is_some_and(|name| live.identity.check_runner_name(name, &table).is_err());
            if table.still_valid(&live.identity) && !bound {
                continue;
            }
            let reason = format!(
                "the credential {} was revoked or changed in the tokens file; closing the session",
                live.identity.label()
            );
            tracing::warn!(identity = %live.identity.label(), runner = ?live.runner, "credential revoked; ending its session");
            if let Some(end) = &live.end {
                end(&reason);
            }
            live.revoked = Some(reason);
            ended += 1;
        }
        Ok(ended)
    }

    /// The tokens file, if one is configured.
    pub fn tokens_path(&self) -> Option<&Path> {
        self.tokens_path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use surveil_common::tokens;

    use super::*;

    struct Setup {
        _dir: tempfile::TempDir,
        path: PathBuf,
        auth: Authenticator,
        ci1: Secret,
        reader: Secret,
        operator: Secret,
        observer: Secret,
    }

    fn setup(shared: Option<&str>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let ci1 = tokens::add(&path, "ci-1", Role::Runner, None).unwrap();
        let reader = tokens::add(&path, "reader", Role::Client, Some(Scope::Read)).unwrap();
        let operator = tokens::add(&path, "op", Role::Client, Some(Scope::Operate)).unwrap();
        let observer = tokens::add(&path, "obs", Role::Observer, None).unwrap();
        let auth = Authenticator::new(shared.map(Secret::from), Some(&path), false).unwrap();
        Setup {
            _dir: dir,
            path,
            auth,
            ci1,
            reader,
            operator,
            observer,
        }
    }

    #[test]
    fn each_credential_has_its_role_and_scope() {
        let s = setup(None);
        let reader = s.auth.authenticate(s.reader.expose()).unwrap();
        assert_eq!(reader.label(), "token:reader");
        assert!(reader.allows(Access::Read).is_ok());
        let denied = reader.allows(Access::Operate).unwrap_err().0;
        assert!(
            denied.contains("scope read") && denied.contains("scope operate"),
            "{denied}"
        );
        assert!(reader.allows(Access::Submit).is_err());
        assert!(matches!(
            reader.may_connect_as(Role::Runner),
            Err(AuthError::RoleNotAllowed(_))
        ));

        let op = s.auth.authenticate(s.operator.expose()).unwrap();
        for access in [Access::Read, Access::Submit, Access::Operate] {
            assert!(op.allows(access).is_ok());
        }
        let obs = s.auth.authenticate(s.observer.expose()).unwrap();
        assert!(obs.allows(Access::Submit).is_ok());
        assert!(
            obs.allows(Access::Read).is_err(),
            "an observer cannot read logs"
        );
        assert!(obs.may_connect_as(Role::Runner).is_err());
        assert!(obs.may_connect_as(Role::Client).is_err());
        let runner = s.auth.authenticate(s.ci1.expose()).unwrap();
        assert!(runner.may_connect_as(Role::Runner).is_ok());
        assert!(runner.allows(Access::Read).is_err());

        assert_eq!(
            s.auth.authenticate("svt_guess"),
            Err(AuthError::BadToken(UNKNOWN_TOKEN))
        );
        assert_eq!(s.auth.authenticate(""), Err(AuthError::BadToken(NO_TOKEN)));
    }

    #[test]
    fn runner_names_are_bound_to_their_identity() {
        let s = setup(Some("laptop-token"));
        let ci1 = s.auth.authenticate(s.ci1.expose()).unwrap();
        let err = s.auth.admit(SessionId(1), &ci1, Some("ci-2")).unwrap_err();
        assert!(matches!(err, AuthError::NameBound(_)), "{err:?}");
        s.auth.admit(SessionId(2), &ci1, Some("ci-1")).unwrap();
        // The shared token may not take a name a runner token holds...
        let shared = s.auth.authenticate("laptop-token").unwrap();
        assert_eq!(shared.grant, Grant::Everything);
        assert!(matches!(
            s.auth.admit(SessionId(3), &shared, Some("ci-1")),
            Err(AuthError::NameBound(_))
        ));
        // ...but any free one, and then only it may replace that session.
        s.auth.admit(SessionId(4), &shared, Some("laptop")).unwrap();
        let cert = Identity {
            kind: Kind::Certificate {
                names: vec!["laptop".into()],
            },
            name: "laptop".into(),
            grant: Grant::Only(Role::Runner, None),
        };
        let err = s
            .auth
            .admit(SessionId(5), &cert, Some("laptop"))
            .unwrap_err();
        assert!(
            err.to_string().contains("connected under another identity"),
            "{err}"
        );
        s.auth.admit(SessionId(6), &shared, Some("laptop")).unwrap();
        // The replaced session leaving does not free the name.
        s.auth.leave(SessionId(4));
        assert!(s.auth.admit(SessionId(7), &cert, Some("laptop")).is_err());
        s.auth.leave(SessionId(6));
        s.auth.admit(SessionId(7), &cert, Some("laptop")).unwrap();
    }

    #[test]
    fn a_certificate_proves_a_runner_name_or_everything_when_no_tokens_exist() {
        let names = vec!["runner-1".to_owned()];
        let open = Authenticator::new(None, None, true).unwrap();
        let id = open.authenticate_peer("", &names).unwrap();
        assert_eq!(
            (id.label().as_str(), id.grant),
            ("cert:runner-1", Grant::Everything)
        );
        assert!(matches!(
            open.admit(SessionId(1), &id, Some("runner-2")),
            Err(AuthError::NameBound(_))
        ));
        assert!(
            open.authenticate_peer("", &[]).is_err(),
            "mutual TLS without a certificate"
        );
        let s = setup(None);
        let id = s.auth.authenticate_peer("", &names).unwrap();
        assert_eq!(id.grant, Grant::Only(Role::Runner, None));
        let none = Authenticator::new(None, None, false).unwrap();
        assert_eq!(none.authenticate("").unwrap().kind, Kind::Anonymous);
    }

    #[test]
    fn revoking_a_token_ends_its_sessions_and_refuses_it() {
        let s = setup(None);
        let ended = Arc::new(AtomicUsize::new(0));
        let ci1 = s.auth.authenticate(s.ci1.expose()).unwrap();
        let reader = s.auth.authenticate(s.reader.expose()).unwrap();
        for (session, identity, runner) in [(1, &ci1, Some("ci-1")), (2, &reader, None)] {
            s.auth.admit(SessionId(session), identity, runner).unwrap();
            let ended = Arc::clone(&ended);
            s.auth.attach(
                SessionId(session),
                Box::new(move |reason| {
                    assert!(reason.contains("revoked"), "{reason}");
                    ended.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
        assert_eq!(s.auth.reload().unwrap(), 0, "nothing changed");
        assert!(tokens::revoke(&s.path, "ci-1").unwrap());
        assert_eq!(s.auth.reload().unwrap(), 1);
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        assert!(s.auth.authenticate(s.ci1.expose()).is_err());
        assert!(s.auth.authenticate(s.reader.expose()).is_ok());
        // A broken file keeps the credentials in force.
        std::fs::write(&s.path, "not toml [").unwrap();
        assert!(s.auth.reload().is_err());
        assert!(s.auth.authenticate(s.reader.expose()).is_ok());
    }
}
