//! An in-test TCP relay on 127.0.0.1 that can make a *silent* network
//! partition: while partitioned it moves no bytes in either direction and
//! accepts new connections without connecting them through, yet closes
//! nothing (no FIN, no RST), exactly like a cable pulled between two hosts.
//! When healed, held bytes flow again in order, as TCP retransmission would
//! deliver them. It relays only connections made to its own listener.
//!
//! It can also *reset* the connections it relays, as a NAT that forgot its
//! table or a restarted proxy would: both ends get an RST at once, and new
//! connections go through as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// A running relay; dropping it closes every relayed connection.
pub struct Relay {
    // Dropping the runtime ends the accept loop and every pump, closing
    // their sockets.
    _rt: Runtime,
    addr: SocketAddr,
    partitioned: watch::Sender<bool>,
    resets: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and relays each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<Relay> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("relay")
            .enable_all()
            .build()
            .context("building the relay's runtime")?;
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the relay")?;
        let addr = listener.local_addr()?;
        let (partitioned, watch_rx) = watch::channel(false);
        let (resets, resets_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(relay_one(
                    client,
                    upstream,
                    watch_rx.clone(),
                    resets_rx.clone(),
                ));
            }
        });
        Ok(Relay {
            _rt: rt,
            addr,
            partitioned,
            resets,
            accepted,
        })
    }

    /// The address to give the client instead of the upstream's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts black-holing: nothing crosses, nothing is closed.
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Ends the partition: held bytes and connections go through.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }

    /// Aborts every connection relayed now with an RST to both ends;
    /// later connections are relayed as usual.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far (a reconnect shows up here).
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn healed(rx: &mut watch::Receiver<bool>) {
    // The sender lives as long as the runtime, so this only errs when the
    // relay is being dropped; then waiting forever is right.
    if rx.wait_for(|partitioned| !partitioned).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<bool>,
    mut resets: watch::Receiver<u64>,
) {
    resets.mark_unchanged();
    // A connection made during the partition is held, as a SYN would be
    // retransmitted until the path works again.
    healed(&mut rx).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = pump(&mut client_read, &mut server_write, rx.clone());
    let down = pump(&mut server_read, &mut client_write, rx);
    let reset = tokio::select! {
        _ = async { tokio::join!(up, down) } => false,
        changed = resets.changed() => changed.is_ok(),
    };
    if reset {
        // Closing with a zero linger sends an RST instead of a FIN.
        let _ = client_read.as_ref().set_zero_linger();
        let _ = server_read.as_ref().set_zero_linger();
    }
}

/// Copies `from` to `to` while healed. On end of stream or an error it
/// shuts `to` down, so a close on one side reaches the other.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        healed(&mut rx).await;
        let mut gate = rx.clone();
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            // Partitioned while waiting: stop reading, so the sender's bytes
            // wait in its socket buffer rather than being lost.
            _ = gate.wait_for(|partitioned| *partitioned) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just as the partition began are held until it heals.
        healed(&mut rx).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
