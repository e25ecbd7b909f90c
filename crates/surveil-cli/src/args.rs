//! The `surveil` command line (contract: DESIGN.md, "Command line"): the
//! global flags, the subcommands and the checks clap can make before
//! anything is dialled, so bad input exits 2 naming the argument.
//!
//! It must not touch the network or print; `commands.rs` runs what was
//! parsed.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use surveil_proto::JobStatus;

/// Query and steer a Surveil dispatcher.
#[derive(Debug, Parser)]
#[command(name = "surveil", version, about)]
pub struct Cli {
    // --dispatch, --token-file, the TLS flags.
    #[command(flatten)]
    pub connect: surveil_common::DispatchArgs,

    /// A TOML file with settings for the flags above (`dispatch`,
    /// `token_file`, `json`); flags and environment win over it.
    #[arg(long, env = "SURVEIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print JSON (the contract's fields) instead of tables.
    #[arg(long, global = true, env = "SURVEIL_JSON")]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// What to ask the dispatcher.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List jobs, newest first.
    Jobs {
        /// Only jobs of this repository (a local path is made canonical).
        #[arg(long, value_name = "REPO")]
        repo: Option<String>,
        /// Only jobs submitted on this branch (for a pull request: its
        /// head branch).
        #[arg(long, value_name = "BRANCH")]
        branch: Option<String>,
        /// Only jobs of this pull (merge) request.
        #[arg(long = "pr", value_name = "N")]
        pull_request: Option<u64>,
        /// Only jobs with this status.
        #[arg(long, value_enum, value_name = "STATUS")]
        status: Option<StatusArg>,
        /// At most this many jobs; 0 for all.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
    },
    /// Show one job and its tasks.
    Job {
        /// The job id.
        id: u64,
    },
    /// Print a job's log (its latest attempt, or --attempt N).
    Logs {
        /// The job id.
        id: u64,
        /// Keep printing output as it arrives until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print this attempt's log (1 is the first; `surveil job ID`
        /// lists them) instead of the latest attempt's.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: Option<u32>,
    },
    /// List the connected runners.
    Runners,
    /// Show the dispatcher's health figures.
    Status,
    /// Queue a commit for building.
    Submit {
        /// The repository: a URL, or a local path (made absolute, symlinks
        /// resolved, as runners and observers name it).
        #[arg(value_parser = parse_repo)]
        repo: String,
        /// The full 40-hex commit id.
        #[arg(value_parser = parse_commit)]
        commit: String,
        /// The branch the commit belongs to.
        #[arg(long, default_value = "main")]
        branch: String,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// The job id.
        id: u64,
    },
    /// Queue a new attempt of a finished job; earlier attempts' results and
    /// logs stay readable.
    Rerun {
        /// The job id.
        id: u64,
    },
    /// Delete the stored logs of old finished jobs (their results and
    /// attempts stay); without a bound, as the dispatcher's --retain-logs
    /// says.
    Prune {
        /// Jobs that finished longer ago than this (`30d`, `12h`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<std::time::Duration>,
        /// Keep the newest N finished jobs' logs (0: delete every finished
        /// job's log).
        #[arg(long)]
        keep_jobs: Option<u64>,
    },
    /// Issue, revoke and list credentials in a tokens file (local file
    /// edits: the dispatcher reloads the file by itself).
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
}

/// `surveil token …`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Adds a credential and prints its secret, once: only its hash is
    /// kept.
    Add {
        /// Its name; a runner's token only lets it connect under this name.
        #[arg(value_parser = parse_name)]
        name: String,
        /// The role it may connect as.
        #[arg(long, value_enum)]
        role: surveil_common::tokens::Role,
        /// For a client: `read` (jobs, logs, runners, status) or `operate`
        /// (also submit, cancel, rerun, prune).
        #[arg(long, value_enum)]
        scope: Option<surveil_common::tokens::Scope>,
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// Removes a credential; the dispatcher ends its sessions within a
    /// second.
    Revoke {
        /// The credential's name.
        name: String,
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// Lists the credentials (names, roles, scopes; never secrets).
    List {
        #[command(flatten)]
        file: TokensFileArg,
    },
}

/// The tokens file a `token` command edits.
#[derive(Debug, Clone, clap::Args)]
pub struct TokensFileArg {
    /// The dispatcher's --tokens-file (created 0600 if missing).
    #[arg(long, env = "SURVEIL_TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: PathBuf,
}

/// A job status as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Queued,
    Running,
    Passed,
    Failed,
    Error,
    Cancelled,
}

