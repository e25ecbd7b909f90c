//! The fetch flags the observer and the runner share (`--fetch-*`,
//! `--ssh-*`), and their reading into a [`FetchSettings`]. The secrets
//! come from files or the environment, never from the command line (which
//! every user can read in `ps`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::transport::{Auth, Credential, FetchSettings};

/// The environment variable holding the HTTP basic-auth password (or
/// token) when `--fetch-password-file` is not given.
pub const PASSWORD_ENV: &str = "SURVEIL_FETCH_PASSWORD";
/// The environment variable holding the bearer token when
/// `--fetch-token-file` is not given.
pub const TOKEN_ENV: &str = "SURVEIL_FETCH_TOKEN";

/// How the remote repositories are reached; flatten it into a binary's
/// command line.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// User name for HTTP basic auth (HTTPS only); the password comes from
    /// --fetch-password-file or SURVEIL_FETCH_PASSWORD.
    #[arg(long, env = "SURVEIL_FETCH_USER", value_name = "NAME")]
    pub fetch_user: Option<String>,
    /// File holding the basic-auth password or forge token (whitespace
    /// trimmed).
    #[arg(
        long,
        env = "SURVEIL_FETCH_PASSWORD_FILE",
        value_name = "FILE",
        requires = "fetch_user"
    )]
    pub fetch_password_file: Option<PathBuf>,
    /// File holding a token sent as `Authorization: Bearer` (HTTPS only);
    /// without it, SURVEIL_FETCH_TOKEN.
    #[arg(
        long,
        env = "SURVEIL_FETCH_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "fetch_user"
    )]
    pub fetch_token_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted for HTTPS remotes, besides the
    /// system's.
    #[arg(long, env = "SURVEIL_FETCH_CA", value_name = "FILE")]
    pub fetch_ca: Option<PathBuf>,
    /// Private key for SSH remotes (`ssh -i`).
    #[arg(long, env = "SURVEIL_SSH_KEY", value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
    /// known_hosts file for SSH remotes instead of the user's; host keys
    /// are always checked.
    #[arg(long, env = "SURVEIL_SSH_KNOWN_HOSTS", value_name = "FILE")]
    pub ssh_known_hosts: Option<PathBuf>,
    /// The longest opening a connection to a remote may take.
    #[arg(long, env = "SURVEIL_FETCH_CONNECT_TIMEOUT", default_value = "20s",
          value_parser = parse_timeout)]
    pub fetch_connect_timeout: Duration,
    /// The longest a remote may send nothing during a fetch.
    #[arg(long, env = "SURVEIL_FETCH_READ_TIMEOUT", default_value = "120s",
          value_parser = parse_timeout)]
    pub fetch_read_timeout: Duration,
}

impl FetchArgs {
    /// Reads the secret files (or environment) into the settings; errors
    /// name the flag or variable, never the secret. `env` is the process
    /// environment (a parameter so tests do not set process variables).
    pub fn settings(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<FetchSettings, String> {
        let secret =
            |file: Option<&Path>, flag: &str, var: &str| -> Result<Option<Credential>, String> {
                let value = match file {
                    Some(path) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?,
                    ),
                    None => env(var),
                };
                match value.map(Credential::new) {
                    Some(c) if c.is_empty() => Err(format!("{flag} (or {var}) is empty")),
                    other => Ok(other),
                }
            };
        let password = secret(
            self.fetch_password_file.as_deref(),
            "--fetch-password-file",
            PASSWORD_ENV,
        )?;
        let token = secret(
            self.fetch_token_file.as_deref(),
            "--fetch-token-file",
            TOKEN_ENV,
        )?;
        let auth = match (&self.fetch_user, password, token) {
            (Some(user), Some(password), _) => Auth::Basic {
                user: user.clone(),
                password,
            },
            (Some(_), None, _) => {
                return Err(format!(
                    "--fetch-user needs a password: --fetch-password-file or {PASSWORD_ENV}"
                ));
            }
            (None, _, Some(token)) => Auth::Bearer(token),
            (None, _, None) if self.ssh_key.is_some() || self.ssh_known_hosts.is_some() => {
                Auth::Ssh {
                    key: self.ssh_key.clone(),
                    known_hosts: self.ssh_known_hosts.clone(),
                }
            }
            (None, _, None) => Auth::None,
        };
        for (flag, path) in [
            ("--fetch-ca", &self.fetch_ca),
            ("--ssh-key", &self.ssh_key),
            ("--ssh-known-hosts", &self.ssh_known_hosts),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(format!("{flag}: {} is not a file", path.display()));
            }
        }
        Ok(FetchSettings {
            auth,
            ca_file: self.fetch_ca.clone(),
            connect_timeout: self.fetch_connect_timeout,
            read_timeout: self.fetch_read_timeout,
        })
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 20s or 2m"))?;
    if duration.is_zero() || duration > Duration::from_secs(3600) {
        return Err("a fetch timeout must be between 1ms and 1h".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        fetch: FetchArgs,
    }

    fn parse(args: &[&str]) -> Result<FetchArgs, String> {
        let argv = std::iter::once("t").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.fetch)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_out_of_range_timeouts() {
        let args = parse(&[]).unwrap();
        let settings = args.settings(&|_| None).unwrap();
        assert_eq!(settings, FetchSettings::default());
        for bad in ["0s", "2h", "soon"] {
            let err = parse(&["--fetch-read-timeout", bad]).unwrap_err();
            assert!(err.contains("--fetch-read-timeout"), "{err}");
        }
    }

    #[test]
    fn secrets_come_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").unwrap();
        let args = parse(&[
            "--fetch-user",
            "bot",
            "--fetch-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let settings = args.settings(&|_| None).unwrap();
        assert_eq!(settings.basic_identity().unwrap().password, "hunter2");

        let args = parse(&["--fetch-user", "bot"]).unwrap();
        let env = |name: &str| (name == PASSWORD_ENV).then(|| "from-env".to_owned());
        assert_eq!(
            args.settings(&env)
                .unwrap()
                .basic_identity()
                .unwrap()
                .password,
            "from-env"
        );
        let err = args.settings(&|_| None).unwrap_err();
        assert!(err.contains("--fetch-password-file"), "{err}");

        let env = |name: &str| (name == TOKEN_ENV).then(|| "tok".to_owned());
        let settings = parse(&[]).unwrap().settings(&env).unwrap();
        assert_eq!(settings.auth, Auth::Bearer(Credential::new("tok")));

        let missing = dir.path().join("missing");
        let args = parse(&["--fetch-token-file", missing.to_str().unwrap()]).unwrap();
        let err = args.settings(&|_| None).unwrap_err();
        assert!(err.contains("--fetch-token-file"), "{err}");
        let err = parse(&["--fetch-user", "a", "--fetch-token-file", "/x"]).unwrap_err();
        assert!(err.contains("--fetch-token-file"), "{err}");
    }

    #[test]
    fn ssh_files_must_exist() {
        let args = parse(&["--ssh-key", "/nonexistent/id"]).unwrap();
        let err = args.settings(&|_| None).unwrap_err();
        assert!(err.contains("--ssh-key"), "{err}");
    }
}
