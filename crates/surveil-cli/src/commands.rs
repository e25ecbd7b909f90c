//! Runs one parsed command: reads the token, connects, sends the request,
//! and writes the answer as JSON or as text. Failures come back as
//! `anyhow` errors that say what failed; `main.rs` prints them and picks the
//! exit code.
//!
//! It must not parse arguments or decide colour from the environment: the
//! caller passes both in.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, bail};
use surveil_common::tls::{self, ClientTls};
use surveil_common::{Dialer, Secret};
use surveil_proto::{GetStatusReply, JobStatus, ListJobs};

use crate::args::{Cli, Command, TokenCommand};
use crate::client::{CONNECT_TIMEOUT, Client, ClientError};
use crate::output::{self, JobJson, LogPrinter, RunnerJson, StatusJson, SubmitJson};

/// How to reach the dispatchers, for a second connection (to the leader).
struct Reach {
    token: Option<Secret>,
    tls: Option<ClientTls>,
    /// Whether `--dispatch` named several dispatchers: `status` then
    /// describes the leader rather than the standby that answered.
    several: bool,
}

impl Reach {
    async fn connect(&self, addrs: Vec<String>) -> Result<Client<tls::Stream>, ClientError> {
        let mut dialer = Dialer::new(addrs, self.tls.clone(), CONNECT_TIMEOUT);
        Client::connect(&mut dialer, self.token.as_ref()).await
    }
}

/// Runs `cli`'s command against its dispatcher, writing the answer to
/// `out`. `colour` says whether statuses may be coloured (stdout is a
/// terminal and `NO_COLOR` is unset).
///
/// A standby welcomes a client but refuses every request but `GetStatus`
/// with `NOT_LEADER`, before doing or printing anything: the command is
/// then run again, once, against the leader it names.
pub async fn run(cli: Cli, colour: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Command::Token { action } = cli.command {
        return token(action, cli.json, out);
    }
    let reach = Reach {
        token: cli.connect.token()?,
        tls: cli.connect.tls()?,
        several: cli.connect.dispatch.len() > 1,
    };
    let mut client = reach.connect(cli.connect.dispatch.clone()).await?;
    let err = match execute(&mut client, &cli, &reach, colour, out).await {
        Ok(()) => return Ok(()),
        Err(err) => err,
    };
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::NotLeader { leader_addr, .. }) if !leader_addr.is_empty() => {
            let mut leader = reach.connect(vec![leader_addr.clone()]).await?;
            execute(&mut leader, &cli, &reach, colour, out).await
        }
        _ => Err(err),
    }
}

async fn execute(
    client: &mut Client<tls::Stream>,
    cli: &Cli,
    reach: &Reach,
    colour: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command.clone() {
        Command::Jobs {
            repo,
            branch,
            pull_request,
            status,
            limit,
        } => {
            let query = ListJobs {
                repo: repo.as_deref().map(filter_repo).transpose()?,
                status: status.map_or(JobStatus::Unspecified, JobStatus::from) as i32,
                limit,
                branch,
                pull_request,
                before: None,
            };
            let jobs = client.list_jobs(query).await?;
            if json {
                let model: Vec<JobJson> = jobs.iter().map(JobJson::from).collect();
                write(out, &output::to_json(&model)?)
            } else {
                write(out, &output::jobs_table(&jobs, SystemTime::now(), colour))
            }
        }
        Command::Job { id } => {
            let Some(job) = client.get_job(id).await? else {
                bail!("no job {id}");
            };
            if json {
                write(out, &output::to_json(&JobJson::with_attempts(&job))?)
            } else {
                write(out, &output::job_details(&job, SystemTime::now(), colour))
            }
        }
        Command::Logs {
            id,
            follow,
            attempt,
        } => logs(client, id, follow, attempt, out).await,
        Command::Runners => {
            let runners = client.list_runners().await?;
            if json {
                let model: Vec<RunnerJson> = runners.iter().map(RunnerJson::from).collect();
                write(out, &output::to_json(&model)?)
            } else {
                write(out, &output::runners_table(&runners, SystemTime::now()))
            }
        }
        Command::Status => {
            let status = status(client, reach).await?;
            if json {
                write(out, &output::to_json(&StatusJson::from(&status))?)
            } else {
                write(out, &output::status_lines(&status))
            }
        }
        Command::Submit {
            repo,
            commit,
            branch,
        } => submit(client, &repo, &branch, commit, json, out).await,
        Command::Cancel { id } => cancel(client, id, json, out).await,
        Command::Rerun { id } => rerun(client, id, json, out).await,
        Command::Prune {
            older_than,
            keep_jobs,
        } => prune(client, older_than, keep_jobs, json, out).await,
        Command::Token { .. } => unreachable!("handled before connecting"),
    }
}

