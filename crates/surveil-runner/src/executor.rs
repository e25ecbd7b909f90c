//! Runs a pipeline's tasks: `sh -c RUN` in the checkout, under the
//! runner's [`Isolation`] (the bubblewrap sandbox, a task user, or none),
//! each in its own process group, output streamed into the job's
//! [`JobLog`] while it runs, timeouts and cancellation enforced on the
//! whole group (SIGTERM, then SIGKILL after a grace period) so
//! grandchildren die too.
//!
//! It owns processes and their pipes, nothing else: it does not check out,
//! parse pipeline files or talk to the dispatcher, it leaves how a task is
//! isolated to [`crate::sandbox`], and it never reads the runner's own
//! environment (the caller passes it in, and only an allowlist of it
//! reaches tasks).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use surveil_proto::{JobStatus, Stream, TaskResult, TaskStatus};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::joblog::{JobLog, MAX_CHUNK};
use crate::pipeline::{Pipeline, Task};
use crate::sandbox::{self, Isolation, TaskCommand};

/// Pending output is sent at the latest this long after it was read, so a
/// slow trickle still reaches `surveil logs --follow` promptly.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// How long a task's process group gets between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// The furthest the executor ever waits: longer than any task timeout
/// (the parser caps them at [`crate::pipeline::MAX_TIMEOUT`]) or kill
/// grace, short enough that adding it to the clock cannot overflow.
const NEVER: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `wait` after `start`, saturated at [`NEVER`]: deadline arithmetic must
/// not panic once the task's processes exist, whatever `Task` or flag it
/// was handed. (A clock that cannot take even a year more yields `start`:
/// a deadline at once is loud; a panic would orphan the group.)
fn after(start: Instant, wait: Duration) -> Instant {
    start.checked_add(wait.min(NEVER)).unwrap_or(start)
}

/// Who the job is, for the tasks' `SURVEIL_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    /// `SURVEIL_JOB_ID`.
    pub job_id: u64,
    /// `SURVEIL_ATTEMPT`.
    pub attempt: u32,
    /// `SURVEIL_REPO`.
    pub repo: String,
    /// `SURVEIL_BRANCH`.
    pub branch: String,
    /// `SURVEIL_REF`: the full ref the job was submitted for (empty when
    /// the submitter named none).
    pub git_ref: String,
    /// `SURVEIL_COMMIT`.
    pub commit: String,
}

/// How tasks are run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The runner's environment; tasks get only the names in
    /// [`sandbox::TASK_ENV`] (and `LC_*`) from it.
    pub base_env: Arc<Vec<(OsString, OsString)>>,
    /// Sandbox, task user or none, decided at start-up.
    pub isolation: Arc<Isolation>,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Tasks of one job run at once at most (`--max-parallel-tasks`),
    /// whatever the pipeline's `parallelism`.
    pub max_parallel: usize,
    /// The task caches; `None`: `cache` keys are ignored (said in the log).
    pub cache: Option<Arc<crate::cache::Cache>>,
}

/// Why a job is being stopped, set by whoever cancels it.
#[derive(Debug, Clone, Default)]
pub struct CancelSignal {
    token: CancellationToken,
    reason: Arc<std::sync::OnceLock<String>>,
}

impl CancelSignal {
    /// A signal not yet raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the job; the first reason given is the one reported.
    pub fn cancel(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
        self.token.cancel();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the job is cancelled.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// The reason given to [`cancel`](Self::cancel).
    pub fn reason(&self) -> String {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| "cancelled".to_owned())
    }
}

/// What running the pipeline produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOutcome {
    /// PASSED, FAILED or CANCELLED; ERROR when the checkout could not be
    /// handed to the task user.
    pub status: JobStatus,
    /// Why, for CANCELLED; empty otherwise.
    pub message: String,
    /// One per pipeline task, in order.
    pub tasks: Vec<TaskResult>,
}

/// The job's log, shared by the tasks that run at once. A writer holds it
/// for one chunk or line, so each chunk gets its offset and goes out in
/// offset order.
pub type SharedLog<'a> = tokio::sync::Mutex<&'a mut JobLog>;

/// Runs the tasks of `pipeline` in `dir`: each once its needs have
/// passed, up to the pipeline's `parallelism` (capped by
/// [`ExecOptions::max_parallel`]) at once. Caches are restored before the
/// first task and saved, test reports read, after the last one ended.
pub async fn run_pipeline(
    pipeline: &Pipeline,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
    log: &mut JobLog,
    cancel: &CancelSignal,
) -> PipelineOutcome {
    log.system(0, &format!("isolation: {}", options.isolation.describe()))
        .await;
    // Still the runner's checkout, before any task ran: nothing can move
    // under the restore.
    let keys = crate::post::restore_caches(pipeline, dir, job, options, log).await;
    if let Err(problem) = hand_over(options, dir).await {
        let message = format!("cannot give the checkout to the task user: {problem}");
        log.system(0, &message).await;
        return PipelineOutcome {
            status: JobStatus::Error,
            message,
            tasks: pipeline
                .tasks
                .iter()
                .map(|t| skipped(t, String::new()))
                .collect(),
        };
    }
    let mut outcome = {
        let shared = tokio::sync::Mutex::new(&mut *log);
        run_graph(pipeline, dir, job, options, &shared, cancel).await
    };
    // Every task's processes are gone now: the checkout holds still.
    crate::post::after_tasks(pipeline, dir, job, options, log, &keys, &mut outcome.tasks).await;
    outcome
}

