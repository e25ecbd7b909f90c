//! The observer's settings: the command line (flags, `SURVEIL_*`
//! environment, `--config` TOML, merged by `surveil_common::config`) and
//! the validated [`Config`] that [`run`](crate::run) takes by value.
//!
//! Validation happens here, once; the rest of the crate trusts `Config`.
//! Reading the token file and resolving the repository path are the only
//! I/O here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use surveil_common::tls::ClientTls;
use surveil_common::{DispatchArgs, LogFormat, Secret};
use surveil_git::{FetchArgs, FetchSettings};

/// Everything the observer needs, validated. Its `Debug` never shows the
/// token.
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatchers' `host:port`s (several with a standby); the leader
    /// is found among them.
    pub dispatch: Vec<String>,
    /// Where the cursor file and URL mirrors live.
    pub state_dir: PathBuf,
    /// The repository: a canonical local path or a URL, exactly as
    /// submitted and as runners match it.
    pub repo: String,
    /// The branch watched.
    pub branch: String,
    /// How often to poll (and, for a URL, fetch).
    pub interval: Duration,
    /// Submit every new commit rather than the new tip only.
    pub every_commit: bool,
    /// The most commits submitted for one move of the branch.
    pub max_backlog: usize,
    /// The shared secret sent in `Hello`.
    pub token: Option<Secret>,
    /// The name sent in `Hello`, for the dispatcher's logs.
    pub name: String,
    /// The first delay before retrying the dispatcher.
    pub retry_min: Duration,
    /// The longest delay between retries.
    pub retry_max: Duration,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
    /// How a remote repository is fetched (credentials, CA, timeouts).
    pub fetch: FetchSettings,
}

impl Config {
    /// A configuration with the contract's defaults for `repo` (already
    /// canonical) and `state_dir`.
    pub fn new(repo: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Config {
            dispatch: vec![surveil_common::dial::DEFAULT_DISPATCH.to_owned()],
            state_dir: state_dir.into(),
            repo: repo.into(),
            branch: "main".to_owned(),
            interval: Duration::from_secs(1),
            every_commit: false,
            max_backlog: 1000,
            token: None,
            name: "surveil-observer".to_owned(),
            retry_min: crate::DEFAULT_RETRY_MIN,
            retry_max: crate::DEFAULT_RETRY_MAX,
            tls: None,
            fetch: FetchSettings::default(),
        }
    }
}

/// `surveil-observer`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "surveil-observer",
    version,
    about = "Watches a branch and submits its new commits to the Surveil dispatcher"
)]
pub struct Cli {
    // --dispatch, --token-file, the TLS flags.
    #[command(flatten)]
    pub connect: DispatchArgs,
    /// Directory for the cursor file and URL mirrors (created if missing).
    #[arg(long, env = "SURVEIL_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The branch to watch.
    #[arg(long, env = "SURVEIL_BRANCH", default_value = "main", value_parser = parse_branch)]
    pub branch: String,
    /// How often to poll the branch (and fetch, for a URL).
    #[arg(long, env = "SURVEIL_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Submit every new commit, oldest first, not only the new tip.
    #[arg(long, env = "SURVEIL_EVERY_COMMIT")]
    pub every_commit: bool,
    /// With --every-commit, the most commits submitted for one move of the
    /// branch; older ones are skipped with a warning.
    #[arg(long, env = "SURVEIL_MAX_BACKLOG", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_backlog: u32,
    // --fetch-user, --fetch-password-file, --fetch-token-file, --fetch-ca,
    // --ssh-key, --ssh-known-hosts and the fetch timeouts.
    #[command(flatten)]
    pub fetch: FetchArgs,
    /// TOML file with any of these settings (names with `_`).
    #[arg(long, env = "SURVEIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "SURVEIL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The repository: a local path or a URL gix can fetch.
    #[arg(value_name = "REPO")]
    pub repo: String,
}

impl Cli {
    /// Resolves the repository name and reads the token. Its errors are
    /// configuration errors (exit code 2).
    pub fn into_config(self) -> anyhow::Result<Config> {
        let repo = surveil_common::canonical_repo(&self.repo)
            .with_context(|| format!("REPO `{}`", self.repo))?;
        let token = self.connect.token()?;
        let tls = self.connect.tls()?;
        let fetch = self
            .fetch
            .settings(&|name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)?;
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned());
        Ok(Config {
            dispatch: self.connect.dispatch,
            state_dir: self.state_dir,
            branch: self.branch,
            interval: self.interval,
            every_commit: self.every_commit,
            max_backlog: self.max_backlog as usize,
            token,
            name: format!("surveil-observer@{host}"),
            repo,
            tls,
            fetch,
            ..Config::new(String::new(), PathBuf::new())
        })
    }
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = surveil_common::parse_duration(text)?;
    if interval.is_zero() {
        return Err("the interval must be above zero".to_owned());
    }
    Ok(interval)
}

fn parse_branch(text: &str) -> Result<String, String> {
    let full = format!("refs/heads/{text}");
    gix::refs::FullName::try_from(full.as_str())
        .map(|_| text.to_owned())
        .map_err(|e| format!("`{text}` is not a valid branch name ({e})"))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut argv = vec![OsString::from("surveil-observer")];
        argv.extend(args.iter().map(OsString::from));
        let no_env = |_: &str| None;
        surveil_common::config::try_parse_from::<Cli>(argv, &no_env).map_err(|e| match e {
            surveil_common::config::ParseError::Clap(e) => e.to_string(),
            surveil_common::config::ParseError::File(e) => e.to_string(),
        })
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cli = parse(&["--state-dir", "/s", "/r"]).unwrap();
        assert_eq!(cli.connect.dispatch, ["127.0.0.1:9000"]);
        assert_eq!(cli.branch, "main");
        assert_eq!(cli.interval, Duration::from_secs(1));
        assert!(!cli.every_commit);
        assert_eq!(cli.max_backlog, 1000);
        assert_eq!(cli.repo, "/r");
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        for (args, flag) in [
            (&["--max-backlog", "0"][..], "--max-backlog"),
            (&["--max-backlog", "100001"][..], "--max-backlog"),
            (&["--interval", "0s"][..], "--interval"),
            (&["--interval", "soon"][..], "--interval"),
            (&["--dispatch", "nowhere"][..], "--dispatch"),
            (&["--branch", "a..b"][..], "--branch"),
        ] {
            let mut all = vec!["--state-dir", "/s"];
            all.extend_from_slice(args);
            all.push("/r");
            let err = parse(&all).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let err = parse(&["/r"]).unwrap_err();
        assert!(err.contains("--state-dir"), "{err}");
    }

    #[test]
    fn repo_is_made_canonical_and_urls_kept() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let cli = parse(&["--state-dir", "/s", link.to_str().unwrap()]).unwrap();
        let config = cli.into_config().unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(config.repo, canonical.to_str().unwrap());

        let url = "https://example.com/app.git";
        let config = parse(&["--state-dir", "/s", url])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.repo, url);

        let missing = dir.path().join("missing");
        let err = parse(&["--state-dir", "/s", missing.to_str().unwrap()])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(format!("{err:#}").contains("REPO"), "{err:#}");
    }
}
