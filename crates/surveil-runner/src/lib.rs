//! The Surveil runner: dials the dispatcher, checks out assigned commits
//! with gix, runs their `.surveil.toml` pipelines and reports the results.
//!
//! Code map:
//! - [`config`]: flags and the validated [`Config`].
//! - [`core`]: the protocol across connections as a pure state machine
//!   (leases, resends, reconnect backoff, drain); no IO, no clock.
//! - [`session`]: the I/O shell around the core (the connection, dials,
//!   job tasks, timers).
//! - [`job`]: one attempt from `Assign` to a stored result.
//! - [`workspace`]: gix mirrors and per-job checkouts.
//! - [`pipeline`]: the `.surveil.toml` file.
//! - [`executor`]: task processes, timeouts, streamed output.
//! - [`sandbox`]: how tasks are isolated (bubblewrap, a task user, or
//!   `--unsandboxed`), and the environment allowlist.
//! - [`joblog`]: an attempt's combined log and job events.
//! - [`outbox`]: results kept on disk until acknowledged.
//!
//! Architecture invariant: a finished job's result is in the outbox before
//! it is sent, and leaves it only on `ResultAck`.
//!
//! Architecture invariant: a task gets only the allowlisted environment,
//! and, unless the operator said `--unsandboxed`, cannot read the work
//! directory's mirrors and outbox nor the runner's token and configuration.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod cache;
use cache::Cache;
pub mod config;
pub mod core;
pub mod executor;
pub mod files;
pub mod job;
pub mod joblog;
pub mod outbox;
pub mod pipeline;
pub mod post;
pub mod reports;
pub mod sandbox;
pub mod session;
pub mod workspace;

use std::sync::Arc;

use anyhow::Context;
use surveil_common::shutdown::Shutdown;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::executor::ExecOptions;
use crate::job::JobContext;
use crate::outbox::Outbox;
use crate::sandbox::Isolation;
use crate::session::Session;
use crate::workspace::Workspace;

/// A runner whose work directory is ready; [`Runner::run`] connects.
pub struct Runner {
    session: Session,
}

impl Runner {
    /// Prepares the work directory (mirrors, jobs, outbox), removes job
    /// directories left by an earlier run, and loads unacknowledged
    /// results from the outbox. Blocking file I/O.
    pub fn prepare(config: Config) -> anyhow::Result<Runner> {
        let workspace = Workspace::open(&config.work_dir)
            .with_context(|| {
                format!(
                    "cannot prepare the work directory {}",
                    config.work_dir.display()
                )
            })?
            .with_fetch(config.fetch.clone());
        if !config.keep_workdirs {
            let stale = workspace
                .clear_stale_jobs()
                .context("cannot remove job directories left by an earlier run")?;
            if stale > 0 {
                tracing::info!(
                    count = stale,
                    "removed job directories left by an earlier run"
                );
            }
        }
        let isolation = Arc::new(config.isolation.clone());
        let root = workspace.root();
        let cache = if config.cache_size == 0 {
            None
        } else {
            let cache = Cache::open(&root.join("cache"), config.cache_size)
                .context("cannot open the task cache")?;
            Some(Arc::new(cache))
        };
        isolation
            .prepare_work_dir(
                &[root, &root.join("jobs")],
                &[
                    &root.join("mirrors"),
                    &workspace.outbox_dir(),
                    &root.join("cache"),
                ],
            )
            .map_err(anyhow::Error::msg)?;
        match &*isolation {
            Isolation::Unsandboxed => tracing::warn!("isolation: {}", isolation.describe()),
            _ => tracing::info!("isolation: {}", isolation.describe()),
        }
        let outbox = Outbox::open(&workspace.outbox_dir()).context("cannot open the outbox")?;
        let pending = outbox.load_all().context("cannot read the outbox")?;
        if !pending.is_empty() {
            tracing::info!(
                results = pending.len(),
                "results from an earlier run will be sent again"
            );
        }
        let ctx = Arc::new(JobContext {
            workspace: Arc::new(workspace),
            outbox,
            exec: ExecOptions {
                base_env: Arc::new(config.base_env.expose().clone()),
                isolation,
                kill_grace: config.kill_grace,
                max_parallel: config.max_parallel_tasks as usize,
                cache,
            },
            keep_workdirs: config.keep_workdirs,
            labels: config.labels.clone(),
        });
        Ok(Runner {
            session: Session::new(&config, ctx, pending),
        })
    }

    /// Runs until shutdown. `graceful` (first SIGTERM) drains: no new job
    /// starts, running ones get the drain timeout, then are cancelled.
    /// `immediate` (second SIGTERM) cancels running jobs at once.
    pub async fn run(self, graceful: CancellationToken, immediate: CancellationToken) {
        self.session.run(graceful, immediate).await;
    }
}

/// Prepares the work directory and runs until `shutdown` is cancelled and
/// the drain is over.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shutdown = Shutdown {
        graceful: shutdown,
        immediate: CancellationToken::new(),
    };
    serve(config, shutdown, || {}).await
}

/// [`run`] with both shutdown stages ([`Runner::run`]), calling `ready`
/// once the work directory is ready (the daemon's systemd `READY=1`).
pub async fn serve(config: Config, shutdown: Shutdown, ready: impl FnOnce()) -> anyhow::Result<()> {
    let runner = tokio::task::spawn_blocking(move || Runner::prepare(config))
        .await
        .context("preparing the runner")??;
    ready();
    runner.run(shutdown.graceful, shutdown.immediate).await;
    Ok(())
}
