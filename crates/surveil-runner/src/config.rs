//! The runner's settings: the command line (flags, `SURVEIL_*`
//! environment, `--config` TOML, merged by `surveil_common::config`) and
//! the validated [`Config`] that [`run`](crate::run) takes by value.
//!
//! Validation happens here, once; the rest of the crate trusts `Config`.
//! Reading the token file, resolving repository paths and capturing the
//! process environment (for the tasks) are the only I/O here.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use surveil_common::tls::ClientTls;
use surveil_common::{DispatchArgs, LogFormat, Secret};

use crate::executor::DEFAULT_KILL_GRACE;

/// Everything the runner needs, validated. Its `Debug` shows neither the
/// token nor the environment (which may hold secrets).
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatcher's `host:port`.
    pub dispatch: String,
    /// Mirrors, job directories and the outbox live here.
    pub work_dir: PathBuf,
    /// The runner's unique name.
    pub name: String,
    /// The shared secret sent in `Hello`.
    pub token: Option<Secret>,
    /// Jobs run at once.
    pub slots: u32,
    /// Free-form labels sent in `Hello`.
    pub labels: Vec<String>,
    /// The repositories it may build, canonical.
    pub repos: Vec<String>,
    /// After the first shutdown signal, how long running jobs may finish.
    pub drain_timeout: Duration,
    /// Keep each job's checkout after the job.
    pub keep_workdirs: bool,
    /// The environment tasks start from (secrets are removed by the
    /// executor); `main` passes the process's own.
    pub base_env: Secret<Vec<(OsString, OsString)>>,
    /// Between SIGTERM and SIGKILL of a task's process group.
    pub kill_grace: Duration,
    /// The longest pause between reconnect attempts.
    pub reconnect_max: Duration,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
}

/// The reconnect backoff's cap: a few seconds, so a restarted dispatcher
/// sees its runners again quickly.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(3);

impl Config {
    /// A configuration with the contract's defaults, for `repos` (already
    /// canonical) and `work_dir`; the environment is empty.
    pub fn new(work_dir: impl Into<PathBuf>, repos: Vec<String>) -> Self {
        Config {
            dispatch: surveil_common::dial::DEFAULT_DISPATCH.to_owned(),
            work_dir: work_dir.into(),
            name: "surveil-runner".to_owned(),
            token: None,
            slots: 1,
            labels: Vec::new(),
            repos,
            drain_timeout: Duration::from_secs(300),
            keep_workdirs: false,
            base_env: Secret::default(),
            kill_grace: DEFAULT_KILL_GRACE,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            tls: None,
        }
    }
}

/// `surveil-runner`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "surveil-runner",
    version,
    about = "Runs the pipelines of commits the Surveil dispatcher assigns to it"
)]
pub struct Cli {
    // --dispatch, --token-file, the TLS flags.
    #[command(flatten)]
    pub connect: DispatchArgs,
    /// Directory for mirrors, job checkouts and the result outbox (created
    /// if missing).
    #[arg(long, env = "SURVEIL_WORK_DIR")]
    pub work_dir: PathBuf,
    /// The runner's unique name (default: the host name).
    #[arg(long, env = "SURVEIL_NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// How many jobs run at once.
    #[arg(long, env = "SURVEIL_SLOTS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub slots: u32,
    /// Labels describing this runner, comma-separated.
    #[arg(long, env = "SURVEIL_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// After SIGTERM, how long running jobs may take before they are
    /// cancelled.
    #[arg(long, env = "SURVEIL_DRAIN_TIMEOUT", default_value = "5m", value_parser = surveil_common::parse_duration)]
    pub drain_timeout: Duration,
    /// Keep each job's checkout under WORK_DIR/jobs after the job.
    #[arg(long, env = "SURVEIL_KEEP_WORKDIRS")]
    pub keep_workdirs: bool,
    /// TOML file with any of these settings (names with `_`).
    #[arg(long, env = "SURVEIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "SURVEIL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The repositories this runner may build: local paths or URLs gix can
    /// fetch.
    #[arg(value_name = "REPO", required = true, num_args = 1..)]
    pub repos: Vec<String>,
}