impl From<StatusArg> for JobStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Queued => JobStatus::Queued,
            StatusArg::Running => JobStatus::Running,
            StatusArg::Passed => JobStatus::Passed,
            StatusArg::Failed => JobStatus::Failed,
            StatusArg::Error => JobStatus::Error,
            StatusArg::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// A full commit id, lower-cased: jobs are keyed by (repo, commit), so
/// `ABC…` and `abc…` must not become two jobs. Short ids are refused
/// rather than resolved, since the repository may not be local.
fn parse_commit(text: &str) -> Result<String, String> {
    if text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(text.to_ascii_lowercase());
    }
    let problem = if text.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("has {} hex digits", text.len())
    } else {
        "is not hexadecimal".to_owned()
    };
    Err(format!(
        "`{text}` {problem}; give the full 40-hex commit id (e.g. from `git rev-parse {text}`)"
    ))
}

fn parse_name(text: &str) -> Result<String, String> {
    surveil_common::tokens::check_name(text).map(|()| text.to_owned())
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    match surveil_common::parse_duration(text)? {
        age if age.is_zero() => Err(format!(
            "`{text}` would select every finished job; use --keep-jobs 0 to mean that"
        )),
        age => Ok(age),
    }
}

fn parse_repo(text: &str) -> Result<String, String> {
    surveil_common::canonical_repo(text).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_must_be_full_hex_ids() {
        let full = "0123456789ABCDEF0123456789abcdef01234567";
        assert_eq!(parse_commit(full).unwrap(), full.to_ascii_lowercase());
        let err = parse_commit("0123abc").unwrap_err();
        assert!(
            err.contains("has 7 hex digits") && err.contains("full 40-hex"),
            "{err}"
        );
        let err = parse_commit("main").unwrap_err();
        assert!(err.contains("`main` is not hexadecimal"), "{err}");
    }

    #[test]
    fn json_is_accepted_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from(["surveil", "--json", "status"]).unwrap();
        assert!(cli.json);
        let cli = Cli::try_parse_from(["surveil", "job", "7", "--json"]).unwrap();
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Job { id: 7 }));
    }

    #[test]
    fn jobs_defaults_and_status_labels() {
        let cli = Cli::try_parse_from(["surveil", "jobs"]).unwrap();
        let Command::Jobs {
            limit,
            status,
            repo,
            branch,
            pull_request,
        } = cli.command
        else {
            panic!("expected jobs");
        };
        assert_eq!((limit, status, repo), (100, None, None));
        assert_eq!((branch, pull_request), (None, None));
        let cli = Cli::try_parse_from(["surveil", "jobs", "--branch", "release/1", "--pr", "12"])
            .unwrap();
        let Command::Jobs {
            branch,
            pull_request,
            ..
        } = cli.command
        else {
            panic!("expected jobs");
        };
        assert_eq!(
            (branch.as_deref(), pull_request),
            (Some("release/1"), Some(12))
        );
        let err = Cli::try_parse_from(["surveil", "jobs", "--pr", "seven"]).unwrap_err();
        assert!(err.to_string().contains("--pr"), "{err}");
        for label in [
            "queued",
            "running",
            "passed",
            "failed",
            "error",
            "cancelled",
        ] {
            let cli = Cli::try_parse_from(["surveil", "jobs", "--status", label]).unwrap();
            let Command::Jobs {
                status: Some(s), ..
            } = cli.command
            else {
                panic!("expected a status");
            };
            assert_eq!(JobStatus::from(s).label(), label);
        }
    }
}
