//! The outbox: finished jobs' results, durable on disk until the
//! dispatcher acknowledges them, so no result is lost to a dropped
//! connection or a runner restart.
//!
//! One file per attempt, `WORK_DIR/outbox/<job>-<attempt>.pb`, holding the
//! protobuf-encoded `JobFinished`. A file is written atomically (temporary
//! file, fsync, rename, fsync of the directory) *before* the result is
//! sent, and deleted only after a `ResultAck`. This module does file I/O
//! only (blocking; callers use `spawn_blocking`) and never talks to the
//! network.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use surveil_proto::JobFinished;

/// The results waiting for a `ResultAck`.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// Uses `dir` (created if missing); temporary files of an interrupted
    /// write are removed, since their rename never happened.
    pub fn open(dir: &Path) -> io::Result<Self> {
        surveil_common::private::create_dir(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                fs::remove_file(&path)?;
            }
        }
        Ok(Outbox {
            dir: dir.to_owned(),
        })
    }

    /// The file holding the result of `job_id`, `attempt`.
    pub fn path(&self, job_id: u64, attempt: u32) -> PathBuf {
        self.dir.join(format!("{job_id}-{attempt}.pb"))
    }

    /// Writes `result` durably, replacing an earlier one of the same attempt.
    pub fn store(&self, result: &JobFinished) -> io::Result<()> {
        let path = self.path(result.job_id, result.attempt);
        let tmp = path.with_extension("tmp");
        {
            let mut file = surveil_common::private::create_file(&tmp)?;
            file.write_all(&result.encode_to_vec())?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        // The rename itself must survive a crash too.
        File::open(&self.dir)?.sync_all()
    }

    /// Deletes the result of `job_id`, `attempt`; absent is fine.
    pub fn remove(&self, job_id: u64, attempt: u32) -> io::Result<()> {
        match fs::remove_file(self.path(job_id, attempt)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every stored result, oldest job first. A file that does not decode
    /// (disk damage, a foreign file) is renamed to `*.corrupt` and skipped
    /// with a warning: it must not block the others.
    pub fn load_all(&self) -> io::Result<Vec<JobFinished>> {
        let mut results = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "pb") {
                continue;
            }
            let bytes = fs::read(&path)?;
            match JobFinished::decode(bytes.as_slice()) {
                Ok(result) if path == self.path(result.job_id, result.attempt) => {
                    results.push(result);
                }
                outcome => {
                    tracing::warn!(
                        file = %path.display(),
                        problem = ?outcome.err(),
                        "outbox file is not a result of the attempt its name says; set aside as .corrupt"
                    );
                    fs::rename(&path, path.with_extension("corrupt"))?;
                }
            }
        }
        results.sort_by_key(|r| (r.job_id, r.attempt));
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surveil_proto::JobStatus;

    fn result(job_id: u64, attempt: u32) -> JobFinished {
        JobFinished {
            job_id,
            attempt,
            status: JobStatus::Passed as i32,
            message: String::new(),
            tasks: vec![],
            infrastructure: false,
        }
    }

    #[test]
    fn stored_results_survive_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        outbox.store(&result(9, 1)).unwrap();
        outbox.store(&result(3, 2)).unwrap();
        std::fs::write(dir.path().join("4-1.tmp"), b"half").unwrap();

        let reopened = Outbox::open(dir.path()).unwrap();
        assert!(
            !dir.path().join("4-1.tmp").exists(),
            "unfinished writes are dropped"
        );
        assert_eq!(reopened.load_all().unwrap(), [result(3, 2), result(9, 1)]);
        reopened.remove(3, 2).unwrap();
        reopened.remove(3, 2).unwrap();
        assert_eq!(reopened.load_all().unwrap(), [result(9, 1)]);
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        outbox.store(&result(1, 1)).unwrap();
        std::fs::write(dir.path().join("2-1.pb"), b"\xff\xff\xff").unwrap();
        assert_eq!(outbox.load_all().unwrap(), [result(1, 1)]);
        assert!(dir.path().join("2-1.corrupt").exists());
    }
}
