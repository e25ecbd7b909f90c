//! One connection, from handshake to close: checks the `Hello` and the
//! token, then runs the role's loop — a runner's reports, an observer's
//! submits, a client's queries — with a bounded outgoing queue drained by a
//! writer task.
//!
//! Decisions belong to the scheduler and data to the store: a session only
//! translates frames into calls on them and answers. It never holds the
//! scheduler lock across `.await`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use subtle::ConstantTimeEq;
use surveil_common::tls::{self, AcceptError};
use surveil_proto::{
    CancelJob, CancelJobReply, Codec, CodecError, Connection, ConnectionError, Envelope,
    Error as ErrorMsg, FrameReader, FrameWriter, GetJobReply, GetStatusReply, Hello, JobFinished,
    JobInfo, JobStatus, ListJobsReply, ListRunnersReply, Msg, ReadLog, ReadLogReply, RejectCode,
    ResultAck, Role, RunnerInfo, Stream, Submit, SubmitAck, Welcome,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use crate::scheduler::{CancelOutcome, JobSpec, ResultDecision, RunnerHello, SessionId};
use crate::state::{Outgoing, Peer, SharedRef, now, outgoing, unix_ms};
use crate::store::RecordOutcome;

/// Frames waiting to be written to one peer. A runner whose queue fills is
/// disconnected; a client simply waits (its requests are answered in turn).
pub(crate) const OUTGOING_QUEUE: usize = 256;
/// How long queued frames (an `Error` before a close) may take to write
/// once a connection is closing.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest log chunk sent in one `ReadLogReply`.
const LOG_CHUNK: u64 = 64 * 1024;
/// A `ReadLog` follower rechecks the job this often even without a
/// notification (e.g. a status change recorded by another dispatcher path).
const FOLLOW_RECHECK: Duration = Duration::from_secs(1);

type Reader = FrameReader<tls::Stream>;
type Tx = mpsc::Sender<Outgoing>;

/// Why a session loop stopped.
enum End {
    /// The peer closed or broke the connection.
    PeerGone(String),
    /// We closed it (protocol error, slow peer, replaced, timed out).
    Closed(String),
    /// The dispatcher is shutting down.
    Shutdown,
}

/// Serves one accepted connection until it closes.
pub(crate) async fn serve(
    shared: SharedRef,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    // One deadline covers the TLS handshake and the Hello.
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let stream = match &shared.config.tls {
        Some(server_tls) => {
            match tokio::time::timeout_at(deadline, tls::accept(stream, Some(server_tls))).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(
                    err @ (AcceptError::PlaintextOnTlsPort | AcceptError::TlsOnPlaintextPort),
                )) => {
                    tracing::warn!(error = %err, "handshake failed");
                    return;
                }
                Ok(Err(err)) => {
                    tracing::info!(error = %err, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(
                        timeout = ?shared.config.handshake_timeout,
                        "handshake failed: no TLS handshake within the handshake timeout"
                    );
                    return;
                }
            }
        }
        None => {
            let _ = stream.set_nodelay(true);
            // A silent or closing peer is left to `accept_hello`, which
            // answers it with the right `Reject`.
            if let Ok(Ok(Some(true))) =
                tokio::time::timeout_at(deadline, tls::starts_tls(&stream)).await
            {
                tracing::warn!(error = %AcceptError::TlsOnPlaintextPort, "handshake failed");
                return;
            }
            tls::Stream::Plain(stream)
        }
    };
    let mut conn = Connection::with_codec(stream, Codec::with_max_frame(shared.config.max_frame));
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let hello = match conn.accept_hello(remaining).await {
        Ok(hello) => hello,
        Err(err) => {
            tracing::info!(error = %err, "handshake failed");
            return;
        }
    };
    if let Some(expected) = &shared.config.token
        && !bool::from(expected.as_bytes().ct_eq(hello.token.as_bytes()))
    {
        tracing::warn!(name = %hello.name, "wrong token");
        conn.reject(
            RejectCode::BadToken,
            "the token does not match the dispatcher's; check --token-file or SURVEIL_TOKEN",
        )
        .await;
        return;
    }
    let role = hello.role();
    if role == Role::Runner {
        let problem = if hello.name.trim().is_empty() {
            Some("a runner's Hello needs a name (its unique --name)")
        } else if hello.slots == 0 {
            Some("a runner's Hello needs slots of at least 1")
        } else {
            None
        };
        if let Some(problem) = problem {
            conn.reject(RejectCode::BadRole, problem).await;
            return;
        }
    }
    if shutdown.is_cancelled() {
        conn.reject(
            RejectCode::ShuttingDown,
            "the dispatcher is shutting down; retry later",
        )
        .await;
        return;
    }
    let session = shared.next_session_id();
    let welcome = Welcome {
        session_id: format!("s-{session}"),
        heartbeat_interval_ms: millis_u32(shared.config.heartbeat_interval),
        runner_timeout_ms: millis_u32(shared.config.runner_timeout),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    if let Err(err) = conn.send(welcome).await {
        tracing::info!(error = %err, "peer left during the handshake");
        return;
    }
    let (reader, writer) = conn.split();
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let close = shutdown.child_token();
    let writer_task = tokio::spawn(write_loop(writer, rx, close.clone()).in_current_span());

    let end = match role {
        Role::Runner => {
            tracing::Span::current().record("runner", hello.name.as_str());
            run_runner(
                &shared, session, hello, peer, reader, &tx, &close, &shutdown,
            )
            .await
        }
        Role::Observer | Role::Client => {
            run_client(&shared, role, reader, &tx, &close, &shutdown).await
        }
        // accept_hello has already rejected any other role.
        Role::Unspecified => End::Closed("no role".to_owned()),
    };
    match &end {
        End::PeerGone(why) => tracing::info!(reason = %why, "connection closed by the peer"),
        End::Closed(why) => tracing::info!(reason = %why, "connection closed"),
        End::Shutdown => tracing::debug!("connection closed for shutdown"),
    }
    close.cancel();
    drop(tx);
    let _ = writer_task.await;
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Writes queued frames, batching what is ready into one flush. On close it
/// still writes what was queued (an `Error` explaining the close), briefly.
async fn write_loop(
    mut writer: FrameWriter<tls::Stream>,
    mut rx: mpsc::Receiver<Outgoing>,
    close: CancellationToken,
) {
    // Made once: a `cancelled()` future registers with the token's
    // notifier, and a fresh one per frame cost measurable CPU with
    // thousands of idle runners being pinged.
    let closed = close.cancelled();
    tokio::pin!(closed);
    loop {
        let first = tokio::select! {
            biased;
            msg = rx.recv() => msg,
            () = &mut closed => break,
        };
        let Some(first) = first else { return };
        if write_batch(&mut writer, first, &mut rx).await.is_err() {
            close.cancel();
            return;
        }
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
        while let Ok(msg) = rx.try_recv() {
            writer.feed(*msg).await?;
        }
        writer.flush().await
    })
    .await;
}

async fn write_batch(
    writer: &mut FrameWriter<tls::Stream>,
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
) -> Result<(), surveil_proto::CodecError> {
    writer.feed(*first).await?;
    for _ in 0..64 {
        match rx.try_recv() {
            Ok(msg) => writer.feed(*msg).await?,
            Err(_) => break,
        }
    }
    writer.flush().await
}

/// Waits for the next frame, or the close switch.
///
/// `closed` is the connection's `close.cancelled()`, made once per session
/// (see `write_loop`).
async fn next_frame(
    reader: &mut Reader,
    tx: &Tx,
    closed: Pin<&mut WaitForCancellationFuture<'_>>,
    shutdown: &CancellationToken,
) -> Result<Msg, End> {
    let received = tokio::select! {
        r = reader.recv() => r,
        () = closed => {
            return Err(if shutdown.is_cancelled() {
                End::Shutdown
            } else {
                End::Closed("closed by the dispatcher".to_owned())
            });
        }
    };
    match received {
        Ok(Some(msg)) => Ok(msg),
        Ok(None) => Err(End::PeerGone("connection closed".to_owned())),
        // A broken or cut stream: nobody is left to read an explanation.
        Err(err @ ConnectionError::Codec(CodecError::Io(_) | CodecError::Truncated { .. })) => {
            Err(End::PeerGone(err.to_string()))
        }
        // Garbage, an oversized frame, or a message from a newer protocol:
        // the peer is still there and should learn why it is cut off.
        Err(err) => Err(protocol_error(tx, format!("{err}; closing the connection")).await),
    }
}

/// A store read failed: the request cannot be answered. Logged, and the
/// peer told, then the connection closes.
async fn store_failed(tx: &Tx, err: crate::store::StoreError) -> End {
    tracing::error!(error = %err, "store read failed");
    protocol_error(
        tx,
        format!("the dispatcher could not read its store: {err}"),
    )
    .await
}

/// Sends `Error` and reports the close.
async fn protocol_error(tx: &Tx, message: String) -> End {
    let _ = tx
        .send(outgoing(ErrorMsg {
            message: message.clone(),
        }))
        .await;
    End::Closed(message)
}

#[allow(clippy::too_many_arguments)]
async fn run_runner(
    shared: &SharedRef,
    session: SessionId,
    hello: Hello,
    peer: SocketAddr,
    mut reader: Reader,
    tx: &Tx,
    close: &CancellationToken,
    shutdown: &CancellationToken,
) -> End {
    shared.register_runner(
        session,
        Peer {
            tx: tx.clone(),
            close: close.clone(),
        },
    );
    let previous = shared.with_sched(|s| s.runner_addr(&hello.name).map(str::to_owned));
    if let Some(previous) = previous {
        let same_host = previous
            .parse::<SocketAddr>()
            .is_ok_and(|addr| addr.ip() == peer.ip());
        if same_host {
            tracing::info!(old = %previous, "runner reconnected; replacing its previous session");
        } else {
            // Names must be unique: two machines sharing one would keep
            // taking each other's place.
            tracing::warn!(
                old = %previous,
                "a runner with this name connected from another address; it replaces the previous session"
            );
        }
    }
    let leases = hello.leases.iter().map(|l| (l.job_id, l.attempt)).collect();
    tracing::info!(session, slots = hello.slots, repos = ?hello.repos, "runner connected");
    shared.with_sched(|s| {
        s.handle_runner_connected(
            RunnerHello {
                session,
                name: hello.name.clone(),
                addr: peer.to_string(),
                slots: hello.slots,
                repos: hello.repos.clone(),
                labels: hello.labels.clone(),
                leases,
            },
            now(),
        );
    });
    shared.apply_effects().await;
    shared.wake.notify_one();

    let closed = close.cancelled();
    tokio::pin!(closed);
    let end = loop {
        let msg = match next_frame(&mut reader, tx, closed.as_mut(), shutdown).await {
            Ok(msg) => msg,
            Err(end) => break end,
        };
        // Any frame is a sign of life.
        shared.with_sched(|s| s.handle_frame(session, now()));
        let outcome = match msg {
            Msg::Pong(_) => Ok(()),
            Msg::Started(started) => {
                runner_started(shared, session, started.job_id, started.attempt).await;
                Ok(())
            }
            Msg::Log(log) => runner_log(shared, session, log).await,
            Msg::JobFinished(finished) => runner_result(shared, session, finished, tx).await,
            Msg::Error(err) => Err(End::PeerGone(format!(
                "runner reported an error: {}",
                err.message
            ))),
            Msg::Hello(_) => Err(protocol_error(
                tx,
                "a second Hello on one connection is not allowed".to_owned(),
            )
            .await),
            other @ (Msg::Welcome(_)
            | Msg::Reject(_)
            | Msg::Submit(_)
            | Msg::SubmitAck(_)
            | Msg::Assign(_)
            | Msg::Ping(_)
            | Msg::Cancel(_)
            | Msg::ResultAck(_)
            | Msg::ListJobs(_)
            | Msg::ListJobsReply(_)
            | Msg::GetJob(_)
            | Msg::GetJobReply(_)
            | Msg::ReadLog(_)
            | Msg::ReadLogReply(_)
            | Msg::ListRunners(_)
            | Msg::ListRunnersReply(_)
            | Msg::GetStatus(_)
            | Msg::GetStatusReply(_)
            | Msg::CancelJob(_)
            | Msg::CancelJobReply(_)) => Err(protocol_error(
                tx,
                format!(
                    "a runner may not send {}; runners send Pong, Started, Log and JobFinished",
                    other.name()
                ),
            )
            .await),
        };
        if let Err(end) = outcome {
            break end;
        }
    };
    shared.unregister_runner(session);
    if !matches!(end, End::Shutdown) {
        // A closed connection revokes the runner's leases at once. On
        // shutdown they are kept: the store still says running, and the
        // runner may reclaim them from the next dispatcher.
        let reason = match &end {
            End::PeerGone(why) | End::Closed(why) => why.clone(),
            End::Shutdown => String::new(),
        };
        shared.with_sched(|s| s.handle_runner_disconnected(session, &reason, now()));
        shared.apply_effects().await;
        shared.wake.notify_one();
    }
    end
}

async fn runner_started(shared: &SharedRef, session: SessionId, job: u64, attempt: u32) {
    let span = tracing::info_span!("job", job, attempt);
    let live = shared.with_sched(|s| s.handle_started(session, job, attempt, now()));
    if !live {
        span.in_scope(|| tracing::info!("Started of a revoked attempt ignored"));
        return;
    }
    if let Err(err) = shared
        .store
        .started(job, attempt, unix_ms())
        .instrument(span.clone())
        .await
    {
        span.in_scope(|| tracing::error!(error = %err, "cannot record that the job started"));
    }
}

async fn runner_log(
    shared: &SharedRef,
    session: SessionId,
    log: surveil_proto::Log,
) -> Result<(), End> {
    let (job, attempt) = (log.job_id, log.attempt);
    let live = shared.with_sched(|s| s.handle_log(session, job, attempt, now()));
    if !live {
        return Ok(());
    }
    let stream = Stream::try_from(log.stream).unwrap_or(Stream::Unspecified);
    if let Err(err) = shared
        .store
        .append_log(job, attempt, log.task, stream, log.offset, log.data)
        .await
    {
        tracing::error!(job, attempt, error = %err, "cannot store a log chunk");
        // The runner resends unacknowledged work after reconnecting.
        return Err(End::Closed(format!("log chunk not stored: {err}")));
    }
    shared.log_appended.notify_waiters();
    Ok(())
}

async fn runner_result(
    shared: &SharedRef,
    session: SessionId,
    finished: JobFinished,
    tx: &Tx,
) -> Result<(), End> {
    let (job, attempt) = (finished.job_id, finished.attempt);
    let span = tracing::info_span!("job", job, attempt);
    let Some(status) = JobStatus::try_from(finished.status)
        .ok()
        .filter(|s| s.is_final())
    else {
        return Err(protocol_error(
            tx,
            format!(
                "JobFinished for job {job} has status {} (a final status is needed: PASSED, FAILED, ERROR or CANCELLED)",
                finished.status
            ),
        )
        .await);
    };
    let decision = shared
        .with_sched(|s| s.handle_result(session, job, attempt, status, &finished.message, now()));
    let (accepted, message) = match decision {
        ResultDecision::Revoked { message } => (false, message),
        ResultDecision::Accept { status, message } => {
            let mut record = finished;
            record.status = status as i32;
            record.message = message;
            let outcome = record_result(shared, job, attempt, &record)
                .instrument(span.clone())
                .await?;
            shared.wake.notify_one();
            outcome
        }
        ResultDecision::Unknown => {
            record_result(shared, job, attempt, &finished)
                .instrument(span.clone())
                .await?
        }
    };
    if accepted {
        span.in_scope(|| tracing::info!("result recorded"));
    } else {
        shared.refused_results.fetch_add(1, Ordering::Relaxed);
        span.in_scope(|| tracing::warn!(%message, "stale result refused"));
    }
    let ack = ResultAck {
        job_id: job,
        attempt,
        accepted,
        message,
    };
    tx.send(outgoing(ack))
        .await
        .map_err(|_| End::PeerGone("writer gone".to_owned()))?;
    shared.log_appended.notify_waiters();
    Ok(())
}

/// Records a result the scheduler accepted, or asks the store about one it
/// does not know: a resend of a recorded result is acknowledged again.
async fn record_result(
    shared: &SharedRef,
    job: u64,
    attempt: u32,
    finished: &JobFinished,
) -> Result<(bool, String), End> {
    match shared
        .store
        .record_result(job, attempt, finished, unix_ms())
        .await
    {
        Ok(RecordOutcome::Recorded) => Ok((true, String::new())),
        Ok(RecordOutcome::Duplicate) => Ok((true, "already recorded".to_owned())),
        Ok(RecordOutcome::Stale) => Ok((
            false,
            format!("attempt {attempt} of job {job} is not the job's live attempt; result refused"),
        )),
        Err(err) => {
            tracing::error!(error = %err, "cannot record the result");
            // No ack: the runner resends after reconnecting.
            Err(End::Closed(format!("result not recorded: {err}")))
        }
    }
}

async fn run_client(
    shared: &SharedRef,
    role: Role,
    mut reader: Reader,
    tx: &Tx,
    close: &CancellationToken,
    shutdown: &CancellationToken,
) -> End {
    let closed = close.cancelled();
    tokio::pin!(closed);
    loop {
        let msg = match next_frame(&mut reader, tx, closed.as_mut(), shutdown).await {
            Ok(msg) => msg,
            Err(end) => return end,
        };
        let queries_allowed = role == Role::Client;
        let reply: Result<Option<Envelope>, End> = match msg {
            Msg::Pong(_) => Ok(None),
            Msg::Submit(submit) => client_submit(shared, submit, tx).await.map(Some),
            Msg::Error(err) => Err(End::PeerGone(format!(
                "peer reported an error: {}",
                err.message
            ))),
            Msg::Hello(_) => Err(protocol_error(
                tx,
                "a second Hello on one connection is not allowed".to_owned(),
            )
            .await),
            Msg::ListJobs(q) if queries_allowed => list_jobs(shared, q, tx).await.map(Some),
            Msg::GetJob(q) if queries_allowed => match shared.store.get_job(q.job_id).await {
                Ok(job) => Ok(Some(
                    GetJobReply {
                        job: job.map(|j| j.to_proto()),
                    }
                    .into(),
                )),
                Err(err) => Err(store_failed(tx, err).await),
            },
            Msg::ReadLog(q) if queries_allowed => {
                read_log(shared, q, tx, close).await.map(|()| None)
            }
            Msg::ListRunners(_) if queries_allowed => Ok(Some(list_runners(shared).into())),
            Msg::GetStatus(_) if queries_allowed => Ok(Some(status(shared).into())),
            Msg::CancelJob(q) if queries_allowed => cancel_job(shared, q, tx).await.map(Some),
            other @ (Msg::ListJobs(_)
            | Msg::GetJob(_)
            | Msg::ReadLog(_)
            | Msg::ListRunners(_)
            | Msg::GetStatus(_)
            | Msg::CancelJob(_)
            | Msg::Welcome(_)
            | Msg::Reject(_)
            | Msg::SubmitAck(_)
            | Msg::Assign(_)
            | Msg::Ping(_)
            | Msg::Cancel(_)
            | Msg::Started(_)
            | Msg::Log(_)
            | Msg::JobFinished(_)
            | Msg::ResultAck(_)
            | Msg::ListJobsReply(_)
            | Msg::GetJobReply(_)
            | Msg::ReadLogReply(_)
            | Msg::ListRunnersReply(_)
            | Msg::GetStatusReply(_)
            | Msg::CancelJobReply(_)) => {
                let allowed = if queries_allowed {
                    "clients send Submit, ListJobs, GetJob, ReadLog, ListRunners, GetStatus and CancelJob"
                } else {
                    "observers send Submit"
                };
                Err(protocol_error(
                    tx,
                    format!(
                        "a {} may not send {}; {allowed}",
                        role_name(role),
                        other.name()
                    ),
                )
                .await)
            }
        };
        match reply {
            Ok(Some(frame)) => {
                if tx.send(outgoing(frame)).await.is_err() {
                    return End::PeerGone("writer gone".to_owned());
                }
            }
            Ok(None) => {}
            Err(end) => return end,
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Runner => "runner",
        Role::Observer => "observer",
        Role::Client => "client",
        Role::Unspecified => "peer without a role",
    }
}

fn is_commit_id(commit: &str) -> bool {
    commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn client_submit(shared: &SharedRef, submit: Submit, tx: &Tx) -> Result<Envelope, End> {
    let Submit {
        repo,
        branch,
        commits,
    } = submit;
    if repo.trim().is_empty() {
        return Err(protocol_error(
            tx,
            "Submit.repo is empty; name the repository as runners list it".to_owned(),
        )
        .await);
    }
    if let Some(bad) = commits.iter().find(|c| !is_commit_id(c)) {
        return Err(protocol_error(
            tx,
            format!("Submit.commits holds `{bad}`, which is not a full 40-hex commit id"),
        )
        .await);
    }
    let commits: Vec<String> = commits
        .into_iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let ids = match shared
        .store
        .submit(&repo, &branch, &commits, unix_ms())
        .await
    {
        Ok(ids) => ids,
        Err(err) => {
            tracing::error!(error = %err, "cannot store submitted jobs");
            return Err(protocol_error(
                tx,
                format!("the dispatcher could not store the jobs: {err}"),
            )
            .await);
        }
    };
    // New jobs (and known ones still queued) join the scheduler; a known
    // job that is finished, or already tracked, is left as it is.
    for id in &ids {
        if shared.with_sched(|s| s.knows_job(*id)) {
            continue;
        }
        let record = match shared.store.get_job(*id).await {
            Ok(record) => record,
            Err(err) => return Err(store_failed(tx, err).await),
        };
        if let Some(record) = record
            && record.status == JobStatus::Queued
        {
            shared.with_sched(|s| {
                s.handle_job_submitted(
                    JobSpec {
                        id: record.id,
                        repo: record.repo,
                        branch: record.branch,
                        commit: record.commit,
                        attempt: record.attempt,
                    },
                    now(),
                );
            });
        }
    }
    tracing::info!(repo = %repo, branch = %branch, jobs = ?ids, "submitted");
    shared.wake.notify_one();
    Ok(SubmitAck { job_ids: ids }.into())
}

async fn list_jobs(
    shared: &SharedRef,
    q: surveil_proto::ListJobs,
    tx: &Tx,
) -> Result<Envelope, End> {
    let status = match JobStatus::try_from(q.status) {
        Ok(JobStatus::Unspecified) | Err(_) => None,
        Ok(s) => Some(s),
    };
    let jobs = match shared.store.list_jobs(q.repo, status, q.limit).await {
        Ok(jobs) => jobs,
        Err(err) => return Err(store_failed(tx, err).await),
    };
    Ok(ListJobsReply {
        jobs: jobs.iter().map(|j| j.to_proto()).collect(),
    }
    .into())
}

fn list_runners(shared: &SharedRef) -> ListRunnersReply {
    let (views, at) = shared.with_sched(|s| (s.runners(), now()));
    let wall = unix_ms();
    ListRunnersReply {
        runners: views
            .into_iter()
            .map(|r| RunnerInfo {
                name: r.name,
                addr: r.addr,
                slots: r.slots,
                running: r.running,
                last_seen_ms: wall.saturating_sub(
                    u64::try_from(at.saturating_duration_since(r.last_seen).as_millis())
                        .unwrap_or(u64::MAX),
                ),
                labels: r.labels,
                repos: r.repos,
            })
            .collect(),
    }
}

fn status(shared: &SharedRef) -> GetStatusReply {
    let (runners, (queued, running), reassignments) =
        shared.with_sched(|s| (s.runner_count(), s.counts(), s.reassignments()));
    GetStatusReply {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: shared.uptime().as_secs(),
        runners: u32::try_from(runners).unwrap_or(u32::MAX),
        queued: queued as u64,
        running: running as u64,
        supervisor_restarts: shared.restarts(),
        reassignments,
        refused_results: shared.refused_results.load(Ordering::Relaxed),
    }
}

async fn cancel_job(shared: &SharedRef, q: CancelJob, tx: &Tx) -> Result<Envelope, End> {
    let outcome = shared.with_sched(|s| s.handle_cancel(q.job_id, now()));
    // The reply reflects the durable state: apply the decision first.
    shared.apply_effects().await;
    let job: Option<JobInfo> = match shared.store.get_job(q.job_id).await {
        Ok(job) => job.map(|j| j.to_proto()),
        Err(err) => return Err(store_failed(tx, err).await),
    };
    let (ok, message) = match (outcome, &job) {
        (CancelOutcome::Cancelled, _) => (true, "cancelled".to_owned()),
        (CancelOutcome::Cancelling, _) => (
            true,
            "the runner was told to stop; the job ends cancelled when it reports".to_owned(),
        ),
        (CancelOutcome::NotActive, None) => (false, format!("no job {}", q.job_id)),
        (CancelOutcome::NotActive, Some(j)) => (
            false,
            format!("job {} already ended {}", q.job_id, j.status().label()),
        ),
    };
    Ok(CancelJobReply { ok, message, job }.into())
}

/// Answers `ReadLog`: the latest attempt's log from the offset, and with
/// `follow` new chunks as they are stored until the job is final.
async fn read_log(
    shared: &SharedRef,
    q: ReadLog,
    tx: &Tx,
    close: &CancellationToken,
) -> Result<(), End> {
    let send = |reply: ReadLogReply| async move {
        tx.send(outgoing(reply))
            .await
            .map_err(|_| End::PeerGone("writer gone".to_owned()))
    };
    let mut offset = q.offset;
    let mut attempt = None;
    loop {
        // Register for wake-ups before looking, so none is missed.
        let appended = shared.log_appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();

        let job = match shared.store.get_job(q.job_id).await {
            Ok(job) => job,
            Err(err) => return Err(store_failed(tx, err).await),
        };
        let Some(job) = job else {
            return send(ReadLogReply {
                job_id: q.job_id,
                end: true,
                not_found: true,
                ..ReadLogReply::default()
            })
            .await;
        };
        if attempt.is_some_and(|a| a != job.attempt) {
            offset = 0;
        }
        attempt = Some(job.attempt);
        // The status is read before the bytes: once it is final, no more
        // bytes can arrive, so this pass reads the last of them.
        let status = job.status;
        let len = match shared.store.log_len(q.job_id, job.attempt).await {
            Ok(len) => len,
            Err(err) => return Err(store_failed(tx, err).await),
        };
        while offset < len {
            let want = usize::try_from(LOG_CHUNK.min(len - offset)).unwrap_or(usize::MAX);
            let data = match shared
                .store
                .read_log(q.job_id, job.attempt, offset, want)
                .await
            {
                Ok(data) => data,
                Err(err) => return Err(store_failed(tx, err).await),
            };
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            send(ReadLogReply {
                job_id: q.job_id,
                attempt: job.attempt,
                offset,
                data,
                status: status as i32,
                ..ReadLogReply::default()
            })
            .await?;
            offset += n;
        }
        if !q.follow || status.is_final() {
            return send(ReadLogReply {
                job_id: q.job_id,
                attempt: job.attempt,
                offset,
                end: true,
                status: status as i32,
                ..ReadLogReply::default()
            })
            .await;
        }
        tokio::select! {
            () = &mut appended => {}
            () = tokio::time::sleep(FOLLOW_RECHECK) => {}
            () = close.cancelled() => return Err(End::Closed("closed while following a log".to_owned())),
            () = tx.closed() => return Err(End::PeerGone("peer left while following a log".to_owned())),
        }
    }
}