impl Cli {
    /// Resolves repository names, the name and the token; `base_env` is
    /// the environment tasks start from. Errors are configuration errors
    /// (exit code 2).
    pub fn into_config(self, base_env: Vec<(OsString, OsString)>) -> anyhow::Result<Config> {
        let mut repos = Vec::with_capacity(self.repos.len());
        for repo in &self.repos {
            let canonical =
                surveil_common::canonical_repo(repo).with_context(|| format!("REPO `{repo}`"))?;
            if !repos.contains(&canonical) {
                repos.push(canonical);
            }
        }
        let token = self.connect.token()?;
        let tls = self.connect.tls()?;
        let name = match self.name {
            Some(name) => name,
            None => hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .context("--name: the host name cannot be read; give a name")?,
        };
        let labels = self
            .labels
            .into_iter()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(Config {
            dispatch: self.connect.dispatch,
            work_dir: self.work_dir,
            name,
            token,
            slots: self.slots,
            labels,
            repos,
            drain_timeout: self.drain_timeout,
            keep_workdirs: self.keep_workdirs,
            base_env: Secret::new(base_env),
            tls,
            ..Config::new(PathBuf::new(), Vec::new())
        })
    }
}

fn parse_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.is_empty() {
        return Err("the name must not be empty".to_owned());
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut argv = vec![OsString::from("surveil-runner")];
        argv.extend(args.iter().map(OsString::from));
        let no_env = |_: &str| None;
        surveil_common::config::try_parse_from::<Cli>(argv, &no_env).map_err(|e| match e {
            surveil_common::config::ParseError::Clap(e) => e.to_string(),
            surveil_common::config::ParseError::File(e) => e.to_string(),
        })
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cli = parse(&["--work-dir", "/w", "/r"]).unwrap();
        assert_eq!(cli.connect.dispatch, "127.0.0.1:9000");
        assert_eq!(cli.slots, 1);
        assert_eq!(cli.drain_timeout, Duration::from_secs(300));
        assert!(!cli.keep_workdirs);
        assert!(cli.labels.is_empty());
        assert_eq!(cli.repos, ["/r"]);
    }

    #[test]
    fn labels_split_on_commas_and_repos_are_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&repo, &link).unwrap();
        let cli = parse(&[
            "--work-dir",
            "/w",
            "--labels",
            "linux, x86",
            "--name",
            "ci-1",
            link.to_str().unwrap(),
            "https://example.com/a.git",
        ])
        .unwrap();
        let config = cli.into_config(Vec::new()).unwrap();
        assert_eq!(config.labels, ["linux", "x86"]);
        assert_eq!(config.name, "ci-1");
        let canonical = std::fs::canonicalize(&repo).unwrap();
        assert_eq!(
            config.repos,
            [canonical.to_str().unwrap(), "https://example.com/a.git"]
        );
    }

    #[test]
    fn out_of_range_values_name_the_flag() {
        for (args, flag) in [
            (&["--slots", "0"][..], "--slots"),
            (&["--slots", "257"][..], "--slots"),
            (&["--drain-timeout", "soon"][..], "--drain-timeout"),
            (&["--dispatch", "nowhere"][..], "--dispatch"),
            (&["--name", " "][..], "--name"),
        ] {
            let mut all = vec!["--work-dir", "/w"];
            all.extend_from_slice(args);
            all.push("/r");
            let err = parse(&all).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let err = parse(&["--work-dir", "/w"]).unwrap_err();
        assert!(err.contains("REPO"), "{err}");
        let err = parse(&["/r"]).unwrap_err();
        assert!(err.contains("--work-dir"), "{err}");
    }

    #[test]
    fn a_missing_repository_path_is_a_configuration_error() {
        let cli = parse(&["--work-dir", "/w", "/definitely/not/here"]).unwrap();
        let err = format!("{:#}", cli.into_config(Vec::new()).unwrap_err());
        assert!(err.contains("REPO `/definitely/not/here`"), "{err}");
    }
}
