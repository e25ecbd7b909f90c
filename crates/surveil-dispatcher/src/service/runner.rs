//! The runner-facing operations: a runner arrives, reports (`Started`,
//! log chunks, results) and leaves. Each decides through [`decide`],
//! persists, then notifies; a result is acknowledged only once durable.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::Instrument;

use super::decide::{self, ReportDecision};
use super::{Event, JobChange, RunnerChange, RunnerLink, Service, ServiceError, now, unix_ms};
use crate::domain::{
    Attempt, JobId, JobResult, LogChunk, ResultAck, RunnerHello, RunnerReport, SessionId,
};
use crate::scheduler::ResultDecision;

impl Service {
    /// An id for a new connection, unique for the life of the process.
    pub fn new_session(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// The address of the connected runner called `name`, if any.
    pub fn runner_addr(&self, name: &str) -> Option<String> {
        self.with_sched(|s| s.runner_addr(name).map(str::to_owned))
    }

    /// A runner completed its handshake as `session`; `link` reaches it.
    /// Its listed leases are kept or cancelled, an earlier session of the
    /// same name is replaced, and the assignment pass runs.
    pub async fn runner_connected(
        &self,
        session: SessionId,
        hello: RunnerHello,
        link: Box<dyn RunnerLink>,
    ) {
        tracing::info!(session = session.0, slots = hello.slots, repos = ?hello.repos, "runner connected");
        let name = hello.name.clone();
        self.register(session, &name, link);
        self.with_sched(|s| s.handle_runner_connected(session, hello, now()));
        self.apply_effects().await;
        self.notifier.event(|| Event::Runner {
            name,
            session,
            change: RunnerChange::Connected,
        });
        self.wake_assigner();
    }

    /// A report from a runner. Returns the acknowledgement to send for a
    /// result. On `Err` nothing of the report is durable and nothing must
    /// be acknowledged: the runner resends after its next handshake.
    pub async fn runner_report(
        &self,
        session: SessionId,
        report: RunnerReport,
    ) -> Result<Option<ResultAck>, ServiceError> {
        let decision = self.with_sched(|s| decide::report(s, session, &report, now()));
        match (decision, report) {
            (ReportDecision::Persist, RunnerReport::Started { job, attempt }) => {
                self.started(job, attempt).await?;
                Ok(None)
            }
            (
                ReportDecision::Persist,
                RunnerReport::Log {
                    job,
                    attempt,
                    chunk,
                },
            ) => {
                self.append_log(job, attempt, chunk).await?;
                Ok(None)
            }
            (
                ReportDecision::Result(decision),
                RunnerReport::Finished {
                    job,
                    attempt,
                    result,
                    commit,
                },
            ) => {
                let span = tracing::info_span!("job", job = job.0, attempt = attempt.0);
                self.record_result(session, job, attempt, (result, commit), decision)
                    .instrument(span)
                    .await
                    .map(Some)
            }
            (ReportDecision::Ignore, RunnerReport::Started { job, attempt }) => {
                tracing::info!(
                    job = job.0,
                    attempt = attempt.0,
                    "Started of a revoked attempt ignored"
                );
                Ok(None)
            }
            // Pongs, and chunks of revoked attempts (decide::report
            // persists only Started and Log, and decides only results).
            _ => Ok(None),
        }
    }

    async fn started(&self, job: JobId, attempt: Attempt) -> Result<(), ServiceError> {
        self.store.started(job, attempt, unix_ms()).await?;
        self.notifier.job_changed(job);
        self.notifier.event(|| Event::Job {
            id: job,
            change: JobChange::Started { attempt },
        });
        Ok(())
    }

    async fn append_log(
        &self,
        job: JobId,
        attempt: Attempt,
        chunk: LogChunk,
    ) -> Result<(), ServiceError> {
        if chunk.data.len() > surveil_proto::MAX_LOG_CHUNK {
            // Not a reason to end the runner's session: the chunk is
            // dropped and named, and the job goes on.
            tracing::warn!(
                job = job.0,
                attempt = attempt.0,
                bytes = chunk.data.len(),
                limit = surveil_proto::MAX_LOG_CHUNK,
                "a log chunk over the protocol's 64 KiB limit was refused"
            );
            return Ok(());
        }
        let cap = self.max_log_size.load(Ordering::Relaxed);
        self.store.append_log(job, attempt, chunk, cap).await?;
        self.notifier.job_changed(job);
        Ok(())
    }

    async fn record_result(
        &self,
        session: SessionId,
        job: JobId,
        attempt: Attempt,
        (result, commit): (JobResult, String),
        mut decision: ResultDecision,
    ) -> Result<ResultAck, ServiceError> {
        while decision == ResultDecision::Pending {
            // A write of this result is in flight (a resend on a new
            // connection): wait until it has answered, then decide again.
            let decide = || {
                self.with_sched(|s| {
                    decide::result(s, session, job, attempt, &result, &commit, now())
                })
            };
            let mut watch = self.notifier.watch(job);
            watch.mark_seen();
            decision = decide();
            if decision == ResultDecision::Pending {
                watch.changed().await;
                decision = decide();
            }
        }
        let (record, accepted_live) = match decision {
            ResultDecision::Revoked { message } => return Ok(self.refused(message)),
            ResultDecision::Retried { message } => return Ok(self.retried(job, message).await),
            ResultDecision::Accept { status, message } => (
                JobResult {
                    status,
                    message,
                    tasks: result.tasks,
                    infrastructure: false,
                },
                true,
            ),
            // Only the store can tell a resend from a stale result.
            ResultDecision::Unknown | ResultDecision::Pending => (result, false),
        };
        let answer = self
            .store
            .record_result(job, attempt, &record, unix_ms())
            .await;
        let outcome = match answer {
            Ok(outcome) => outcome,
            // Not this dispatcher's job (a result kept across a store
            // restored from backup, or a confused peer): refused, so the
            // runner drops it, and the session goes on.
            Err(crate::store::StoreError::NoSuchJob(_)) => {
                return Ok(self.refused(format!(
                    "there is no job {job} in this dispatcher's store; result refused"
                )));
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot record the result");
                self.with_sched(|s| decide::result_failed(s, job, attempt, now()));
                // A resend waiting for this write decides again.
                self.notifier.job_changed(job);
                return Err(err.into());
            }
        };
        let ack = self.with_sched(|s| decide::result_recorded(s, job, attempt, outcome));
        self.notifier.job_changed(job);
        if outcome == crate::store::RecordOutcome::Recorded {
            tracing::info!(status = record.status.label(), "result recorded");
            self.notifier.event(|| Event::Job {
                id: job,
                change: JobChange::Finished {
                    status: record.status,
                },
            });
        }
        if accepted_live {
            // Its runner's slot is free.
            self.wake_assigner();
        }
        if ack.accepted {
            Ok(ack)
        } else {
            Ok(self.refused(ack.message))
        }
    }

    /// An infrastructure failure of the live attempt: the scheduler has
    /// decided its requeue (or the job's end); it is recorded before the
    /// runner hears that its result is taken. The attempt's record keeps
    /// the runner's message as why it ended.
    async fn retried(&self, job: JobId, message: String) -> ResultAck {
        tracing::warn!(%message, "infrastructure failure");
        self.apply_effects().await;
        self.notifier.job_changed(job);
        // Its runner's slot is free, and the job may wait for another.
        self.wake_assigner();
        ResultAck {
            accepted: true,
            message,
        }
    }

    fn refused(&self, message: String) -> ResultAck {
        count(&self.refused_results);
        tracing::warn!(%message, "stale result refused");
        ResultAck {
            accepted: false,
            message,
        }
    }

    /// The runner's connection closed or broke under it (a FIN or RST):
    /// its leases wait `--disconnect-grace` for it to reconnect, and the
    /// monitor revokes them when the grace is over.
    pub async fn runner_closed(&self, session: SessionId, reason: &str) {
        if let Some(name) = self.unregister(session) {
            self.runner_gone_event(session, name);
        }
        self.with_sched(|s| s.handle_runner_closed(session, reason, now()));
        self.expiry_changed.notify_one();
        self.apply_effects().await;
        self.wake_assigner();
    }

    /// The dispatcher ended the runner's connection (a protocol error,
    /// silence, a replaced session): its leases are revoked at once.
    pub async fn runner_disconnected(&self, session: SessionId, reason: &str) {
        if let Some(name) = self.unregister(session) {
            self.runner_gone_event(session, name);
        }
        self.with_sched(|s| s.handle_runner_disconnected(session, reason, now()));
        self.apply_effects().await;
        self.wake_assigner();
    }

    /// The dispatcher ended the runner's connection because it could not
    /// record what the runner reported: the runner keeps its leases for one
    /// runner timeout, so that after reconnecting it resends what was lost
    /// and carries on.
    pub fn runner_released(&self, session: SessionId) {
        if let Some(name) = self.unregister(session) {
            self.runner_gone_event(session, name);
        }
        self.with_sched(|s| s.handle_runner_released(session, now()));
    }

    /// The connection ended because the dispatcher is shutting down: the
    /// leases stay as the store records them, for the runner to reclaim
    /// from the next dispatcher.
    pub fn runner_left_at_shutdown(&self, session: SessionId) {
        self.unregister(session);
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