/// Deletes old finished jobs' logs and says how much went (`{"attempts":
/// N, "bytes": B}` under `--json`).
async fn prune(
    client: &mut Client<tls::Stream>,
    older_than: Option<std::time::Duration>,
    keep_jobs: Option<u64>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let older_than_ms = older_than.map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    let reply = client.prune(older_than_ms, keep_jobs).await?;
    if !reply.ok {
        bail!("cannot prune: {}", reply.message);
    }
    if json {
        write(
            out,
            &output::to_json(&output::PruneJson {
                attempts: reply.attempts,
                bytes: reply.bytes,
            })?,
        )
    } else {
        write(
            out,
            &format!(
                "deleted the logs of {} attempts ({} bytes); their jobs and results are kept\n",
                reply.attempts, reply.bytes
            ),
        )
    }
}

/// Queues a new attempt of a finished job and prints the job as `submit`
/// prints a new one (the job, with its attempts, under `--json`).
async fn rerun(
    client: &mut Client<tls::Stream>,
    id: u64,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let reply = client.rerun(id).await?;
    let Some(job) = reply.job else {
        bail!("no job {id}");
    };
    if !reply.ok {
        let why = if reply.message.is_empty() {
            format!("it is {}", job.status().label())
        } else {
            reply.message
        };
        bail!("cannot rerun job {id}: {why}");
    }
    if json {
        write(out, &output::to_json(&JobJson::with_attempts(&job))?)
    } else {
        write(
            out,
            &format!(
                "job {id}: {} of {} on branch {} (attempt {} next)\n",
                job.commit,
                job.repo,
                job.branch,
                job.attempt + 1
            ),
        )
    }
}

/// The dispatcher's status; with several `--dispatch` addresses, the
/// leader's when a standby answered (the standby's own if the leader
/// cannot be reached: it still says who leads).
async fn status(
    client: &mut Client<tls::Stream>,
    reach: &Reach,
) -> Result<GetStatusReply, ClientError> {
    let status = client.status().await?;
    if !(reach.several && status.standby && !status.leader_addr.is_empty()) {
        return Ok(status);
    }
    let leader = async {
        let mut leader = reach.connect(vec![status.leader_addr.clone()]).await?;
        leader.status().await
    };
    match leader.await {
        Ok(leader) if !leader.standby => Ok(leader),
        _ => Ok(status),
    }
}

/// Queues one commit and prints its job id.
async fn submit(
    client: &mut Client<tls::Stream>,
    repo: &str,
    branch: &str,
    commit: String,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ids = client.submit(repo, branch, vec![commit.clone()]).await?;
    if json {
        return write(out, &output::to_json(&SubmitJson { job_ids: ids })?);
    }
    let Some(id) = ids.first() else {
        bail!("the dispatcher acknowledged the submission without a job id");
    };
    write(
        out,
        &format!("job {id}: {commit} of {repo} on branch {branch}\n"),
    )
}

