//! The Surveil observer: watches one branch of one repository and submits
//! its new commits to the dispatcher, oldest first, moving its cursor only
//! after the dispatcher has acknowledged them.
//!
//! # Code map
//!
//! - [`watch`]: where the tip comes from (local repository in place, or a
//!   gix-fetched mirror of a URL) and the ref-file watch; gix only.
//! - [`commits`]: which commits a branch move yields (tip, or every commit
//!   with a backlog cap; force pushes).
//! - [`cursor`]: the atomic `cursor.json`.
//! - [`submit`]: the connection to the dispatcher, `Submit` → `SubmitAck`.
//! - [`config`]: the command line, turned into a validated [`Config`].
//! - this file: the loop tying them together ([`Observer::run`]).
//!
//! **Invariant:** the cursor moves only after a `SubmitAck`, and what is
//! pending is always recomputed as `cursor..tip`, so a failed send can
//! delay a commit but never lose it. A resubmit after a crash between ack
//! and cursor write is answered by the dispatcher with the existing job ids.
//!
//! **Re-verification:** the cursor says what the dispatcher's store *had*;
//! a store restored from a backup may have lost it. So after every new
//! connection the observer submits the cursor's commit again, and while
//! `SubmitAck.created` says the store did not know it, walks back along
//! first parents resubmitting (with `--every-commit`, at most
//! `--max-backlog` commits; else the cursor's tip alone, as only tips are
//! built), until a commit the store knows. Then it records the `Welcome`'s
//! store epoch with the cursor. The walk runs on every connection (one
//! submit of a known commit when nothing was lost), so a restore whose
//! epoch step was forgotten is caught too; a changed epoch is logged.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod commits;
pub mod config;
pub mod cursor;
pub mod submit;
pub mod watch;
pub mod webhook;

#[cfg(test)]
mod test_repo;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use gix::ObjectId;
use surveil_common::Backoff;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::commits::{Mode, Selection};
use crate::cursor::{Cursor, CursorFile};
use crate::submit::{Identity, Link, SubmitError};
use crate::watch::{RefWatch, Source};

pub use crate::config::Config;

/// The most commits sent in one `Submit`; a longer backlog goes in several,
/// the cursor advancing after each ack. Keeps frames far below the limit.
const SUBMIT_CHUNK: usize = 1000;

/// An observer with its cursor loaded, ready to [`run`](Observer::run).
pub struct Observer {
    config: Config,
    source: Source,
    cursor_file: CursorFile,
    cursor: Option<ObjectId>,
    /// The store epoch the cursor was confirmed under (empty: unknown).
    cursor_epoch: String,
    /// The link's connection count when the cursor was last re-verified.
    verified: u64,
    /// Commits a re-verification resubmitted (the store did not know
    /// them) under the epoch being verified: if the connection drops
    /// mid-walk, the next walk goes on past them rather than taking them
    /// for commits the store always had.
    resubmitted: std::collections::HashSet<ObjectId>,
}

