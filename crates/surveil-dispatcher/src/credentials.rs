//! Keeping the credentials in force current: the tokens file is reloaded
//! when it changes (checked every [`POLL`]) or on SIGHUP, and the start-up
//! warning about the shared "one token, all roles" token off loopback.
//!
//! The decisions (who is who, which sessions end) are `auth`'s; this task
//! only notices changes and reports what a reload did.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::auth::Authenticator;

/// How often the tokens file's metadata is looked at. A revocation ends
/// the revoked identity's sessions within this (plus a reload, well under
/// a millisecond for any realistic file): the promise is "within a
/// second".
pub const POLL: Duration = Duration::from_millis(200);

/// What identifies one version of the file: an atomic rewrite (rename)
/// changes the inode, an edit in place the size or the time.
type Stamp = Option<(u64, u64, i64, i64, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

/// Reloads the tokens file on change or SIGHUP until `cancel`.
pub(crate) async fn watch(auth: Arc<Authenticator>, cancel: CancellationToken) {
    let Some(path) = auth.tokens_path().map(Path::to_owned) else {
        return;
    };
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; the tokens file is still reloaded when it changes");
            None
        }
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = stamp(&path);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match auth.reload() {
            Ok(ended) => tracing::info!(
                file = %path.display(),
                sessions_ended = ended,
                "tokens file reloaded"
            ),
            Err(err) => tracing::error!(
                file = %path.display(),
                error = format!("{err:#}"),
                "cannot reload the tokens file; the credentials loaded before stay in force"
            ),
        }
    }
}

/// The shared token grants every role to whoever holds it, including the
/// code being built if it ever reads it: fine on a laptop, not on a
/// network.
pub(crate) fn warn_if_shared(config: &Config, listen: SocketAddr) {
    if config.token.is_some() && !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "--token-file is one token for every role: whoever holds it can pose as any runner and cancel or submit anything; issue per-role and per-runner credentials with `surveil token add` and --tokens-file"
        );
    }
}
