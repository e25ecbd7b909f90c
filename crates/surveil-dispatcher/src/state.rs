//! What every task of one dispatcher shares: the settings, the store, the
//! scheduler behind a `std::sync::Mutex`, the runners' outgoing queues, the
//! wake-ups and the counters reported by `GetStatus`.
//!
//! The scheduler lock is only ever taken for one synchronous call
//! ([`Shared::with_sched`]) and never held across `.await`. Its effects are
//! carried out by [`Shared::apply_effects`], one applier at a time and in
//! the order they were decided, each persisted before a peer hears of it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use surveil_proto::{Assign, Cancel, Envelope, Error as ErrorMsg};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::scheduler::{Effect, Scheduler, SessionId};
use crate::store::Store;

/// The supervised tasks, by the names used in logs, failpoints and
/// `GetStatus.supervisor_restarts`.
pub(crate) const TASK_NAMES: [&str; 3] = ["monitor", "redistributor", "spawner"];

/// A frame queued for a peer. Boxed so that a queue's first block (32
/// slots, allocated when the channel is made) stays small: with
/// `Envelope`s inline it was ~7 KiB for every idle runner.
pub(crate) type Outgoing = Box<Envelope>;

/// Wraps a message for an outgoing queue.
pub(crate) fn outgoing(msg: impl Into<Envelope>) -> Outgoing {
    Box::new(msg.into())
}

/// A runner connection's handle: its outgoing queue and its close switch.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub tx: mpsc::Sender<Outgoing>,
    pub close: CancellationToken,
}

/// State shared by the sessions and the supervised tasks.
pub(crate) struct Shared {
    pub config: Config,
    pub store: Store,
    /// The address runners are told to dial (the listener's).
    pub local_addr: SocketAddr,
    sched: Mutex<Scheduler>,
    /// Serialises effect application so effects are persisted in the order
    /// the scheduler decided them.
    applier: tokio::sync::Mutex<()>,
    runners: Mutex<HashMap<SessionId, Peer>>,
    next_session: AtomicU64,
    /// Wakes the redistributor: a job was queued, a runner came or went, a
    /// slot was freed.
    pub wake: Notify,
    /// Wakes `ReadLog` followers: a log chunk or a result was stored.
    pub log_appended: Notify,
    pub refused_results: AtomicU64,
    restarts: Mutex<BTreeMap<&'static str, u64>>,
    started: tokio::time::Instant,
}