impl Observer {
    /// Creates the state directory if needed, loads the cursor and, for a
    /// local repository, checks that gix can open it.
    ///
    /// Blocking (small file reads); call it before serving, then report
    /// readiness.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        surveil_common::private::create_dir(&config.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                config.state_dir.display()
            )
        })?;
        let cursor_file = CursorFile::new(&config.state_dir);
        let loaded = cursor_file.load(&config.repo, &config.branch)?;
        let source = Source::new(&config.repo, &config.state_dir, &config.fetch);
        if let Source::Local { .. } = source {
            source.open()?;
        }
        let (cursor, cursor_epoch) = match loaded {
            Some(Cursor { commit, epoch }) => (Some(commit), epoch),
            None => (None, String::new()),
        };
        Ok(Observer {
            config,
            source,
            cursor_file,
            cursor,
            cursor_epoch,
            verified: 0,
            resubmitted: std::collections::HashSet::new(),
        })
    }

    /// The last acknowledged commit, as loaded or advanced since.
    pub fn cursor(&self) -> Option<ObjectId> {
        self.cursor
    }

    /// Watches and submits until `shutdown` is cancelled (then returns
    /// `Ok`), or until an error retrying cannot fix: the dispatcher refusing
    /// the token, version or role, or the cursor file becoming unwritable.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let span =
            tracing::info_span!("observer", repo = %self.config.repo, branch = %self.config.branch);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let wake = Arc::new(tokio::sync::Notify::new());
        // Started before the first look at the branch, so a commit landing
        // in between still wakes us.
        let _ref_watch = match &self.source {
            Source::Local { .. } => self.start_ref_watch(wake.clone()).await,
            Source::Remote { .. } => None,
        };
        let interrupt = Arc::new(AtomicBool::new(false));
        // Stops a fetch that is still running in a blocking thread when we
        // stop waiting for it; aborted with this function if it returns first.
        let _interrupt_on_shutdown = {
            let (interrupt, shutdown) = (interrupt.clone(), shutdown.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                shutdown.cancelled().await;
                interrupt.store(true, Ordering::Relaxed);
            }))
        };

        let mut link = Link::new(
            self.config.dispatch.clone(),
            Identity {
                name: self.config.name.clone(),
                repo: self.config.repo.clone(),
                token: self.config.token.clone(),
                tls: self.config.tls.clone(),
            },
        );
        // Dial at once: a wrong token or address shows up at start, not at
        // the first commit.
        let mut retry = Retry {
            backoff: Backoff::new(self.config.retry_min, self.config.retry_max),
            at: Some(Instant::now()),
        };
        let mut poll = tokio::time::interval(self.config.interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll.tick().await; // the first tick is immediate; we look right away anyway
        let mut fetch_due = true;
        let mut reported = Reported::default();

        loop {
            let detected = tokio::select! {
                _ = shutdown.cancelled() => break,
                detected = self.detect(fetch_due, interrupt.clone()) => detected,
            };
            fetch_due = false;
            let pending = reported.detected(detected, self.cursor, self.config.max_backlog);
            // While backing off, ref changes and polls only look; the retry
            // deadline is what sends again.
            if !pending.is_empty() && !retry.backing_off() {
                let delivered = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    delivered = self.deliver(&mut link, &pending) => delivered,
                };
                match delivered {
                    Ok(()) => {
                        retry.succeeded();
                        // The tip may have moved while we were sending.
                        continue;
                    }
                    Err(Delivery::Fatal(error)) => return Err(error),
                    Err(Delivery::Retry(error)) => {
                        retry.failed("submit failed; will retry", &error)
                    }
                }
            }

            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => Event::RefChanged,
                _ = poll.tick() => Event::Poll,
                _ = sleep_until(retry.at), if retry.at.is_some() => Event::Retry,
                error = link.closed(), if link.is_connected() => Event::Lost(error),
            };
            match event {
                Event::RefChanged => {}
                Event::Poll => fetch_due = true,
                Event::Retry => {
                    retry.at = None;
                    // Reconnect even with nothing pending, so the link is
                    // up (and a bad token reported) before the next commit.
                    let verified = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        verified = self.verify(&mut link) => verified,
                    };
                    match verified {
                        Ok(()) => retry.succeeded(),
                        Err(Delivery::Fatal(error)) => return Err(error),
                        Err(Delivery::Retry(error)) => {
                            retry.failed("dispatcher unreachable; will retry", &error);
                        }
                    }
                }
                Event::Lost(error) => {
                    retry.failed("lost the dispatcher connection; will reconnect", &error);
                }
            }
        }
        tracing::info!("observer stopped");
        Ok(())
    }

    async fn start_ref_watch(&self, wake: Arc<tokio::sync::Notify>) -> Option<RefWatch> {
        let source = self.source.clone();
        let started = tokio::task::spawn_blocking(move || {
            let repo = source.open()?;
            RefWatch::start(repo.common_dir(), wake)
        })
        .await;
        match started {
            Ok(Ok(watch)) => Some(watch),
            Ok(Err(error)) => {
                tracing::warn!(%error, "ref watch unavailable; relying on polling every --interval");
                None
            }
            Err(join) => {
                tracing::warn!(error = %join, "ref watch set-up panicked; relying on polling");
                None
            }
        }
    }

    /// Fetches (for a URL, when due), reads the tip and selects what is
    /// pending since the cursor.
    async fn detect(&self, fetch: bool, interrupt: Arc<AtomicBool>) -> Result<Selection, String> {
        let source = self.source.clone();
        let branch = self.config.branch.clone();
        let cursor = self.cursor;
        let mode = if self.config.every_commit {
            Mode::EveryCommit {
                max_backlog: self.config.max_backlog,
            }
        } else {
            Mode::TipOnly
        };
        tokio::task::spawn_blocking(move || {
            if fetch && let Err(error) = source.fetch(&branch, &interrupt) {
                // Keep going with what the mirror already has: commits
                // fetched earlier may still be waiting for delivery.
                tracing::warn!(%error, "fetch failed; will retry next interval");
            }
            let repo = match source.open() {
                Ok(repo) => repo,
                // A mirror that was never fetched is not a problem yet.
                Err(_) if source.fetch_pending() => return Ok(Selection::default()),
                Err(error) => return Err(error.to_string()),
            };
            match watch::resolve_tip(&repo, &branch).map_err(|e| e.to_string())? {
                None => Err(format!("branch {branch} does not exist (yet)")),
                Some(tip) => commits::select(&repo, cursor, tip, mode).map_err(|e| e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|join| Err(format!("reading the repository panicked: {join}")))
    }

    /// Submits `commits` in chunks, advancing the cursor after each ack;
    /// on a new connection, re-verifies the cursor first.
    async fn deliver(&mut self, link: &mut Link, commits: &[ObjectId]) -> Result<(), Delivery> {
        self.verify(link).await?;
        for chunk in commits.chunks(SUBMIT_CHUNK) {
            let hex: Vec<String> = chunk.iter().map(ObjectId::to_string).collect();
            let acked = link
                .submit(&self.config.branch, &hex)
                .await
                .map_err(Delivery::from)?;
            for (commit, job) in hex.iter().zip(&acked.job_ids) {
                tracing::info!(%commit, job, "submitted");
            }
            let last = *chunk.last().expect("chunks are never empty");
            self.store_cursor(last, link.epoch().to_owned()).await?;
        }
        Ok(())
    }

    /// Writes the cursor file, then the cursor in memory.
    async fn store_cursor(&mut self, commit: ObjectId, epoch: String) -> Result<(), Delivery> {
        let (file, repo, branch) = (
            self.cursor_file.clone(),
            self.config.repo.clone(),
            self.config.branch.clone(),
        );
        let cursor = Cursor {
            commit,
            epoch: epoch.clone(),
        };
        tokio::task::spawn_blocking(move || file.store(&repo, &branch, cursor))
            .await
            .map_err(|join| {
                Delivery::Fatal(anyhow::anyhow!("writing the cursor panicked: {join}"))
            })?
            .map_err(|error| Delivery::Fatal(error.into()))?;
        self.cursor = Some(commit);
        self.cursor_epoch = epoch;
        Ok(())
    }

    /// Connects if needed; on a connection not verified yet, checks that
    /// the dispatcher's store knows the cursor's commit, resubmitting what
    /// it lost (see the crate documentation), and records its epoch.
    async fn verify(&mut self, link: &mut Link) -> Result<(), Delivery> {
        link.connect().await.map_err(Delivery::from)?;
        if link.connections() == self.verified {
            return Ok(());
        }
        let epoch = link.epoch().to_owned();
        let Some(cursor) = self.cursor else {
            self.verified = link.connections();
            return Ok(());
        };
        if !self.cursor_epoch.is_empty() && !epoch.is_empty() && epoch != self.cursor_epoch {
            tracing::warn!(
                cursor_epoch = %self.cursor_epoch,
                epoch = %epoch,
                "the dispatcher's store epoch changed (restored from a backup, or replaced): re-verifying the cursor"
            );
        }
        let limit = if self.config.every_commit {
            self.config.max_backlog.max(1)
        } else {
            1
        };
        let chain = self.first_parents(cursor, limit).await;
        let mut lost = 0usize;
        for commit in chain {
            let hex = commit.to_string();
            let acked = link
                .submit(&self.config.branch, std::slice::from_ref(&hex))
                .await
                .map_err(Delivery::from)?;
            let created = acked.created.first().copied().unwrap_or(false);
            if !created && !self.resubmitted.contains(&commit) {
                break;
            }
            if created {
                tracing::info!(commit = %hex, job = acked.job_ids.first().copied().unwrap_or_default(),
                    "resubmitted: the dispatcher's store did not know this commit behind the cursor");
                self.resubmitted.insert(commit);
            }
            lost += 1;
        }
        if lost > 0 {
            tracing::warn!(
                resubmitted = lost,
                epoch = %epoch,
                "the dispatcher's store had lost commits already acknowledged (a restore from a backup?): they were submitted again"
            );
        }
        if epoch != self.cursor_epoch {
            self.store_cursor(cursor, epoch).await?;
        }
        self.resubmitted.clear();
        self.verified = link.connections();
        Ok(())
    }

    /// `from` and its first parents, newest first, at most `limit`; just
    /// `from` when the history cannot be read (it is still worth a probe).
    async fn first_parents(&self, from: ObjectId, limit: usize) -> Vec<ObjectId> {
        let source = self.source.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let repo = source.open().map_err(|e| e.to_string())?;
            commits::first_parents(&repo, from, limit).map_err(|e| e.to_string())
        })
        .await;
        match walked {
            Ok(Ok(chain)) if !chain.is_empty() => chain,
            Ok(Ok(_)) => vec![from],
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot walk back from the cursor; probing its commit only");
                vec![from]
            }
            Err(join) => {
                tracing::warn!(error = %join, "walking back from the cursor panicked; probing its commit only");
                vec![from]
            }
        }
    }
}

