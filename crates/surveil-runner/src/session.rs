//! The runner's side of the protocol, across connections: dial, `Hello`
//! with the leases it holds, answer pings, take `Assign`/`Cancel`/
//! `ResultAck`, forward job events, reconnect forever with jittered
//! backoff, and drain on shutdown.
//!
//! One task owns all of this state (jobs, retained logs, unacknowledged
//! results, the current connection), so nothing here needs a lock. Jobs
//! run in their own tasks and never wait for the connection: while it is
//! down their logs are retained (bounded) and their results sit in the
//! outbox, and both are resent after the next handshake.
//!
//! Drain (first shutdown signal): the protocol has no "draining" message,
//! and closing the connection would revoke the running jobs' leases at
//! once. So the runner stays connected, lets running jobs finish (up to
//! the drain timeout, then cancels them and reports `cancelled`), and does
//! not start any job it has not started yet, including an `Assign` that
//! arrives during the drain. Those are never reported: reporting them
//! `cancelled` or `error` would be a final verdict on a job that never
//! ran. When the runner then disconnects, the dispatcher revokes their
//! leases and queues them again, so they are neither lost nor wrongly
//! failed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use surveil_common::tls::{self, ClientTls};
use surveil_proto::{
    Assign, Connection, Envelope, Hello, JobFinished, Lease, Log, Msg, Pong, Role,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::executor::CancelSignal;
use crate::job::{self, JobContext};
use crate::joblog::{JobEvent, JobLog};

/// Most bytes of one job's log kept for resending after a reconnect; older
/// output is dropped first (a very chatty job that outlives a long outage
/// loses the oldest part of its log, never its result).
pub const LOG_RETAIN_BYTES: usize = 4 * 1024 * 1024;

/// How long a frame may take to write before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// First reconnect delay; doubled per failure up to the configured cap.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// After the jobs ended during shutdown, how long the runner keeps trying
/// to deliver their results before leaving them to the outbox (they are
/// sent on the next start).
const RESULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the session needs besides the job context. Its `Debug`
/// never shows the token.
#[derive(Clone)]
pub struct SessionConfig {
    /// `host:port` of the dispatcher.
    pub dispatch: String,
    /// The runner's unique name.
    pub name: String,
    /// The shared secret, if any.
    pub token: Option<String>,
    /// Jobs at once.
    pub slots: u32,
    /// Free-form labels.
    pub labels: Vec<String>,
    /// Canonical repository strings this runner builds.
    pub repos: Vec<String>,
    /// How long running jobs may take to finish after the first shutdown
    /// signal.
    pub drain_timeout: Duration,
    /// The longest wait between reconnect attempts.
    pub reconnect_max: Duration,
    /// TLS to the dispatcher; `None` dials plaintext.
    pub tls: Option<ClientTls>,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("dispatch", &self.dispatch)
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("slots", &self.slots)
            .field("labels", &self.labels)
            .field("repos", &self.repos)
            .field("drain_timeout", &self.drain_timeout)
            .field("reconnect_max", &self.reconnect_max)
            .field("tls", &self.tls)
            .finish()
    }
}

type LeaseKey = (u64, u32);

/// The tail of a job's log, for resending after a reconnect.
#[derive(Debug, Default)]
struct Retained {
    chunks: VecDeque<Log>,
    bytes: usize,
    dropped: u64,
}

impl Retained {
    fn push(&mut self, log: Log) {
        self.bytes += log.data.len();
        self.chunks.push_back(log);
        while self.bytes > LOG_RETAIN_BYTES {
            let Some(old) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
            self.dropped += old.data.len() as u64;
        }
    }
}

struct Running {
    cancel: CancelSignal,
    started_sent: bool,
}

/// The live connection. It stays one `Connection` read and written by the
/// session task alone: `Connection::split` would hand the reader bytes
/// already buffered during the handshake, but tokio-util's `FramedRead`
/// only decodes them after the next socket read, so a frame that arrived
/// together with `Welcome` would wait for the one after it.
struct Link {
    conn: Connection<tls::Stream>,
    /// Without any frame from the dispatcher for this long, it is presumed
    /// gone (its pings stopped).
    silence_limit: Option<Duration>,
    last_heard: Instant,
}

