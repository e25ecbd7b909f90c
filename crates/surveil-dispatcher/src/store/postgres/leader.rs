//! The leader election of the PostgreSQL store: one row `(term, holder,
//! addr, expires_at)`, expiry by the database clock.
//!
//! A dispatcher takes the term over only once it has expired (a new term
//! number, so the old leader's writes no longer pass the writer's check),
//! renews its own before it expires, and resigns on a clean stop. This
//! file only reads and updates that row and the store's fence; deciding
//! when to campaign or step down is the dispatcher's (`crate::ha`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Ctx, PostgresStore};
use crate::store::StoreError;

/// Who holds the leader term, as the row says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The term number (0: nobody was ever elected).
    pub term: u64,
    /// The holder's unique name.
    pub holder: String,
    /// The address the holder serves on, for clients to follow.
    pub addr: String,
    /// Whether the term is still live by the database's clock.
    pub live: bool,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// Takes the leader term if it has expired (or is already ours):
    /// `Some(term)` when this store now leads, valid for the TTL from the
    /// moment this call was made. A takeover waits for the old leader's
    /// in-flight write transaction, if any, to end.
    pub async fn campaign(&self, holder: &str, addr: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn().await?;
        let ttl = millis(self.inner.ttl);
        let row = conn
            .query_opt(
                "UPDATE leader SET term = term + 1, holder = $1, addr = $2, \
                 expires_at = clock_timestamp() + $3 * interval '1 millisecond' \
                 WHERE id = 1 AND expires_at <= clock_timestamp() RETURNING term",
                &[&holder, &addr, &(ttl as f64)],
            )
            .await
            .ctx("campaigning for the leader term")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let term: i64 = row.get(0);
        let term = u64::try_from(term).unwrap_or(0);
        self.inner.fence.lost.store(false, Ordering::SeqCst);
        self.inner.fence.term.store(term, Ordering::SeqCst);
        Ok(Some(term))
    }

    /// Extends this store's term by the TTL from now (database clock).
    /// `Ok(false)`: the term is gone (expired, or taken over); the fence
    /// is cleared so no further write is even attempted.
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let Some(term) = self.inner.fence.term() else {
            return Ok(false);
        };
        let conn = self.conn().await?;
        let ttl = millis(self.inner.ttl);
        let renewed = conn
            .execute(
                "UPDATE leader SET expires_at = clock_timestamp() + $2 * interval '1 millisecond' \
                 WHERE id = 1 AND term = $1 AND expires_at > clock_timestamp()",
                &[&i64::try_from(term).unwrap_or(-1), &(ttl as f64)],
            )
            .await
            .ctx("renewing the leader term")?;
        if renewed == 0 {
            self.inner.fence.deposed();
        }
        Ok(renewed == 1)
    }

    /// Who leads now, as the database says.
    pub async fn leader(&self) -> Result<LeaderInfo, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT term, holder, addr, expires_at > clock_timestamp() FROM leader WHERE id = 1",
                &[],
            )
            .await
            .ctx("reading the leader term")?;
        Ok(LeaderInfo {
            term: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            holder: row.get(1),
            addr: row.get(2),
            live: row.get(3),
        })
    }

    /// The term this store holds, if any.
    pub fn term(&self) -> Option<u64> {
        self.inner.fence.term()
    }

    /// Gives the term up (it expires now), so a standby takes over without
    /// waiting for the TTL. Harmless without a term.
    pub async fn resign(&self) -> Result<(), StoreError> {
        let Some(term) = self.inner.fence.term() else {
            return Ok(());
        };
        self.inner.fence.term.store(0, Ordering::SeqCst);
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE leader SET expires_at = clock_timestamp() WHERE id = 1 AND term = $1",
            &[&i64::try_from(term).unwrap_or(-1)],
        )
        .await
        .ctx("resigning the leader term")?;
        Ok(())
    }

    /// Resolves once a write or a renewal found this store's term gone.
    pub async fn deposed(&self) {
        loop {
            let notified = self.inner.fence.lost_notify.notified();
            if self.inner.fence.lost.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Forgets the term locally without touching the database: what a
    /// leader does when it cannot renew in time (its writes would be
    /// refused anyway).
    pub fn step_down(&self) {
        self.inner.fence.deposed();
    }
}
