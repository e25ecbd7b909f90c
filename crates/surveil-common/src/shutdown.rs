//! Signals → cancellation. A daemon gets one token; SIGTERM or SIGINT
//! cancels it (and tells systemd `STOPPING=1`). What a second signal does is
//! the caller's choice: end the process at once, or cancel a second token
//! for daemons that have a "stop now" mode (the runner cancels its jobs).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Graceful and immediate shutdown tokens.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Cancelled by the first SIGTERM/SIGINT: stop taking work, drain.
    pub graceful: CancellationToken,
    /// Cancelled by the second: stop now.
    pub immediate: CancellationToken,
}

/// Installs the handlers; the first signal cancels the returned token, a
/// second one ends the process at once with exit code 1.
///
/// Must be called inside a tokio runtime.
pub fn install() -> CancellationToken {
    let shutdown = install_two_stage();
    let immediate = shutdown.immediate.clone();
    tokio::spawn(async move {
        immediate.cancelled().await;
        eprintln!("second signal during shutdown: exiting at once");
        std::process::exit(1);
    });
    shutdown.graceful
}

/// Installs the handlers; the first signal cancels `graceful`, the second
/// `immediate`, and the process is left to the caller.
///
/// Must be called inside a tokio runtime.
pub fn install_two_stage() -> Shutdown {
    let shutdown = Shutdown::default();
    let tokens = shutdown.clone();
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::spawn(async move {
        let mut seen = 0u32;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::info!(signal = name, "shutting down");
                crate::notify::stopping();
                tokens.graceful.cancel();
            } else {
                tracing::warn!(signal = name, "second signal: stopping now");
                tokens.immediate.cancel();
                return;
            }
        }
    });
    shutdown
}
