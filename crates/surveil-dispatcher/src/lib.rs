//! The Surveil dispatcher: a durable job queue, a pure scheduler with
//! fenced leases, a service layer every protocol goes through, and
//! supervised liveness and assignment tasks.
//!
//! # Code map
//!
//! - [`auth`]: credentials to identities (role, scope, bound runner
//!   name), the one access policy, revocation of live sessions.
//! - [`config`]: the command-line contract and the validated [`Config`].
//! - [`domain`]: ids, statuses, jobs, results, log chunks, queries and
//!   views: what the scheduler, the store and the service speak.
//! - [`scheduler`]: the pure state machine (runners, queue, leases,
//!   attempts); no IO, no clock.
//! - [`store`]: the store interface ([`store::JobStore`], durable before
//!   answered), its SQLite backend, and with the `testing` feature the
//!   conformance suite every backend passes.
//! - [`service`]: one function per operation (submit, runner reports,
//!   cancel, logs, listings, status), each deciding, persisting, then
//!   notifying; the ordered applier of the scheduler's effects; per-job
//!   watches and the event stream.
//! - [`wire`]: protocol messages to domain types and back, and which
//!   message a role may send: the only place the two meet.
//! - [`web`]: the HTTP side (JSON API, SSE, pages, badges, `/metrics`),
//!   calling the service like the sessions do.
//! - `session`: one task per connection: the handshake, then a runner's
//!   or a client's loop, adapting frames to service calls.
//! - `supervisor`, `monitor`, `redistributor`, `spawner`: the supervised
//!   background tasks (liveness, assignment, local runners).
//!
//! [`run`] serves on a listener the caller bound, so tests start a whole
//! dispatcher on `127.0.0.1:0` in-process.

// Production functions stay under 100 lines (clippy.toml); tests may run
// longer stories.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

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

pub mod auth;
pub mod config;
pub mod domain;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod web;
pub mod wire;

mod credentials;
mod ha;
mod health;
mod limits;
mod monitor;
mod pruner;
mod redistributor;
mod session;
mod spawner;
mod supervisor;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{Cli, Config, ConfigError};

use crate::scheduler::SchedulerConfig;
use crate::service::Service;
use crate::store::{JobStore, PostgresStore, SqliteStore};
use crate::supervisor::TaskFactory;

/// How long shutdown waits for connections and tasks to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the sessions and the supervised tasks share.
pub(crate) struct Daemon {
    pub config: Config,
    /// The address runners are told to dial (the listener's).
    pub local_addr: SocketAddr,
    pub service: Arc<Service>,
    /// Who peers are and what they may do.
    pub auth: Arc<auth::Authenticator>,
    /// `--max-connections` and `--max-unauthenticated-per-ip`.
    pub limits: Arc<limits::ConnLimits>,
}

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
    ready: impl FnOnce() + Send + 'static,
) -> anyhow::Result<()> {
    serve_hooked(config, listener, shutdown, Hooks::default().on_ready(ready)).await
}

/// What the daemon's `main` hands the dispatcher besides its config: what
/// to call once serving, and the systemd watchdog's gate, which the
/// dispatcher closes while its store is wedged.
#[derive(Default)]
pub struct Hooks {
    ready: Option<Box<dyn FnOnce() + Send>>,
    watchdog: surveil_common::notify::WatchdogGate,
}

impl Hooks {
    /// Calls `ready` once the store is open, recovered and the listener is
    /// serving.
    #[must_use]
    pub fn on_ready(mut self, ready: impl FnOnce() + Send + 'static) -> Hooks {
        self.ready = Some(Box::new(ready));
        self
    }

    /// Sets the watchdog's check on `gate`: keep-alives stop while a store
    /// write is in flight past `--store-write-timeout`, and once the
    /// dispatcher stops for its store.
    #[must_use]
    pub fn watchdog(mut self, gate: surveil_common::notify::WatchdogGate) -> Hooks {
        self.watchdog = gate;
        self
    }

    fn ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            ready();
        }
    }
}

/// [`serve`] with [`Hooks`].
pub async fn serve_hooked(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    surveil_common::private::create_dir(&config.state_dir)
        .with_context(|| format!("creating --state-dir {}", config.state_dir.display()))?;
    let http = bind_http(&config.http).await?;
    if let config::StoreConfig::Postgres(options) = &config.store {
        let options = options.clone();
        return ha::serve(config, options, listener, http, shutdown, hooks).await;
    }
    let store = SqliteStore::open(&config.state_dir)
        .with_context(|| format!("opening the job store in {}", config.state_dir.display()))?;
    serve_on(
        config,
        Arc::new(store),
        listener,
        http,
        shutdown,
        None,
        hooks,
    )
    .await
}

