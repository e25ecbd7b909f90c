//! Carrying out the scheduler's effects, one applier at a time and in the
//! order they were decided, each persisted before a peer hears of it; and
//! the runners' links, through which the service talks to them without
//! knowing the protocol.

use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::{Event, JobChange, RunnerChange, Service, lock, unix_ms};
use crate::domain::{Assignment, SessionId, ToRunner};
use crate::scheduler::{Effect, Scheduler};
use crate::store::{StoreError, StoreFuture};

/// How many times a decided requeue or final status is written before the
/// dispatcher gives up and fails stop.
const DECIDED_TRIES: u32 = 5;
/// The pause after the first failed try; it doubles after each (1.5 s in
/// all before the last try).
const DECIDED_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The service's way to one connected runner. A protocol session provides
/// one (frames on a bounded queue); tests provide recorders.
pub trait RunnerLink: Send + Sync {
    /// Queues a message without waiting. A link that cannot take it (the
    /// runner cannot keep up) closes itself: a slow peer must not make the
    /// dispatcher buffer without bound. `false` when it was not queued.
    fn send(&self, msg: ToRunner) -> bool;

    /// The identity the runner authenticated as (`token:ci-3`,
    /// `cert:ci-3`, `shared`...), for listings; empty when unknown.
    fn identity(&self) -> String {
        String::new()
    }

    /// Closes the connection, telling the runner why (best effort).
    fn close(&self, reason: &str);
}

/// A connected runner's link, with its name for the event stream.
pub(super) struct Registered {
    name: String,
    link: Box<dyn RunnerLink>,
}

impl Service {
    pub(super) fn register(&self, session: SessionId, name: &str, link: Box<dyn RunnerLink>) {
        let name = name.to_owned();
        lock(&self.links).insert(session, Registered { name, link });
    }

    /// Forgets the session's link; returns the runner's name if it was
    /// registered.
    pub(super) fn unregister(&self, session: SessionId) -> Option<String> {
        lock(&self.links).remove(&session).map(|r| r.name)
    }

    /// The identity of a connected runner's session.
    pub(super) fn identity_of(&self, session: SessionId) -> String {
        lock(&self.links)
            .get(&session)
            .map(|r| r.link.identity())
            .unwrap_or_default()
    }

    /// Queues a message for a runner; `false` when it is gone or slow.
    pub(super) fn send_to(&self, session: SessionId, msg: ToRunner) -> bool {
        lock(&self.links)
            .get(&session)
            .is_some_and(|r| r.link.send(msg))
    }

    /// Pings every connected runner, under one lock.
    pub(super) fn ping_all(&self, seq: u64) {
        for registered in lock(&self.links).values() {
            registered.link.send(ToRunner::Ping { seq });
        }
    }

    fn close_session(&self, session: SessionId, reason: &str) {
        let registered = lock(&self.links).remove(&session);
        if let Some(registered) = registered {
            registered.link.close(reason);
            self.runner_gone_event(session, registered.name);
        }
    }

    pub(super) fn runner_draining_event(&self, session: SessionId) {
        let name = lock(&self.links).get(&session).map(|r| r.name.clone());
        if let Some(name) = name {
            self.notifier.event(|| Event::Runner {
                name,
                session,
                change: RunnerChange::Draining,
            });
        }
    }

    pub(super) fn runner_gone_event(&self, session: SessionId, name: String) {
        self.notifier.event(|| Event::Runner {
            name,
            session,
            change: RunnerChange::Disconnected,
        });
    }

