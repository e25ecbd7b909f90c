//! The runner's settings: the command line (flags, `SURVEIL_*`
//! environment, `--config` TOML, merged by `surveil_common::config`) and
//! the validated [`Config`] that [`run`](crate::run) takes by value.
//!
//! Validation happens here, once; the rest of the crate trusts `Config`.
//! Reading the token file, resolving repository paths, capturing the
//! process environment (for the tasks) and choosing the tasks' isolation
//! (which tries bubblewrap once, see [`crate::sandbox::choose`]) are the
//! only I/O here.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use surveil_common::tls::ClientTls;
use surveil_common::{DispatchArgs, LogFormat, Secret};
use surveil_git::{FetchArgs, FetchSettings};

use crate::executor::DEFAULT_KILL_GRACE;
use crate::sandbox::{self, Isolation};

/// Everything the runner needs, validated. Its `Debug` shows neither the
/// token nor the environment (which may hold secrets).
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatchers' `host:port`s (several with a standby); the leader
    /// is found among them.
    pub dispatch: Vec<String>,
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
    /// The runner's environment, of which tasks get only an allowlist
    /// (see [`sandbox::TASK_ENV`]); `main` passes the process's own.
    pub base_env: Secret<Vec<(OsString, OsString)>>,
    /// How tasks are isolated. The command line chooses the sandbox where
    /// it works; [`Config::new`] says [`Isolation::Unsandboxed`], which
    /// embedders replace (e.g. with [`Isolation::detect`]).
    pub isolation: Isolation,
    /// Between SIGTERM and SIGKILL of a task's process group.
    pub kill_grace: Duration,
    /// The longest pause between reconnect attempts.
    pub reconnect_max: Duration,
    /// Tasks of one job run at once at most, whatever the pipeline's
    /// `parallelism` asks.
    pub max_parallel_tasks: u32,
    /// The task caches under `<work dir>/cache` hold at most this many
    /// bytes; 0 keeps no cache.
    pub cache_size: u64,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
    /// How repositories are fetched (credentials, CA, timeouts).
    pub fetch: FetchSettings,
}

/// The reconnect backoff's cap: a few seconds, so a restarted dispatcher
/// sees its runners again quickly.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(3);

/// `--max-parallel-tasks` when not given.
pub const DEFAULT_MAX_PARALLEL_TASKS: u32 = 4;

impl Config {
    /// A configuration with the contract's defaults, for `repos` (already
    /// canonical) and `work_dir`; the environment is empty.
    pub fn new(work_dir: impl Into<PathBuf>, repos: Vec<String>) -> Self {
        Config {
            dispatch: vec![surveil_common::dial::DEFAULT_DISPATCH.to_owned()],
            work_dir: work_dir.into(),
            name: "surveil-runner".to_owned(),
            token: None,
            slots: 1,
            labels: Vec::new(),
            repos,
            drain_timeout: Duration::from_secs(300),
            keep_workdirs: false,
            base_env: Secret::default(),
            isolation: Isolation::Unsandboxed,
            kill_grace: DEFAULT_KILL_GRACE,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            max_parallel_tasks: DEFAULT_MAX_PARALLEL_TASKS,
            cache_size: crate::cache::DEFAULT_CACHE_BYTES,
            tls: None,
            fetch: FetchSettings::default(),
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
    /// Run tasks as this unprivileged user: inside the bubblewrap sandbox
    /// where it works, instead of it where it does not. The runner must be
    /// root (or hold CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_DAC_OVERRIDE).
    #[arg(long, env = "SURVEIL_TASK_USER", value_name = "USER")]
    pub task_user: Option<String>,
    /// Run tasks without the bubblewrap sandbox, as the runner's own user
    /// (or --task-user): they can then read what that user can. Without
    /// this, a runner that cannot sandbox its tasks refuses to start.
    #[arg(long, env = "SURVEIL_UNSANDBOXED")]
    pub unsandboxed: bool,
    /// Extra paths tasks see, read-only, in the sandbox: toolchains outside
    /// /usr (e.g. /opt/rust). Comma-separated; none may contain the work
    /// directory, the token or config file, or the TLS key.
    #[arg(
        long,
        env = "SURVEIL_SANDBOX_RO",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sandbox_ro: Vec<PathBuf>,
    /// Tasks of one job that run at once at most: caps the pipeline's
    /// `parallelism` (1 runs every job's tasks one at a time).
    #[arg(long, env = "SURVEIL_MAX_PARALLEL_TASKS", default_value_t = DEFAULT_MAX_PARALLEL_TASKS,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_parallel_tasks: u32,
    /// Size cap of the task caches kept under the work directory
    /// (least recently used entries go first); 0 keeps none.
    #[arg(long, env = "SURVEIL_CACHE_SIZE", default_value = "5GiB", value_parser = surveil_common::parse_size)]
    pub cache_size: u64,
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
        let fetch = self
            .fetch
            .settings(&|name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)?;
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
        // Whatever holds the runner's secrets or state; the sandbox's extra
        // paths must stay clear of it.
        let private: Vec<PathBuf> = [Some(&self.work_dir)]
            .into_iter()
            .chain(
                [
                    &self.connect.token_file,
                    &self.config,
                    &self.connect.tls.tls_key,
                    &self.fetch.fetch_password_file,
                    &self.fetch.fetch_token_file,
                    &self.fetch.ssh_key,
                ]
                .map(Option::as_ref),
            )
            .flatten()
            .cloned()
            .collect();
        let path = base_env
            .iter()
            .rev()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_os_str());
        let isolation = sandbox::choose(&sandbox::Request {
            task_user: self.task_user.as_deref(),
            unsandboxed: self.unsandboxed,
            read_only: &self.sandbox_ro,
            path,
            private: &private,
        })?;
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
            isolation,
            max_parallel_tasks: self.max_parallel_tasks,
            cache_size: self.cache_size,
            tls,
            fetch,
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
        assert_eq!(cli.connect.dispatch, ["127.0.0.1:9000"]);
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
            "--unsandboxed",
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
        assert_eq!(config.isolation, Isolation::Unsandboxed);
    }

