//! Where the watched branch's tip comes from: a local repository read in
//! place, or a bare mirror under `STATE_DIR/mirrors/` that gix fetches a
//! URL into (`surveil_git::Mirror`, which owns the mirror's crash-safety
//! rule); plus a watch on a local repository's ref files so a commit or
//! push wakes the observer at once.
//!
//! Every git operation here is gix (blocking; callers run it in
//! `spawn_blocking`). Nothing here decides which commits to submit, talks
//! to the dispatcher or touches the cursor.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use notify::{EventKind, RecursiveMode, Watcher as _};
use surveil_git::{FetchSettings, Mirror, MirrorError, Wanted};

/// What can go wrong reading or fetching the watched repository.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The repository (or mirror) cannot be opened.
    #[error("cannot open repository {path}: {source}")]
    Open {
        /// Where it was looked for.
        path: PathBuf,
        /// gix's explanation.
        source: gix::Error,
    },
    /// The branch name does not make a valid reference name.
    #[error("`{0}` is not a valid branch name")]
    BadBranch(String),
    /// The branch reference exists but cannot be read or peeled.
    #[error("cannot resolve refs/heads/{branch}: {source}")]
    Resolve {
        /// The branch.
        branch: String,
        /// gix's explanation.
        source: gix::Error,
    },
    /// The mirror of a URL could not be created, opened or fetched into.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The ref-file watch could not be set up.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The path that could not be watched.
        path: PathBuf,
        /// notify's explanation.
        source: notify::Error,
    },
}

/// The repository the observer reads the branch from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A local repository, read in place.
    Local {
        /// Its canonical path.
        path: PathBuf,
    },
    /// A remote repository (the URL exactly as configured), fetched every
    /// interval into a bare mirror under the state directory.
    Remote {
        /// The URL and its mirror.
        mirror: Arc<Mirror>,
    },
}

impl Source {
    /// The source for `repo` (a canonical local path or a URL), keeping any
    /// mirror under `state_dir/mirrors/`.
    pub fn new(repo: &str, state_dir: &Path, fetch: &FetchSettings) -> Self {
        if surveil_common::is_remote_repo(repo) {
            let path = state_dir.join("mirrors").join(mirror_dir_name(repo));
            Source::Remote {
                mirror: Arc::new(Mirror::with_settings(repo, path, fetch.clone())),
            }
        } else {
            Source::Local {
                path: PathBuf::from(repo),
            }
        }
    }

    /// Opens the repository the branch is read from: the local repository
    /// itself, or the mirror (which must have been created by [`fetch`]).
    ///
    /// [`fetch`]: Source::fetch
    pub fn open(&self) -> Result<gix::Repository, WatchError> {
        match self {
            Source::Local { path } => gix::open(path).map_err(|source| WatchError::Open {
                path: path.clone(),
                source,
            }),
            Source::Remote { mirror } => Ok(mirror.open()?),
        }
    }

    /// A remote source whose mirror has not been created yet (the first
    /// fetch has not succeeded).
    pub fn fetch_pending(&self) -> bool {
        matches!(self, Source::Remote { mirror } if !mirror.exists())
    }

    /// Brings the mirror up to date with the remote's `branch` (creating
    /// the mirror on first use). A local source has nothing to fetch.
    ///
    /// `interrupt` stops a fetch in progress when set (at shutdown).
    pub fn fetch(&self, branch: &str, interrupt: &AtomicBool) -> Result<(), WatchError> {
        let Source::Remote { mirror } = self else {
            return Ok(());
        };
        mirror.fetch(Wanted::Branch(branch), interrupt)?;
        Ok(())
    }
}

/// The commit `refs/heads/<branch>` points to in `repo`, or `None` while
/// the branch does not exist.
pub fn resolve_tip(repo: &gix::Repository, branch: &str) -> Result<Option<ObjectId>, WatchError> {
    let name = format!("refs/heads/{branch}");
    let full: &gix::refs::FullNameRef = name
        .as_str()
        .try_into()
        .map_err(|_| WatchError::BadBranch(branch.to_owned()))?;
    let resolve_error = |source| WatchError::Resolve {
        branch: branch.to_owned(),
        source,
    };
    match repo.try_find_reference(full).map_err(resolve_error)? {
        None => Ok(None),
        Some(mut reference) => Ok(Some(
            reference.peel_to_id().map_err(resolve_error)?.detach(),
        )),
    }
}

/// A file-system-safe, reversible directory name for a URL: ASCII letters,
/// digits, `.` and `-` kept, every other byte written as `_` and two hex
/// digits. Very long URLs keep a prefix and a hash of the whole.
fn mirror_dir_name(url: &str) -> String {
    let mut name = String::with_capacity(url.len() + 8);
    for byte in url.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'-' {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("_{byte:02X}"));
        }
    }
    // Keep well under the usual 255-byte limit on a file name.
    const MAX: usize = 160;
    if name.len() > MAX {
        // FNV-1a: stable across Rust versions, unlike std's hasher.
        let hash = url.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        name.truncate(MAX);
        name.push_str(&format!("-{hash:016x}"));
    }
    name
}