    /// Carries out every effect decided so far, in order. When it returns,
    /// every effect emitted before the call is applied.
    pub(crate) async fn apply_effects(&self) {
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
                assignment,
            } => {
                let span = tracing::info_span!(
                    "job",
                    job = assignment.job.0,
                    attempt = assignment.attempt.0
                );
                self.assign(session, &runner, assignment)
                    .instrument(span)
                    .await;
            }
            Effect::Cancel {
                session,
                job,
                attempt,
            } => {
                tracing::info!(
                    job = job.0,
                    attempt = attempt.0,
                    session = session.0,
                    "telling the runner to stop"
                );
                self.send_to(session, ToRunner::Cancel { job, attempt });
            }
            Effect::Requeue {
                job,
                attempt,
                reason,
                handed_back: false,
            } => {
                tracing::warn!(job = job.0, attempt = attempt.0, %reason, "attempt lost; job queued again");
                self.persist_decided("the requeue", job, || {
                    self.store.requeue(job, attempt, &reason)
                })
                .await;
                self.notifier.job_changed(job);
                self.notifier.event(|| Event::Job {
                    id: job,
                    change: JobChange::Requeued { attempt },
                });
                self.wake_assigner();
            }
            Effect::Requeue {
                job,
                attempt,
                reason,
                handed_back: true,
            } => {
                tracing::info!(job = job.0, attempt = attempt.0, %reason, "attempt handed back; job queued again (not counted)");
                self.persist_decided("the hand-back", job, || {
                    self.store.hand_back(job, attempt, &reason)
                })
                .await;
                self.notifier.job_changed(job);
                self.notifier.event(|| Event::Job {
                    id: job,
                    change: JobChange::Requeued { attempt },
                });
                self.wake_assigner();
            }
            Effect::Finish {
                job,
                status,
                message,
            } => {
                tracing::info!(job = job.0, status = status.label(), %message, "job finished");
                let at = unix_ms();
                self.persist_decided("the final status", job, || {
                    self.store.finish(job, status, &message, at)
                })
                .await;
                self.notifier.job_changed(job);
                self.notifier.event(|| Event::Job {
                    id: job,
                    change: JobChange::Finished { status },
                });
            }
            Effect::Disconnect { session, reason } => {
                tracing::warn!(session = session.0, %reason, "disconnecting runner");
                self.close_session(session, &reason);
            }
        }
    }

    /// Records a requeue or a final status the scheduler has already
    /// decided: memory has moved on, so the store must follow or the two
    /// disagree (a job final in memory but running on disk, with no lease
    /// anywhere). A write the disk refused is tried again after a doubling
    /// pause, [`DECIDED_TRIES`] times in all; if it still fails the
    /// dispatcher fails stop, and recovery rebuilds memory from what the
    /// store holds. Other refusals (the job moved on) change nothing.
    async fn persist_decided<'a>(
        &'a self,
        what: &str,
        job: crate::domain::JobId,
        write: impl Fn() -> StoreFuture<'a, ()>,
    ) {
        let mut pause = DECIDED_FIRST_PAUSE;
        for tries in 1..=DECIDED_TRIES {
            let err = match write().await {
                Ok(()) => return,
                Err(err @ (StoreError::Commit(_) | StoreError::Database { .. })) => err,
                Err(err) => {
                    tracing::error!(job = job.0, error = %err, "cannot record {what}");
                    return;
                }
            };
            if tries == DECIDED_TRIES || self.failing_stop() {
                self.fail_stop(format!(
                    "cannot record {what} of job {job} after {tries} tries ({err}): \
                     the dispatcher's memory and its store would disagree"
                ));
                return;
            }
            tracing::warn!(job = job.0, error = %err, retry_in = ?pause, "cannot record {what}; trying again");
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    async fn assign(&self, session: SessionId, runner: &str, assignment: Assignment) {
        let (job, attempt) = (assignment.job, assignment.attempt);
        if let Err(err) = self.store.assign(job, attempt, runner, unix_ms()).await {
            // Not durable, so not sent: the job waits again as if never
            // assigned, and the pass retries after a pause.
            tracing::error!(error = %err, "cannot record the assignment; the job waits again");
            self.with_sched(|s| s.handle_assign_failed(job, attempt));
            self.assign_failed.store(true, Ordering::Relaxed);
            self.wake_assigner();
            return;
        }
        tracing::info!(runner = %runner, commit = %assignment.commit, "assigned");
        self.notifier.job_changed(job);
        self.notifier.event(|| Event::Job {
            id: job,
            change: JobChange::Assigned {
                attempt,
                runner: runner.to_owned(),
            },
        });
        self.send_to(session, ToRunner::Assign(assignment));
    }
}
