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
//! is the serving side of the fetch, and runs the system `ssh` for SSH
//! remotes. How a remote is reached (credentials, TLS roots, timeouts) is
//! [`transport`]'s.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::remote::Direction;

pub mod args;
pub mod transport;

pub use args::FetchArgs;
use transport::Scheme;
pub use transport::{Auth, Credential, FetchSettings, redact_url};

/// What a fetch brings into the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// Every branch and tag, under the same names (the runner: any commit
    /// reachable from the repository's refs may be assigned).
    Everything,
    /// One branch, force-updated, and no tags (the observer: only the
    /// watched branch is ours to download; a force push must replace it).
    Branch(&'a str),
    /// These full ref names or glob patterns (`refs/heads/release/*`,
    /// `refs/pull/*/head`), each force-updated under the same name, and no
    /// tags; refs that vanished from the remote are removed from the mirror
    /// (a deleted branch must stop being watched).
    Refs(&'a [String]),
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
        /// The remote, as configured, without any password in it.
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
    settings: FetchSettings,
    /// Held while creating or fetching.
    busy: Mutex<()>,
}

impl Mirror {
    /// The mirror of `url` (a URL or a local path gix can fetch) at `path`;
    /// nothing is created yet.
    pub fn new(url: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::with_settings(url, path, FetchSettings::default())
    }

    /// Like [`new`](Mirror::new), reaching the remote with `settings`.
    pub fn with_settings(
        url: impl Into<String>,
        path: impl Into<PathBuf>,
        settings: FetchSettings,
    ) -> Self {
        Mirror {
            url: url.into(),
            path: path.into(),
            settings,
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
        self.with_commit_at(commit, "", interrupt)
    }

    /// Like [`with_commit`](Mirror::with_commit), and when the commit is
    /// still missing after fetching every branch and tag, fetches the full
    /// ref `git_ref` too (unless empty, or a branch or tag, already
    /// fetched): a pull request's head (`refs/pull/7/head`) is on no
    /// branch.
    pub fn with_commit_at(
        &self,
        commit: ObjectId,
        git_ref: &str,
        interrupt: &AtomicBool,
    ) -> Result<(gix::Repository, bool), MirrorError> {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let repo = self.open_or_create()?;
        if repo.has_object(commit) {
            return Ok((repo, false));
        }
        self.fetch_into(&repo, Wanted::Everything, interrupt)?;
        let fetched_already = ["refs/heads/", "refs/tags/"]
            .iter()
            .any(|p| git_ref.starts_with(p));
        if !repo.has_object(commit) && git_ref.starts_with("refs/") && !fetched_already {
            // A pattern would widen the fetch beyond the one ref we need.
            if !git_ref.contains('*') {
                let wanted = [git_ref.to_owned()];
                self.fetch_into(&repo, Wanted::Refs(&wanted), interrupt)?;
            }
        }
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
        let failed = |reason: String| MirrorError::Fetch {
            url: redact_url(&self.url),
            reason,
        };
        let gix_failed = |e: gix::Error| failed(format!("{e:#}"));
        let scheme = Scheme::of(&self.url);
        let mut repo = repo.clone();
        if scheme == Scheme::Ssh {
            let mut config = repo.config_snapshot_mut();
            config
                .set_raw_value("core.sshCommand", self.settings.ssh_command().as_str())
                .map_err(|e| failed(format!("setting the ssh command: {e}")))?;
        }
        let remote = repo.remote_at(self.url.as_str()).map_err(gix_failed)?;
        let remote = with_refspecs(remote, wanted).map_err(gix_failed)?;
        let mut connection = remote.connect(Direction::Fetch).map_err(gix_failed)?;
        if scheme == Scheme::Http {
            let defaults = repo
                .transport_options(self.url.as_str(), None)
                .map_err(gix_failed)?
                .and_then(|o| o.downcast::<transport_http::Options>().ok())
                .map(|o| *o)
                .unwrap_or_default();
            let options = self.settings.http_options(defaults).map_err(failed)?;
            connection.set_transport_options(Box::new(options));
        }
        // Never a prompt or the system's credential helpers: a daemon's
        // credentials are its configuration's alone.
        let identity = self.settings.basic_identity();
        let mut asked = false;
        connection.set_credentials(move |action| {
            use gix::credentials::helper::Action;
            match (action, &identity) {
                (Action::Get(context), Some(identity)) if !asked => {
                    asked = true;
                    Ok(Some(gix::credentials::protocol::Outcome {
                        identity: identity.clone(),
                        next: context.into(),
                    }))
                }
                _ => Ok(None),
            }
        });
        let prepared = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(gix_failed)?;
        let outcome = prepared
            .receive(gix::progress::Discard, interrupt)
            .map_err(gix_failed)?;
        if let Wanted::Refs(patterns) = wanted {
            let kept = outcome
                .ref_map
                .mappings
                .iter()
                .filter_map(|m| m.local.as_ref().map(|l| l.to_string()))
                .collect();
            prune(&repo, patterns, &kept).map_err(failed)?;
        }
        Ok(())
    }
}

/// Removes the refs matching `patterns` that the remote no longer has
/// (gix fetches do not prune), so a deleted branch disappears from the
/// mirror and its watchers forget it.
fn prune(
    repo: &gix::Repository,
    patterns: &[String],
    kept: &std::collections::HashSet<String>,
) -> Result<(), String> {
    use gix::refs::transaction::{Change, PreviousValue, RefEdit, RefLog};
    let failed = |e: &dyn std::fmt::Display| format!("pruning refs: {e}");
    let references = repo.references().map_err(|e| failed(&e))?;
    let mut edits = Vec::new();
    for reference in references.all().map_err(|e| failed(&e))? {
        let reference = reference.map_err(|e| failed(&e))?;
        let name = reference.name().as_bstr().to_string();
        if kept.contains(&name) || !patterns.iter().any(|p| ref_matches(p, &name)) {
            continue;
        }
        edits.push(RefEdit {
            change: Change::Delete {
                expected: PreviousValue::Any,
                log: RefLog::AndReference,
            },
            name: reference.name().to_owned(),
            deref: false,
        });
    }
    if !edits.is_empty() {
        repo.edit_references(edits).map_err(|e| failed(&e))?;
    }
    Ok(())
}

/// Whether the full ref `name` matches `pattern` (a refspec side: exact,
/// or one `*` standing for one or more characters, as git's).
pub fn ref_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, suffix)) => {
            name.len() > prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
        }
    }
}

use gix::protocol::transport::client::blocking_io::http as transport_http;

/// `remote` fetching `wanted`.
fn with_refspecs<'repo>(
    remote: gix::Remote<'repo>,
    wanted: Wanted<'_>,
) -> Result<gix::Remote<'repo>, gix::Error> {
    let no_tags = |r: gix::Remote<'repo>| r.with_fetch_tags(gix::remote::fetch::Tags::None);
    match wanted {
        Wanted::Everything => remote.with_refspecs(EVERYTHING, Direction::Fetch),
        Wanted::Branch(branch) => {
            let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
            remote
                .with_refspecs([refspec.as_str()], Direction::Fetch)
                .map(no_tags)
        }
        Wanted::Refs(patterns) => {
            let refspecs: Vec<String> = patterns.iter().map(|p| format!("+{p}:{p}")).collect();
            remote
                .with_refspecs(refspecs.iter().map(String::as_str), Direction::Fetch)
                .map(no_tags)
        }
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
