//! The outbox: finished jobs' results, durable on disk until the
//! dispatcher acknowledges them, so no result is lost to a dropped
//! connection or a runner restart.
//!
//! One file per attempt, `WORK_DIR/outbox/<job>-<attempt>.pb`, holding the
//! protobuf-encoded `JobFinished` followed by the store epoch it was
//! assigned under, as field 1000 (a string) of the same message: a
//! protobuf decoder skips a field it does not know, so the file still reads
//! as the plain `JobFinished` it was before epochs (and an older runner
//! reads a newer file), and a file from before epochs reads with an empty
//! epoch. A file is written atomically (temporary
//! file, fsync, rename, fsync of the directory) *before* the result is
//! sent, and deleted only after a `ResultAck`. This module does file I/O
//! only (blocking; callers use `spawn_blocking`) and never talks to the
//! network.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use surveil_proto::JobFinished;

use crate::core::Stamped;

/// The epoch's field after the `JobFinished` fields, far from any number
/// the protocol may give `JobFinished` (the file is this runner's own).
#[derive(Clone, PartialEq, prost::Message)]
struct EpochStamp {
    #[prost(string, tag = "1000")]
    epoch: String,
}

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

    /// Writes `result`, stamped with the store `epoch` its lease was
    /// assigned under, durably, replacing an earlier one of the same attempt.
    pub fn store(&self, result: &JobFinished, epoch: &str) -> io::Result<()> {
        let path = self.path(result.job_id, result.attempt);
        let tmp = path.with_extension("tmp");
        {
            let mut file = surveil_common::private::create_file(&tmp)?;
            let mut bytes = result.encode_to_vec();
            EpochStamp {
                epoch: epoch.to_owned(),
            }
            .encode(&mut bytes)
            .map_err(io::Error::other)?;
            file.write_all(&bytes)?;
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
    pub fn load_all(&self) -> io::Result<Vec<Stamped>> {
        let mut results = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "pb") {
                continue;
            }
            let bytes = fs::read(&path)?;
            let decoded = JobFinished::decode(bytes.as_slice())
                .and_then(|result| Ok((result, EpochStamp::decode(bytes.as_slice())?.epoch)));
            match decoded {
                Ok((result, epoch)) if path == self.path(result.job_id, result.attempt) => {
                    results.push(Stamped { result, epoch });
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
        results.sort_by_key(|r| (r.result.job_id, r.result.attempt));
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
            commit: format!("{job_id:040x}"),
        }
    }

    fn stamped(job_id: u64, attempt: u32, epoch: &str) -> Stamped {
        Stamped {
            result: result(job_id, attempt),
            epoch: epoch.to_owned(),
        }
    }

    #[test]
    fn stored_results_survive_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        outbox.store(&result(9, 1), "e1").unwrap();
        outbox.store(&result(3, 2), "e2").unwrap();
        std::fs::write(dir.path().join("4-1.tmp"), b"half").unwrap();

        let reopened = Outbox::open(dir.path()).unwrap();
        assert!(
            !dir.path().join("4-1.tmp").exists(),
            "unfinished writes are dropped"
        );
        assert_eq!(
            reopened.load_all().unwrap(),
            [stamped(3, 2, "e2"), stamped(9, 1, "e1")]
        );
        reopened.remove(3, 2).unwrap();
        reopened.remove(3, 2).unwrap();
        assert_eq!(reopened.load_all().unwrap(), [stamped(9, 1, "e1")]);
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        outbox.store(&result(1, 1), "e").unwrap();
        std::fs::write(dir.path().join("2-1.pb"), b"\xff\xff\xff").unwrap();
        assert_eq!(outbox.load_all().unwrap(), [stamped(1, 1, "e")]);
        assert!(dir.path().join("2-1.corrupt").exists());
    }

    /// A file written before epochs (the bare `JobFinished`) reads with an
    /// empty epoch, and a stamped file still reads as the bare result, so
    /// an older runner keeps working on it.
    #[test]
    fn the_epoch_stamp_is_compatible_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("5-1.pb"), result(5, 1).encode_to_vec()).unwrap();
        outbox.store(&result(6, 1), "ab12").unwrap();
        assert_eq!(
            outbox.load_all().unwrap(),
            [stamped(5, 1, ""), stamped(6, 1, "ab12")]
        );
        let stamped_bytes = std::fs::read(dir.path().join("6-1.pb")).unwrap();
        assert_eq!(
            JobFinished::decode(stamped_bytes.as_slice()).unwrap(),
            result(6, 1)
        );
    }
}
