//! The I/O shell around the runner's pure [`core`](crate::core): it owns
//! the connection, the dial in progress, the jobs' tasks and their cancel
//! signals, and the clock. Each turn it waits for whichever comes first
//! (a frame, a job event, the dial's outcome, a shutdown signal, the
//! core's deadline), hands it to the core as an [`Event`] with the current
//! time, then carries out the [`Action`]s the core queued, in order.
//!
//! No decision is made here: what to send, when to dial, which job starts
//! or stops and when the run is over are the core's. One task owns all of
//! this, so nothing needs a lock; jobs run in their own tasks and never
//! wait for the connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use surveil_common::dial::Dialed;
use surveil_common::tls;
use surveil_common::{Backoff, DialError, Dialer};
use surveil_proto::{Assign, Connection, Envelope, Hello, JobFinished, Msg};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Config;
use crate::core::{Action, Event, LeaseKey, RunnerCore, Stamped, Stop};
use crate::executor::CancelSignal;
use crate::job::{self, JobContext};
use crate::joblog::{JobEvent, JobLog};

/// How long a frame may take to write before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting, and then the handshake, may each take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// First reconnect delay; doubled per failure up to the configured cap.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// A dial round in progress; it hands back its copy of the dialer with the
/// outcome (which address answered is the dialer's state).
type Dialing = Pin<Box<dyn Future<Output = (Dialer, Result<Dialed, DialError>)> + Send>>;

/// The session's driver.
pub struct Session {
    core: RunnerCore,
    /// Which dispatcher answered last; a round works on a copy and hands
    /// it back.
    dialer: Dialer,
    ctx: Arc<JobContext>,
    events_tx: mpsc::Sender<JobEvent>,
    events_rx: mpsc::Receiver<JobEvent>,
    cancels: HashMap<LeaseKey, CancelSignal>,
    link: Option<Connection<tls::Stream>>,
    dialing: Option<Dialing>,
}

