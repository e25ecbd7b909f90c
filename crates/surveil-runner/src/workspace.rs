//! The runner's work directory: bare mirrors of the repositories it builds
//! and one fresh checkout per job attempt, all done with gix.
//!
//! Layout under `WORK_DIR`: `mirrors/<sha1 of the repo string>.git` (one
//! bare repository per REPO, fetched only when a commit is missing; made
//! and fetched by `surveil_git::Mirror`, which owns their crash-safety
//! rule), `jobs/<job>-<attempt>/` (the commit's tree, nothing else) and
//! `outbox/` (owned by [`crate::outbox`]). This module must not run `git`
//! processes itself. Everything here is blocking: callers run it in
//! `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use surveil_git::{FetchSettings, Mirror, MirrorError};

/// Why a checkout failed; the text becomes the job's `error` message.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The job named something that is not a full commit id.
    #[error("`{commit}` is not a full 40-hex commit id")]
    BadCommitId {
        /// What the job named.
        commit: String,
    },
    /// The repository could not be fetched from.
    #[error("repository {repo} is unreachable: {reason}")]
    Unreachable {
        /// The repository as the job names it.
        repo: String,
        /// What gix reported.
        reason: String,
    },
    /// The fetch worked but the commit is not among the repository's refs.
    #[error(
        "commit {commit} not found in repository {repo} (fetched every branch and tag; \
         was it force-pushed away or never pushed?)"
    )]
    CommitMissing {
        /// The repository.
        repo: String,
        /// The commit.
        commit: String,
    },
    /// The object exists but is not a commit.
    #[error("{commit} in repository {repo} is not a commit")]
    NotACommit {
        /// The repository.
        repo: String,
        /// The object id.
        commit: String,
    },
    /// The mirror or the checkout directory could not be prepared or
    /// written.
    #[error("checkout of {commit} from {repo} failed: {reason}")]
    Checkout {
        /// The repository.
        repo: String,
        /// The commit.
        commit: String,
        /// What went wrong.
        reason: String,
    },
    /// The commit's paths collide on this runner's file system (names that
    /// differ only in case, on a case-insensitive one).
    #[error("checkout of {commit} from {repo} failed: {reason}")]
    Collision {
        /// The repository.
        repo: String,
        /// The commit.
        commit: String,
        /// Which paths.
        reason: String,
    },
    /// The job was cancelled while its checkout ran.
    #[error("checkout of {commit} from {repo} was interrupted")]
    Interrupted {
        /// The repository.
        repo: String,
        /// The commit.
        commit: String,
    },
}

impl WorkspaceError {
    /// Whether the failure is the runner's or the network's fault rather
    /// than the job's, so that another runner (or this one later) may well
    /// succeed: the repository could not be fetched (unreachable, refused,
    /// a transport timeout, credentials this runner lacks), or the mirror
    /// or job directory could not be made or written (a full or read-only
    /// work dir, a damaged mirror).
    ///
    /// Never infrastructure: what the commit itself decides, which every
    /// runner would meet alike: a commit id that is not one, a commit the
    /// freshly fetched repository does not have (force-pushed away, never
    /// pushed: the fetch *worked*), an object that is not a commit, and
    /// paths that collide on the file system. Nor a cancel.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            WorkspaceError::Unreachable { .. } | WorkspaceError::Checkout { .. } => true,
            WorkspaceError::BadCommitId { .. }
            | WorkspaceError::CommitMissing { .. }
            | WorkspaceError::NotACommit { .. }
            | WorkspaceError::Collision { .. }
            | WorkspaceError::Interrupted { .. } => false,
        }
    }
}

/// The work directory's mirrors and job directories.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    /// One [`Mirror`] per repository, shared by its jobs: it lets one of
    /// them create or fetch the mirror at a time.
    mirrors: Mutex<HashMap<String, Arc<Mirror>>>,
    /// How every mirror reaches its remote.
    fetch: FetchSettings,
}

