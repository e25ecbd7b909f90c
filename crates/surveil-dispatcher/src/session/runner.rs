//! A runner's session: registers its link with the service, then turns
//! each frame into a report for the service and sends back the result
//! acknowledgements. When the connection ends, the service is told why:
//! a closed or broken connection revokes the runner's leases, a close for
//! the store's failure keeps them for its reconnect, a shutdown leaves them
//! to the next dispatcher.

use std::net::SocketAddr;

use surveil_proto::Error as ErrorMsg;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{End, Io, Outgoing, next_frame, outgoing};
use crate::domain::{RunnerHello, RunnerReport, SessionId, ToRunner};
use crate::service::{RunnerLink, Service, ServiceError};
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
    let end = loop {
        let msg = match next_frame(&mut io, closed.as_mut()).await {
            Ok(msg) => msg,
            Err(end) => break end,
        };
        let report = match wire::runner_report(msg) {
            Ok(report) => report,
            Err(err) => break io.refuse(err).await,
        };
        if let Err(end) = handle(service, session, report, &io).await {
            break end;
        }
    };
    match &end {
        End::PeerGone(why) => service.runner_closed(session, why).await,
        End::Closed(why) => service.runner_disconnected(session, why).await,
        End::StoreFailed(_) => service.runner_released(session),
        End::Shutdown => service.runner_left_at_shutdown(session),
    }
    end
}

async fn handle(
    service: &Service,
    session: SessionId,
    report: RunnerReport,
    io: &Io,
) -> Result<(), End> {
    let acked = match &report {
        RunnerReport::Finished { job, attempt, .. } => Some((*job, *attempt)),
        _ => None,
    };
    match service.runner_report(session, report).await {
        Ok(Some(ack)) => {
            let Some((job, attempt)) = acked else {
                return Ok(());
            };
            io.send(wire::result_ack(job, attempt, ack)).await
        }
        Ok(None) => Ok(()),
        Err(ServiceError::Invalid(text)) => Err(io.protocol_error(text).await),
        Err(ServiceError::Store(err)) => {
            // Nothing was acknowledged. Closing makes the runner reconnect
            // and resend; its leases wait for it.
            let _ = io
                .send(ErrorMsg {
                    message: format!(
                        "the dispatcher could not record your report ({err}); reconnect and resend it"
                    ),
                })
                .await;
            Err(End::StoreFailed(format!(
                "a report was not recorded: {err}"
            )))
        }
    }
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
