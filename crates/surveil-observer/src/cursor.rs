//! The cursor file, `STATE_DIR/cursor.json`: for each (repository, branch)
//! the last commit the dispatcher acknowledged, and the dispatcher's store
//! epoch it was confirmed under (absent in files from before epochs; a
//! reader from before them ignores it). Replaced atomically (temp
//! file, fsync, rename, fsync of the directory) so a crash leaves either the
//! old cursor or the new one, never a torn file.
//!
//! This module only reads and writes the file. When to write it (only
//! after a `SubmitAck`) is the caller's rule; it never talks to the
//! dispatcher or reads the repository.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gix::ObjectId;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The cursor file's name inside the state directory.
pub const FILE_NAME: &str = "cursor.json";

/// The file format version written and understood.
const FORMAT_VERSION: u32 = 1;

/// What can go wrong with the cursor file.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// The file exists but cannot be read.
    #[error("cannot read the cursor file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a cursor file this version understands.
    #[error(
        "the cursor file {path} is corrupt ({reason}); repair it, or delete it to start again from the branch's current tip"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing the new cursor failed; the old one is still in place.
    #[error("cannot write the cursor file {path}: {source}")]
    Write {
        /// The file (or its temporary sibling, or its directory).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    cursors: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    repo: String,
    branch: String,
    commit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    epoch: String,
}

/// One branch's cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The last commit the dispatcher acknowledged.
    pub commit: ObjectId,
    /// The dispatcher's store epoch when it was confirmed; empty when not
    /// known (a file from before epochs, a dispatcher without them).
    pub epoch: String,
}

type Cursors = BTreeMap<(String, String), Cursor>;