impl Workspace {
    /// Creates `root/{mirrors,jobs,outbox}` as needed, each 0700. Existing
    /// directories keep their mode: the sandbox opens the work dir and
    /// `jobs/` to a task user (0711), and a second opener must not undo it.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        for dir in [
            root.to_owned(),
            root.join("mirrors"),
            root.join("jobs"),
            root.join("outbox"),
        ] {
            if !dir.exists() {
                surveil_common::private::create_dir(&dir)?;
            }
        }
        Ok(Workspace {
            root: root.to_owned(),
            mirrors: Mutex::new(HashMap::new()),
            fetch: FetchSettings::default(),
        })
    }

    /// Fetches with `settings` (credentials, CA, timeouts) from now on.
    pub fn with_fetch(mut self, settings: FetchSettings) -> Self {
        self.fetch = settings;
        self
    }

    /// The work directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `WORK_DIR/outbox`.
    pub fn outbox_dir(&self) -> PathBuf {
        self.root.join("outbox")
    }

    /// `WORK_DIR/mirrors/<sha1 of repo>.git`: a hash, so any URL or path
    /// maps to one safe file name.
    pub fn mirror_path(&self, repo: &str) -> PathBuf {
        let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
        hasher.update(repo.as_bytes());
        let name = match hasher.try_finalize() {
            Ok(id) => id.to_hex().to_string(),
            // Only a SHA-1 collision attack pattern fails here; fall back to
            // a name that is still unique per repository string length.
            Err(_) => format!("repo-{}", repo.len()),
        };
        self.root.join("mirrors").join(format!("{name}.git"))
    }

    /// `WORK_DIR/jobs/<job>-<attempt>`.
    pub fn job_dir(&self, job_id: u64, attempt: u32) -> PathBuf {
        self.root.join("jobs").join(format!("{job_id}-{attempt}"))
    }

    /// The mirror of `repo`, the same value for every job of it.
    fn mirror(&self, repo: &str) -> Arc<Mirror> {
        let mut mirrors = self
            .mirrors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        mirrors
            .entry(repo.to_owned())
            .or_insert_with(|| {
                let path = self.mirror_path(repo);
                Arc::new(Mirror::with_settings(repo, path, self.fetch.clone()))
            })
            .clone()
    }

    /// Removes job directories left by an earlier run of the runner (it
    /// crashed or was killed mid-job); their jobs are not ours any more.
    pub fn clear_stale_jobs(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.root.join("jobs"))? {
            let path = entry?.path();
            std::fs::remove_dir_all(&path)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Checks out `commit` of `repo` into `dest` (which must not exist yet):
    /// opens (or creates) the repository's mirror, fetches only when the
    /// commit is not there, then writes the commit's tree. Blocking.
    pub fn checkout(
        &self,
        repo: &str,
        commit: &str,
        dest: &Path,
        interrupt: &AtomicBool,
    ) -> Result<CheckoutInfo, WorkspaceError> {
        self.checkout_at(repo, commit, "", dest, interrupt)
    }

    /// Like [`checkout`](Workspace::checkout), also fetching the job's
    /// ref `git_ref` when the commit is on no branch or tag (a pull
    /// request's head).
    pub fn checkout_at(
        &self,
        repo: &str,
        commit: &str,
        git_ref: &str,
        dest: &Path,
        interrupt: &AtomicBool,
    ) -> Result<CheckoutInfo, WorkspaceError> {
        let id = gix::ObjectId::from_hex(commit.as_bytes())
            .ok()
            .filter(|_| commit.len() == 40)
            .ok_or_else(|| WorkspaceError::BadCommitId {
                commit: commit.to_owned(),
            })?;
        let failed = |reason: String| WorkspaceError::Checkout {
            repo: repo.to_owned(),
            commit: commit.to_owned(),
            reason,
        };
        let (mirror, fetched) = self
            .mirror(repo)
            .with_commit_at(id, git_ref, interrupt)
            .map_err(|e| match e {
                // A fetch stopped by a cancel failed for no fault of anyone's.
                _ if interrupt.load(std::sync::atomic::Ordering::Relaxed) => {
                    WorkspaceError::Interrupted {
                        repo: repo.to_owned(),
                        commit: commit.to_owned(),
                    }
                }
                MirrorError::Fetch { reason, .. } => WorkspaceError::Unreachable {
                    repo: repo.to_owned(),
                    reason,
                },
                other => failed(other.to_string()),
            })?;
        // A job given up on during a slow fetch must not write a checkout
        // afterwards into a directory its runner has already cleaned up.
        if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(WorkspaceError::Interrupted {
                repo: repo.to_owned(),
                commit: commit.to_owned(),
            });
        }
        let object = mirror
            .find_object(id)
            .map_err(|_| WorkspaceError::CommitMissing {
                repo: repo.to_owned(),
                commit: commit.to_owned(),
            })?;
        let commit_obj = object
            .try_into_commit()
            .map_err(|_| WorkspaceError::NotACommit {
                repo: repo.to_owned(),
                commit: commit.to_owned(),
            })?;
        let tree = commit_obj
            .tree_id()
            .map_err(|e| failed(format!("reading the commit: {e}")))?;
        let mut index = mirror
            .index_from_tree(&tree)
            .map_err(|e| failed(format!("reading the tree: {e}")))?;
        let mut options = mirror
            .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
            .map_err(|e| failed(format!("checkout options: {e}")))?;
        options.destination_is_initially_empty = true;
        // 0700 whatever the umask: with a task user, `jobs/` lets everyone
        // through (0711) and job ids are guessable, so a checkout made
        // 0777 under umask 000 could be rewritten by any local user.
        surveil_common::private::create_new_dir(dest)
            .map_err(|e| failed(format!("creating {}: {e}", dest.display())))?;
        let objects = mirror
            .objects
            .clone()
            .into_arc()
            .map_err(|e| failed(format!("object database: {e}")))?;
        let outcome = gix::worktree::state::checkout(
            &mut index,
            dest,
            objects,
            &gix::progress::Discard,
            &gix::progress::Discard,
            interrupt,
            options,
        )
        .map_err(|e| failed(format!("writing files: {e}")))?;
        if let Some(first) = outcome.errors.first() {
            return Err(failed(format!(
                "{} file(s) could not be written, first {}: {}",
                outcome.errors.len(),
                first.path,
                first.error
            )));
        }
        if let Some(first) = outcome.collisions.first() {
            return Err(WorkspaceError::Collision {
                repo: repo.to_owned(),
                commit: commit.to_owned(),
                reason: format!(
                    "{} path(s) collide on this file system, first {}",
                    outcome.collisions.len(),
                    first.path
                ),
            });
        }
        Ok(CheckoutInfo {
            fetched,
            files: outcome.files_updated,
        })
    }
}