type Running<'a> = futures_util::stream::FuturesUnordered<
    std::pin::Pin<Box<dyn std::future::Future<Output = (usize, TaskResult, bool)> + Send + 'a>>,
>;

/// The scheduling loop: starts what is ready, skips what can no longer
/// run, until every task has a result.
async fn run_graph(
    pipeline: &Pipeline,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
    log: &SharedLog<'_>,
    cancel: &CancelSignal,
) -> PipelineOutcome {
    use futures_util::StreamExt;
    let limit = pipeline
        .parallelism
        .map_or(usize::MAX, |p| p as usize)
        .min(options.max_parallel.max(1));
    let n = pipeline.tasks.len();
    let mut results: Vec<Option<TaskResult>> = vec![None; n];
    let mut started = vec![false; n];
    let mut running: Running<'_> = futures_util::stream::FuturesUnordered::new();
    let mut active = 0;
    loop {
        let mut changed = true;
        while changed {
            changed = false;
            for (i, task) in pipeline.tasks.iter().enumerate() {
                if started[i] {
                    continue;
                }
                let Some(ready) = readiness(pipeline, task, &results, cancel) else {
                    continue;
                };
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                match ready {
                    Err(reason) => {
                        started[i] = true;
                        changed = true;
                        // Set now, so that dependants see it in this pass.
                        results[i] = Some(skipped(task, reason.clone()));
                        running.push(Box::pin(async move {
                            let line = format!("task `{}` skipped: {reason}", task.name);
                            log.lock().await.system(index, &line).await;
                            (i, skipped(task, reason), false)
                        }));
                    }
                    Ok(()) if active < limit => {
                        started[i] = true;
                        active += 1;
                        running.push(Box::pin(async move {
                            let result =
                                run_task(task, index, dir, job, options, log, cancel).await;
                            let status = result.status();
                            if task.allow_failure
                                && !matches!(status, TaskStatus::Passed | TaskStatus::Cancelled)
                            {
                                let line = format!(
                                    "task `{}` {} but allow_failure = true: continuing",
                                    task.name,
                                    status.label()
                                );
                                log.lock().await.system(index, &line).await;
                            }
                            (i, result, true)
                        }));
                    }
                    Ok(()) => {}
                }
            }
        }
        let Some((i, result, ran)) = running.next().await else {
            break;
        };
        if ran {
            active -= 1;
        }
        results[i] = Some(result);
    }
    conclude_job(pipeline, results, cancel)
}

/// `None`: a need has no result yet. `Ok`: it may start. `Err`: it never
/// will, and why.
fn readiness(
    pipeline: &Pipeline,
    task: &Task,
    results: &[Option<TaskResult>],
    cancel: &CancelSignal,
) -> Option<Result<(), String>> {
    if cancel.is_cancelled() {
        return Some(Err(format!("the job was cancelled ({})", cancel.reason())));
    }
    let mut waiting = false;
    for &j in &task.needs {
        let need = &pipeline.tasks[j];
        match results[j].as_ref().map(TaskResult::status) {
            None => waiting = true,
            Some(TaskStatus::Passed) => {}
            Some(TaskStatus::Skipped | TaskStatus::Cancelled) => {
                return Some(Err(format!("its need `{}` did not run", need.name)));
            }
            Some(_) if need.allow_failure => {}
            Some(status) => {
                return Some(Err(format!("its need `{}` {}", need.name, status.label())));
            }
        }
    }
    (!waiting).then_some(Ok(()))
}

/// The job's status from its tasks': CANCELLED when cancelling stopped or
/// skipped any, FAILED when one failed without `allow_failure`.
fn conclude_job(
    pipeline: &Pipeline,
    results: Vec<Option<TaskResult>>,
    cancel: &CancelSignal,
) -> PipelineOutcome {
    let tasks: Vec<TaskResult> = results
        .into_iter()
        .zip(&pipeline.tasks)
        .map(|(r, t)| r.unwrap_or_else(|| skipped(t, String::new())))
        .collect();
    let stopped = cancel.is_cancelled()
        && tasks.iter().any(|t| {
            t.status() == TaskStatus::Cancelled
                || (t.status() == TaskStatus::Skipped
                    && t.message.starts_with("the job was cancelled"))
        });
    let failed = tasks.iter().zip(&pipeline.tasks).any(|(r, t)| {
        !t.allow_failure
            && !matches!(
                r.status(),
                TaskStatus::Passed | TaskStatus::Skipped | TaskStatus::Cancelled
            )
    });
    let (status, message) = if stopped {
        (JobStatus::Cancelled, cancel.reason())
    } else if failed {
        (JobStatus::Failed, String::new())
    } else {
        (JobStatus::Passed, String::new())
    };
    PipelineOutcome {
        status,
        message,
        tasks,
    }
}

