//! High availability on a PostgreSQL store: a dispatcher is a standby
//! until it wins the leader term, then serves as the leader while it keeps
//! renewing the term, and stops serving before the term can expire when it
//! cannot renew.
//!
//! Step-down is crash-only: a leader that lost its term closes every
//! connection (runners keep their leases, as at shutdown), stops its
//! supervised tasks and exits with an error, so that its service manager
//! restarts it as a standby — start-up is the only recovery path. The
//! fence that matters is the database's (the writer's term check); this
//! file only makes the dispatcher stop trying before that fence bites.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Config;
use crate::domain::LeaderView;
use crate::session::standby::{self, Standby};
use crate::store::{JobStore, LeaderInfo, PostgresOptions, PostgresStore};

/// How much before the term's earliest possible expiry a leader that could
/// not renew stops serving: room for closing connections.
fn stop_margin(ttl: Duration) -> Duration {
    ttl / 6
}

/// Serves on `listener` with a PostgreSQL store: standby, then leader.
pub(crate) async fn serve(
    config: Config,
    options: PostgresOptions,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
    mut hooks: crate::Hooks,
) -> anyhow::Result<()> {
    let store = PostgresStore::open(&options)
        .await
        .context("opening the PostgreSQL job store")?;
    let local = listener
        .local_addr()
        .context("reading the listener's address")?;
    let addr = config
        .advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    let holder = format!("{addr}#{}", std::process::id());
    let ttl = options.leader_ttl;
    hooks.ready();
    let standby = Arc::new(Standby {
        config: config.clone(),
        auth: Arc::new(crate::authenticator(&config)?),
        leader: Arc::new(std::sync::Mutex::new(LeaderView {
            standby: true,
            ..LeaderView::default()
        })),
        started: Instant::now(),
        closed: CancellationToken::new(),
    });
    let web = async {
        if let Some(http) = &http {
            crate::web::standby::serve(http, standby_http(&standby), standby.closed.clone()).await;
        }
    };
    let campaign = async {
        let elected = stand_by(
            &standby,
            &store,
            &listener,
            (&holder, &addr),
            ttl,
            &shutdown,
        )
        .await;
        // Ends the standby's HTTP side too, whatever the outcome.
        standby.closed.cancel();
        elected
    };
    let ((), elected) = tokio::join!(web, campaign);
    let Some((term, since)) = elected? else {
        store.close().await.ok();
        tracing::info!("dispatcher stopped");
        return Ok(());
    };
    tracing::info!(term, %addr, "elected leader");
    let leading = shutdown.child_token();
    let keeper = tokio::spawn(keep_term(store.clone(), ttl, since, leading.clone()));
    let view = LeaderView {
        addr,
        term,
        standby: false,
    };
    let served = crate::serve_on(
        config,
        Arc::new(store.clone()) as Arc<dyn JobStore>,
        listener,
        http,
        leading,
        Some(view),
        hooks,
    )
    .await;
    keeper.abort();
    if shutdown.is_cancelled() {
        return served;
    }
    if let Err(err) = served {
        tracing::warn!(error = %format!("{err:#}"), "closing after losing the term");
    }
    anyhow::bail!(
        "lost the leader term {term}: stopped serving so that a standby takes over; \
         restart this dispatcher (systemd's Restart=always does) to serve as a standby"
    )
}

/// Answers connections as a standby and campaigns every third of the TTL
/// until elected (`Some((term, when the winning campaign started))`) or
/// shut down (`None`).
async fn stand_by(
    standby: &Arc<Standby>,
    store: &PostgresStore,
    listener: &TcpListener,
    (holder, addr): (&str, &str),
    ttl: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(u64, Instant)>> {
    let tracker = TaskTracker::new();
    // A token revoked while this dispatcher stands by is refused here too.
    tracker.spawn(crate::credentials::watch(
        Arc::clone(&standby.auth),
        standby.closed.clone(),
    ));
    let mut tick = tokio::time::interval(ttl / 3);
    let elected = loop {
        tokio::select! {
            () = shutdown.cancelled() => break None,
            accepted = listener.accept() => {
                if let Ok((stream, peer)) = accepted {
                    let span = tracing::info_span!("standby-conn", %peer);
                    tracker.spawn(standby::serve(Arc::clone(standby), stream, peer).instrument(span));
                }
            }
            _ = tick.tick() => {
                let since = Instant::now();
                match store.campaign(holder, addr).await {
                    Ok(Some(term)) => break Some((term, since)),
                    Ok(None) => {}
                    Err(err) => tracing::warn!(error = %err, "campaign for the leader term failed"),
                }
                match store.leader().await {
                    Ok(info) => record_leader(standby, &info),
                    Err(err) => tracing::warn!(error = %err, "reading the leader term failed"),
                }
            }
        }
    };
    // Answers as a standby would now be wrong: those connections close.
    standby.closed.cancel();
    tracker.close();
    Ok(elected)
}

/// The standby's HTTP side: the same token and TLS as the leader's, and
/// the leader view the campaign loop keeps current.
fn standby_http(standby: &Standby) -> crate::web::standby::StandbyParts {
    let config = &standby.config;
    crate::web::standby::StandbyParts {
        leader: Arc::clone(&standby.leader),
        credentials: Arc::clone(&standby.auth),
        tls: config.tls.clone(),
        anonymous_read: config.http.public_read
            || config.http.listen.is_some_and(|a| a.ip().is_loopback()),
    }
}

fn record_leader(standby: &Standby, info: &LeaderInfo) {
    if let Ok(mut view) = standby.leader.lock() {
        let addr = if info.live {
            info.addr.clone()
        } else {
            String::new()
        };
        if view.addr != addr && !addr.is_empty() {
            tracing::info!(leader = %addr, term = info.term, "following the leader");
        }
        *view = LeaderView {
            addr,
            term: info.term,
            standby: true,
        };
    }
}

/// Renews the term every third of the TTL. When no renewal has succeeded
/// for long enough that the term might expire, or a write found it gone,
/// cancels `leading`: the leader stops serving before a standby can take
/// over.
async fn keep_term(
    store: PostgresStore,
    ttl: Duration,
    since: Instant,
    leading: CancellationToken,
) {
    // The database computed the expiry after `since`: the term is ours at
    // least until then, by any clock running at the same rate.
    let mut valid_until = since + ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        let stop_at = valid_until
            .checked_sub(stop_margin(ttl))
            .unwrap_or(valid_until);
        tokio::select! {
            () = leading.cancelled() => return,
            () = store.deposed() => {
                tracing::error!("the database refused a write of this term: another dispatcher leads");
                break;
            }
            () = tokio::time::sleep_until(stop_at) => {
                tracing::error!(?ttl, "could not renew the leader term in time: stepping down");
                break;
            }
            _ = tick.tick() => {
                let sent = Instant::now();
                match tokio::time::timeout_at(stop_at, store.renew()).await {
                    Ok(Ok(true)) => valid_until = sent + ttl,
                    Ok(Ok(false)) => {
                        tracing::error!("the leader term was taken over: stepping down");
                        break;
                    }
                    Ok(Err(err)) => tracing::warn!(error = %err, "renewing the leader term failed"),
                    Err(_) => {}
                }
            }
        }
    }
    store.step_down();
    leading.cancel();
}