/// Asks for a job to be cancelled and prints what became of it.
async fn cancel(
    client: &mut Client<tls::Stream>,
    id: u64,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let reply = client.cancel(id).await?;
    if !reply.ok {
        let Some(job) = reply.job else {
            bail!("no job {id}");
        };
        let why = if reply.message.is_empty() {
            format!("it is {}", job.status().label())
        } else {
            reply.message
        };
        bail!("cannot cancel job {id}: {why}");
    }
    // The reply should carry the job; if a dispatcher leaves it out, ask
    // for it so the output is the same either way.
    let job = match reply.job {
        Some(job) => job,
        None => client
            .get_job(id)
            .await?
            .with_context(|| format!("job {id} vanished after it was cancelled"))?,
    };
    if json {
        write(out, &output::to_json(&JobJson::from(&job))?)
    } else {
        write(
            out,
            &format!(
                "job {id}: cancel requested (status now {})\n",
                job.status().label()
            ),
        )
    }
}

/// Prints a job's log as it arrives until the dispatcher's last reply.
async fn logs(
    client: &mut Client<tls::Stream>,
    id: u64,
    follow: bool,
    attempt: Option<u32>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    client.read_log(id, 0, follow, attempt).await?;
    let mut printer = LogPrinter::new();
    loop {
        let reply = client.next_log(follow).await?;
        if reply.not_found {
            bail!("no job {id}");
        }
        printer
            .write(&reply, out)
            .context("writing the log to stdout")?;
        if reply.end {
            return Ok(());
        }
    }
}

/// The `--repo` filter as jobs name repositories. Unlike `submit`, the
/// repository need not exist here: the CLI may run on another machine than
/// the observer, so an absolute path that does not resolve locally is
/// taken as written.
fn filter_repo(repo: &str) -> anyhow::Result<String> {
    match surveil_common::canonical_repo(repo) {
        Ok(canonical) => Ok(canonical),
        Err(_) if Path::new(repo).is_absolute() => Ok(repo.to_owned()),
        Err(err) => Err(err.context("--repo")),
    }
}

fn write(out: &mut dyn Write, text: &str) -> anyhow::Result<()> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// `surveil token …`: edits the tokens file; never dials.
fn token(action: TokenCommand, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    use surveil_common::tokens;
    match action {
        TokenCommand::Add {
            name,
            role,
            scope,
            file,
        } => {
            let secret = tokens::add(&file.tokens_file, &name, role, scope)?;
            eprintln!(
                "surveil: added {role} token {name:?} to {}; this is the only time its secret is shown: put it in the peer's --token-file (chmod 600)",
                file.tokens_file.display()
            );
            if json {
                let value = serde_json::json!({
                    "name": name,
                    "role": role.label(),
                    "scope": scope.map(tokens::Scope::label),
                    "token": secret.expose(),
                });
                write(out, &format!("{}\n", serde_json::to_string(&value)?))
            } else {
                write(out, &format!("{}\n", secret.expose()))
            }
        }
        TokenCommand::Revoke { name, file } => {
            if !tokens::revoke(&file.tokens_file, &name)? {
                bail!("{} has no token named {name:?}", file.tokens_file.display());
            }
            eprintln!(
                "surveil: revoked token {name:?}; the dispatcher ends its sessions within a second"
            );
            Ok(())
        }
        TokenCommand::List { file } => {
            let list = tokens::TokensFile::load(&file.tokens_file)?;
            let mut text = String::new();
            for entry in &list.tokens {
                let scope = entry.scope.map_or("-", tokens::Scope::label);
                let created = entry.created.as_deref().unwrap_or("-");
                text.push_str(&format!(
                    "{}\t{}\t{scope}\t{created}\n",
                    entry.name, entry.role
                ));
            }
            write(out, &text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_filter_canonicalises_what_exists_and_keeps_remote_or_absolute_names() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            filter_repo(dir.path().to_str().unwrap()).unwrap(),
            canonical.to_str().unwrap()
        );
        assert_eq!(
            filter_repo("/srv/git/not-here-on-this-machine").unwrap(),
            "/srv/git/not-here-on-this-machine"
        );
        assert_eq!(
            filter_repo("https://example.com/a.git").unwrap(),
            "https://example.com/a.git"
        );
        let err = filter_repo("surely/not/a/relative/path").unwrap_err();
        assert!(format!("{err:#}").contains("--repo"), "{err:#}");
    }
}