    #[test]
    fn isolation_flags_read_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runner.toml");
        std::fs::write(
            &file,
            "task_user = \"ci-task\"\nunsandboxed = true\nsandbox_ro = [\"/opt/rust\"]\n",
        )
        .unwrap();
        let cli = parse(&["--config", file.to_str().unwrap(), "--work-dir", "/w", "/r"]).unwrap();
        assert_eq!(cli.task_user.as_deref(), Some("ci-task"));
        assert!(cli.unsandboxed);
        assert_eq!(cli.sandbox_ro, [PathBuf::from("/opt/rust")]);
        let cli = parse(&["--work-dir", "/w", "--sandbox-ro", "/opt/a,/opt/b", "/r"]).unwrap();
        assert!(!cli.unsandboxed && cli.task_user.is_none());
        assert_eq!(
            cli.sandbox_ro,
            [PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]
        );
    }

    #[test]
    fn without_a_sandbox_a_task_user_or_unsandboxed_the_runner_refuses() {
        let dir = tempfile::tempdir().unwrap();
        // A PATH without bwrap: the machine has no sandbox.
        let env = vec![(OsString::from("PATH"), dir.path().as_os_str().to_owned())];
        let cli = parse(&["--work-dir", "/w", "--name", "n", "/tmp"]).unwrap();
        let err = format!("{:#}", cli.into_config(env.clone()).unwrap_err());
        assert!(err.contains("bwrap is not on the runner's PATH"), "{err}");
        for way in ["bubblewrap", "--task-user USER", "--unsandboxed"] {
            assert!(err.contains(way), "{way} not named: {err}");
        }
        let cli = parse(&["--work-dir", "/w", "--name", "n", "--unsandboxed", "/tmp"]).unwrap();
        assert_eq!(
            cli.into_config(env).unwrap().isolation,
            Isolation::Unsandboxed
        );
    }

    #[test]
    fn a_read_only_path_holding_the_work_dir_or_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        surveil_common::private::write_atomic(&token, b"t\n").unwrap();
        let work = dir.path().join("work");
        let work = work.to_str().unwrap();
        let token = token.to_str().unwrap();
        for (ro, hidden) in [(dir.path().to_str().unwrap(), work), ("/", work)] {
            let cli = parse(&[
                "--work-dir",
                work,
                "--name",
                "n",
                "--token-file",
                token,
                "--sandbox-ro",
                ro,
                "/tmp",
            ])
            .unwrap();
            let err = format!("{:#}", cli.into_config(Vec::new()).unwrap_err());
            assert!(
                err.starts_with(&format!("--sandbox-ro {ro}: would show tasks")),
                "{err}"
            );
            assert!(err.contains(hidden) || err.contains(token), "{err}");
        }
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
