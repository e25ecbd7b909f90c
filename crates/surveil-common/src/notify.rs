//! systemd's notify protocol (`Type=notify`): readiness, status lines,
//! watchdog keep-alives, stopping. Every call is a no-op when the process
//! was not started with `NOTIFY_SOCKET`, so daemons call them
//! unconditionally.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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

/// What the watchdog asks before each keep-alive. A daemon that knows it
/// is wedged (the dispatcher's store stalled past its deadline) answers
/// no, the keep-alives stop, and systemd restarts it even if its own exit
/// hangs. Until a check is set, the answer is yes.
///
/// ```
/// use surveil_common::notify::WatchdogGate;
/// let gate = WatchdogGate::default();
/// assert!(gate.open());
/// gate.set(|| false);
/// assert!(!gate.open());
/// ```
#[derive(Clone, Default)]
pub struct WatchdogGate {
    check: Arc<Mutex<Option<Check>>>,
}

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for WatchdogGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchdogGate")
            .field("open", &self.open())
            .finish()
    }
}

impl WatchdogGate {
    /// Replaces the check: keep-alives are sent only while it is true.
    pub fn set(&self, healthy: impl Fn() -> bool + Send + Sync + 'static) {
        *self.check.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(healthy));
    }

    /// Whether a keep-alive may be sent now.
    pub fn open(&self) -> bool {
        let check = self.check.lock().unwrap_or_else(|p| p.into_inner()).clone();
        check.is_none_or(|healthy| healthy())
    }
}

/// Sends `WATCHDOG=1` every half of `WATCHDOG_USEC` while `gate` is open,
/// until `shutdown` is cancelled. It runs on the daemon's own runtime, so a
/// runtime wedged by blocking code stops the keep-alives and systemd
/// restarts the daemon.
pub fn spawn_watchdog(shutdown: CancellationToken, gate: WatchdogGate) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    keep_alive(interval, shutdown, gate, || send(&[NotifyState::Watchdog]));
}

/// [`spawn_watchdog`] to an explicit notify socket and interval (what
/// `NOTIFY_SOCKET` and `WATCHDOG_USEC` would say), for tests that play
/// systemd in-process without touching the environment.
pub fn spawn_watchdog_to(
    socket: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
    gate: WatchdogGate,
) {
    keep_alive(interval, shutdown, gate, move || {
        let sent = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(b"WATCHDOG=1\n", &socket));
        if let Err(err) = sent {
            tracing::warn!(error = %err, "sd_notify failed");
        }
    });
}

fn keep_alive(
    interval: Duration,
    shutdown: CancellationToken,
    gate: WatchdogGate,
    feed: impl Fn() + Send + 'static,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval / 2);
        let mut withheld = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if gate.open() {
                withheld = false;
                feed();
            } else if !withheld {
                withheld = true;
                tracing::error!("unhealthy: no longer feeding the systemd watchdog");
            }
        }
    });
}