type Dialed = anyhow::Result<(Connection<tls::Stream>, surveil_proto::Welcome)>;

/// The session state machine and its driver.
pub struct Session {
    cfg: SessionConfig,
    ctx: Arc<JobContext>,
    events_tx: mpsc::Sender<JobEvent>,
    events_rx: mpsc::Receiver<JobEvent>,
    running: HashMap<LeaseKey, Running>,
    queued: VecDeque<Assign>,
    /// Results in the outbox, waiting for `ResultAck`.
    results: BTreeMap<LeaseKey, JobFinished>,
    retained: HashMap<LeaseKey, Retained>,
    link: Option<Link>,
    failures: u32,
    draining: bool,
}

impl Session {
    /// A session whose unacknowledged results are `pending` (from the
    /// outbox at start-up).
    pub fn new(cfg: SessionConfig, ctx: Arc<JobContext>, pending: Vec<JobFinished>) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        Session {
            cfg,
            ctx,
            events_tx,
            events_rx,
            running: HashMap::new(),
            queued: VecDeque::new(),
            results: pending
                .into_iter()
                .map(|r| ((r.job_id, r.attempt), r))
                .collect(),
            retained: HashMap::new(),
            link: None,
            failures: 0,
            draining: false,
        }
    }

    /// Runs until shutdown: `graceful` drains, `immediate` cancels running
    /// jobs at once. Returns when no job runs any more and the results were
    /// delivered or left in the outbox.
    pub async fn run(mut self, graceful: CancellationToken, immediate: CancellationToken) {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut next_dial = Instant::now();
        let mut dialing: Option<std::pin::Pin<Box<dyn Future<Output = Dialed> + Send>>> = None;
        let mut drain_deadline: Option<Instant> = None;
        let mut jobs_cancelled = false;
        let mut flush_deadline: Option<Instant> = None;
        loop {
            self.start_queued();
            if self.draining && self.running.is_empty() {
                if self.results.is_empty() {
                    break;
                }
                let deadline = *flush_deadline.get_or_insert_with(|| {
                    Instant::now()
                        + if immediate.is_cancelled() {
                            Duration::from_secs(1)
                        } else {
                            RESULT_FLUSH_TIMEOUT
                        }
                });
                if Instant::now() >= deadline {
                    tracing::warn!(
                        results = self.results.len(),
                        "leaving unacknowledged results in the outbox for the next start"
                    );
                    break;
                }
            }
            let silence_at = self
                .link
                .as_ref()
                .and_then(|l| l.silence_limit.map(|limit| l.last_heard + limit));
            let connected = self.link.is_some();
            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_job_event(event).await,
                msg = recv(&mut self.link), if connected => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => self.disconnect("the dispatcher closed the connection"),
                },
                () = tokio::time::sleep_until(next_dial), if !connected && dialing.is_none() => {
                    dialing = Some(Box::pin(dial(self.cfg.dispatch.clone(), self.cfg.tls.clone(), self.hello())));
                }
                dialed = async { dialing.as_mut().expect("guarded").await }, if dialing.is_some() => {
                    dialing = None;
                    match dialed {
                        Ok((conn, welcome)) => self.on_connected(conn, welcome).await,
                        Err(e) => {
                            self.failures = self.failures.saturating_add(1);
                            let delay = backoff(self.failures, self.cfg.reconnect_max);
                            tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot reach the dispatcher");
                            next_dial = Instant::now() + delay;
                        }
                    }
                }
                () = tokio::time::sleep_until(silence_at.unwrap_or_else(far)), if silence_at.is_some() => {
                    self.disconnect("nothing heard from the dispatcher for too long");
                }
                () = graceful.cancelled(), if !self.draining => {
                    self.draining = true;
                    drain_deadline = Some(Instant::now() + self.cfg.drain_timeout);
                    tracing::info!(
                        running = self.running.len(),
                        not_started = self.queued.len(),
                        drain_timeout = ?self.cfg.drain_timeout,
                        "draining: running jobs may finish, no new job starts"
                    );
                }
                () = tokio::time::sleep_until(drain_deadline.unwrap_or_else(far)), if drain_deadline.is_some() && !jobs_cancelled => {
                    jobs_cancelled = true;
                    self.cancel_all(&format!(
                        "runner shut down: the job did not finish within the drain timeout ({})",
                        humantime::format_duration(self.cfg.drain_timeout)
                    ));
                }
                () = immediate.cancelled(), if !jobs_cancelled => {
                    self.draining = true;
                    jobs_cancelled = true;
                    self.cancel_all("runner stopped at once by a second shutdown signal");
                }
                () = tokio::time::sleep_until(flush_deadline.unwrap_or_else(far)), if flush_deadline.is_some() => {}
            }
            if self.link.is_none() && dialing.is_none() && next_dial < Instant::now() {
                // Lost the connection just now: reconnect after a short,
                // jittered pause so a restarted dispatcher is not stormed.
                if self.failures == 0 {
                    self.failures = 1;
                    next_dial = Instant::now() + backoff(1, self.cfg.reconnect_max);
                }
            }
        }
        // Every send flushed already; dropping the link closes it.
        drop(self.link.take());
        if !self.queued.is_empty() {
            tracing::info!(
                jobs = ?self.queued.iter().map(|a| (a.job_id, a.attempt)).collect::<Vec<_>>(),
                "never started because of the shutdown; the dispatcher requeues them"
            );
        }
    }

    fn hello(&self) -> Hello {
        let mut hello = Hello::new(Role::Runner, self.cfg.name.clone());
        hello.token = self.cfg.token.clone().unwrap_or_default();
        hello.slots = self.cfg.slots;
        hello.labels = self.cfg.labels.clone();
        hello.repos = self.cfg.repos.clone();
        let mut leases: Vec<LeaseKey> = self
            .running
            .keys()
            .copied()
            .chain(self.queued.iter().map(|a| (a.job_id, a.attempt)))
            .chain(self.results.keys().copied())
            .collect();
        leases.sort_unstable();
        leases.dedup();
        hello.leases = leases
            .into_iter()
            .map(|(job_id, attempt)| Lease { job_id, attempt })
            .collect();
        hello
    }

    async fn on_connected(
        &mut self,
        conn: Connection<tls::Stream>,
        welcome: surveil_proto::Welcome,
    ) {
        tracing::info!(session = %welcome.session_id, dispatcher = %welcome.server_version, "connected to the dispatcher");
        self.failures = 0;
        // Several missed pings, and never less than the runner timeout the
        // dispatcher itself applies to us.
        let silence_limit = (welcome.heartbeat_interval_ms > 0).then(|| {
            let beats = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms) * 4);
            beats.max(Duration::from_millis(u64::from(welcome.runner_timeout_ms)))
        });
        self.link = Some(Link {
            conn,
            silence_limit,
            last_heard: Instant::now(),
        });
        self.resend().await;
    }

    /// After a handshake: what the dispatcher may have missed. Logs are
    /// idempotent by offset, results by (job, attempt).
    async fn resend(&mut self) {
        let mut frames: Vec<Envelope> = Vec::new();
        let unstarted: Vec<LeaseKey> = self
            .running
            .iter()
            .filter(|(_, running)| !running.started_sent)
            .map(|(key, _)| *key)
            .collect();
        for &(job_id, attempt) in &unstarted {
            frames.push(surveil_proto::Started { job_id, attempt }.into());
        }
        let mut keys: Vec<&LeaseKey> = self.retained.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let retained = &self.retained[key];
            if retained.dropped > 0 {
                tracing::warn!(
                    job = key.0,
                    attempt = key.1,
                    bytes = retained.dropped,
                    "the oldest log output was dropped while disconnected"
                );
            }
            frames.extend(retained.chunks.iter().cloned().map(Envelope::from));
        }
        frames.extend(self.results.values().cloned().map(Envelope::from));
        for frame in frames {
            if !self.send(frame).await {
                return;
            }
        }
        for key in unstarted {
            if let Some(running) = self.running.get_mut(&key) {
                running.started_sent = true;
            }
        }
    }

    /// Sends one frame if connected; a failed or stuck write drops the
    /// connection. Returns whether it was written.
    async fn send(&mut self, frame: impl Into<Envelope>) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let frame = frame.into();
        match tokio::time::timeout(WRITE_TIMEOUT, link.conn.send(frame)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.disconnect(&format!("sending failed: {e}"));
                false
            }
            Err(_) => {
                self.disconnect("the dispatcher did not read for too long");
                false
            }
        }
    }

    fn disconnect(&mut self, why: &str) {
        if self.link.take().is_some() {
            tracing::warn!(
                reason = why,
                "disconnected from the dispatcher; jobs keep running"
            );
        }
    }

    async fn on_job_event(&mut self, event: JobEvent) {
        match event {
            JobEvent::Started(started) => {
                let key = (started.job_id, started.attempt);
                let sent = self.send(started).await;
                if let Some(r) = self.running.get_mut(&key) {
                    r.started_sent = sent;
                }
            }
            JobEvent::Log(log) => {
                let key = (log.job_id, log.attempt);
                self.retained.entry(key).or_default().push(log.clone());
                self.send(log).await;
            }
            JobEvent::Finished(result) => {
                let key = (result.job_id, result.attempt);
                self.running.remove(&key);
                self.results.insert(key, result.clone());
                self.send(result).await;
            }
        }
    }

    async fn on_message(&mut self, msg: Msg) {
        if let Some(link) = self.link.as_mut() {
            link.last_heard = Instant::now();
        }
        match msg {
            Msg::Ping(ping) => {
                self.send(Pong { seq: ping.seq }).await;
            }
            Msg::Assign(assign) => self.on_assign(assign),
            Msg::Cancel(cancel) => {
                let key = (cancel.job_id, cancel.attempt);
                if let Some(running) = self.running.get(&key) {
                    tracing::info!(job = key.0, attempt = key.1, "cancel from the dispatcher");
                    running.cancel.cancel("cancelled by the dispatcher");
                } else if let Some(pos) = self
                    .queued
                    .iter()
                    .position(|a| (a.job_id, a.attempt) == key)
                {
                    self.queued.remove(pos);
                    let result = JobFinished {
                        job_id: key.0,
                        attempt: key.1,
                        status: surveil_proto::JobStatus::Cancelled as i32,
                        message: "cancelled by the dispatcher before it started".into(),
                        tasks: vec![],
                    };
                    self.deliver_without_running(result);
                } else {
                    // Finished already (its result is resent until acked)
                    // or unknown: nothing runs that could be stopped.
                    tracing::debug!(job = key.0, attempt = key.1, "cancel for no running job");
                }
            }
            Msg::ResultAck(ack) => {
                let key = (ack.job_id, ack.attempt);
                if self.results.remove(&key).is_none() {
                    tracing::debug!(job = key.0, attempt = key.1, "ack for a result not held");
                }
                self.retained.remove(&key);
                if ack.accepted {
                    tracing::info!(
                        job = key.0,
                        attempt = key.1,
                        "result recorded by the dispatcher"
                    );
                } else {
                    tracing::warn!(
                        job = key.0,
                        attempt = key.1,
                        reason = %ack.message,
                        "dispatcher refused the result (the attempt was revoked); dropped"
                    );
                }
                let outbox = self.ctx.outbox.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = outbox.remove(key.0, key.1) {
                        tracing::warn!(job = key.0, attempt = key.1, error = %e, "cannot delete the acknowledged result from the outbox");
                    }
                });
            }
            Msg::Error(error) => {
                self.disconnect(&format!(
                    "the dispatcher reported a protocol error: {}",
                    error.message
                ));
            }
            other => {
                let name = other.name();
                self.send(surveil_proto::Error {
                    message: format!("a runner does not accept {name}"),
                })
                .await;
                self.disconnect(&format!("unexpected {name} from the dispatcher"));
            }
        }
    }

    fn on_assign(&mut self, assign: Assign) {
        let key = (assign.job_id, assign.attempt);
        let span =
            tracing::info_span!("job", job = key.0, attempt = key.1, commit = %assign.commit);
        let _entered = span.enter();
        if self.running.contains_key(&key)
            || self.results.contains_key(&key)
            || self.queued.iter().any(|a| (a.job_id, a.attempt) == key)
        {
            tracing::info!("assignment of a job already held: not run again");
            return;
        }
        if !self.cfg.repos.contains(&assign.repo) {
            tracing::warn!(repo = %assign.repo, "refused: repository not in this runner's REPO list");
            let message = format!(
                "runner {} does not build repository {} (its REPO list: {})",
                self.cfg.name,
                assign.repo,
                self.cfg.repos.join(", ")
            );
            self.deliver_without_running(job::error_result(key.0, key.1, message));
            return;
        }
        if self.draining {
            tracing::info!(
                "assignment during drain: not started; the dispatcher requeues it when this runner disconnects"
            );
        }
        self.queued.push_back(assign);
    }

    /// A result for a job that never ran: through the outbox like any other.
    fn deliver_without_running(&self, result: JobFinished) {
        let ctx = self.ctx.clone();
        let log = JobLog::new(result.job_id, result.attempt, self.events_tx.clone());
        let span = tracing::info_span!("job", job = result.job_id, attempt = result.attempt);
        tokio::spawn(async move { job::deliver(&ctx.outbox, result, &log).await }.instrument(span));
    }

    fn start_queued(&mut self) {
        while !self.draining && self.running.len() < self.cfg.slots as usize {
            let Some(assign) = self.queued.pop_front() else {
                return;
            };
            let key = (assign.job_id, assign.attempt);
            let cancel = CancelSignal::new();
            self.running.insert(
                key,
                Running {
                    cancel: cancel.clone(),
                    started_sent: false,
                },
            );
            let span =
                tracing::info_span!("job", job = key.0, attempt = key.1, commit = %assign.commit);
            tracing::info!(parent: &span, repo = %assign.repo, "job starts");
            tokio::spawn(
                job::run(self.ctx.clone(), assign, cancel, self.events_tx.clone()).instrument(span),
            );
        }
    }

    fn cancel_all(&mut self, reason: &str) {
        for running in self.running.values() {
            running.cancel.cancel(reason);
        }
    }
}

