//! Who hears of a change once it is durable: a `watch` per followed job
//! (made by the first follower, dropped with the last), so a follower
//! wakes only for its own job, and a bounded broadcast of job and runner
//! [`Event`]s for listeners of the whole dispatcher.
//!
//! Both cost next to nothing when nobody listens: a lookup in an empty
//! map, and an event is not even built. This file knows nothing of what
//! the followers do on waking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use crate::domain::{Attempt, FinalStatus, JobId, SessionId};

/// Events kept for a slow listener before it is told it lagged.
const EVENT_BACKLOG: usize = 1024;

/// A change of a job or a runner, after it was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A job changed.
    Job {
        /// The job.
        id: JobId,
        /// How.
        change: JobChange,
    },
    /// A runner came or went.
    Runner {
        /// Its name.
        name: String,
        /// Its connection.
        session: SessionId,
        /// How.
        change: RunnerChange,
    },
}

/// How a job changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobChange {
    /// Submitted: it waits for a runner.
    Queued,
    /// Given to a runner.
    Assigned {
        /// The new attempt.
        attempt: Attempt,
        /// The runner's name.
        runner: String,
    },
    /// Its runner started it.
    Started {
        /// The attempt.
        attempt: Attempt,
    },
    /// Its attempt was lost; it waits for a runner again.
    Requeued {
        /// The lost attempt.
        attempt: Attempt,
    },
    /// A user asked to cancel it; it ends when its runner reports.
    CancelRequested,
    /// It ended.
    Finished {
        /// How.
        status: FinalStatus,
    },
}

/// How a runner changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerChange {
    /// It completed its handshake.
    Connected,
    /// It started draining: it gets no new job.
    Draining,
    /// Its connection ended.
    Disconnected,
}

/// The watches and the event broadcast.
pub struct Notifier {
    /// A change counter per followed job; its receivers are the followers.
    jobs: Mutex<HashMap<JobId, watch::Sender<u64>>>,
    events: broadcast::Sender<Event>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Notifier {
    /// No watches, no listeners.
    pub fn new() -> Arc<Notifier> {
        Arc::new(Notifier {
            jobs: Mutex::new(HashMap::new()),
            events: broadcast::channel(EVENT_BACKLOG).0,
        })
    }

    /// Wakes `job`'s followers: its record or its log changed.
    pub fn job_changed(&self, job: JobId) {
        if let Some(tx) = lock(&self.jobs).get(&job) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Broadcasts the event `make` builds, if anyone listens.
    pub fn event(&self, make: impl FnOnce() -> Event) {
        if self.events.receiver_count() > 0 {
            // Only fails when the last listener left meanwhile.
            let _ = self.events.send(make());
        }
    }

    /// A new listener of every event from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Follows `job`'s changes from now on.
    pub fn watch(self: &Arc<Self>, job: JobId) -> JobWatch {
        let rx = lock(&self.jobs)
            .entry(job)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        JobWatch {
            job,
            rx,
            notifier: Arc::clone(self),
        }
    }

    /// How many jobs have followers.
    #[cfg(test)]
    pub fn watched_jobs(&self) -> usize {
        lock(&self.jobs).len()
    }
}

/// One follower's view of one job's changes.
pub struct JobWatch {
    job: JobId,
    rx: watch::Receiver<u64>,
    notifier: Arc<Notifier>,
}

impl JobWatch {
    /// Marks every change so far as seen. Called before reading the job,
    /// so that a change made after the read wakes [`changed`](Self::changed).
    pub fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Waits for a change not yet seen.
    pub async fn changed(&mut self) {
        // The sender lives in the map while this receiver does (see Drop),
        // so this only returns on a change.
        let _ = self.rx.changed().await;
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut jobs = lock(&self.notifier.jobs);
        // Under the map's lock nobody can subscribe meanwhile: if this is
        // the last follower, the job's watch goes with it.
        if jobs
            .get(&self.job)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            jobs.remove(&self.job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_wakes_for_its_job_only_and_goes_with_its_last_follower() {
        let n = Notifier::new();
        let mut a1 = n.watch(JobId(1));
        let a2 = n.watch(JobId(1));
        let mut b = n.watch(JobId(2));
        assert_eq!(n.watched_jobs(), 2);
        a1.mark_seen();
        b.mark_seen();
        n.job_changed(JobId(2));
        n.job_changed(JobId(3));
        assert!(
            !a1.rx.has_changed().unwrap(),
            "job 1's follower woke for job 2"
        );
        assert!(b.rx.has_changed().unwrap());
        b.changed().await;
        n.job_changed(JobId(1));
        a1.changed().await;
        drop(a2);
        assert_eq!(n.watched_jobs(), 2, "job 1 still has a follower");
        drop(a1);
        drop(b);
        assert_eq!(n.watched_jobs(), 0);
    }

    #[tokio::test]
    async fn events_reach_listeners_and_are_not_built_without_them() {
        let n = Notifier::new();
        n.event(|| unreachable!("nobody listens"));
        let mut rx = n.subscribe_events();
        let queued = Event::Job {
            id: JobId(7),
            change: JobChange::Queued,
        };
        n.event(|| queued.clone());
        assert_eq!(rx.recv().await.unwrap(), queued);
    }
}
