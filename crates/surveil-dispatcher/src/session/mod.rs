//! One task per connection: the handshake (`handshake`), then the role's
//! loop — a runner's reports (`runner`), an observer's submits or a
//! client's queries (`client`) — with a bounded outgoing queue drained by
//! a writer task.
//!
//! Sessions are adapters: they turn frames into domain requests through
//! `wire` and call the [`Service`](crate::service::Service); they never
//! touch the scheduler or the store. An idle runner session costs
//! ~10 KiB (split buffers start small, queued frames are boxed, no
//! per-frame allocations in the loops): keep it so.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use surveil_common::tls;
use surveil_proto::{CodecError, ConnectionError, Envelope, FrameReader, FrameWriter, Msg, Role};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use crate::Daemon;
use crate::wire::FrameError;

mod client;
mod handshake;
mod runner;
pub(crate) mod standby;

/// Frames waiting to be written to one peer. A runner whose queue fills is
/// disconnected; a client simply waits (its requests are answered in turn).
const OUTGOING_QUEUE: usize = 256;
/// How long queued frames (an `Error` before a close) may take to write
/// once a connection is closing.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// A frame queued for a peer. Boxed so that a queue's first block (32
/// slots, allocated when the channel is made) stays small: with
/// `Envelope`s inline it was ~7 KiB for every idle runner.
type Outgoing = Box<Envelope>;
type Reader = FrameReader<tls::Stream>;
type Tx = mpsc::Sender<Outgoing>;

/// Wraps a message for an outgoing queue.
fn outgoing(msg: impl Into<Envelope>) -> Outgoing {
    Box::new(msg.into())
}

/// Why a session loop stopped.
enum End {
    /// The peer closed or broke the connection.
    PeerGone(String),
    /// We closed it (protocol error, slow peer, replaced, timed out).
    Closed(String),
    /// The dispatcher is shutting down.
    Shutdown,
}

/// Serves one accepted connection until it closes; `_place` holds its
/// place under `--max-connections` until then.
pub(crate) async fn serve(
    daemon: Arc<Daemon>,
    stream: TcpStream,
    peer: SocketAddr,
    _place: crate::limits::Open,
    shutdown: CancellationToken,
) {
    let Some(accepted) = handshake::accept(&daemon, stream, peer, &shutdown).await else {
        return;
    };
    let (reader, writer) = accepted.conn.split();
    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let close = shutdown.child_token();
    let writer_task = tokio::spawn(write_loop(writer, rx, close.clone()).in_current_span());
    // A revoked credential ends the session from `auth`, telling the peer.
    let _admitted = Admitted {
        daemon: &daemon,
        session: accepted.session,
    };
    daemon
        .auth
        .attach(accepted.session, revoker(tx.clone(), close.clone()));
    let identity = accepted.identity;
    let io = Io {
        reader,
        tx,
        close,
        shutdown,
        max_frame: daemon.config.max_frame,
        heartbeat: daemon.config.heartbeat_interval,
    };
    let end = match (accepted.role, accepted.runner) {
        (Role::Runner, Some(hello)) => {
            tracing::Span::current().record("runner", hello.name.as_str());
            let label = identity.label();
            runner::run(&daemon.service, accepted.session, hello, label, peer, io).await
        }
        (role @ (Role::Observer | Role::Client), _) => {
            client::run(&daemon.service, role, &identity, io).await
        }
        // The handshake has already rejected any other role or Hello.
        _ => End::Closed("no role".to_owned()),
    };
    match &end {
        End::PeerGone(why) => tracing::info!(reason = %why, "connection closed by the peer"),
        End::Closed(why) => {
            tracing::info!(reason = %why, "connection closed");
        }
        End::Shutdown => tracing::debug!("connection closed for shutdown"),
    }
    let _ = writer_task.await;
}

/// Closes a connection over a connection limit: on a plaintext port after
/// a `Reject` saying which (written without waiting for the `Hello`, and
/// given a moment at most), over TLS at once, since a TLS handshake is what
/// the limit saves.
pub(crate) async fn refuse(daemon: Arc<Daemon>, stream: TcpStream, why: String) {
    refuse_stream(&daemon.config, stream, why).await;
}

async fn refuse_stream(config: &crate::Config, stream: TcpStream, why: String) {
    if config.tls.is_some() {
        return;
    }
    let mut conn = surveil_proto::Connection::new(tls::Stream::Plain(stream));
    let _ = tokio::time::timeout(
        CLOSE_FLUSH_TIMEOUT,
        conn.reject(surveil_proto::RejectCode::TooManyConnections, why),
    )
    .await;
}

/// Keeps a session admitted to `auth` for as long as it runs.
struct Admitted<'a> {
    daemon: &'a Daemon,
    session: crate::domain::SessionId,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.daemon.auth.leave(self.session);
    }
}

/// How `auth` ends a session whose credential was revoked: an `Error`
/// saying so (best effort), then the close.
fn revoker(tx: Tx, close: CancellationToken) -> crate::auth::EndSession {
    Box::new(move |reason| {
        let _ = tx.try_send(outgoing(surveil_proto::Error {
            message: reason.to_owned(),
        }));
        close.cancel();
    })
}

/// A session's ends of its connection.
struct Io {
    reader: Reader,
    tx: Tx,
    /// Closes this connection (the writer stops after flushing briefly).
    close: CancellationToken,
    shutdown: CancellationToken,
    /// `--max-frame`: what a reply must fit.
    max_frame: usize,
    /// `--heartbeat-interval`: how often a session held up by the store
    /// still counts its runner as seen.
    heartbeat: std::time::Duration,
}

impl Io {
    /// Queues a frame, waiting for room.
    async fn send(&self, msg: impl Into<Envelope>) -> Result<(), End> {
        self.tx
            .send(outgoing(msg))
            .await
            .map_err(|_| End::PeerGone("writer gone".to_owned()))
    }

    /// Sends `Error` and reports the close.
    async fn protocol_error(&self, message: String) -> End {
        let _ = self
            .tx
            .send(outgoing(surveil_proto::Error {
                message: message.clone(),
            }))
            .await;
        End::Closed(message)
    }

    /// The session's end for a frame that cannot be taken.
    async fn refuse(&self, err: FrameError) -> End {
        match err {
            FrameError::Peer(why) => End::PeerGone(why),
            FrameError::Protocol(text) => self.protocol_error(text).await,
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        // The writer flushes what is queued (an Error) and stops.
        self.close.cancel();
    }
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
        if let Err(err) = write_batch(&mut writer, first, &mut rx).await {
            // A frame over --max-frame is our bug, not the peer's: say
            // which, or the close has no visible reason.
            match &err {
                CodecError::Io(_) => tracing::info!(error = %err, "writing to the peer failed"),
                _ => {
                    tracing::warn!(error = %err, "a frame for the peer could not be encoded; closing")
                }
            }
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
) -> Result<(), CodecError> {
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
    io: &mut Io,
    closed: Pin<&mut WaitForCancellationFuture<'_>>,
) -> Result<Msg, End> {
    let received = tokio::select! {
        r = io.reader.recv() => r,
        () = closed => {
            return Err(if io.shutdown.is_cancelled() {
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
        Err(err) => Err(io
            .protocol_error(format!("{err}; closing the connection"))
            .await),
    }
}
