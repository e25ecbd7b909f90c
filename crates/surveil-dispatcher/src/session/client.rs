//! An observer's or a client's session: each request, turned into a domain
//! request by `wire`, is answered in turn by the service, once the peer's
//! identity allows it (`auth`'s policy: scope `read` or `operate`). An
//! observer may only submit. `ReadLog` with `follow` streams replies until the job is
//! final, or the peer leaves.

use surveil_proto::{Envelope, GetJobReply, Msg, Role, SubmitAck};

use super::{End, Io, next_frame};
use crate::auth::Identity;
use crate::domain::{JobId, PruneRule};
use crate::service::{LogEvent, Service, ServiceError};
use crate::wire::{self, ClientRequest};

pub(super) async fn run(service: &Service, role: Role, identity: &Identity, mut io: Io) -> End {
    let close = io.close.clone();
    let closed = close.cancelled();
    tokio::pin!(closed);
    loop {
        let msg = match next_frame(&mut io, closed.as_mut()).await {
            Ok(msg) => msg,
            Err(end) => return end,
        };
        let request = match wire::client_request(role, msg) {
            Ok(request) => request,
            Err(err) => return io.refuse(err).await,
        };
        // The scope check, for every request, before the service sees it.
        if let Some(access) = request.access()
            && let Err(denied) = identity.allows(access)
        {
            tracing::warn!(identity = %identity.label(), reason = %denied, "request refused");
            return io.protocol_error(denied.0).await;
        }
        let reply = match answer(service, request, &mut io).await {
            Ok(reply) => reply,
            Err(end) => return end,
        };
        if let Some(frame) = reply
            && let Err(end) = io.send(frame).await
        {
            return end;
        }
    }
}

/// Answers one request: the reply frame, or `None` when the answer was
/// already streamed (a log).
async fn answer(
    service: &Service,
    request: ClientRequest,
    io: &mut Io,
) -> Result<Option<Envelope>, End> {
    let reply: Envelope = match request {
        ClientRequest::Ignore => return Ok(None),
        ClientRequest::Submit(submission) => match service.submit(&submission).await {
            Ok(rows) => SubmitAck {
                job_ids: rows.iter().map(|row| row.id.0).collect(),
                created: rows.iter().map(|row| row.created).collect(),
            }
            .into(),
            Err(err) => {
                tracing::error!(error = %err, "cannot store submitted jobs");
                return Err(io
                    .protocol_error(format!("the dispatcher could not store the jobs: {err}"))
                    .await);
            }
        },
        ClientRequest::ListJobs(filter) => {
            let asked = filter.limit;
            let (filter, page) = wire::list_page(filter);
            let jobs = read(service.list_jobs(&filter).await, io).await?;
            let waiting = service.waiting_of(&jobs);
            wire::list_reply(jobs, page, asked, io.max_frame, &waiting).into()
        }
        ClientRequest::GetJob(id) => {
            let job = read(service.get_job(id).await, io).await?;
            let attempts = match &job {
                Some(_) => read(service.attempts(id).await, io).await?,
                None => Vec::new(),
            };
            let waiting = service.waiting_of(job.as_slice());
            GetJobReply {
                job: job.map(|j| {
                    let why = waiting.get(&j.id);
                    wire::with_reason(wire::job_with_attempts(j, attempts), why)
                }),
            }
            .into()
        }
        ClientRequest::ReadLog {
            job,
            offset,
            follow,
            attempt,
        } => {
            let log = service.follow_attempt_log(job, attempt, offset, follow);
            read_log(log, job, io).await?;
            return Ok(None);
        }
        ClientRequest::ListRunners => wire::runners_reply(service.runners()).into(),
        ClientRequest::GetStatus => wire::status_reply(service.status()).into(),
        ClientRequest::Cancel(id) => {
            wire::cancel_reply(read(service.cancel(id).await, io).await?).into()
        }
        ClientRequest::Rerun(id) => {
            let reply = read(service.rerun(id).await, io).await?;
            let attempts = read(service.attempts(id).await, io).await?;
            wire::rerun_reply(reply, attempts).into()
        }
        ClientRequest::Prune {
            older_than_ms,
            keep_jobs,
        } => {
            let outcome = if older_than_ms.is_none() && keep_jobs.is_none() {
                service.prune_by_retention().await
            } else {
                let rule = PruneRule {
                    finished_before_ms: older_than_ms
                        .map(|age| crate::service::unix_ms().saturating_sub(age)),
                    keep_jobs,
                };
                service.prune_logs(rule).await
            };
            // A refused or failed prune is answered, not a reason to end
            // the session: nothing was half-done (each batch commits alone).
            wire::prune_reply(outcome.map_err(|err| {
                tracing::warn!(error = %err, "prune failed");
                err.to_string()
            }))
            .into()
        }
    };
    Ok(Some(reply))
}

/// A store read failed: the request cannot be answered. Logged, and the
/// peer told, then the connection closes.
async fn read<T>(result: Result<T, ServiceError>, io: &Io) -> Result<T, End> {
    match result {
        Ok(value) => Ok(value),
        Err(err) => {
            tracing::error!(error = %err, "store read failed");
            Err(io
                .protocol_error(format!("the dispatcher could not read its store: {err}"))
                .await)
        }
    }
}

/// Answers `ReadLog`: the attempt's log (the latest's by default) from
/// the offset, and with `follow` new pieces as they are stored until the
/// job is final.
async fn read_log(mut log: crate::service::LogFollow, job: JobId, io: &mut Io) -> Result<(), End> {
    enum Step {
        Log(Result<LogEvent, crate::store::StoreError>),
        Closed,
        Gone,
        // Boxed: a frame is rare here, and a Msg is large.
        Frame(Box<Result<Option<Msg>, surveil_proto::ConnectionError>>),
    }
    loop {
        let step = tokio::select! {
            event = log.next() => Step::Log(event),
            () = io.close.cancelled() => Step::Closed,
            () = io.tx.closed() => Step::Gone,
            // Reading too is what notices a client that went away (Ctrl-C)
            // while no log arrives: otherwise only the next write would.
            frame = io.reader.recv() => Step::Frame(Box::new(frame)),
        };
        let event = match step {
            Step::Log(event) => read(event.map_err(ServiceError::from), io).await?,
            Step::Closed => return Err(End::Closed("closed while following a log".to_owned())),
            Step::Gone => {
                return Err(End::PeerGone("peer left while following a log".to_owned()));
            }
            Step::Frame(frame) => match *frame {
                Ok(None) | Err(_) => {
                    return Err(End::PeerGone("peer left while following a log".to_owned()));
                }
                Ok(Some(Msg::Pong(_))) => continue,
                Ok(Some(other)) => {
                    return Err(io
                        .protocol_error(format!(
                            "{} sent while following a log; wait for its end",
                            other.name()
                        ))
                        .await);
                }
            },
        };
        let last = event.is_last();
        io.send(wire::read_log_reply(job, event)).await?;
        if last {
            return Ok(());
        }
    }
}
