//! Signals → cancellation. A daemon gets two tokens: the first SIGTERM or
//! SIGINT cancels `graceful` (and tells systemd `STOPPING=1`), a second
//! cancels `immediate`. What "immediate" means is the daemon's choice
//! ([`crate::daemon::SecondSignal`]): exit at once, or cancel running work.

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

/// Installs the handlers; the first signal cancels `graceful`, the second
/// `immediate`.
///
/// Must be called inside a tokio runtime.
pub fn install() -> Shutdown {
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
