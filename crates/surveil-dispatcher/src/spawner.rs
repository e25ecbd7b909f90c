//! The spawner: with `--spawn-runners N --runner-command CMD`, when jobs
//! wait and no runner has been connected for one runner timeout, it starts
//! up to N local runners (`sh -c CMD`, told the dispatcher's address in
//! `SURVEIL_DISPATCH`), restarts those that die while jobs still wait, and
//! kills them all when it stops (shutdown, or a panic of this task).
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

/// One spawned runner; its process group is killed when dropped, so a
/// panicking spawner leaves no runner behind.
struct Spawned {
    child: Child,
    pgid: Option<Pid>,
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
    let mut ticker = tokio::time::interval(daemon.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut children: Vec<Spawned> = Vec::new();
    let mut runner_last_seen = Instant::now();
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
                tracing::warn!(%status, "spawned runner exited");
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
        if !needed {
            continue;
        }
        while children.len() < wanted {
            match spawn(command, &daemon.local_addr.to_string()) {
                Ok(child) => {
                    tracing::info!(pid = ?child.pgid, "spawned a local runner");
                    children.push(child);
                }
                Err(err) => {
                    tracing::error!(error = %err, command = %command, "cannot spawn a runner");
                    break;
                }
            }
        }
    }
    stop(children).await;
}

fn spawn(command: &str, dispatch: &str) -> std::io::Result<Spawned> {
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SURVEIL_DISPATCH", dispatch)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    Ok(Spawned { child, pgid })
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