/// The next message; `None` when the connection ended or broke. Cancel
/// safe (a frame half-read stays buffered in the connection).
async fn recv(link: &mut Option<Link>) -> Option<Msg> {
    let Some(link) = link else {
        return std::future::pending().await;
    };
    match link.conn.recv().await {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!(error = %e, "reading from the dispatcher failed");
            None
        }
    }
}

async fn dial(addr: String, tls: Option<ClientTls>, hello: Hello) -> Dialed {
    use anyhow::Context;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls::connect(&addr, tls.as_ref()))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    let mut conn = Connection::new(stream);
    let welcome = match conn.client_handshake(hello, HANDSHAKE_TIMEOUT).await {
        Ok(welcome) => welcome,
        Err(err) => {
            let hint = tls::handshake_hint(&err);
            return Err(anyhow::Error::new(err).context(match hint {
                Some(hint) => format!("handshake with {addr} failed ({hint})"),
                None => format!("handshake with {addr} failed"),
            }));
        }
    };
    Ok((conn, welcome))
}

/// Exponential from [`BACKOFF_START`], capped, with "equal jitter" (half
/// fixed, half random) so runners cut off together do not return together.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let ceiling = exp.min(cap).max(Duration::from_millis(1));
    let half = ceiling / 2;
    half + ceiling.mul_f64(rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let cap = Duration::from_secs(3);
        for failures in 1..40 {
            let d = backoff(failures, cap);
            let exp = BACKOFF_START
                .saturating_mul(1 << (failures - 1).min(16))
                .min(cap);
            assert!(
                d >= exp / 2 && d <= exp,
                "{failures}: {d:?} outside [{:?}, {exp:?}]",
                exp / 2
            );
        }
    }

    #[test]
    fn retained_log_keeps_the_newest_bytes() {
        let mut r = Retained::default();
        for i in 0..10u64 {
            r.push(Log {
                offset: i * 1024 * 1024,
                data: vec![0u8; 1024 * 1024].into(),
                ..Log::default()
            });
        }
        assert_eq!(r.bytes, LOG_RETAIN_BYTES);
        assert_eq!(r.dropped, 6 * 1024 * 1024);
        assert_eq!(r.chunks.front().map(|l| l.offset), Some(6 * 1024 * 1024));
    }
}