/// A watch on a local repository's branch refs (`refs/heads/…`, loose refs
/// written by rename) and `packed-refs`; it wakes the observer on every
/// change. Dropping it stops the watch.
pub struct RefWatch {
    _watcher: notify::RecommendedWatcher,
}

impl RefWatch {
    /// Watches the refs of the repository whose common directory (where
    /// `refs/` and `packed-refs` live, shared by all worktrees) is
    /// `common_dir`, calling `notify_one` on `wake` for every change.
    pub fn start(common_dir: &Path, wake: Arc<tokio::sync::Notify>) -> Result<Self, WatchError> {
        let heads = common_dir.join("refs").join("heads");
        let packed = common_dir.join("packed-refs");
        let is_ref_path = {
            let heads = heads.clone();
            move |p: &Path| p.starts_with(&heads) || p == packed
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match event {
                    // Reads (ours included) must not wake us, or every check
                    // would trigger the next.
                    Ok(event) if matches!(event.kind, EventKind::Access(_)) => false,
                    Ok(event) => {
                        event.paths.is_empty() || event.paths.iter().any(|p| is_ref_path(p))
                    }
                    // A watch error (e.g. overflow) may have hidden a change.
                    Err(_) => true,
                };
                if relevant {
                    wake.notify_one();
                }
            })
            .map_err(|source| WatchError::Watch {
                path: common_dir.to_owned(),
                source,
            })?;
        // A repository whose refs are all packed may have no refs/heads
        // yet; refs/ always exists, and the path filter still applies.
        let refs = common_dir.join("refs");
        let loose = if heads.is_dir() { &heads } else { &refs };
        let targets = [
            // Recursive: branch names may contain `/`, and git replaces a
            // loose ref by renaming `<name>.lock` over it.
            (loose.as_path(), RecursiveMode::Recursive),
            // Non-recursive: only for `packed-refs` (also written by rename).
            (common_dir, RecursiveMode::NonRecursive),
        ];
        for (path, mode) in targets {
            watcher
                .watch(path, mode)
                .map_err(|source| WatchError::Watch {
                    path: path.to_owned(),
                    source,
                })?;
        }
        Ok(RefWatch { _watcher: watcher })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_repo::TestRepo;

    #[test]
    fn local_tip_is_read_in_place_and_missing_branch_is_none() {
        let repo = TestRepo::new();
        let a = repo.commit("a");
        let source = Source::new(
            repo.path().to_str().unwrap(),
            Path::new("/nonexistent"),
            &FetchSettings::default(),
        );
        assert!(matches!(source, Source::Local { .. }));
        let opened = source.open().unwrap();
        assert_eq!(resolve_tip(&opened, "main").unwrap(), Some(a));
        assert_eq!(resolve_tip(&opened, "other").unwrap(), None);
        repo.git(&["pack-refs", "--all"]);
        assert_eq!(
            resolve_tip(&source.open().unwrap(), "main").unwrap(),
            Some(a)
        );
    }

    #[test]
    fn url_is_fetched_into_a_mirror_and_follows_force_pushes() {
        let upstream = TestRepo::new();
        let a = upstream.commit("a");
        let state = tempfile::tempdir().unwrap();
        let url = format!("file://{}", upstream.path().display());
        let source = Source::new(&url, state.path(), &FetchSettings::default());
        let Source::Remote { mirror } = &source else {
            panic!("a file:// URL is remote: {source:?}");
        };
        assert!(mirror.path().starts_with(state.path().join("mirrors")));
        assert!(source.fetch_pending());
        let interrupt = AtomicBool::new(false);
        source.fetch("main", &interrupt).unwrap();
        assert_eq!(
            resolve_tip(&source.open().unwrap(), "main").unwrap(),
            Some(a)
        );

        let b = upstream.commit("b");
        source.fetch("main", &interrupt).unwrap();
        assert_eq!(
            resolve_tip(&source.open().unwrap(), "main").unwrap(),
            Some(b)
        );

        upstream.git(&["reset", "-q", "--hard", &a.to_string()]);
        let c = upstream.commit("c");
        source.fetch("main", &interrupt).unwrap();
        assert_eq!(
            resolve_tip(&source.open().unwrap(), "main").unwrap(),
            Some(c)
        );
    }

    #[test]
    fn mirror_names_are_distinct_and_safe() {
        let a = mirror_dir_name("https://example.com/a/b.git");
        let b = mirror_dir_name("https://example.com/a_b.git");
        assert_ne!(a, b);
        assert!(!a.contains('/'));
        let long = mirror_dir_name(&format!("https://example.com/{}", "x".repeat(400)));
        assert!(long.len() < 200);
    }
}
