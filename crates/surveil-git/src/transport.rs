//! How a mirror reaches its remote: credentials, the TLS roots and the
//! connect/read timeouts, applied to gix's transports (smart HTTP(S) over
//! reqwest + rustls, SSH through the system `ssh`, local paths through
//! `git upload-pack`).
//!
//! This is the one place the fetch timeouts are set; callers build a
//! [`FetchSettings`] from their configuration. Secrets live here only as
//! [`Credential`], whose `Debug` never shows them, and they reach the
//! remote only: never a log line, an error or a child's environment (the
//! `ssh` command line names a key *file*, never key material).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::http;

/// The default for [`FetchSettings::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The default for [`FetchSettings::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A secret string (a password or token) whose `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    /// Wraps `value`; surrounding whitespace (a file's trailing newline)
    /// is removed.
    pub fn new(value: impl Into<String>) -> Self {
        Credential(value.into().trim().to_owned())
    }

    /// The secret itself, for the transport.
    fn expose(&self) -> &str {
        &self.0
    }

    /// Whether nothing is left once trimmed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the remote is authenticated to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials: a remote asking for them is an error (never a
    /// prompt, never a system credential helper).
    #[default]
    None,
    /// HTTP basic auth (a forge token is usually the password, with any
    /// user name or the one the forge documents).
    Basic {
        /// The user name.
        user: String,
        /// The password or token.
        password: Credential,
    },
    /// An `Authorization: Bearer` header on every HTTP request.
    Bearer(Credential),
    /// SSH with this private key file (the agent and `~/.ssh` defaults
    /// are used when `None`).
    Ssh {
        /// `ssh -i`.
        key: Option<PathBuf>,
        /// A `known_hosts` file used instead of the user's; host keys are
        /// always checked.
        known_hosts: Option<PathBuf>,
    },
}

/// Everything a fetch needs besides the URL. The defaults: no
/// credentials, the system's TLS roots, [`DEFAULT_CONNECT_TIMEOUT`] and
/// [`DEFAULT_READ_TIMEOUT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchSettings {
    /// The credentials.
    pub auth: Auth,
    /// A PEM file of extra CA certificates trusted for HTTPS, besides the
    /// system's.
    pub ca_file: Option<PathBuf>,
    /// The longest a connection to the remote may take to open.
    pub connect_timeout: Duration,
    /// The longest the remote may send nothing while a response is
    /// awaited or read (HTTP), a whole fetch giving up on a silent server.
    pub read_timeout: Duration,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            auth: Auth::None,
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// The kind of transport a URL uses, as far as settings go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Ssh,
    Local,
}

impl Scheme {
    pub(crate) fn of(url: &str) -> Scheme {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Scheme::Http
        } else if lower.starts_with("ssh://") || lower.starts_with("git+ssh://") || is_scp_like(url)
        {
            Scheme::Ssh
        } else {
            Scheme::Local
        }
    }
}

/// `user@host:path` (git's scp-like SSH syntax): a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    if url.contains("://") {
        return false;
    }
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 1,
        (Some(colon), None) => colon > 1,
        _ => false,
    }
}

