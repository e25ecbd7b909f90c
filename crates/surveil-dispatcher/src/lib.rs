//! The Surveil dispatcher: a durable job queue, a pure scheduler with
//! fenced leases, and supervised liveness and assignment tasks.
//!
//! # Code map
//!
//! - [`config`]: the command-line contract and the validated [`Config`].
//! - [`scheduler`]: the pure state machine (runners, queue, leases,
//!   attempts); no IO, no clock.
//! - [`store`]: the SQLite job store; durable before acknowledged.
//! - `state`: what the tasks share; applies the scheduler's effects in
//!   order, persisting each before a peer hears of it.
//! - `session`: one task per connection: handshake, the role's messages.
//! - `supervisor`, `monitor`, `redistributor`, `spawner`: the supervised
//!   background tasks (liveness, assignment, local runners).
//!
//! [`run`] serves on a listener the caller bound, so tests start a whole
//! dispatcher on `127.0.0.1:0` in-process.

/// A failpoint in a supervised loop; compiled in only with the
/// `failpoints` feature (armed through the `FAILPOINTS` environment
/// variable, or `fail::cfg` in tests).
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            fail::fail_point!($name);
        }
    };
}
pub(crate) use failpoint;

pub mod config;
pub mod scheduler;
pub mod store;

mod monitor;
mod redistributor;
mod session;
mod spawner;
mod state;
mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use surveil_proto::JobStatus;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{Cli, Config, ConfigError};

use crate::scheduler::{JobSpec, Scheduler, SchedulerConfig};
use crate::state::{Shared, SharedRef, now};
use crate::store::Store;
use crate::supervisor::TaskFactory;

/// How long shutdown waits for connections and tasks to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Runs a dispatcher on `listener` until `shutdown` is cancelled, then
/// stops accepting, closes every connection (runners keep their leases and
/// may reclaim them from the next dispatcher), stops the supervised tasks
/// and returns.
///
/// Errors only when the store cannot be opened or read.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve(config, listener, shutdown, || {}).await
}

/// [`run`], calling `ready` once the store is open, recovered and the
/// listener is serving (the daemon's systemd `READY=1`).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating --state-dir {}", config.state_dir.display()))?;
    let store = Store::open(&config.state_dir)
        .with_context(|| format!("opening the job store in {}", config.state_dir.display()))?;

    let mut sched = Scheduler::new(SchedulerConfig {
        runner_timeout: config.runner_timeout,
        max_attempts: config.max_attempts,
    });
    recover(&store, &mut sched).await?;

    let shared: SharedRef = Arc::new(Shared::new(config, store, local_addr, sched));
    let tracker = TaskTracker::new();

    let tasks_cancel = shutdown.child_token();
    let sup_shared = shared.clone();
    let supervisor = tracker.spawn(supervisor::supervise(
        supervised_tasks(&shared),
        tasks_cancel.clone(),
        move |name| sup_shared.count_restart(name),
    ));

    match &shared.config.tls {
        Some(tls) if tls.requires_client_certs() => tracing::info!(
            listen = %local_addr,
            "dispatcher serving TLS; clients must present a certificate signed by --tls-client-ca"
        ),
        Some(_) => tracing::info!(listen = %local_addr, "dispatcher serving TLS"),
        None => tracing::info!(listen = %local_addr, "dispatcher serving"),
    }
    ready();

    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("conn", %peer, runner = tracing::field::Empty);
                tracker.spawn(
                    session::serve(shared.clone(), stream, peer, shutdown.clone()).instrument(span),
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }

    tracing::info!("shutting down: closing connections");
    drop(listener);
    tasks_cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = tracker.len(),
            "connections or tasks still running after the shutdown deadline"
        );
    }
    drop(supervisor);
    // Effects decided while closing (none for runners at shutdown, but a
    // client's cancel may be in flight) are made durable before we return.
    shared.apply_effects().await;
    shared
        .store
        .close()
        .await
        .context("finishing the store's writes")?;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Start-up is recovery: queued jobs queue again; running jobs become
/// orphaned leases their runner may reclaim within one runner timeout.
async fn recover(store: &Store, sched: &mut Scheduler) -> anyhow::Result<()> {
    let unfinished = store
        .unfinished()
        .await
        .context("reading unfinished jobs from the store")?;
    let mut queued = Vec::new();
    let mut running = Vec::new();
    for job in unfinished {
        let runner = job.runner.clone().unwrap_or_default();
        let spec = JobSpec {
            id: job.id,
            repo: job.repo,
            branch: job.branch,
            commit: job.commit,
            attempt: job.attempt,
        };
        if job.status == JobStatus::Running {
            running.push((spec, runner));
        } else {
            queued.push(spec);
        }
    }
    tracing::info!(
        queued = queued.len(),
        running = running.len(),
        "recovered unfinished jobs"
    );
    sched.handle_recovered(queued, running, now());
    Ok(())
}

fn supervised_tasks(shared: &SharedRef) -> Vec<(&'static str, TaskFactory)> {
    let monitor = shared.clone();
    let redistributor = shared.clone();
    let spawner = shared.clone();
    vec![
        (
            "monitor",
            Arc::new(move |cancel| Box::pin(monitor::run(monitor.clone(), cancel))),
        ),
        (
            "redistributor",
            Arc::new(move |cancel| Box::pin(redistributor::run(redistributor.clone(), cancel))),
        ),
        (
            "spawner",
            Arc::new(move |cancel| Box::pin(spawner::run(spawner.clone(), cancel))),
        ),
    ]
}