/// The restore step (`--new-epoch`): gives the configured store a new
/// epoch and returns the old one and the new one. Refuses a state
/// directory without a store (nothing was restored there), and a
/// PostgreSQL database a dispatcher still leads.
pub async fn new_epoch(config: &Config) -> anyhow::Result<(String, String)> {
    match &config.store {
        config::StoreConfig::Postgres(options) => {
            let store = PostgresStore::open(options)
                .await
                .context("opening the PostgreSQL store")?;
            let old = store.epoch().await?;
            let new = store.new_epoch().await?;
            store.close().await?;
            Ok((old, new))
        }
        config::StoreConfig::Sqlite => {
            let db = config.state_dir.join(store::DB_FILE);
            anyhow::ensure!(
                db.exists(),
                "there is no store in --state-dir {} (no {}): restore the backup there first",
                config.state_dir.display(),
                store::DB_FILE
            );
            let store = SqliteStore::open(&config.state_dir).with_context(|| {
                format!("opening the job store in {}", config.state_dir.display())
            })?;
            let old = store.epoch().await?;
            let new = store.new_epoch().await?;
            store.close().await?;
            Ok((old, new))
        }
    }
}

/// Binds the HTTP listener: an address given with `--http-listen` must
/// bind, but the default one is skipped with a warning when it cannot be
/// (another dispatcher on this host has it), so that a second dispatcher
/// still serves the protocol.
async fn bind_http(http: &web::HttpConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = http.listen else {
        return Ok(None);
    };
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(err) if !http.explicit => {
            tracing::warn!(
                addr = %addr,
                error = %err,
                "cannot bind the default HTTP address {addr} ({err}): serving without HTTP; \
                 give --http-listen ADDR to serve it elsewhere, or --http-listen off"
            );
            Ok(None)
        }
        Err(err) => Err(anyhow::Error::new(err).context(format!("binding --http-listen {addr}"))),
    }
}

/// [`serve`] on a store the caller opened (tests use it to reach the
/// store's testing hooks).
#[cfg(feature = "testing")]
pub async fn serve_with_store(
    config: Config,
    store: Arc<dyn JobStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_on(
        config,
        store,
        listener,
        None,
        shutdown,
        None,
        Hooks::default(),
    )
    .await
}

/// [`serve_with_store`] with [`Hooks`] (tests that play systemd's
/// watchdog in-process).
#[cfg(feature = "testing")]
pub async fn serve_with_store_hooked(
    config: Config,
    store: Arc<dyn JobStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    serve_on(config, store, listener, None, shutdown, None, hooks).await
}

/// [`serve_with_store`] with the HTTP side on `http` (tests bind it on
/// `127.0.0.1:0` and read its address first).
#[cfg(feature = "testing")]
pub async fn serve_with_http(
    config: Config,
    store: Arc<dyn JobStore>,
    listener: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_on(
        config,
        store,
        listener,
        Some(http),
        shutdown,
        None,
        Hooks::default(),
    )
    .await
}

/// The credentials `config` names (the shared token, the tokens file,
/// client certificates), for the leader's and a standby's handshakes.
pub(crate) fn authenticator(config: &Config) -> anyhow::Result<auth::Authenticator> {
    auth::Authenticator::new(
        config.token.clone(),
        config.tokens_file.as_deref(),
        config
            .tls
            .as_ref()
            .is_some_and(|t| t.requires_client_certs()),
    )
    .context("--tokens-file")
}

/// The scheduler's part of `config`.
fn scheduler_config(config: &Config) -> SchedulerConfig {
    SchedulerConfig {
        runner_timeout: config.runner_timeout,
        disconnect_grace: config.disconnect_grace,
        max_attempts: config.max_attempts,
        job_timeout: config.job_timeout,
        quarantine_after: config.quarantine_after,
        quarantine_for: config.quarantine_for,
    }
}

