//! The accept loop: serves the router on its port, and takes the port away
//! (listener closed, open connections dropped, so connections are refused)
//! while the forge is told to be down. It knows nothing of forges.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Whether the forge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Availability {
    /// Listening.
    Up,
    /// Refusing connections until the instant, or until told otherwise.
    Down(Option<Instant>),
}

impl Availability {
    fn is_down(self, now: Instant) -> bool {
        match self {
            Availability::Up => false,
            Availability::Down(None) => true,
            Availability::Down(Some(until)) => now < until,
        }
    }
}

/// How often, and how long, re-binding the port is retried after a down
/// period (the port is ours, but the kernel may take a moment).
const REBIND_TRIES: u32 = 100;
const REBIND_PAUSE: Duration = Duration::from_millis(20);

/// Serves until `shutdown`; while `availability` says down, the port is
/// closed and every open connection is dropped.
pub(crate) async fn serve(
    mut listener: TcpListener,
    router: Router,
    mut availability: watch::Receiver<Availability>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    let mut connections = shutdown.child_token();
    loop {
        let now_available = *availability.borrow_and_update();
        if now_available.is_down(Instant::now()) {
            drop(listener);
            connections.cancel();
            if !wait_until_up(&mut availability, &shutdown).await {
                return Ok(());
            }
            listener = rebind(addr).await?;
            connections = shutdown.child_token();
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = availability.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    tokio::spawn(serve_connection(tcp, router.clone(), connections.clone()));
                }
            }
        }
    }
}

/// Waits for the end of a down period; `false` on shutdown.
async fn wait_until_up(
    availability: &mut watch::Receiver<Availability>,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        let current = *availability.borrow_and_update();
        let until = match current {
            Availability::Up => return true,
            Availability::Down(Some(until)) if Instant::now() >= until => return true,
            Availability::Down(until) => until,
        };
        let sleep = async {
            match until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = sleep => return true,
            changed = availability.changed() => {
                if changed.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..REBIND_TRIES {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(REBIND_PAUSE).await;
    }
    Err(last.unwrap_or_else(|| io::Error::other("rebind failed")))
}

async fn serve_connection(tcp: TcpStream, router: Router, stop: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
    tokio::select! {
        _ = connection => {}
        () = stop.cancelled() => {}
    }
}
