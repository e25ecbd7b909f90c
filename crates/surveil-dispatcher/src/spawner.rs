//! The spawner: with `--spawn-runners N --runner-command CMD`, when jobs
//! wait and no runner has been connected for one runner timeout, it starts
//! up to N local runners (`sh -c CMD`), restarts those that die while jobs
//! still wait, and kills them all when it stops (shutdown, or a panic of
//! this task).
//!
//! Runner `i` (0-based, kept across restarts) is told the dispatcher's
//! address in `SURVEIL_DISPATCH`, its own name in `SURVEIL_NAME`
//! (`spawned-<i>` after the dispatcher's host name) and its own work dir in
//! `SURVEIL_WORK_DIR` (`<state dir>/spawned/<i>`), so two children never
//! replace each other's session or delete each other's checkouts. Their
//! environment is otherwise cleared to [`PASSED_ENV`]: the dispatcher's
//! store credentials never reach a build. Children that die soon after
//! starting are restarted with a doubling delay, not in a tight loop.
//!
//! Each runner runs in its own process group so the whole group — the
//! shell and whatever it started — is signalled, never anything else.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Daemon;

/// How long spawned runners get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A child that exits sooner than this after its start is a failed start:
/// the next one waits longer.
const QUICK_DEATH: Duration = Duration::from_secs(10);

/// The longest wait between restarts of children that keep dying.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The dispatcher's environment variables a spawned runner inherits;
/// everything else is cleared.
pub(crate) const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "NO_COLOR",
    "SURVEIL_LOG_FORMAT",
    // The shared token and a token file are a runner's credentials too.
    "SURVEIL_TOKEN",
    "SURVEIL_TOKEN_FILE",
];

/// One spawned runner; its process group is killed when dropped, so a
/// panicking spawner leaves no runner behind.
struct Spawned {
    child: Child,
    pgid: Option<Pid>,
    /// Its slot: its name and work dir.
    index: usize,
    started: Instant,
}

impl Spawned {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, signal);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Runs until `cancel` fires; does nothing unless spawning is configured.
pub(crate) async fn run(daemon: Arc<Daemon>, cancel: CancellationToken) {
    let wanted = daemon.config.spawn_runners as usize;
    let command = daemon.config.runner_command.clone().filter(|_| wanted > 0);
    let timeout = daemon.config.runner_timeout;
    let tick = daemon.config.heartbeat_interval;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut children: Vec<Spawned> = Vec::new();
    let mut runner_last_seen = Instant::now();
    let mut backoff = Backoff::new(tick);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        crate::failpoint!("spawner-tick");
        let Some(command) = &command else {
            // Spawning is off; the loop still ticks so that it is
            // supervised like the others.
            continue;
        };
        children.retain_mut(|c| match c.child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(%status, index = c.index, "spawned runner exited");
                backoff.exited(c.started.elapsed());
                false
            }
            Ok(None) => true,
            Err(err) => {
                tracing::warn!(error = %err, "cannot check a spawned runner");
                true
            }
        });
        let (runners, queued) = daemon.service.fleet();
        if runners > 0 {
            runner_last_seen = Instant::now();
        }
        // Start runners when jobs wait and none has been connected for a
        // runner timeout; once started, keep the fleet whole while jobs wait.
        let starved = runners == 0 && runner_last_seen.elapsed() >= timeout;
        let needed = queued && (starved || !children.is_empty());
        if !needed || !backoff.may_start() {
            continue;
        }
        while children.len() < wanted {
            let index = (0..wanted)
                .find(|i| children.iter().all(|c| c.index != *i))
                .unwrap_or(children.len());
            match spawn(&daemon, command, index) {
                Ok(child) => {
                    tracing::info!(pid = ?child.pgid, index, "spawned a local runner");
                    children.push(child);
                }
                Err(err) => {
                    tracing::error!(error = %err, command = %command, "cannot spawn a runner");
                    backoff.exited(Duration::ZERO);
                    break;
                }
            }
        }
    }
    stop(children).await;
}

/// The delay before children are started again after failed starts.
struct Backoff {
    first: Duration,
    delay: Duration,
    not_before: Instant,
}

impl Backoff {
    fn new(first: Duration) -> Backoff {
        Backoff {
            first,
            delay: Duration::ZERO,
            not_before: Instant::now(),
        }
    }

    /// A child exited after `lived`: a quick death doubles the delay, a
    /// child that ran a while resets it.
    fn exited(&mut self, lived: Duration) {
        self.delay = if lived < QUICK_DEATH {
            (self.delay * 2).max(self.first).min(MAX_BACKOFF)
        } else {
            Duration::ZERO
        };
        self.not_before = Instant::now() + self.delay;
    }

    fn may_start(&self) -> bool {
        Instant::now() >= self.not_before
    }
}

fn spawn(daemon: &Daemon, command: &str, index: usize) -> std::io::Result<Spawned> {
    let work_dir = daemon
        .config
        .state_dir
        .join("spawned")
        .join(index.to_string());
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command).env_clear();
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let child = cmd
        .env("SURVEIL_DISPATCH", daemon.local_addr.to_string())
        .env("SURVEIL_NAME", format!("{host}-spawned-{index}"))
        .env("SURVEIL_WORK_DIR", &work_dir)
        .env("SURVEIL_SPAWN_INDEX", index.to_string())
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    Ok(Spawned {
        child,
        pgid,
        index,
        started: Instant::now(),
    })
}

async fn stop(mut children: Vec<Spawned>) {
    for c in &children {
        c.signal(Signal::SIGTERM);
    }
    let waited = tokio::time::timeout(STOP_GRACE, async {
        for c in &mut children {
            let _ = c.child.wait().await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!("spawned runners did not stop after SIGTERM; killing them");
    }
    // Dropping sends SIGKILL to any group still around.
    drop(children);
}