/// The cursor file of one state directory.
#[derive(Clone, Debug)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    /// The cursor file in `state_dir` (which must exist before a write).
    pub fn new(state_dir: &Path) -> Self {
        CursorFile {
            path: state_dir.join(FILE_NAME),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last acknowledged commit of `branch` in `repo`; `None` when the
    /// file or the entry does not exist yet.
    pub fn load(&self, repo: &str, branch: &str) -> Result<Option<Cursor>, CursorError> {
        Ok(self
            .read_all()?
            .remove(&(repo.to_owned(), branch.to_owned())))
    }

    /// Records `cursor` as the last acknowledged commit of `branch` in
    /// `repo`, keeping the entries of other repositories and branches.
    ///
    /// Blocking: it takes a lock, writes and fsyncs. Observers sharing a
    /// state directory serialise on `cursor.json.lock`, so neither loses
    /// the other's update.
    pub fn store(&self, repo: &str, branch: &str, cursor: Cursor) -> Result<(), CursorError> {
        let _lock = self.lock()?;
        let mut cursors = self.read_all()?;
        cursors.insert((repo.to_owned(), branch.to_owned()), cursor);
        self.write_all(&cursors)
    }

    fn lock(&self) -> Result<Flock<File>, CursorError> {
        let path = self.sibling("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(surveil_common::private::FILE_MODE)
            .open(&path)
            .map_err(|source| CursorError::Write {
                path: path.clone(),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| CursorError::Write {
            path,
            source: errno.into(),
        })
    }

    fn sibling(&self, extension: &str) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".");
        name.push(extension);
        PathBuf::from(name)
    }

    fn read_all(&self) -> Result<Cursors, CursorError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursors::new()),
            Err(source) => {
                return Err(CursorError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| CursorError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let file: FileFormat = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} is not {FORMAT_VERSION}",
                file.version
            )));
        }
        file.cursors
            .into_iter()
            .map(|entry| {
                let commit = ObjectId::from_hex(entry.commit.as_bytes()).map_err(|_| {
                    corrupt(format!(
                        "`{}` for {} branch {} is not a commit id",
                        entry.commit, entry.repo, entry.branch
                    ))
                })?;
                let cursor = Cursor {
                    commit,
                    epoch: entry.epoch,
                };
                Ok(((entry.repo, entry.branch), cursor))
            })
            .collect()
    }

    fn write_all(&self, cursors: &Cursors) -> Result<(), CursorError> {
        let file = FileFormat {
            version: FORMAT_VERSION,
            cursors: cursors
                .iter()
                .map(|((repo, branch), cursor)| Entry {
                    repo: repo.clone(),
                    branch: branch.clone(),
                    commit: cursor.commit.to_string(),
                    epoch: cursor.epoch.clone(),
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("cursor entries serialise");
        text.push(b'\n');

        let temp = self.sibling("tmp");
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| CursorError::Write { path, source }
        };
        let mut out = surveil_common::private::create_file(&temp).map_err(write_error(&temp))?;
        out.write_all(&text).map_err(write_error(&temp))?;
        out.sync_all().map_err(write_error(&temp))?;
        drop(out);
        std::fs::rename(&temp, &self.path).map_err(write_error(&self.path))?;
        // The rename is durable only once the directory entry is.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error(dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId::from_bytes_or_panic(&[n; 20])
    }

    fn at(n: u8) -> Cursor {
        Cursor {
            commit: id(n),
            epoch: String::new(),
        }
    }

    /// The epoch a cursor was confirmed under is kept; a file from before
    /// epochs reads with none, and one entry's epoch leaves the others'.
    #[test]
    fn the_epoch_is_kept_and_optional() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = CursorFile::new(dir.path());
        std::fs::write(
            cursor.path(),
            format!(
                r#"{{"version": 1, "cursors": [{{"repo": "/r", "branch": "main", "commit": "{}"}}]}}"#,
                id(1)
            ),
        )
        .unwrap();
        assert_eq!(cursor.load("/r", "main").unwrap(), Some(at(1)));
        let stamped = Cursor {
            commit: id(2),
            epoch: "ab".repeat(16),
        };
        cursor.store("/r", "dev", stamped.clone()).unwrap();
        assert_eq!(cursor.load("/r", "dev").unwrap(), Some(stamped));
        assert_eq!(cursor.load("/r", "main").unwrap(), Some(at(1)));
        let text = std::fs::read_to_string(cursor.path()).unwrap();
        assert_eq!(text.matches("\"epoch\"").count(), 1, "{text}");
    }

    #[test]
    fn round_trip_keeps_other_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = CursorFile::new(dir.path());
        assert_eq!(cursor.load("/r", "main").unwrap(), None);
        cursor.store("/r", "main", at(1)).unwrap();
        cursor.store("/r", "dev", at(2)).unwrap();
        cursor.store("https://x/y.git", "main", at(3)).unwrap();
        cursor.store("/r", "main", at(4)).unwrap();
        let fresh = CursorFile::new(dir.path());
        assert_eq!(fresh.load("/r", "main").unwrap(), Some(at(4)));
        assert_eq!(fresh.load("/r", "dev").unwrap(), Some(at(2)));
        assert_eq!(fresh.load("https://x/y.git", "main").unwrap(), Some(at(3)));
        assert_eq!(fresh.load("/other", "main").unwrap(), None);
        assert!(!cursor.sibling("tmp").exists(), "no temp file left behind");
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = CursorFile::new(dir.path());
        for text in [
            "{not json",
            r#"{"version": 1, "cursors": [{"repo": "/r", "branch": "main", "commit": "xyz"}]}"#,
            r#"{"version": 7, "cursors": []}"#,
        ] {
            std::fs::write(cursor.path(), text).unwrap();
            let err = cursor.load("/r", "main").unwrap_err();
            assert!(matches!(err, CursorError::Corrupt { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.contains(&cursor.path().display().to_string()),
                "{message}"
            );
            // A write must not silently replace a file it cannot read.
            assert!(cursor.store("/r", "main", at(1)).is_err());
        }
    }
}