/// Serves as the leader on `store` until `shutdown`; `leader` is the term
/// it serves under (a PostgreSQL store), shown by `status`.
pub(crate) async fn serve_on(
    config: Config,
    store: Arc<dyn JobStore>,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
    leader: Option<domain::LeaderView>,
    mut hooks: Hooks,
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    let sched = scheduler_config(&config);
    let metrics = web::Metrics::new();
    let health = Arc::new(health::StoreHealth::new(
        config.max_store_failures,
        config.store_write_timeout,
    ));
    {
        let health = Arc::clone(&health);
        hooks.watchdog.set(move || health.alive());
    }
    let store: Arc<dyn JobStore> = Arc::new(web::metrics::MeteredStore::new(
        store,
        Arc::clone(&metrics),
        Arc::clone(&health),
    ));
    // Everything below stops on a shutdown or when the store trips the
    // fail-stop.
    let shutdown = health.or(shutdown);
    let auth = authenticator(&config)?;
    let service = Service::open(store, sched)
        .await
        .context("reading unfinished jobs from the store")?;
    if let Some(view) = leader {
        service.set_leader(view);
    }
    service.set_health(Arc::clone(&health));
    service.set_log_limits(config.max_log_size, config.retain_logs);
    let limits = limits::ConnLimits::new(
        usize::try_from(config.max_connections).unwrap_or(usize::MAX),
        usize::try_from(config.max_unauthenticated_per_ip).unwrap_or(usize::MAX),
    );
    let daemon = Arc::new(Daemon {
        limits,
        config,
        local_addr,
        service: Arc::new(service),
        auth: Arc::new(auth),
    });
    let tracker = TaskTracker::new();
    credentials::warn_if_shared(&daemon.config, local_addr);
    if daemon.auth.tokens_path().is_some() {
        tracker.spawn(credentials::watch(
            Arc::clone(&daemon.auth),
            shutdown.child_token(),
        ));
    }

    let tasks_cancel = shutdown.child_token();
    let counter = Arc::clone(&daemon.service);
    let supervisor = tracker.spawn(supervisor::supervise(
        supervised_tasks(&daemon),
        tasks_cancel.clone(),
        move |name| counter.count_restart(name),
    ));

    let web_cancel = shutdown.child_token();
    if let Some(http) = http {
        start_web(&daemon, &metrics, http, &tracker, &web_cancel);
    }

    match &daemon.config.tls {
        Some(tls) if tls.requires_client_certs() => tracing::info!(
            listen = %local_addr,
            "dispatcher serving TLS; clients must present a certificate signed by --tls-client-ca"
        ),
        Some(_) => tracing::info!(listen = %local_addr, "dispatcher serving TLS"),
        None => tracing::info!(listen = %local_addr, "dispatcher serving"),
    }
    hooks.ready();

    accept_loop(&daemon, &listener, &tracker, &shutdown).await;

    tracing::info!("shutting down: closing connections");
    drop(listener);
    tasks_cancel.cancel();
    web_cancel.cancel();
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
    if health.tripped().is_cancelled() {
        // The store is failing: finishing its writes would fail too, and
        // on a wedged disk would never return (the watchdog, no longer
        // fed, is the last resort then).
        let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, daemon.service.close()).await;
        anyhow::bail!("{}", health.reason());
    }
    // Effects decided while closing (none for runners at shutdown, but a
    // client's cancel may be in flight) are made durable before we return.
    daemon
        .service
        .close()
        .await
        .context("finishing the store's writes")?;
    tracing::info!("dispatcher stopped");
    Ok(())
}

async fn accept_loop(
    daemon: &Arc<Daemon>,
    listener: &TcpListener,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("conn", %peer, runner = tracing::field::Empty);
                match daemon.limits.open() {
                    Ok(place) => tracker.spawn(
                        session::serve(Arc::clone(daemon), stream, peer, place, shutdown.clone())
                            .instrument(span),
                    ),
                    Err(why) => tracker
                        .spawn(session::refuse(Arc::clone(daemon), stream, why).instrument(span)),
                };
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Starts the HTTP side and the metrics' event follower on `tracker`.
fn start_web(
    daemon: &Arc<Daemon>,
    metrics: &Arc<web::Metrics>,
    http: TcpListener,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let config = &daemon.config;
    // Config validation refused a non-loopback address without a token
    // or --http-public-read; on loopback, reading needs no token.
    let anonymous_read =
        config.http.public_read || http.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let parts = web::HttpParts {
        credentials: Arc::clone(&daemon.auth),
        tls: config.tls.clone(),
        anonymous_read,
        max_attempts: config.max_attempts,
    };
    tracker.spawn(web::metrics::observe(
        Arc::clone(metrics),
        Arc::clone(&daemon.service),
        cancel.clone(),
    ));
    tracker.spawn(web::serve(
        Arc::clone(&daemon.service),
        Arc::clone(metrics),
        parts,
        http,
        cancel.clone(),
    ));
}

fn supervised_tasks(daemon: &Arc<Daemon>) -> Vec<(&'static str, TaskFactory)> {
    let monitor = Arc::clone(daemon);
    let redistributor = Arc::clone(&daemon.service);
    let spawner = Arc::clone(daemon);
    let pruner = Arc::clone(&daemon.service);
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
        (
            "pruner",
            Arc::new(move |cancel| Box::pin(pruner::run(pruner.clone(), cancel))),
        ),
    ]
}
