//! A complete minimal Surveil runner built on `surveil-proto`, tokio and std
//! alone: the starting point for a runner of your own. It handshakes, answers
//! pings, runs each assigned job as one `sh -c` task, streams its output as
//! one `Log` chunk and reports the result. It does not fetch the repository,
//! read `.surveil.toml`, reconnect or resend unacknowledged results; a real
//! runner does (see docs/protocol.md).
//!
//! `cargo run -p surveil-proto --example custom_runner -- --dispatch 127.0.0.1:9000 /srv/git/app`

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use surveil_proto::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: custom_runner --dispatch ADDR [--name NAME] [--run CMD] REPO...
  --dispatch ADDR  the dispatcher's host:port
  --name NAME      this runner's unique name (default: custom-runner)
  --run CMD        the shell command each job runs, with $REPO, $BRANCH and
                   $COMMIT set (default: echo \"building $COMMIT\")
  REPO...          the repositories this runner builds, as jobs name them
The token, if the dispatcher wants one, is read from SURVEIL_TOKEN.
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub dispatch: String,
    pub name: String,
    pub token: String,
    pub command: String,
    pub repos: Vec<String>,
}

/// Parses the arguments after the program name; `Ok(None)` for `--help`.
pub fn parse_args(
    argv: impl IntoIterator<Item = String>,
    token: Option<String>,
) -> Result<Option<Args>, String> {
    let (mut dispatch, mut name, mut command) = (None, "custom-runner".to_owned(), None);
    let mut repos = Vec::new();
    let mut argv = argv.into_iter();
    while let Some(arg) = argv.next() {
        let mut value = |flag: &str| argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--dispatch" => dispatch = Some(value("--dispatch")?),
            "--name" => name = value("--name")?,
            "--run" => command = Some(value("--run")?),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            _ => repos.push(arg),
        }
    }
    let dispatch = dispatch.ok_or("--dispatch ADDR is required")?;
    if repos.is_empty() {
        return Err("name at least one REPO to build".into());
    }
    let command = command.unwrap_or_else(|| "echo \"building $COMMIT\"".into());
    let token = token.unwrap_or_default();
    Ok(Some(Args {
        dispatch,
        name,
        token,
        command,
        repos,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let token = std::env::var("SURVEIL_TOKEN").ok();
    let args = match parse_args(std::env::args().skip(1), token) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("custom_runner: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let outcome = match tokio::net::TcpStream::connect(&args.dispatch).await {
        Ok(stream) => run(stream, &args).await,
        Err(err) => Err(format!("cannot connect to {}: {err}", args.dispatch).into()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("custom_runner: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one session over `io` until the dispatcher closes it.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    args: &Args,
) -> Result<(), BoxError> {
    let mut conn = Connection::new(io);
    let mut hello = Hello::new(Role::Runner, &args.name);
    (hello.token, hello.slots, hello.repos) = (args.token.clone(), 1, args.repos.clone());
    let welcome = conn
        .client_handshake(hello, Duration::from_secs(10))
        .await?;
    eprintln!("connected, session {}", welcome.session_id);

    // One writer task, so pings are answered while a job is running.
    let (mut reader, mut writer) = conn.split();
    let (tx, mut outbox) = mpsc::channel::<Envelope>(64);
    let sender = tokio::spawn(async move {
        while let Some(msg) = outbox.recv().await {
            writer.send(msg).await?;
        }
        Ok::<_, CodecError>(())
    });
    let mut jobs: HashMap<(u64, u32), JoinHandle<()>> = HashMap::new();
    while let Some(msg) = reader.recv().await? {
        match msg {
            Msg::Ping(ping) => tx.send(Pong { seq: ping.seq }.into()).await?,
            Msg::Assign(job) => {
                let key = (job.job_id, job.attempt);
                let allowed = args.repos.contains(&job.repo);
                let work = run_job(job, allowed, args.command.clone(), tx.clone());
                jobs.insert(key, tokio::spawn(work));
            }
            Msg::Cancel(Cancel { job_id, attempt }) => {
                // A finished job has already sent its result: nothing to do.
                let job = jobs.remove(&(job_id, attempt));
                if let Some(job) = job.filter(|job| !job.is_finished()) {
                    // Aborting drops the child, which kills `sh`. A real runner starts
                    // each task in its own process group and kills the group.
                    job.abort();
                    let mut result = JobFinished {
                        job_id,
                        attempt,
                        ..Default::default()
                    };
                    result.set_status(JobStatus::Cancelled);
                    result.message = "cancelled by the dispatcher".into();
                    tx.send(result.into()).await?;
                }
            }
            Msg::ResultAck(ack) => {
                jobs.remove(&(ack.job_id, ack.attempt));
                let verdict = if ack.accepted { "recorded" } else { "refused" };
                let (job, attempt) = (ack.job_id, ack.attempt);
                eprintln!(
                    "job {job} attempt {attempt}: result {verdict} {}",
                    ack.message
                );
            }
            Msg::Error(err) => return Err(format!("dispatcher says: {}", err.message).into()),
            other => return Err(format!("unexpected {} from the dispatcher", other.name()).into()),
        }
    }
    drop(tx);
    sender.await??;
    Ok(())
}

async fn run_job(job: Assign, allowed: bool, command: String, tx: mpsc::Sender<Envelope>) {
    let (job_id, attempt) = (job.job_id, job.attempt);
    let mut result = JobFinished::default();
    (result.job_id, result.attempt) = (job_id, attempt);
    if !allowed {
        // Never build a repository this runner did not offer.
        result.set_status(JobStatus::Error);
        result.message = format!("repository {} is not one this runner builds", job.repo);
        let _ = tx.send(result.into()).await;
        return;
    }
    let _ = tx.send(Started { job_id, attempt }.into()).await;
    let started = Instant::now();
    let output = tokio::process::Command::new("sh")
        .args(["-c", &command])
        .env("COMMIT", job.commit)
        .envs([("REPO", job.repo), ("BRANCH", job.branch)])
        .kill_on_drop(true)
        .output()
        .await;
    match output {
        Ok(out) => {
            let mut data = [out.stdout, out.stderr].concat();
            data.truncate(64 * 1024); // the most one Log chunk may carry
            let (task, stream) = (0, Stream::Stdout as i32);
            let log = Log {
                job_id,
                attempt,
                task,
                stream,
                offset: 0,
                data: data.into(),
            };
            let _ = tx.send(log.into()).await;
            let (status, task_status) = match out.status.success() {
                true => (JobStatus::Passed, TaskStatus::Passed),
                false => (JobStatus::Failed, TaskStatus::Failed),
            };
            result.set_status(status);
            result.tasks.push(TaskResult {
                name: "build".into(),
                status: task_status as i32,
                exit_code: out.status.code(),
                signal: std::os::unix::process::ExitStatusExt::signal(&out.status),
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                message: String::new(),
                ..TaskResult::default()
            });
        }
        Err(err) => {
            result.set_status(JobStatus::Error);
            result.message = format!("cannot run sh: {err}");
        }
    }
    let _ = tx.send(result.into()).await;
}
