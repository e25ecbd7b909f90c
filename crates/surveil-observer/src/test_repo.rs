//! Scratch repositories for unit tests. The `git` CLI is used here for
//! test set-up only; the code under test reads them with gix.

use std::path::{Path, PathBuf};
use std::process::Command;

use gix::ObjectId;

pub(crate) struct TestRepo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestRepo {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("repo");
        std::fs::create_dir(&path).expect("repo dir");
        let repo = TestRepo { _dir: dir, path };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn open(&self) -> gix::Repository {
        gix::open(&self.path).expect("open test repo")
    }

    pub(crate) fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.path)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    pub(crate) fn commit(&self, message: &str) -> ObjectId {
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.rev_parse("HEAD")
    }

    pub(crate) fn rev_parse(&self, rev: &str) -> ObjectId {
        ObjectId::from_hex(self.git(&["rev-parse", rev]).as_bytes()).expect("hex id")
    }
}