/// Unix time in milliseconds, for the store's timestamps.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The scheduler's clock: tokio's, so paused-time tests move it.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock (a bug) must not wedge the daemon: the
    // state is still consistent between calls, so keep using it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new(config: Config, store: Store, local_addr: SocketAddr, sched: Scheduler) -> Self {
        Shared {
            config,
            store,
            local_addr,
            sched: Mutex::new(sched),
            applier: tokio::sync::Mutex::new(()),
            runners: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            wake: Notify::new(),
            log_appended: Notify::new(),
            refused_results: AtomicU64::new(0),
            restarts: Mutex::new(TASK_NAMES.iter().map(|n| (*n, 0)).collect()),
            started: tokio::time::Instant::now(),
        }
    }

    /// Runs one synchronous scheduler call under the lock.
    pub fn with_sched<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        f(&mut lock(&self.sched))
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn count_restart(&self, task: &'static str) {
        *lock(&self.restarts).entry(task).or_default() += 1;
    }

    pub fn restarts(&self) -> BTreeMap<String, u64> {
        lock(&self.restarts)
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }

    pub fn register_runner(&self, session: SessionId, peer: Peer) {
        lock(&self.runners).insert(session, peer);
    }

    pub fn unregister_runner(&self, session: SessionId) {
        lock(&self.runners).remove(&session);
    }

    /// Queues a frame for a runner without waiting. A runner whose queue is
    /// full cannot keep up and is disconnected: its memory must not grow.
    pub fn send_to(&self, session: SessionId, msg: impl Into<Envelope>) -> bool {
        // try_send never waits, so it is done under the map lock: cloning
        // the Peer instead would lock the cancellation tree on every ping.
        let runners = lock(&self.runners);
        let Some(peer) = runners.get(&session) else {
            return false;
        };
        match peer.tx.try_send(outgoing(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let close = peer.close.clone();
                drop(runners);
                tracing::warn!(
                    session,
                    "runner cannot keep up with its outgoing queue; disconnecting it"
                );
                close.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn close_session(&self, session: SessionId, reason: &str) {
        let Some(peer) = lock(&self.runners).remove(&session) else {
            return;
        };
        // Best effort: the runner learns why before the connection closes.
        let _ = peer.tx.try_send(outgoing(ErrorMsg {
            message: reason.to_owned(),
        }));
        peer.close.cancel();
    }

    /// Carries out every effect decided so far, in order: persisted first,
    /// then told to the peer. When it returns, every effect emitted before
    /// the call is applied.
    pub async fn apply_effects(&self) {
        let _turn = self.applier.lock().await;
        let effects = self.with_sched(Scheduler::drain_effects);
        for effect in effects {
            self.apply(effect).await;
        }
    }

    async fn apply(&self, effect: Effect) {
        match effect {
            Effect::Assign {
                session,
                runner,
                job,
                attempt,
                repo,
                branch,
                commit,
            } => {
                let span = tracing::info_span!("job", job, attempt);
                let _enter = span.enter();
                if let Err(err) = self.store.assign(job, attempt, &runner, unix_ms()).await {
                    // Not durable, so not sent: closing the runner revokes
                    // the lease and the job is requeued.
                    tracing::error!(error = %err, "cannot record the assignment; disconnecting the runner");
                    self.close_session(session, "dispatcher could not record an assignment");
                    return;
                }
                tracing::info!(runner = %runner, commit = %commit, "assigned");
                self.send_to(
                    session,
                    Assign {
                        job_id: job,
                        attempt,
                        repo,
                        branch,
                        commit,
                    },
                );
            }
            Effect::Cancel {
                session,
                job,
                attempt,
            } => {
                tracing::info!(job, attempt, session, "telling the runner to stop");
                self.send_to(
                    session,
                    Cancel {
                        job_id: job,
                        attempt,
                    },
                );
            }
            Effect::Requeue {
                job,
                attempt,
                reason,
            } => {
                tracing::warn!(job, attempt, %reason, "attempt lost; job queued again");
                if let Err(err) = self.store.requeue(job, &reason).await {
                    tracing::error!(job, error = %err, "cannot record the requeue");
                }
                self.wake.notify_one();
            }
            Effect::Finish {
                job,
                status,
                message,
            } => {
                tracing::info!(job, status = status.label(), %message, "job finished");
                if let Err(err) = self.store.finish(job, status, &message, unix_ms()).await {
                    tracing::error!(job, error = %err, "cannot record the final status");
                }
                self.log_appended.notify_waiters();
            }
            Effect::Disconnect { session, reason } => {
                tracing::warn!(session, %reason, "disconnecting runner");
                self.close_session(session, &reason);
            }
        }
    }
}

/// Shared, reference-counted.
pub(crate) type SharedRef = Arc<Shared>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use surveil_proto::Ping;

    use super::*;
    use crate::scheduler::SchedulerConfig;

    #[tokio::test]
    async fn a_runner_whose_queue_is_full_is_disconnected_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::for_state_dir(dir.path());
        let store = Store::open(dir.path()).unwrap();
        let sched = Scheduler::new(SchedulerConfig {
            runner_timeout: Duration::from_secs(5),
            max_attempts: 3,
        });
        let shared = Shared::new(config, store, "127.0.0.1:1".parse().unwrap(), sched);
        let (tx, mut rx) = mpsc::channel(2);
        let close = CancellationToken::new();
        shared.register_runner(
            7,
            Peer {
                tx,
                close: close.clone(),
            },
        );
        assert!(shared.send_to(7, Ping { seq: 1 }));
        assert!(shared.send_to(7, Ping { seq: 2 }));
        assert!(!close.is_cancelled());
        assert!(
            !shared.send_to(7, Ping { seq: 3 }),
            "the third frame does not fit"
        );
        assert!(close.is_cancelled(), "the slow peer is closed");
        // Nothing beyond the bound was kept.
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_some());
        assert!(rx.try_recv().is_err());
        assert!(!shared.send_to(99, Ping { seq: 1 }), "unknown session");
    }
}