/// `url` without any `user:password@` part, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// rustls needs a process-wide crypto provider before reqwest builds a
/// client; ring is the one the rest of Surveil uses. Installing fails only
/// when one is installed already, which is as good.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl FetchSettings {
    /// The transport options for an HTTP(S) remote: the timeouts, the CA
    /// file and, for [`Auth::Bearer`], the header. gix's own defaults
    /// (from git configuration) are the starting point.
    pub(crate) fn http_options(&self, mut options: http::Options) -> Result<http::Options, String> {
        install_crypto_provider();
        let extra_root = match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("the CA file {} is not PEM: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!(
                        "the CA file {} holds no certificate",
                        path.display()
                    ));
                }
                certs
            }
            None => Vec::new(),
        };
        let (connect, read) = (self.connect_timeout, self.read_timeout);
        let backend = http::reqwest::Options {
            configure_client: Some(Box::new(move |builder| {
                Ok(builder
                    .connect_timeout(connect)
                    .timeout(read)
                    .tls_certs_merge(extra_root.clone()))
            })),
            configure_request: None,
        };
        options.backend = Some(Arc::new(Mutex::new(backend)));
        options.connect_timeout = Some(connect);
        if let Auth::Bearer(token) = &self.auth {
            options
                .extra_headers
                .push(format!("Authorization: Bearer {}", token.expose()));
        }
        Ok(options)
    }

    /// The `core.sshCommand` for an SSH remote: never prompting (a daemon
    /// has no terminal), host keys checked against `known_hosts`, and the
    /// connect timeout.
    pub(crate) fn ssh_command(&self) -> String {
        let secs = self.connect_timeout.as_secs().max(1);
        let mut command = format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout={secs} \
             -o ServerAliveInterval={} -o ServerAliveCountMax=1",
            self.read_timeout.as_secs().max(1)
        );
        if let Auth::Ssh { key, known_hosts } = &self.auth {
            if let Some(key) = key {
                command.push_str(" -o IdentitiesOnly=yes -i ");
                command.push_str(&shell_quote(&key.to_string_lossy()));
            }
            if let Some(known_hosts) = known_hosts {
                let option = format!("UserKnownHostsFile={}", known_hosts.to_string_lossy());
                command.push_str(" -o ");
                command.push_str(&shell_quote(&option));
            }
        }
        command
    }

    /// The identity answered when an HTTP remote asks for credentials.
    pub(crate) fn basic_identity(&self) -> Option<gix::sec::identity::Account> {
        match &self.auth {
            Auth::Basic { user, password } => Some(gix::sec::identity::Account {
                username: user.clone(),
                password: password.expose().to_owned(),
                oauth_refresh_token: None,
            }),
            _ => None,
        }
    }
}

/// `text` as one word for `sh -c` (gix runs `core.sshCommand` through
/// the shell, as git does).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_told_apart() {
        for (url, scheme) in [
            ("https://forge.example/app.git", Scheme::Http),
            ("HTTP://forge.example/app.git", Scheme::Http),
            ("ssh://git@forge.example/app.git", Scheme::Ssh),
            ("git@forge.example:team/app.git", Scheme::Ssh),
            ("/srv/git/app.git", Scheme::Local),
            ("file:///srv/git/app.git", Scheme::Local),
            ("./a:b/c", Scheme::Local),
        ] {
            assert_eq!(Scheme::of(url), scheme, "{url}");
        }
    }

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            redact_url("https://bot:s3cret@forge.example/a.git"),
            "https://forge.example/a.git"
        );
        assert_eq!(
            redact_url("https://forge.example/a@b.git"),
            "https://forge.example/a@b.git"
        );
        assert_eq!(redact_url("/srv/a.git"), "/srv/a.git");
    }

    #[test]
    fn credentials_never_show_in_debug() {
        let settings = FetchSettings {
            auth: Auth::Basic {
                user: "bot".into(),
                password: Credential::new("s3cret\n"),
            },
            ..FetchSettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(settings.basic_identity().unwrap().password, "s3cret");
        assert!(!format!("{:?}", Auth::Bearer(Credential::new("tok"))).contains("tok"));
    }

    #[test]
    fn the_ssh_command_checks_host_keys_and_never_prompts() {
        let settings = FetchSettings {
            auth: Auth::Ssh {
                key: Some(PathBuf::from("/keys/it's")),
                known_hosts: Some(PathBuf::from("/etc/kh")),
            },
            connect_timeout: Duration::from_secs(7),
            ..FetchSettings::default()
        };
        let command = settings.ssh_command();
        assert!(command.contains("BatchMode=yes"), "{command}");
        assert!(command.contains("StrictHostKeyChecking=yes"), "{command}");
        assert!(command.contains("ConnectTimeout=7"), "{command}");
        assert!(command.contains(r"-i '/keys/it'\''s'"), "{command}");
        assert!(
            command.contains("'UserKnownHostsFile=/etc/kh'"),
            "{command}"
        );
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let settings = FetchSettings {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..FetchSettings::default()
        };
        let Err(err) = settings.http_options(http::Options::default()) else {
            panic!("a missing CA file is an error");
        };
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
