//! The Surveil runner: dials the dispatcher, checks out assigned commits
//! with gix, runs their `.surveil.toml` pipelines and reports the results.
//!
//! Code map:
//! - [`config`]: flags and the validated [`Config`].
//! - [`session`]: the protocol across connections (Hello with leases,
//!   pings, assignments, cancels, acks, reconnects, drain).
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

pub mod config;
pub mod executor;
pub mod job;
pub mod joblog;
pub mod outbox;
pub mod pipeline;
pub mod sandbox;
pub mod session;
pub mod workspace;

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::executor::ExecOptions;
use crate::job::JobContext;
use crate::outbox::Outbox;
use crate::sandbox::Isolation;
use crate::session::{Session, SessionConfig};
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
        let workspace = Workspace::open(&config.work_dir).with_context(|| {
            format!(
                "cannot prepare the work directory {}",
                config.work_dir.display()
            )
        })?;
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
        let isolation = Arc::new(config.isolation);
        let root = workspace.root();
        isolation
            .prepare_work_dir(
                &[root, &root.join("jobs")],
                &[&root.join("mirrors"), &workspace.outbox_dir()],
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
                base_env: Arc::new(config.base_env),
                isolation,
                kill_grace: config.kill_grace,
            },
            keep_workdirs: config.keep_workdirs,
        });
        let session = SessionConfig {
            dispatch: config.dispatch,
            name: config.name,
            token: config.token,
            slots: config.slots,
            labels: config.labels,
            repos: config.repos,
            drain_timeout: config.drain_timeout,
            reconnect_max: config.reconnect_max,
            tls: config.tls,
        };
        Ok(Runner {
            session: Session::new(session, ctx, pending),
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
    let runner = tokio::task::spawn_blocking(move || Runner::prepare(config))
        .await
        .context("preparing the runner")??;
    runner.run(shutdown, CancellationToken::new()).await;
    Ok(())
}
