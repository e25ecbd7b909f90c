//! systemd's notify protocol (`Type=notify`): readiness, status lines,
//! watchdog keep-alives, stopping. Every call is a no-op when the process
//! was not started with `NOTIFY_SOCKET`, so daemons call them
//! unconditionally.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(state: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(state) {
        tracing::warn!(error = %err, "sd_notify failed");
    }
}

/// `READY=1`: the daemon is serving.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=…`: a one-line description shown by `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` every half of `WATCHDOG_USEC` until `shutdown` is
/// cancelled. It runs on the daemon's own runtime, so a runtime wedged by
/// blocking code stops the keep-alives and systemd restarts the daemon.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