/// Watches and submits until `shutdown` is cancelled: [`Observer::open`]
/// then [`Observer::run`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    serve(config, shutdown, || {}).await
}

/// [`run`], calling `ready` once the cursor is loaded (the daemon's systemd
/// `READY=1`).
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let observer = tokio::task::spawn_blocking(move || Observer::open(config))
        .await
        .context("opening the observer panicked")??;
    ready();
    observer.run(shutdown).await
}

/// What ended a wait in the main loop.
enum Event {
    /// A ref file changed (local repositories).
    RefChanged,
    /// The polling interval elapsed.
    Poll,
    /// The backoff after a failure elapsed.
    Retry,
    /// The idle connection to the dispatcher was lost.
    Lost(SubmitError),
}

/// When to dial or submit again after a failure.
struct Retry {
    backoff: Backoff,
    /// The next attempt; `None` while nothing failed.
    at: Option<Instant>,
}

impl Retry {
    fn backing_off(&self) -> bool {
        self.at.is_some_and(|at| at > Instant::now())
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        self.at = None;
    }

    fn failed(&mut self, what: &str, error: &SubmitError) {
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %surveil_common::error_chain(error), retry_in = ?delay, "{what}");
        self.at = Some(Instant::now() + delay);
    }
}

/// Why a delivery stopped.
enum Delivery {
    /// Try again later: the dispatcher was unreachable or misbehaved.
    Retry(SubmitError),
    /// Stop the observer.
    Fatal(anyhow::Error),
}

