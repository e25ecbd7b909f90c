//! Bare mirrors of the repositories Surveil watches and builds: the one
//! place where the observer (a mirror of a watched URL) and the runner (a
//! mirror per repository it builds) create, open and fetch them, with gix.
//!
//! # The crash-safety rule
//!
//! **A mirror directory at its final path is always a complete bare
//! repository.** It is initialised under `<path>.partial` and renamed into
//! place, so a crash while creating it leaves either nothing or a stale
//! `.partial` (removed on the next try), never a half-made repository
//! that looks like a mirror. A final path that does not open as a
//! repository (damaged from outside, or left by an older Surveil that
//! created mirrors in place) is removed and made again the same way.
//! Fetching into a mirror that exists relies on git's own order, which gix
//! keeps: objects are written before the refs that point at them, and refs
//! are replaced through lock files, so a fetch cut short leaves the refs
//! it had and at most unreferenced objects; the next fetch does the work
//! again. After any crash a mirror is absent or opens with every ref
//! pointing at objects it has.
//!
//! In one process, one [`Mirror`] value fetches one at a time (two jobs of
//! the same repository must not create or fetch it at once); processes
//! must not share a mirror directory. Where mirrors live and how they are
//! named is the caller's layout. Everything here is blocking: async
//! callers use `spawn_blocking`. This crate runs no `git` process itself;
//! gix does, for local and `file://` remotes only, where `git upload-pack`
//! is the serving side of the fetch.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::remote::Direction;

/// What a fetch brings into the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// Every branch and tag, under the same names (the runner: any commit
    /// reachable from the repository's refs may be assigned).
    Everything,
    /// One branch, force-updated, and no tags (the observer: only the
    /// watched branch is ours to download; a force push must replace it).
    Branch(&'a str),
}

/// Refspecs of [`Wanted::Everything`].
const EVERYTHING: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// Why a mirror could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The mirror could not be created (or a damaged one replaced).
    #[error("cannot create the mirror {}: {reason}", path.display())]
    Create {
        /// The mirror's directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The mirror exists but does not open.
    #[error("cannot open the mirror {}: {source}", path.display())]
    Open {
        /// The mirror's directory.
        path: PathBuf,
        /// gix's explanation.
        source: gix::Error,
    },
    /// The remote could not be fetched from.
    #[error("fetching {url} failed: {reason}")]
    Fetch {
        /// The remote, as configured.
        url: String,
        /// gix's explanation, with its causes.
        reason: String,
    },
}

/// One remote repository and the bare mirror it is fetched into.
#[derive(Debug)]
pub struct Mirror {
    url: String,
    path: PathBuf,
    /// Held while creating or fetching.
    busy: Mutex<()>,
}

impl Mirror {
    /// The mirror of `url` (a URL or a local path gix can fetch) at `path`;
    /// nothing is created yet.
    pub fn new(url: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Mirror {
            url: url.into(),
            path: path.into(),
            busy: Mutex::new(()),
        }
    }

    /// The mirror's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the mirror has been created (by the crash-safety rule, a
    /// directory at the path is a complete repository).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Opens the mirror, which must exist.
    pub fn open(&self) -> Result<gix::Repository, MirrorError> {
        gix::open(&self.path).map_err(|source| MirrorError::Open {
            path: self.path.clone(),
            source,
        })
    }

    /// Fetches `wanted` into the mirror, creating it first if needed, and
    /// returns it opened. `interrupt` stops a fetch in progress when set.
    pub fn fetch(
        &self,
        wanted: Wanted<'_>,
        interrupt: &AtomicBool,
    ) -> Result<gix::Repository, MirrorError> {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let repo = self.open_or_create()?;
        self.fetch_into(&repo, wanted, interrupt)?;
        Ok(repo)
    }

    /// The mirror opened with `commit` in it: created if needed, and
    /// fetched ([`Wanted::Everything`]) only when the commit is missing.
    /// Also returns whether a fetch happened.
    pub fn with_commit(
        &self,
        commit: ObjectId,
        interrupt: &AtomicBool,
    ) -> Result<(gix::Repository, bool), MirrorError> {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let repo = self.open_or_create()?;
        if repo.has_object(commit) {
            return Ok((repo, false));
        }
        self.fetch_into(&repo, Wanted::Everything, interrupt)?;
        Ok((repo, true))
    }

    /// Applies the crash-safety rule: open what is there, else make it
    /// beside the final path and rename it into place.
    fn open_or_create(&self) -> Result<gix::Repository, MirrorError> {
        if let Ok(repo) = gix::open(&self.path) {
            return Ok(repo);
        }
        let failed = |what: &str, e: &dyn std::fmt::Display| MirrorError::Create {
            path: self.path.clone(),
            reason: format!("{what}: {e}"),
        };
        let parent = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| failed("creating its parent", &e))?;
        let partial = partial_path(&self.path);
        for stale in [&partial, &self.path] {
            if stale.exists() {
                std::fs::remove_dir_all(stale)
                    .map_err(|e| failed(&format!("removing {}", stale.display()), &e))?;
            }
        }
        gix::init_bare(&partial).map_err(|e| failed("initialising", &e))?;
        std::fs::rename(&partial, &self.path).map_err(|e| failed("moving it into place", &e))?;
        self.open()
    }

    fn fetch_into(
        &self,
        repo: &gix::Repository,
        wanted: Wanted<'_>,
        interrupt: &AtomicBool,
    ) -> Result<(), MirrorError> {
        let failed = |e: gix::Error| MirrorError::Fetch {
            url: self.url.clone(),
            reason: format!("{e:#}"),
        };
        let remote = repo.remote_at(self.url.as_str()).map_err(failed)?;
        let remote = match wanted {
            Wanted::Everything => remote.with_refspecs(EVERYTHING, Direction::Fetch),
            Wanted::Branch(branch) => {
                let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
                remote
                    .with_refspecs([refspec.as_str()], Direction::Fetch)
                    .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
            }
        }
        .map_err(failed)?;
        remote
            .connect(Direction::Fetch)
            .and_then(|c| c.prepare_fetch(gix::progress::Discard, Default::default()))
            .and_then(|p| p.receive(gix::progress::Discard, interrupt))
            .map_err(failed)?;
        Ok(())
    }
}

/// Where a mirror is made before it is renamed to `path`.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests;