/// The clock the core is fed: tokio's, so paused-time tests drive it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Session {
    /// A session of the runner `config` describes, whose unacknowledged
    /// results are `pending` (from the outbox at start-up).
    pub fn new(config: &Config, ctx: Arc<JobContext>, pending: Vec<Stamped>) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        let backoff = Backoff::new(BACKOFF_START, config.reconnect_max);
        Session {
            core: RunnerCore::new(config, backoff, pending, now()),
            dialer: Dialer::new(
                config.dispatch.clone(),
                config.tls.clone(),
                HANDSHAKE_TIMEOUT,
            ),
            ctx,
            events_tx,
            events_rx,
            cancels: HashMap::new(),
            link: None,
            dialing: None,
        }
    }

    /// Runs until shutdown: `graceful` drains, `immediate` cancels running
    /// jobs at once. Returns when no job runs any more and the results were
    /// delivered or left in the outbox.
    pub async fn run(mut self, graceful: CancellationToken, immediate: CancellationToken) {
        let (mut graceful_seen, mut immediate_seen) = (false, false);
        loop {
            self.perform().await;
            if self.core.is_done() {
                break;
            }
            let deadline = self.core.deadline().map(Instant::from_std);
            let event = tokio::select! {
                Some(event) = self.events_rx.recv() => {
                    if let JobEvent::Finished(result) = &event {
                        self.cancels.remove(&(result.job_id, result.attempt));
                    }
                    Event::Job(event)
                }
                received = recv(&mut self.link), if self.link.is_some() => match received {
                    Ok(msg) => Event::Frame(msg),
                    Err(reason) => {
                        self.link = None;
                        Event::Disconnected { reason, unsent: None }
                    }
                },
                (dialer, dialed) = poll_dial(&mut self.dialing), if self.dialing.is_some() => {
                    self.dialing = None;
                    self.dialer = dialer;
                    match dialed {
                        Ok((conn, welcome)) => {
                            tracing::info!(addr = self.dialer.current().unwrap_or_default(), "dialled the dispatcher");
                            self.link = Some(conn);
                            Event::Connected(welcome)
                        }
                        Err(error) if self.dialer.saw_standby() => {
                            Event::NoLeaderYet(surveil_common::error_chain(&error))
                        }
                        Err(error) => Event::DialFailed(surveil_common::error_chain(&error)),
                    }
                }
                () = graceful.cancelled(), if !graceful_seen => {
                    graceful_seen = true;
                    Event::Shutdown(Stop::Graceful)
                }
                () = immediate.cancelled(), if !immediate_seen => {
                    immediate_seen = true;
                    Event::Shutdown(Stop::Immediate)
                }
                () = sleep_until(deadline), if deadline.is_some() => Event::Tick,
            };
            self.core.handle(event, now());
        }
        // Every send was flushed already; dropping the link closes it.
        drop(self.link.take());
    }

    /// Carries out the core's actions, in order.
    async fn perform(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Dial(hello) => self.dialing = Some(self.dial(hello)),
                Action::Send(frame) => self.send(frame).await,
                Action::Disconnect => self.link = None,
                Action::Start { assign, epoch } => self.start(assign, epoch),
                Action::Cancel {
                    job_id,
                    attempt,
                    reason,
                } => {
                    if let Some(cancel) = self.cancels.get(&(job_id, attempt)) {
                        cancel.cancel(reason);
                    }
                }
                Action::Store { result, epoch } => self.store(result, epoch),
                Action::Forget { job_id, attempt } => {
                    let outbox = self.ctx.outbox.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = outbox.remove(job_id, attempt) {
                            tracing::warn!(job = job_id, attempt, error = %e, "cannot delete the acknowledged result from the outbox");
                        }
                    });
                }
            }
        }
    }

    /// A round over the `--dispatch` addresses. Dialling again means the
    /// last connection (if any) is gone: the round starts after it.
    fn dial(&mut self, hello: Hello) -> Dialing {
        self.dialer.lost();
        let mut dialer = self.dialer.clone();
        Box::pin(async move {
            let dialed = dialer.dial(hello).await;
            (dialer, dialed)
        })
    }

    /// Writes one frame; a failed or stuck write ends the connection and
    /// tells the core which frame did not go out.
    async fn send(&mut self, frame: Envelope) {
        let Some(conn) = self.link.as_mut() else {
            return;
        };
        let reason = match tokio::time::timeout(WRITE_TIMEOUT, conn.send(frame.clone())).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("sending failed: {e}"),
            Err(_) => "the dispatcher did not read for too long".to_owned(),
        };
        self.link = None;
        let unsent = Some(frame);
        self.core
            .handle(Event::Disconnected { reason, unsent }, now());
    }

    fn start(&mut self, assign: Assign, epoch: String) {
        let key = (assign.job_id, assign.attempt);
        let cancel = CancelSignal::new();
        self.cancels.insert(key, cancel.clone());
        let span =
            tracing::info_span!("job", job = key.0, attempt = key.1, commit = %assign.commit);
        tracing::info!(parent: &span, repo = %assign.repo, "job starts");
        tokio::spawn(
            job::run(
                self.ctx.clone(),
                assign,
                epoch,
                cancel,
                self.events_tx.clone(),
            )
            .instrument(span),
        );
    }

    /// A result for a job that never ran: through the outbox like any other.
    fn store(&self, result: JobFinished, epoch: String) {
        let ctx = self.ctx.clone();
        let log = JobLog::new(result.job_id, result.attempt, self.events_tx.clone());
        let span = tracing::info_span!("job", job = result.job_id, attempt = result.attempt);
        tokio::spawn(
            async move { job::deliver(&ctx.outbox, result, &epoch, &log).await }.instrument(span),
        );
    }
}

/// The next message, or why the connection ended. Cancel safe (a frame
/// half-read stays buffered in the connection).
async fn recv(link: &mut Option<Connection<tls::Stream>>) -> Result<Msg, String> {
    let Some(conn) = link else {
        return std::future::pending().await;
    };
    match conn.recv().await {
        Ok(Some(msg)) => Ok(msg),
        Ok(None) => Err("the dispatcher closed the connection".to_owned()),
        Err(e) => Err(format!("reading from the dispatcher failed: {e}")),
    }
}

async fn poll_dial(dialing: &mut Option<Dialing>) -> (Dialer, Result<Dialed, DialError>) {
    match dialing {
        Some(dial) => dial.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
