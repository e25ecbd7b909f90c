//! A runner's session: registers its link with the service, then turns
//! each frame into a report for the service and sends back the result
//! acknowledgements, or a `Resend` for a report the store failed to
//! record (the session goes on). Frames are read while a report is being
//! recorded, so a slow store never delays the runner's signs of life.
//! When the connection ends, the service is told why: one that closed or
//! broke under the runner keeps its leases for `--disconnect-grace`, one
//! the dispatcher ended revokes them, unless the runner was asked to
//! resend (one that does not know `Resend` closes on it: its leases wait
//! a runner timeout for its reconnect), and a shutdown leaves them to the
//! next dispatcher.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use surveil_proto::{Envelope, Error as ErrorMsg};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{End, Io, Outgoing, Tx, next_frame, outgoing};
use crate::domain::{RunnerHello, RunnerReport, SessionId, ToRunner};
use crate::service::{ReportReply, RunnerLink, Service};
use crate::wire;

/// The service's link to this connection: frames on its bounded queue.
struct Link {
    session: SessionId,
    /// The identity it authenticated as, for listings.
    identity: String,
    tx: mpsc::Sender<Outgoing>,
    close: CancellationToken,
}

impl RunnerLink for Link {
    fn send(&self, msg: ToRunner) -> bool {
        match self.tx.try_send(outgoing(wire::to_runner(msg))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    session = self.session.0,
                    "runner cannot keep up with its outgoing queue; disconnecting it"
                );
                self.close.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn close(&self, reason: &str) {
        // Best effort: the runner learns why before the connection closes.
        let _ = self.tx.try_send(outgoing(ErrorMsg {
            message: reason.to_owned(),
        }));
        self.close.cancel();
    }
}

pub(super) async fn run(
    service: &Service,
    session: SessionId,
    hello: RunnerHello,
    identity: String,
    peer: SocketAddr,
    mut io: Io,
) -> End {
    if let Some(previous) = service.runner_addr(&hello.name) {
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
    let link = Link {
        session,
        identity,
        tx: io.tx.clone(),
        close: io.close.clone(),
    };
    service
        .runner_connected(session, hello, Box::new(link))
        .await;

    let close = io.close.clone();
    let closed = close.cancelled();
    tokio::pin!(closed);
    let tx = io.tx.clone();
    let heartbeat = io.heartbeat;
    // Reports are handled one at a time, in order, while the connection
    // keeps being read: a store write that stalls holds up the reports
    // behind it, never the runner's pongs or its `last_seen`.
    let mut waiting: VecDeque<RunnerReport> = VecDeque::new();
    let mut handling: Option<Handling<'_>> = None;
    let mut resend_asked = false;
    let end = loop {
        if handling.is_none()
            && let Some(report) = waiting.pop_front()
        {
            handling = Some(Box::pin(handle(service, session, report, &tx)));
        }
        let room = waiting.len() < WAITING_REPORTS;
        tokio::select! {
            biased;
            done = async { handling.as_mut().expect("checked by the guard").await }, if handling.is_some() => {
                handling = None;
                match done {
                    Ok(asked) => resend_asked |= asked,
                    Err(end) => break end,
                }
            }
            msg = next_frame(&mut io, closed.as_mut()), if room => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(end) => break end,
                };
                service.runner_seen(session);
                match wire::runner_report(msg) {
                    Ok(RunnerReport::Alive) => {}
                    Ok(report) => waiting.push_back(report),
                    Err(err) => break io.refuse(err).await,
                }
            }
            // The runner outpaces the store: its frames wait in our queue
            // and its socket because of us, not because it went quiet.
            () = tokio::time::sleep(heartbeat), if !room => service.runner_seen(session),
        }
    };
    // What the runner sent before the end is still its word: a result in
    // flight must get the store's answer (the scheduler waits for it), and
    // the reports read after it are recorded as well.
    if let Some(in_flight) = handling.take() {
        resend_asked |= in_flight.await.unwrap_or(false);
    }
    for report in waiting {
        resend_asked |= handle(service, session, report, &tx).await.unwrap_or(false);
    }
    match &end {
        // A runner that does not know `Resend` closes on it: not its fault.
        End::PeerGone(_) | End::Closed(_) if resend_asked => service.runner_released(session),
        End::PeerGone(why) => service.runner_closed(session, why).await,
        End::Closed(why) => service.runner_disconnected(session, why).await,
        End::Shutdown => service.runner_left_at_shutdown(session),
    }
    end
}

/// Reports read but not yet handled, at most; past it the connection is
/// read no further until the store catches up.
const WAITING_REPORTS: usize = 256;

type Handling<'a> = Pin<Box<dyn Future<Output = Result<bool, End>> + Send + 'a>>;

/// Handles one report; `Ok(true)` when the runner was asked to resend.
async fn handle(
    service: &Service,
    session: SessionId,
    report: RunnerReport,
    tx: &Tx,
) -> Result<bool, End> {
    let acked = match &report {
        RunnerReport::Finished { job, attempt, .. } => Some((*job, *attempt)),
        _ => None,
    };
    let (frame, resend): (Envelope, bool) = match service.runner_report(session, report).await {
        ReportReply::Nothing => return Ok(false),
        ReportReply::Ack(ack) => {
            let Some((job, attempt)) = acked else {
                return Ok(false);
            };
            (wire::result_ack(job, attempt, ack).into(), false)
        }
        // Nothing was acknowledged; the connection stays up, the lease
        // stays live, and the runner sends it again.
        ReportReply::Resend(request) => (wire::to_runner(ToRunner::Resend(request)), true),
    };
    tx.send(outgoing(frame))
        .await
        .map(|()| resend)
        .map_err(|_| End::PeerGone("writer gone".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_runner_whose_queue_is_full_is_disconnected_not_buffered() {
        let (tx, mut rx) = mpsc::channel(2);
        let close = CancellationToken::new();
        let link = Link {
            session: SessionId(7),
            identity: "shared".to_owned(),
            tx,
            close: close.clone(),
        };
        assert!(link.send(ToRunner::Ping { seq: 1 }));
        assert!(link.send(ToRunner::Ping { seq: 2 }));
        assert!(!close.is_cancelled());
        assert!(
            !link.send(ToRunner::Ping { seq: 3 }),
            "the third frame does not fit"
        );
        assert!(close.is_cancelled(), "the slow peer is closed");
        // Nothing beyond the bound was kept.
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_some());
        assert!(rx.try_recv().is_err());
    }
}
