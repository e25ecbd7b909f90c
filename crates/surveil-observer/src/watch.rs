//! Where the watched branch's tip comes from: a local repository read in
//! place, or a bare mirror under `STATE_DIR/mirrors/` that gix fetches a
//! URL into; plus a watch on a local repository's ref files so a commit or
//! push wakes the observer at once.
//!
//! Every git operation here is gix (blocking; callers run it in
//! `spawn_blocking`). Nothing here decides which commits to submit, talks
//! to the dispatcher or touches the cursor.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::remote::Direction;
use notify::{EventKind, RecursiveMode, Watcher as _};

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
    /// Creating the mirror failed.
    #[error("cannot create the mirror {path}: {source}")]
    Mirror {
        /// The mirror's directory.
        path: PathBuf,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Fetching from the URL failed.
    #[error("fetching {url} failed: {source}")]
    Fetch {
        /// The remote.
        url: String,
        /// gix's explanation.
        source: gix::Error,
    },
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A local repository, read in place.
    Local {
        /// Its canonical path.
        path: PathBuf,
    },
    /// A remote repository, fetched into a bare mirror every interval.
    Remote {
        /// The URL, exactly as configured.
        url: String,
        /// The bare mirror under the state directory.
        mirror: PathBuf,
    },
}

impl Source {
    /// The source for `repo` (a canonical local path or a URL), keeping any
    /// mirror under `state_dir/mirrors/`.
    pub fn new(repo: &str, state_dir: &Path) -> Self {
        if surveil_common::is_remote_repo(repo) {
            Source::Remote {
                url: repo.to_owned(),
                mirror: state_dir.join("mirrors").join(mirror_dir_name(repo)),
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
        let path = match self {
            Source::Local { path } => path,
            Source::Remote { mirror, .. } => mirror,
        };
        gix::open(path).map_err(|source| WatchError::Open {
            path: path.clone(),
            source,
        })
    }

    /// Brings the mirror up to date with the remote's `branch` (creating
    /// the mirror on first use). A local source has nothing to fetch.
    ///
    /// `interrupt` stops a fetch in progress when set (at shutdown).
    pub fn fetch(&self, branch: &str, interrupt: &AtomicBool) -> Result<(), WatchError> {
        let Source::Remote { url, mirror } = self else {
            return Ok(());
        };
        let repo = open_or_create_mirror(mirror)?;
        // Only the watched branch: a force push must replace it (`+`), and
        // tags or other branches are not ours to download.
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        let fetch_error = |source| WatchError::Fetch {
            url: url.clone(),
            source,
        };
        let remote = repo
            .remote_at(url.as_str())
            .and_then(|r| r.with_refspecs([refspec.as_str()], Direction::Fetch))
            .map_err(fetch_error)?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        remote
            .connect(Direction::Fetch)
            .and_then(|c| c.prepare_fetch(gix::progress::Discard, Default::default()))
            .and_then(|p| p.receive(gix::progress::Discard, interrupt))
            .map_err(fetch_error)?;
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

fn open_or_create_mirror(mirror: &Path) -> Result<gix::Repository, WatchError> {
    if let Ok(repo) = gix::open(mirror) {
        return Ok(repo);
    }
    let mirror_error = |source: Box<dyn std::error::Error + Send + Sync>| WatchError::Mirror {
        path: mirror.to_owned(),
        source,
    };
    // Initialise beside the final place and rename, so a crash half-way
    // never leaves a directory that looks like a mirror but is not one.
    let parent = mirror.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| mirror_error(e.into()))?;
    let partial = mirror.with_extension("partial");
    for stale in [&partial, &mirror.to_path_buf()] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| mirror_error(e.into()))?;
        }
    }
    gix::init_bare(&partial).map_err(|e| mirror_error(e.into()))?;
    std::fs::rename(&partial, mirror).map_err(|e| mirror_error(e.into()))?;
    gix::open(mirror).map_err(|source| WatchError::Open {
        path: mirror.to_owned(),
        source,
    })
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
        let source = Source::new(repo.path().to_str().unwrap(), Path::new("/nonexistent"));
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
        let source = Source::new(&url, state.path());
        let Source::Remote { mirror, .. } = &source else {
            panic!("a file:// URL is remote: {source:?}");
        };
        assert!(mirror.starts_with(state.path().join("mirrors")));
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
