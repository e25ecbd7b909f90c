//! Connection limits: at most `--max-connections` open connections, and at
//! most `--max-unauthenticated-per-ip` from one source address that have
//! not finished their handshake. A connection over a limit is closed at
//! once (after a `Reject` saying why on a plaintext port), so a flood of
//! silent or half-open connections from one host costs the dispatcher a
//! bounded amount and never locks other hosts' runners out.
//!
//! Counts are held by guards: a connection counts until its guard drops,
//! whatever path its task leaves by.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a refusal is logged at most: a flood must not flood the log.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The counters behind both limits.
pub(crate) struct ConnLimits {
    max_open: usize,
    max_pending_per_ip: usize,
    open: AtomicUsize,
    pending: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// Holds one open connection's place.
pub(crate) struct Open(Arc<ConnLimits>);

/// Holds one unfinished handshake's place for its source address.
pub(crate) struct Pending(Arc<ConnLimits>, IpAddr);

impl ConnLimits {
    pub(crate) fn new(max_open: usize, max_pending_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_open,
            max_pending_per_ip,
            open: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// A place for a newly accepted connection; `Err` with the reason when
    /// `--max-connections` are open.
    pub(crate) fn open(self: &Arc<Self>) -> Result<Open, String> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_open).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Open(Arc::clone(self))),
            Err(n) => Err(self.refuse(format!(
                "the dispatcher has {n} connections open, its --max-connections; try again later"
            ))),
        }
    }

    /// A place for `ip`'s handshake; `Err` with the reason when
    /// `--max-unauthenticated-per-ip` of its connections are still in theirs.
    pub(crate) fn handshake(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, String> {
        let mut pending = crate::service::lock(&self.pending);
        let n = pending.entry(ip).or_insert(0);
        if *n >= self.max_pending_per_ip {
            let n = *n;
            drop(pending);
            return Err(self.refuse(format!(
                "{n} connections from {ip} are still in their handshake, its \
                 --max-unauthenticated-per-ip; try again later"
            )));
        }
        *n += 1;
        Ok(Pending(Arc::clone(self), ip))
    }

    /// Counts a refusal and logs it, at most every [`WARN_EVERY`].
    fn refuse(&self, reason: String) -> String {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = crate::service::lock(&self.last_warning);
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(refused_so_far = refused, "connection refused: {reason}");
        }
        reason
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut pending = crate::service::lock(&self.0.pending);
        if let Some(n) = pending.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back_when_their_guards_drop() {
        let limits = ConnLimits::new(2, 1);
        let a = limits.open().unwrap();
        let _b = limits.open().unwrap();
        assert!(limits.open().err().unwrap().contains("--max-connections"));
        drop(a);
        let _c = limits.open().unwrap();
        assert!(limits.open().is_err(), "still two open");

        let here: IpAddr = [127, 0, 0, 2].into();
        let elsewhere: IpAddr = [127, 0, 0, 1].into();
        let p = limits.handshake(here).unwrap();
        let err = limits.handshake(here).err().unwrap();
        assert!(
            err.contains("127.0.0.2") && err.contains("--max-unauthenticated-per-ip"),
            "{err}"
        );
        let _q = limits.handshake(elsewhere).unwrap();
        drop(p);
        let _r = limits.handshake(here).unwrap();
        assert_eq!(limits.refused.load(Ordering::Relaxed), 3);
    }
}
