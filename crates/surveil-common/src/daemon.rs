//! The one `main` of the three daemons: parse the configuration (exit 2 on
//! any configuration error), set up logging, start the runtime, turn
//! signals into a two-stage [`Shutdown`], keep systemd informed (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`, `STOPPING=1`), print the error chain of a
//! failure and pick the exit code (0 after a clean stop, 1 on failure).
//!
//! A daemon's `main.rs` describes its [`Daemon`] and hands over three
//! things: where its log format is, how its command line becomes a
//! validated config, and its `serve(config, shutdown, ready)`. What the
//! daemon does lives in its library; this module knows none of it.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use crate::LogFormat;
use crate::shutdown::{self, Shutdown};

/// How long the runtime waits, after `serve` returned, for blocking work
/// still running (a fetch, a file write) before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What a second SIGTERM or SIGINT during shutdown does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondSignal {
    /// The process exits at once with code 1: for daemons whose shutdown
    /// has no faster mode.
    Exit,
    /// `Shutdown::immediate` is cancelled and `serve` decides (the runner
    /// cancels its running jobs rather than orphan their processes).
    Immediate,
}

/// How one daemon runs.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    /// Worker threads of the runtime; `None`: one per core.
    worker_threads: Option<usize>,
    /// What a second signal does.
    second_signal: SecondSignal,
    /// The `STATUS=` line sent with `READY=1`, shown by `systemctl status`.
    ready_status: &'static str,
}

/// Handed to `serve`, which calls [`Ready::notify`] once it is serving (its
/// own state loaded, listening if it listens).
#[derive(Debug)]
pub struct Ready {
    status: &'static str,
    watchdog: crate::notify::WatchdogGate,
}

impl Ready {
    /// The gate the watchdog keep-alives pass: a daemon that can tell it is
    /// wedged sets a check on it (see [`crate::notify::WatchdogGate`]).
    pub fn watchdog(&self) -> crate::notify::WatchdogGate {
        self.watchdog.clone()
    }

    /// Tells systemd `READY=1` and the daemon's status line.
    pub fn notify(self) {
        crate::notify::ready();
        crate::notify::status(self.status);
    }
}

impl Daemon {
    /// A daemon that tells systemd `ready_status` once serving, runs one
    /// worker thread per core, and exits at once on a second signal.
    pub const fn new(ready_status: &'static str) -> Self {
        Daemon {
            worker_threads: None,
            second_signal: SecondSignal::Exit,
            ready_status,
        }
    }

    /// Runs `threads` worker threads instead.
    pub const fn worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = Some(threads);
        self
    }

    /// Leaves a second signal to `serve`: [`SecondSignal::Immediate`].
    pub const fn immediate_on_second_signal(mut self) -> Self {
        self.second_signal = SecondSignal::Immediate;
        self
    }

    /// Runs the daemon whose command line is `C` and returns its exit code.
    ///
    /// `log_format` reads the `--log-format` flag; `into_config` validates
    /// the rest (its error exits 2); `serve` runs until the shutdown it is
    /// given, calling [`Ready::notify`] when serving.
    pub fn main<C, Config, E, Fut>(
        self,
        log_format: impl FnOnce(&C) -> LogFormat,
        into_config: impl FnOnce(C) -> Result<Config, E>,
        serve: impl FnOnce(Config, Shutdown, Ready) -> Fut,
    ) -> ExitCode
    where
        C: clap::Parser,
        E: Into<anyhow::Error>,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let cli: C = crate::config::parse();
        crate::logging::init(log_format(&cli));
        let config = match into_config(cli) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("error: {:#}", error.into());
                return ExitCode::from(2);
            }
        };
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = self.worker_threads {
            builder.worker_threads(threads);
        }
        let runtime = match builder.enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        let result = runtime.block_on(async move {
            let shutdown = self.signals();
            // Keep-alives go on through a drain, which can take minutes, and
            // stop only when serving is over.
            let serving = tokio_util::sync::CancellationToken::new();
            let watchdog = crate::notify::WatchdogGate::default();
            crate::notify::spawn_watchdog(serving.clone(), watchdog.clone());
            let ready = Ready {
                status: self.ready_status,
                watchdog,
            };
            let result = serve(config, shutdown, ready).await;
            serving.cancel();
            result
        });
        runtime.shutdown_timeout(SHUTDOWN_GRACE);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error:#}");
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// Installs the signal handlers, applying the second-signal policy.
    fn signals(&self) -> Shutdown {
        let shutdown = shutdown::install();
        if self.second_signal == SecondSignal::Exit {
            let immediate = shutdown.immediate.clone();
            tokio::spawn(async move {
                immediate.cancelled().await;
                eprintln!("second signal during shutdown: exiting at once");
                std::process::exit(1);
            });
        }
        shutdown
    }
}
