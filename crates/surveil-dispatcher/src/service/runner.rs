//! The runner-facing operations: a runner arrives, reports (`Started`,
//! log chunks, results) and leaves. Each decides through [`decide`],
//! persists, then notifies; a result is acknowledged only once durable.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::Instrument;

use super::decide::{self, ReportDecision};
use super::{Event, JobChange, RunnerChange, RunnerLink, Service, ServiceError, now, unix_ms};
use crate::domain::{
    Attempt, JobId, JobResult, LogChunk, ResendRequest, ResultAck, RunnerHello, RunnerReport,
    SessionId,
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

    /// A frame arrived from the runner's session: it is alive. Called by
    /// the session as each frame is read, before any store write, so that
    /// a stalled write never makes a runner look silent.
    pub fn runner_seen(&self, session: SessionId) {
        self.with_sched(|s| decide::report(s, session, &RunnerReport::Alive, now()));
    }

    /// A report from a runner, and what to answer it. Nothing of a report
    /// the store failed to record is acknowledged: the answer is then a
    /// [`ReportReply::Resend`], the lease stays live, and the runner sends
    /// it again on the same connection.
    pub async fn runner_report(&self, session: SessionId, report: RunnerReport) -> ReportReply {
        let decision = self.with_sched(|s| decide::report(s, session, &report, now()));
        match (decision, report) {
            (ReportDecision::Persist, RunnerReport::Started { job, attempt }) => {
                match self.started(job, attempt).await {
                    Ok(()) => ReportReply::Nothing,
                    Err(err) => self.resend(job, attempt, &err, |r| r.started = true),
                }
            }
            (
                ReportDecision::Persist,
                RunnerReport::Log {
                    job,
                    attempt,
                    chunk,
                },
            ) => {
                let offset = chunk.offset;
                match self.append_log(job, attempt, chunk).await {
                    Ok(()) => {
                        self.with_sched(|s| decide::log_stored(s, job, attempt, offset));
                        ReportReply::Nothing
                    }
                    Err(err) => {
                        let gap = self.with_sched(|s| decide::log_failed(s, job, attempt, offset));
                        if gap.is_none() {
                            // The attempt ended meanwhile: its log is closed.
                            return ReportReply::Nothing;
                        }
                        tracing::warn!(job = job.0, attempt = attempt.0, offset, error = %err, "cannot record a log chunk; asking for a resend");
                        self.resend(job, attempt, &err, |_| {})
                    }
                }
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
                match self
                    .record_result(session, job, attempt, (result, commit), decision)
                    .instrument(span)
                    .await
                {
                    Ok(ack) => ReportReply::Ack(ack),
                    Err(err) => self.resend(job, attempt, &err, |r| r.result = true),
                }
            }
            (ReportDecision::Apply, RunnerReport::Draining) => {
                tracing::info!(session = session.0, "runner draining: it gets no new job");
                self.runner_draining_event(session);
                ReportReply::Nothing
            }
            (
                ReportDecision::Apply,
                RunnerReport::HandBack {
                    job,
                    attempt,
                    started,
                    reason,
                },
            ) => {
                tracing::info!(job = job.0, attempt = attempt.0, started, %reason, "lease handed back");
                self.apply_effects().await;
                self.wake_assigner();
                ReportReply::Nothing
            }
            (ReportDecision::Ignore, RunnerReport::HandBack { job, attempt, .. }) => {
                tracing::info!(
                    job = job.0,
                    attempt = attempt.0,
                    "hand-back of a lease this session does not hold ignored"
                );
                ReportReply::Nothing
            }
            (ReportDecision::Ignore, RunnerReport::Started { job, attempt }) => {
                tracing::info!(
                    job = job.0,
                    attempt = attempt.0,
                    "Started of a revoked attempt ignored"
                );
                ReportReply::Nothing
            }
            // Pongs, chunks of revoked attempts and chunks past a gap that
            // a resend will fill (decide::report persists only Started and
            // Log, and decides only results).
            _ => ReportReply::Nothing,
        }
    }

    /// What to ask of the runner after a failed write for its attempt: what
    /// `what` names, plus the attempt's log from its gap, if one is open.
    fn resend(
        &self,
        job: JobId,
        attempt: Attempt,
        err: &ServiceError,
        what: impl FnOnce(&mut ResendRequest),
    ) -> ReportReply {
        let mut request = ResendRequest {
            job,
            attempt,
            log_offset: self.with_sched(|s| s.log_gap(job, attempt)),
            result: false,
            started: false,
            retry_after: self.resend_delay(),
            message: format!("the dispatcher could not record your report ({err}); send it again"),
        };
        what(&mut request);
        ReportReply::Resend(request)
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
            ResultDecision::Retried { message } => return self.retried(job, message).await,
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
    ///
    /// A decided write either lands (tried again while the disk refuses)
    /// or stops the dispatcher ([`Service::fail_stop`]): once stopping,
    /// the requeue may not be on disk, so nothing is acknowledged and the
    /// runner is asked to resend (after the restart, recovery finds the
    /// attempt still running and the resend decides it again).
    async fn retried(&self, job: JobId, message: String) -> Result<ResultAck, ServiceError> {
        tracing::warn!(%message, "infrastructure failure");
        self.apply_effects().await;
        self.notifier.job_changed(job);
        // Its runner's slot is free, and the job may wait for another.
        self.wake_assigner();
        if self.failing_stop() {
            return Err(ServiceError::Store(crate::store::StoreError::Database {
                context: format!(
                    "recording the requeue of job {job} after an infrastructure failure"
                ),
                source: "the dispatcher is stopping for its store".into(),
            }));
        }
        Ok(ResultAck {
            accepted: true,
            message,
        })
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

    /// The connection ended after the dispatcher asked the runner to resend
    /// a report its store could not record: a runner that does not know
    /// `Resend` closes on it (an unknown message). That is the store's
    /// doing, not the runner's, so its leases become orphans it may claim
    /// back within one runner timeout (as after a dispatcher restart), and
    /// it resends what was lost after reconnecting.
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

/// What a runner's session answers a report with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportReply {
    /// Nothing (a `Pong`, `Started`, a log chunk, or a report ignored).
    Nothing,
    /// The result's acknowledgement.
    Ack(ResultAck),
    /// The store failed: the runner must send this again.
    Resend(ResendRequest),
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