/// One SYSTEM line from a task running beside others.
async fn say(log: &SharedLog<'_>, task: u32, line: &str) {
    log.lock().await.system(task, line).await;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Gives the checkout to the task user, if the runner has one. The job has
/// read its pipeline file by now, while the checkout was still the
/// runner's, so no task could have swapped it for a symlink.
async fn hand_over(options: &ExecOptions, dir: &Path) -> Result<(), String> {
    let (isolation, dir) = (options.isolation.clone(), dir.to_owned());
    match tokio::task::spawn_blocking(move || isolation.hand_over(&dir)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn skipped(task: &Task, reason: String) -> TaskResult {
    TaskResult {
        name: task.name.clone(),
        status: TaskStatus::Skipped as i32,
        message: reason,
        ..TaskResult::default()
    }
}

/// Everything a task's process gets: the allowlisted part of the runner's
/// environment, the task's own `env`, then the job's `SURVEIL_*` variables
/// (last, so that a pipeline cannot pass itself off as another job).
fn task_environment(task: &Task, job: &JobEnv, options: &ExecOptions) -> Vec<(OsString, OsString)> {
    let mut env = sandbox::task_env(&options.base_env, options.isolation.task_user());
    env.extend(
        task.env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    env.extend(
        [
            ("SURVEIL_JOB_ID", job.job_id.to_string()),
            ("SURVEIL_ATTEMPT", job.attempt.to_string()),
            ("SURVEIL_COMMIT", job.commit.clone()),
            ("SURVEIL_REPO", job.repo.clone()),
            ("SURVEIL_BRANCH", job.branch.clone()),
            ("SURVEIL_REF", job.git_ref.clone()),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    env
}

/// Why the task's process group was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
    /// The main process exited; leftovers in its group are cleaned up.
    Leftovers,
}

async fn run_task(
    task: &Task,
    index: u32,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
    log: &SharedLog<'_>,
    cancel: &CancelSignal,
) -> TaskResult {
    let mut result = TaskResult {
        name: task.name.clone(),
        ..TaskResult::default()
    };
    say(log, index, &format!("task `{}`: {}", task.name, task.run)).await;
    result.started_at_ms = Some(unix_ms());
    let Ok((mut child, started)) =
        spawn_task(task, dir, job, options).map_err(|problem| result.message = problem)
    else {
        result.status = TaskStatus::Error as i32;
        result.started_at_ms = None;
        let line = format!("task `{}`: {}", task.name, result.message);
        say(log, index, &line).await;
        return result;
    };
    let mut group = options.isolation.task_group(child.id());
    let (mut rx, readers) = read_output(&mut child);

    let mut pending = Pending::default();
    let deadline = after(started, task.timeout);
    let mut exit: Option<ExitStatus> = None;
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    // After the main process is gone, how long we keep reading pipes that a
    // process outside the group may hold open.
    let mut give_up_at: Option<Instant> = None;
    let mut pipes_open = true;
    loop {
        if exit.is_some() && !pipes_open {
            break;
        }
        let far = after(Instant::now(), NEVER);
        tokio::select! {
            chunk = rx.recv(), if pipes_open => match chunk {
                Some((stream, data)) => pending.push(index, stream, &data, log).await,
                None => pipes_open = false,
            },
            () = tokio::time::sleep_until(pending.flush_at.unwrap_or(far)), if pending.flush_at.is_some() => {
                pending.flush(index, log).await;
            }
            waited = child.wait(), if exit.is_none() => {
                group.reaped();
                match waited {
                    Ok(status) => exit = Some(status),
                    Err(e) => {
                        result.message = format!("waiting for the task failed: {e}");
                        exit = Some(ExitStatus::from_raw(-1));
                    }
                }
                result.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                if stop.is_none() {
                    stop = Some(Stop::Leftovers);
                    group.signal(Signal::SIGTERM);
                    kill_at = Some(after(Instant::now(), options.kill_grace));
                }
                give_up_at = Some(after(Instant::now(), options.kill_grace.saturating_mul(2)));
            }
            () = tokio::time::sleep_until(deadline), if stop.is_none() => {
                stop = Some(Stop::TimedOut);
                say(log, index, &format!(
                    "task `{}` timed out after {}: terminating its process group",
                    task.name, humantime::format_duration(task.timeout)
                )).await;
                group.signal(Signal::SIGTERM);
                kill_at = Some(after(Instant::now(), options.kill_grace));
            }
            () = cancel.cancelled(), if stop.is_none() => {
                stop = Some(Stop::Cancelled);
                say(log, index, &format!("task `{}` cancelled ({}): terminating its process group", task.name, cancel.reason())).await;
                group.signal(Signal::SIGTERM);
                kill_at = Some(after(Instant::now(), options.kill_grace));
            }
            () = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                kill_at = None;
                if stop != Some(Stop::Leftovers) || pipes_open {
                    group.signal(Signal::SIGKILL);
                }
            }
            () = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() && pipes_open => {
                // Something that left the process group still holds the
                // pipes; the task itself is over.
                say(log, index, "output pipes still held open by a process outside the task's process group: no longer reading them").await;
                pipes_open = false;
            }
        }
    }
    for reader in readers {
        reader.abort();
    }
    while let Ok((stream, data)) = rx.try_recv() {
        pending.push(index, stream, &data, log).await;
    }
    pending.flush(index, log).await;
    // Whatever is left of the group dies with the task; on the ways out
    // that never get here, dropping `group` does it.
    group.finish();

    let exit = exit.unwrap_or_else(|| ExitStatus::from_raw(-1));
    (result.exit_code, result.signal) = group.decode(exit);
    conclude(&mut result, task, index, stop, exit.success(), cancel, log).await;
    result
}

/// Builds the task's command (sandboxed as configured) and starts it in
/// its own process group. `Err` says why it could not start.
fn spawn_task(
    task: &Task,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
) -> Result<(tokio::process::Child, Instant), String> {
    let env = task_environment(task, job, options);
    let spec = TaskCommand {
        run: &task.run,
        dir,
        env: &env,
        network: task.network,
    };
    let mut command = options.isolation.command(&spec)?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a signal reaches everything the task started.
        .process_group(0);
    let started = Instant::now();
    let child = command
        .spawn()
        .map_err(|e| format!("could not start the task's process: {e}"))?;
    Ok((child, started))
}

/// The task's status from how it stopped, with the closing SYSTEM line.
async fn conclude(
    result: &mut TaskResult,
    task: &Task,
    index: u32,
    stop: Option<Stop>,
    success: bool,
    cancel: &CancelSignal,
    log: &SharedLog<'_>,
) {
    let status = match stop {
        Some(Stop::TimedOut) => {
            result.message = format!(
                "timed out after {}",
                humantime::format_duration(task.timeout)
            );
            TaskStatus::TimedOut
        }
        Some(Stop::Cancelled) => {
            result.message = cancel.reason();
            TaskStatus::Cancelled
        }
        _ if success => TaskStatus::Passed,
        _ => TaskStatus::Failed,
    };
    result.status = status as i32;
    let how = match (result.exit_code, result.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => "no exit status".to_owned(),
    };
    log.lock()
        .await
        .system(
            index,
            &format!(
                "task `{}` {} ({how}) in {} ms",
                task.name,
                status.label(),
                result.duration_ms
            ),
        )
        .await;
}

/// Output chunks of a task, tagged with their stream.
type Output = mpsc::Receiver<(Stream, Vec<u8>)>;

/// Reads the child's stdout and stderr on their own tasks into one channel.
fn read_output(child: &mut tokio::process::Child) -> (Output, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>)>(16);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_pipe(out, Stream::Stdout, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_pipe(err, Stream::Stderr, tx)));
    }
    (rx, readers)
}

async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Output read but not yet sent, per stream; full chunks go at once, the
/// rest by [`FLUSH_INTERVAL`] after the first pending byte.
#[derive(Default)]
struct Pending {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    flush_at: Option<Instant>,
}

impl Pending {
    async fn push(&mut self, task: u32, stream: Stream, data: &[u8], log: &SharedLog<'_>) {
        let buf = match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        buf.extend_from_slice(data);
        if buf.len() >= MAX_CHUNK {
            let full = buf.len() - buf.len() % MAX_CHUNK;
            let chunk: Vec<u8> = buf.drain(..full).collect();
            log.lock().await.write(task, stream, &chunk).await;
        }
        if self.stdout.is_empty() && self.stderr.is_empty() {
            self.flush_at = None;
        } else if self.flush_at.is_none() {
            self.flush_at = Some(after(Instant::now(), FLUSH_INTERVAL));
        }
    }

    async fn flush(&mut self, task: u32, log: &SharedLog<'_>) {
        if !self.stdout.is_empty() {
            let out = std::mem::take(&mut self.stdout);
            log.lock().await.write(task, Stream::Stdout, &out).await;
        }
        if !self.stderr.is_empty() {
            let err = std::mem::take(&mut self.stderr);
            log.lock().await.write(task, Stream::Stderr, &err).await;
        }
        self.flush_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::JobEvent;
    use surveil_proto::Log;

    fn job() -> JobEnv {
        JobEnv {
            job_id: 7,
            attempt: 2,
            repo: "/srv/git/app".into(),
            branch: "main".into(),
            git_ref: "refs/heads/main".into(),
            commit: "a".repeat(40),
        }
    }

    fn options(env: &[(&str, &str)]) -> ExecOptions {
        ExecOptions {
            base_env: Arc::new(
                env.iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                    .chain(std::env::var_os("PATH").map(|p| (OsString::from("PATH"), p)))
                    .collect(),
            ),
            isolation: Arc::new(Isolation::Unsandboxed),
            kill_grace: Duration::from_millis(300),
            max_parallel: 4,
            cache: None,
        }
    }

    /// [`options`] in the bubblewrap sandbox; `None` (said loudly, and a
    /// failure under `CI=true`) where it does not work here.
    fn sandboxed(env: &[(&str, &str)]) -> Option<ExecOptions> {
        match Isolation::detect(std::env::var_os("PATH").as_deref()) {
            Ok(isolation) => Some(ExecOptions {
                isolation: Arc::new(isolation),
                ..options(env)
            }),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI must run the sandbox tests, but: {e}"
                );
                eprintln!("SKIPPED: the bubblewrap sandbox does not work here: {e}");
                None
            }
        }
    }

    /// Whether a process whose command line contains `marker` still runs
    /// anywhere on the machine (the sandbox's PIDs are not ours to read).
    fn running_with(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            let pid = entry.file_name().to_string_lossy().into_owned();
            pid.parse::<i32>().is_ok_and(alive)
                && std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
    }

    /// A `sleep` argument no other process has.
    fn marker() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("1000.{}{nanos}", std::process::id())
    }

    async fn gone(marker: &str) -> bool {
        for _ in 0..100 {
            if !running_with(marker) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn run(
        toml: &str,
        opts: &ExecOptions,
        cancel: &CancelSignal,
    ) -> (PipelineOutcome, Vec<Log>) {
        let pipeline = crate::pipeline::parse(toml.as_bytes(), ".surveil.toml").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(100_000);
        let mut log = JobLog::new(7, 2, tx);
        let outcome = run_pipeline(&pipeline, dir.path(), &job(), opts, &mut log, cancel).await;
        drop(log);
        let mut logs = Vec::new();
        while let Some(event) = rx.recv().await {
            if let JobEvent::Log(l) = event {
                logs.push(l);
            }
        }
        (outcome, logs)
    }

    fn text(logs: &[Log], stream: Stream) -> String {
        logs.iter()
            .filter(|l| l.stream == stream as i32)
            .map(|l| String::from_utf8_lossy(&l.data).into_owned())
            .collect()
    }

    fn alive(pid: i32) -> bool {
        // A zombie waiting for a reaper counts as dead: it runs nothing.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn timeout_kills_a_backgrounded_grandchild_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let toml = format!(
            "[[task]]\nname = \"hang\"\ntimeout = \"500ms\"\nrun = \"trap '' TERM; sleep 100 & echo $! > {}; wait\"\n",
            pid_file.display()
        );
        let (outcome, logs) = run(&toml, &options(&[]), &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Failed);
        let task = &outcome.tasks[0];
        assert_eq!(task.status(), TaskStatus::TimedOut);
        assert_eq!(
            task.signal,
            Some(9),
            "SIGTERM was ignored, SIGKILL ended it"
        );
        assert_eq!(task.exit_code, None);
        assert_eq!(task.message, "timed out after 500ms");
        assert!(text(&logs, Stream::System).contains("task `hang` timed out after 500ms"));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut gone = false;
        for _ in 0..100 {
            if !alive(pid) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "grandchild {pid} survived the task's timeout");
    }

    #[tokio::test]
    async fn dropping_a_running_task_kills_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let toml = format!(
            "[[task]]\nname = \"hang\"\nrun = \"sleep 1000 & echo $! > {}.tmp; mv {0}.tmp {0}; wait\"\n",
            pid_file.display()
        );
        let pipeline = crate::pipeline::parse(toml.as_bytes(), ".surveil.toml").unwrap();
        let checkout = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1000);
        let mut log = JobLog::new(7, 2, tx);
        let (opts, cancel, job) = (options(&[]), CancelSignal::new(), job());
        let pid = {
            let running = run_pipeline(&pipeline, checkout.path(), &job, &opts, &mut log, &cancel);
            tokio::pin!(running);
            let mut pid = None;
            for _ in 0..200 {
                tokio::select! {
                    outcome = &mut running => panic!("the task ended by itself: {outcome:?}"),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if let Ok(text) = std::fs::read_to_string(&pid_file) {
                    pid = Some(text.trim().parse::<i32>().unwrap());
                    break;
                }
            }
            // The runner drops a job's future when it shuts down or gives
            // the job up: no timeout, cancel or exit is ever seen.
            pid.expect("the task started its sleep")
        };
        let mut gone = false;
        for _ in 0..100 {
            if !alive(pid) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !gone {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        assert!(gone, "the task's sleep {pid} outlived its dropped future");
    }

    #[tokio::test]
    async fn dropping_a_running_sandboxed_task_kills_its_processes() {
        let Some(opts) = sandboxed(&[]) else {
            return;
        };
        let marker = marker();
        let toml = format!("[[task]]\nname = \"hang\"\nrun = \"sleep {marker} & wait\"\n");
        let pipeline = crate::pipeline::parse(toml.as_bytes(), ".surveil.toml").unwrap();
        let checkout = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1000);
        let mut log = JobLog::new(7, 2, tx);
        let (cancel, job) = (CancelSignal::new(), job());
        {
            let running = run_pipeline(&pipeline, checkout.path(), &job, &opts, &mut log, &cancel);
            tokio::pin!(running);
            let mut started = false;
            for _ in 0..200 {
                tokio::select! {
                    outcome = &mut running => panic!("the task ended by itself: {outcome:?}"),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if running_with(&marker) {
                    started = true;
                    break;
                }
            }
            assert!(started, "the sandboxed task started its sleep");
        }
        assert!(
            gone(&marker).await,
            "the sandboxed task's sleep outlived its dropped future"
        );
    }

    #[tokio::test]
    async fn a_timeout_past_the_clock_runs_the_task_instead_of_panicking() {
        // The parser caps timeouts, but `Task` is public: the executor must
        // not overflow an Instant after the process was spawned.
        let mut pipeline =
            crate::pipeline::parse(b"[[task]]\nname = \"a\"\nrun = \"true\"\n", ".surveil.toml")
                .unwrap();
        pipeline.tasks[0].timeout = Duration::MAX;
        let opts = ExecOptions {
            kill_grace: Duration::MAX,
            ..options(&[])
        };
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1000);
        let mut log = JobLog::new(7, 2, tx);
        let outcome = run_pipeline(
            &pipeline,
            dir.path(),
            &job(),
            &opts,
            &mut log,
            &CancelSignal::new(),
        )
        .await;
        assert_eq!(outcome.status, JobStatus::Passed, "{outcome:?}");
    }

    #[tokio::test]
    async fn a_mebibyte_of_output_arrives_complete_in_order_with_offsets() {
        let toml = "[[task]]\nname = \"big\"\nrun = \"yes 0123456789abcdef | head -c 1048576; echo done >&2\"\n";
        let (outcome, logs) = run(toml, &options(&[]), &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Passed);
        let mut next = 0;
        for l in &logs {
            assert_eq!(l.offset, next, "offsets are contiguous in the combined log");
            assert!(l.data.len() <= MAX_CHUNK);
            assert_eq!((l.job_id, l.attempt), (7, 2));
            next += l.data.len() as u64;
        }
        let out = text(&logs, Stream::Stdout);
        let expected: String = "0123456789abcdef\n".repeat(1048576 / 17 + 1)[..1048576].to_owned();
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "stdout differs from what the task wrote");
        assert_eq!(text(&logs, Stream::Stderr), "done\n");
    }

    async fn environment_of(opts: &ExecOptions) -> String {
        let toml = "[[task]]\nname = \"env\"\nrun = \"env\"\nenv = { FROM_TASK = \"1\", SURVEIL_JOB_ID = \"99\" }\n";
        let (outcome, logs) = run(toml, opts, &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Passed, "{logs:?}");
        text(&logs, Stream::Stdout)
    }

    const RUNNER_ENV: [(&str, &str); 10] = [
        ("SURVEIL_TOKEN", "t1-secret"),
        // The fetch credentials (surveil_git::args) stay the runner's.
        ("SURVEIL_FETCH_PASSWORD", "f1-secret"),
        ("SURVEIL_FETCH_TOKEN", "f2-secret"),
        ("GITHUB_TOKEN", "t2-secret"),
        ("SSH_AUTH_SOCK", "/tmp/ssh-agent.sock"),
        ("FOO_KEY", "k-secret"),
        ("DATABASE_URL", "postgres://u:p-secret@db/x"),
        ("KEEP_ME", "not-on-the-list"),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C"),
    ];

    fn assert_allowlisted(env: &str) {
        for leaked in [
            "SURVEIL_TOKEN",
            "SURVEIL_FETCH",
            "GITHUB_TOKEN",
            "SSH_AUTH_SOCK",
            "FOO_KEY",
            "DATABASE_URL",
            "KEEP_ME",
            "secret",
        ] {
            assert!(!env.contains(leaked), "{leaked} leaked into:\n{env}");
        }
        for line in [
            "LANG=C.UTF-8",
            "LC_ALL=C",
            "FROM_TASK=1",
            "SURVEIL_JOB_ID=7",
            "SURVEIL_ATTEMPT=2",
            "SURVEIL_REPO=/srv/git/app",
            "SURVEIL_BRANCH=main",
            "SURVEIL_REF=refs/heads/main",
        ] {
            assert!(
                env.lines().any(|l| l == line),
                "{line} missing from:\n{env}"
            );
        }
        assert!(env.contains(&format!("SURVEIL_COMMIT={}", "a".repeat(40))));
    }

    #[tokio::test]
    async fn tasks_get_only_the_allowlisted_environment() {
        assert_allowlisted(&environment_of(&options(&RUNNER_ENV)).await);
        if let Some(opts) = sandboxed(&RUNNER_ENV) {
            assert_allowlisted(&environment_of(&opts).await);
        }
    }

    #[tokio::test]
    async fn network_false_without_the_sandbox_is_a_task_error_not_a_silent_pass() {
        let toml = "[[task]]\nname = \"offline\"\nrun = \"echo ran\"\nnetwork = false\n";
        let (outcome, logs) = run(toml, &options(&[]), &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Failed);
        assert_eq!(outcome.tasks[0].status(), TaskStatus::Error);
        assert!(
            outcome.tasks[0]
                .message
                .starts_with("`network = false` needs the bubblewrap sandbox"),
            "{}",
            outcome.tasks[0].message
        );
        assert_eq!(text(&logs, Stream::Stdout), "", "the task did not run");
    }

    #[tokio::test]
    async fn sandboxed_tasks_time_out_report_signals_and_leave_nothing_behind() {
        let Some(opts) = sandboxed(&[]) else { return };
        let hang = marker();
        let toml = format!(
            "[[task]]\nname = \"hang\"\ntimeout = \"500ms\"\nrun = \"trap '' TERM; sleep {hang} & wait\"\n"
        );
        let (outcome, logs) = run(&toml, &opts, &CancelSignal::new()).await;
        let task = &outcome.tasks[0];
        assert_eq!(task.status(), TaskStatus::TimedOut, "{logs:?}");
        assert_eq!((task.exit_code, task.signal), (None, Some(9)));
        assert!(gone(&hang).await, "the sandboxed grandchild survived");

        let toml = "[[task]]\nname = \"die\"\nrun = \"kill -USR1 $$\"\n[[task]]\nname = \"fail\"\nrun = \"exit 3\"\nallow_failure = true\n";
        let (outcome, _) = run(toml, &opts, &CancelSignal::new()).await;
        let task = &outcome.tasks[0];
        assert_eq!((task.exit_code, task.signal), (None, Some(libc_sigusr1())));

        // A process that leaves the task's process group (setsid) still
        // ends with the task: the PID namespace goes with it.
        let escapee = marker();
        let toml = format!(
            "[[task]]\nname = \"escape\"\nrun = \"setsid sleep {escapee} > /dev/null 2>&1 & echo left\"\n"
        );
        let (outcome, logs) = run(&toml, &opts, &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Passed, "{logs:?}");
        assert_eq!(text(&logs, Stream::Stdout), "left\n");
        assert!(
            gone(&escapee).await,
            "a setsid process outlived the sandbox"
        );
    }

    #[tokio::test]
    async fn a_sandboxed_task_gets_sigterm_first_when_cancelled() {
        let Some(opts) = sandboxed(&[]) else { return };
        let toml = "[[task]]\nname = \"slow\"\nrun = \"trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done\"\n";
        let pipeline = crate::pipeline::parse(toml.as_bytes(), ".surveil.toml").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1000);
        let cancel = CancelSignal::new();
        let watcher = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut out = String::new();
                while let Some(event) = rx.recv().await {
                    if let JobEvent::Log(l) = &event
                        && l.stream == Stream::Stdout as i32
                    {
                        out.push_str(&String::from_utf8_lossy(&l.data));
                        if out.contains("ready") {
                            cancel.cancel("cancelled by a user");
                        }
                    }
                }
                out
            })
        };
        let mut log = JobLog::new(7, 2, tx);
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            run_pipeline(&pipeline, dir.path(), &job(), &opts, &mut log, &cancel),
        )
        .await
        .expect("cancel ends the task");
        drop(log);
        let out = watcher.await.unwrap();
        let task = &outcome.tasks[0];
        assert_eq!(task.status(), TaskStatus::Cancelled);
        // The trap ran: SIGTERM reached the task, not only bwrap.
        assert!(out.contains("got TERM"), "{out}");
        assert_eq!(task.exit_code, Some(7));
    }

    #[tokio::test]
    async fn allow_failure_continues_and_a_failure_skips_the_rest() {
        let toml = r#"
[[task]]
name = "flaky"
run = "exit 1"
allow_failure = true
[[task]]
name = "unit"
run = "echo unit; exit 3"
[[task]]
name = "never"
run = "echo never"
"#;
        let (outcome, logs) = run(toml, &options(&[]), &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Failed);
        assert_eq!(outcome.message, "");
        let statuses: Vec<_> = outcome
            .tasks
            .iter()
            .map(|t| (t.status(), t.exit_code))
            .collect();
        assert_eq!(
            statuses,
            [
                (TaskStatus::Failed, Some(1)),
                (TaskStatus::Failed, Some(3)),
                (TaskStatus::Skipped, None)
            ]
        );
        assert_eq!(outcome.tasks[2].name, "never");
        assert_eq!(text(&logs, Stream::Stdout), "unit\n");
        assert!(text(&logs, Stream::System).contains("allow_failure = true: continuing"));
    }

    #[tokio::test]
    async fn a_task_killed_by_a_signal_reports_it() {
        let toml = "[[task]]\nname = \"die\"\nrun = \"kill -USR1 $$\"\n";
        let (outcome, _) = run(toml, &options(&[]), &CancelSignal::new()).await;
        let task = &outcome.tasks[0];
        assert_eq!(task.status(), TaskStatus::Failed);
        assert_eq!(task.signal, Some(libc_sigusr1()));
        assert_eq!(task.exit_code, None);
    }

    fn libc_sigusr1() -> i32 {
        Signal::SIGUSR1 as i32
    }

    #[tokio::test]
    async fn output_streams_while_the_task_runs_and_cancel_stops_it() {
        let pipeline = crate::pipeline::parse(
            b"[[task]]\nname = \"slow\"\nrun = \"printf hello; sleep 100\"\n[[task]]\nname = \"next\"\nrun = \"true\"\n",
            ".surveil.toml",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1000);
        let cancel = CancelSignal::new();
        let opts = options(&[]);
        let watcher = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(event) = rx.recv().await {
                    if let JobEvent::Log(l) = &event
                        && l.stream == Stream::Stdout as i32
                        && l.data.as_ref() == b"hello"
                    {
                        // The partial line arrived while the task still runs.
                        cancel.cancel("cancelled by a user");
                    }
                    seen.push(event);
                }
                seen
            })
        };
        let mut log = JobLog::new(7, 2, tx);
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            run_pipeline(&pipeline, dir.path(), &job(), &opts, &mut log, &cancel),
        )
        .await
        .expect("cancel ends the task");
        drop(log);
        watcher.await.unwrap();
        assert_eq!(outcome.status, JobStatus::Cancelled);
        assert_eq!(outcome.message, "cancelled by a user");
        assert_eq!(outcome.tasks[0].status(), TaskStatus::Cancelled);
        assert_eq!(outcome.tasks[0].signal, Some(Signal::SIGTERM as i32));
        assert_eq!(outcome.tasks[1].status(), TaskStatus::Skipped);
    }

    #[tokio::test]
    async fn ready_tasks_start_together_and_a_failed_need_skips_its_dependants() {
        let toml = r#"
[[task]]
name = "build"
run = "echo built > out"
[[task]]
name = "test"
run = "sleep 0.6; cat out"
needs = ["build"]
matrix = { n = [1, 2, 3] }
[[task]]
name = "broken"
run = "exit 4"
needs = ["build"]
[[task]]
name = "ship"
run = "echo shipped"
needs = ["test", "broken"]
[[task]]
name = "after-ship"
run = "true"
needs = ["ship"]
"#;
        let (outcome, logs) = run(toml, &options(&[]), &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Failed);
        let statuses: Vec<_> = outcome.tasks.iter().map(TaskResult::status).collect();
        assert_eq!(
            statuses,
            [
                TaskStatus::Passed,
                TaskStatus::Passed,
                TaskStatus::Passed,
                TaskStatus::Passed,
                TaskStatus::Failed,
                TaskStatus::Skipped,
                TaskStatus::Skipped
            ]
        );
        assert_eq!(outcome.tasks[5].message, "its need `broken` failed");
        assert_eq!(outcome.tasks[6].message, "its need `ship` did not run");
        assert_eq!(outcome.tasks[5].started_at_ms, None);
        let start = |i: usize| outcome.tasks[i].started_at_ms.unwrap();
        let end = |i: usize| start(i) + outcome.tasks[i].duration_ms;
        // The three combinations (600 ms each) overlap: each started
        // before any of the others ended; all after `build` ended.
        for i in 1..=3 {
            // (1 ms of rounding each way.)
            assert!(start(i) + 2 >= end(0), "{i} started before its need ended");
            for j in 1..=3 {
                assert!(
                    start(i) < end(j),
                    "{i} started after {j} ended: not in parallel"
                );
            }
        }
        // Logs of parallel tasks carry their task index and stay apart.
        for i in 1..=3 {
            let out: String = logs
                .iter()
                .filter(|l| l.task == i && l.stream == Stream::Stdout as i32)
                .map(|l| String::from_utf8_lossy(&l.data).into_owned())
                .collect();
            assert_eq!(out, "built\n", "task {i}");
        }
        let mut next = 0;
        for l in &logs {
            assert_eq!(
                l.offset, next,
                "offsets stay contiguous with tasks in parallel"
            );
            next += l.data.len() as u64;
        }
        assert!(
            text(&logs, Stream::System).contains("task `ship` skipped: its need `broken` failed")
        );
    }

    #[tokio::test]
    async fn parallelism_and_the_runner_cap_limit_tasks_at_once() {
        let toml = |limit: &str| {
            format!(
                "{limit}[[task]]\nname = \"t\"\nrun = \"sleep 0.3\"\nmatrix = {{ n = [1, 2, 3] }}\n"
            )
        };
        let overlap = |outcome: &PipelineOutcome| {
            let spans: Vec<(u64, u64)> = outcome
                .tasks
                .iter()
                .map(|t| {
                    (
                        t.started_at_ms.unwrap(),
                        t.started_at_ms.unwrap() + t.duration_ms,
                    )
                })
                .collect();
            let mut most = 0;
            for (s, _) in &spans {
                // 2 ms of slack for rounding to milliseconds.
                most = most.max(spans.iter().filter(|(a, b)| a <= s && s + 2 < *b).count());
            }
            most
        };
        let (outcome, _) = run(
            &toml("parallelism = 1\n"),
            &options(&[]),
            &CancelSignal::new(),
        )
        .await;
        assert_eq!(outcome.status, JobStatus::Passed);
        assert_eq!(overlap(&outcome), 1);
        let capped = ExecOptions {
            max_parallel: 2,
            ..options(&[])
        };
        let (outcome, _) = run(&toml(""), &capped, &CancelSignal::new()).await;
        assert_eq!(overlap(&outcome), 2);
        let (outcome, _) = run(&toml(""), &options(&[]), &CancelSignal::new()).await;
        assert_eq!(overlap(&outcome), 3);
    }

    #[tokio::test]
    async fn a_cache_is_saved_after_a_pass_and_restored_on_the_next_run() {
        let store = tempfile::tempdir().unwrap();
        let cache = Arc::new(crate::cache::Cache::open(store.path(), 1 << 20).unwrap());
        let opts = ExecOptions {
            cache: Some(cache),
            ..options(&[])
        };
        let toml = "[[task]]\nname = \"build\"\nrun = \"if [ -f deps/x ]; then echo hit; else echo miss; mkdir -p deps; echo v > deps/x; fi\"\ncache = { key = \"deps-v1\", paths = [\"deps\"] }\n";
        let (outcome, logs) = run(toml, &opts, &CancelSignal::new()).await;
        assert_eq!(outcome.status, JobStatus::Passed);
        assert_eq!(text(&logs, Stream::Stdout), "miss\n");
        assert!(text(&logs, Stream::System).contains("cache `deps-v1` saved (2 bytes)"));
        let (_, logs) = run(toml, &opts, &CancelSignal::new()).await;
        assert_eq!(text(&logs, Stream::Stdout), "hit\n");
        assert!(text(&logs, Stream::System).contains("cache `deps-v1` restored (2 bytes)"));
        // A failing task saves nothing.
        let failing = toml
            .replace("deps-v1", "deps-v2")
            .replace("fi\"", "fi; exit 1\"");
        run(&failing, &opts, &CancelSignal::new()).await;
        let (_, logs) = run(&failing, &opts, &CancelSignal::new()).await;
        assert_eq!(text(&logs, Stream::Stdout), "miss\n");
    }

    #[tokio::test]
    async fn junit_reports_are_read_into_the_task_result() {
        let toml = r#"
[[task]]
name = "unit"
run = "mkdir -p out; printf '<testsuite><testcase classname=\"m\" name=\"ok\"/><testcase classname=\"m\" name=\"bad\"><failure/></testcase></testsuite>' > out/junit.xml; exit 1"
reports = ["**/junit.xml"]
"#;
        let (outcome, logs) = run(toml, &options(&[]), &CancelSignal::new()).await;
        let report = outcome.tasks[0].report.as_ref().expect("a report");
        assert_eq!((report.passed, report.failed, report.skipped), (1, 1, 0));
        assert_eq!(report.failing, ["m.bad"]);
        assert!(
            text(&logs, Stream::System)
                .contains("task `unit`: tests: 1 passed, 1 failed, 0 skipped")
        );
    }
}