impl From<SubmitError> for Delivery {
    fn from(error: SubmitError) -> Self {
        if error.is_fatal() {
            Delivery::Fatal(error.into())
        } else {
            Delivery::Retry(error)
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps repeated detections from repeating the same log line: a problem
/// or warning is logged when it first appears, not on every poll.
#[derive(Default)]
struct Reported {
    problem: Option<String>,
    warned_tip: Option<ObjectId>,
}

impl Reported {
    /// What a detection leaves to submit, logging what changed.
    fn detected(
        &mut self,
        detected: Result<Selection, String>,
        cursor: Option<ObjectId>,
        max_backlog: usize,
    ) -> Vec<ObjectId> {
        match detected {
            Err(problem) => {
                self.problem(problem);
                Vec::new()
            }
            Ok(selection) => {
                self.clear();
                self.selection(&selection, cursor, max_backlog);
                selection.commits
            }
        }
    }

    fn problem(&mut self, problem: String) {
        if self.problem.as_ref() != Some(&problem) {
            tracing::warn!(problem = %problem, "cannot read the branch; will retry");
            self.problem = Some(problem);
        }
    }

    fn clear(&mut self) {
        if self.problem.take().is_some() {
            tracing::info!("the branch is readable again");
        }
    }

    fn selection(&mut self, selection: &Selection, cursor: Option<ObjectId>, max_backlog: usize) {
        let tip = selection.commits.last().copied();
        if tip == self.warned_tip {
            return;
        }
        self.warned_tip = tip;
        if let Some(tip) = tip {
            tracing::info!(%tip, pending = selection.commits.len(), "branch moved; submitting");
        }
        if selection.rewound {
            tracing::warn!(
                old = %cursor.map(|c| c.to_string()).unwrap_or_default(),
                new = %tip.map(|c| c.to_string()).unwrap_or_default(),
                "force push or rewind: the last submitted commit is not an ancestor of the new tip; submitting the new tip only"
            );
        }
        if selection.skipped > 0 {
            tracing::warn!(
                skipped = selection.skipped,
                max_backlog,
                "{} new commits are over --max-backlog {max_backlog}: skipping the {} oldest",
                selection.skipped + selection.commits.len(),
                selection.skipped,
            );
        }
    }
}

/// The default bounds of the reconnect backoff.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(100);
/// See [`DEFAULT_RETRY_MIN`].
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