/// What a successful checkout did, for the job's SYSTEM log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckoutInfo {
    /// Whether the mirror had to be fetched.
    pub fetched: bool,
    /// Files written.
    pub files: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Test set-up only: builds a repository with the git CLI.
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A repository with three commits; returns their ids, oldest first.
    fn three_commits(dir: &Path) -> Vec<String> {
        git(dir, &["init", "-q"]);
        let mut ids = Vec::new();
        for i in 1..=3 {
            std::fs::write(dir.join("version.txt"), format!("v{i}\n")).unwrap();
            if i == 2 {
                std::fs::create_dir_all(dir.join("sub")).unwrap();
                std::fs::write(dir.join("sub/only-in-2.txt"), "two\n").unwrap();
            }
            if i == 3 {
                std::fs::remove_dir_all(dir.join("sub")).unwrap();
            }
            git(dir, &["add", "-A"]);
            git(dir, &["commit", "-q", "-m", &format!("commit {i}")]);
            ids.push(git(dir, &["rev-parse", "HEAD"]));
        }
        ids
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn checks_out_the_exact_tree_of_an_older_commit_not_the_tip() {
        let src = tempfile::tempdir().unwrap();
        let ids = three_commits(src.path());
        let work = tempfile::tempdir().unwrap();
        let ws = Workspace::open(work.path()).unwrap();
        let repo = src.path().to_str().unwrap();
        let no = AtomicBool::new(false);

        let dest = ws.job_dir(1, 1);
        let info = ws.checkout(repo, &ids[1], &dest, &no).unwrap();
        assert!(info.fetched, "first checkout fetches into the mirror");
        assert_eq!(files(&dest), ["sub/only-in-2.txt", "version.txt"]);
        assert_eq!(
            std::fs::read_to_string(dest.join("version.txt")).unwrap(),
            "v2\n"
        );
        assert!(ws.mirror_path(repo).join("HEAD").exists());

        let dest = ws.job_dir(2, 1);
        let info = ws.checkout(repo, &ids[2], &dest, &no).unwrap();
        assert!(!info.fetched, "the commit is in the mirror already");
        assert_eq!(files(&dest), ["version.txt"]);
        assert_eq!(
            std::fs::read_to_string(dest.join("version.txt")).unwrap(),
            "v3\n"
        );
    }

    #[test]
    fn file_url_fetches_new_commits_into_the_existing_mirror() {
        let src = tempfile::tempdir().unwrap();
        let ids = three_commits(src.path());
        let work = tempfile::tempdir().unwrap();
        let ws = Workspace::open(work.path()).unwrap();
        let url = format!("file://{}", src.path().display());
        let no = AtomicBool::new(false);
        ws.checkout(&url, &ids[0], &ws.job_dir(1, 1), &no).unwrap();

        std::fs::write(src.path().join("new.txt"), "4\n").unwrap();
        git(src.path(), &["add", "-A"]);
        git(src.path(), &["commit", "-q", "-m", "commit 4"]);
        let fourth = git(src.path(), &["rev-parse", "HEAD"]);
        let dest = ws.job_dir(2, 1);
        let info = ws.checkout(&url, &fourth, &dest, &no).unwrap();
        assert!(info.fetched);
        assert_eq!(files(&dest), ["new.txt", "version.txt"]);
    }

    #[test]
    fn missing_commit_and_unreachable_repo_say_which() {
        let src = tempfile::tempdir().unwrap();
        three_commits(src.path());
        let work = tempfile::tempdir().unwrap();
        let ws = Workspace::open(work.path()).unwrap();
        let repo = src.path().to_str().unwrap();
        let no = AtomicBool::new(false);
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = ws
            .checkout(repo, missing, &ws.job_dir(1, 1), &no)
            .unwrap_err();
        assert!(matches!(err, WorkspaceError::CommitMissing { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("commit {missing} not found in repository {repo}")),
            "{err}"
        );

        let gone = work.path().join("no-such-repo");
        let gone = gone.to_str().unwrap();
        let err = ws
            .checkout(gone, missing, &ws.job_dir(2, 1), &no)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("repository {gone} is unreachable: ")),
            "{err}"
        );

        let err = ws
            .checkout(repo, "main", &ws.job_dir(3, 1), &no)
            .unwrap_err();
        assert_eq!(err.to_string(), "`main` is not a full 40-hex commit id");
    }

    #[test]
    fn only_the_runners_and_the_networks_faults_are_infrastructure() {
        let src = tempfile::tempdir().unwrap();
        let ids = three_commits(src.path());
        let work = tempfile::tempdir().unwrap();
        let ws = Workspace::open(work.path()).unwrap();
        let repo = src.path().to_str().unwrap();
        let no = AtomicBool::new(false);

        // The job's own problems: another runner would meet them too.
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = ws
            .checkout(repo, missing, &ws.job_dir(1, 1), &no)
            .unwrap_err();
        assert!(
            !err.is_infrastructure(),
            "a commit the repository lacks: {err}"
        );
        let err = ws
            .checkout(repo, "HEAD", &ws.job_dir(2, 1), &no)
            .unwrap_err();
        assert!(!err.is_infrastructure(), "{err}");
        let tree = git(src.path(), &["rev-parse", "HEAD^{tree}"]);
        let err = ws
            .checkout(repo, &tree, &ws.job_dir(3, 1), &no)
            .unwrap_err();
        assert!(matches!(err, WorkspaceError::NotACommit { .. }), "{err}");
        assert!(!err.is_infrastructure(), "{err}");

        // A repository this runner cannot reach.
        let gone = work.path().join("no-such-repo");
        let err = ws
            .checkout(gone.to_str().unwrap(), &ids[0], &ws.job_dir(4, 1), &no)
            .unwrap_err();
        assert!(err.is_infrastructure(), "{err}");

        // A work dir the runner cannot write in (as a full disk would be):
        // `mirrors` is not a directory, so no mirror can be made.
        let broken = tempfile::tempdir().unwrap();
        let ws = Workspace::open(broken.path()).unwrap();
        std::fs::remove_dir(broken.path().join("mirrors")).unwrap();
        std::fs::write(broken.path().join("mirrors"), b"not a directory").unwrap();
        let err = ws
            .checkout(repo, &ids[0], &ws.job_dir(5, 1), &no)
            .unwrap_err();
        assert!(matches!(err, WorkspaceError::Checkout { .. }), "{err}");
        assert!(err.is_infrastructure(), "{err}");

        // Interrupted (cancelled) before the checkout is written: nothing
        // is written, and it is no one's fault.
        let ws = Workspace::open(work.path()).unwrap();
        let dest = ws.job_dir(6, 1);
        let err = ws
            .checkout(repo, &ids[0], &dest, &AtomicBool::new(true))
            .unwrap_err();
        assert!(matches!(err, WorkspaceError::Interrupted { .. }), "{err}");
        assert!(!err.is_infrastructure());
        assert!(!dest.exists(), "an interrupted checkout writes nothing");
    }

    #[test]
    fn stale_job_dirs_are_cleared() {
        let work = tempfile::tempdir().unwrap();
        let ws = Workspace::open(work.path()).unwrap();
        std::fs::create_dir_all(ws.job_dir(5, 2).join("x")).unwrap();
        assert_eq!(ws.clear_stale_jobs().unwrap(), 1);
        assert!(!ws.job_dir(5, 2).exists());
    }
}
