//! The runner's task caches: `cache = { key, paths }` entries kept under
//! `<work dir>/cache/`, one directory per repository and key, restored
//! into a checkout before its tasks run and saved from it after they end.
//!
//! It owns that directory, which no task sees (the sandbox binds only the
//! checkout; the directory is the runner's, mode 0700): a task only ever
//! gets its restored copy. Entries are immutable once saved: a save
//! writes a temporary directory and renames it into place, so two jobs
//! saving the same key at once leave one whole entry. The total size is
//! capped, least recently used entries evicted first. It is used only
//! while no task of the job runs (see [`crate::files`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::pipeline::{CacheSpec, KeyPart};

/// The default `--cache-size`.
pub const DEFAULT_CACHE_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// The local cache store of one runner.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    cap: u64,
    // Restores and saves share it; eviction takes it alone, so it never
    // removes an entry being copied out.
    lock: RwLock<()>,
    counter: AtomicU64,
}

/// What a restore found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The entry was copied into the checkout.
    Hit { bytes: u64 },
    /// No entry for this key (yet).
    Miss,
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// A new entry.
    Saved { bytes: u64 },
    /// The key already has an entry (entries are never replaced).
    Exists,
    /// Larger than the whole cache: not kept.
    TooLarge { bytes: u64 },
}

impl Cache {
    /// Opens (creating) the store at `root`, at most `cap` bytes.
    pub fn open(root: &Path, cap: u64) -> io::Result<Self> {
        // The root is the boundary that keeps the entries (made with the
        // umask's modes) the runner's: 0700 even if it existed looser.
        surveil_common::private::create_dir(root)?;
        surveil_common::private::create_dir(&root.join("tmp"))?;
        // Left by a runner that stopped during a save or an eviction.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_dir_all(entry?.path());
        }
        Ok(Cache {
            root: root.to_owned(),
            cap,
            lock: RwLock::new(()),
            counter: AtomicU64::new(0),
        })
    }

    /// The size cap.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Repositories never share entries: the repository is part of the path.
    fn entry_dir(&self, repo: &str, key: &str) -> PathBuf {
        self.root
            .join(&hex(repo.as_bytes())[..32])
            .join(hex(key.as_bytes()))
    }

    /// Copies the entry of `key` (if any) into `checkout`.
    pub fn restore(
        &self,
        repo: &str,
        key: &str,
        checkout: &Path,
        paths: &[String],
    ) -> io::Result<Restored> {
        let _shared = self.lock.read().unwrap_or_else(|e| e.into_inner());
        let entry = self.entry_dir(repo, key);
        if !entry.join("size").exists() {
            return Ok(Restored::Miss);
        }
        let mut bytes = 0;
        for path in paths {
            let from = entry.join("data").join(path);
            if from.symlink_metadata().is_err() {
                continue;
            }
            let to = checkout.join(path);
            real_parents(checkout, path)?;
            bytes += crate::files::copy_tree(&from, &to)?;
        }
        // Its modification time is the entry's last use, for eviction.
        std::fs::write(entry.join("used"), b"")?;
        Ok(Restored::Hit { bytes })
    }

    /// Saves `paths` of `checkout` as the entry of `key`, unless it has one.
    pub fn save(
        &self,
        repo: &str,
        key: &str,
        checkout: &Path,
        paths: &[String],
    ) -> io::Result<Saved> {
        let entry = self.entry_dir(repo, key);
        if entry.exists() {
            return Ok(Saved::Exists);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("save-{}-{n}", std::process::id()));
        let result = self.fill(&tmp, key, checkout, paths).and_then(|bytes| {
            if bytes > self.cap {
                return Ok(Saved::TooLarge { bytes });
            }
            let _shared = self.lock.read().unwrap_or_else(|e| e.into_inner());
            std::fs::create_dir_all(entry.parent().unwrap_or(&self.root))?;
            match std::fs::rename(&tmp, &entry) {
                Ok(()) => Ok(Saved::Saved { bytes }),
                // Another job saved the same key first; its entry stands.
                Err(_) if entry.exists() => Ok(Saved::Exists),
                Err(e) => Err(e),
            }
        });
        let _ = std::fs::remove_dir_all(&tmp);
        if matches!(result, Ok(Saved::Saved { .. })) {
            self.evict()?;
        }
        result
    }

    fn fill(&self, tmp: &Path, key: &str, checkout: &Path, paths: &[String]) -> io::Result<u64> {
        let data = tmp.join("data");
        std::fs::create_dir_all(&data)?;
        let mut bytes = 0;
        for path in paths {
            let from = checkout.join(path);
            if from.symlink_metadata().is_err() || real_parents(checkout, path).is_err() {
                continue;
            }
            let to = data.join(path);
            std::fs::create_dir_all(to.parent().unwrap_or(&data))?;
            bytes += crate::files::copy_tree(&from, &to)?;
        }
        std::fs::write(tmp.join("key"), key)?;
        std::fs::write(tmp.join("used"), b"")?;
        std::fs::write(tmp.join("size"), bytes.to_string())?;
        Ok(bytes)
    }

    /// Removes least recently used entries until the total fits the cap.
    fn evict(&self) -> io::Result<()> {
        let _alone = self.lock.write().unwrap_or_else(|e| e.into_inner());
        let mut entries = Vec::new();
        for repo in std::fs::read_dir(&self.root)? {
            let repo = repo?;
            if repo.file_name() == "tmp" || !repo.path().is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(repo.path())? {
                let path = entry?.path();
                let size: u64 = std::fs::read_to_string(path.join("size"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                let used = std::fs::metadata(path.join("used"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                entries.push((used, size, path));
            }
        }
        let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
        entries.sort();
        for (_, size, path) in entries {
            if total <= self.cap {
                break;
            }
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let doomed = self.root.join("tmp").join(format!("evict-{n}"));
            std::fs::rename(&path, &doomed)?;
            std::fs::remove_dir_all(&doomed)?;
            total -= size;
        }
        Ok(())
    }
}

/// Fails when a directory on the way to `path` inside `checkout` is a
/// link (a commit may contain one): the cache never writes through it.
fn real_parents(checkout: &Path, path: &str) -> io::Result<()> {
    let mut at = checkout.to_owned();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        match at.symlink_metadata() {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "`{}` is not a directory (a link?)",
                    at.strip_prefix(checkout).unwrap_or(&at).display()
                )));
            }
            Err(_) => std::fs::create_dir(&at)?,
        }
    }
    Ok(())
}

/// The key of `spec` for this checkout: its text, each `hashFiles(...)`
/// replaced by the SHA-256 of the matching files (names and contents),
/// as the commit has them (the empty string when none match).
pub fn evaluate_key(spec: &CacheSpec, checkout: &Path) -> io::Result<String> {
    let mut key = String::new();
    for part in &spec.key {
        match part {
            KeyPart::Text(text) => key.push_str(text),
            KeyPart::HashFiles(patterns) => {
                let files = crate::files::matching(checkout, patterns)?;
                if files.is_empty() {
                    continue;
                }
                let mut hasher = Sha256::new();
                for file in files {
                    hasher.update(file.as_bytes());
                    hasher.update([0]);
                    hasher.update(Sha256::digest(std::fs::read(checkout.join(&file))?));
                }
                key.push_str(&to_hex(&hasher.finalize()));
            }
        }
    }
    Ok(key)
}

fn hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn save_then_restore_per_repository_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        std::fs::create_dir_all(one.join("target/deep")).unwrap();
        std::fs::write(one.join("target/deep/obj"), "12345").unwrap();
        let p = paths(&["target", "missing"]);
        assert_eq!(
            cache.save("/r", "k", &one, &p).unwrap(),
            Saved::Saved { bytes: 5 }
        );
        assert_eq!(cache.save("/r", "k", &one, &p).unwrap(), Saved::Exists);
        std::fs::create_dir_all(&two).unwrap();
        assert_eq!(
            cache.restore("/other", "k", &two, &p).unwrap(),
            Restored::Miss,
            "never across repositories"
        );
        assert_eq!(cache.restore("/r", "k2", &two, &p).unwrap(), Restored::Miss);
        assert_eq!(
            cache.restore("/r", "k", &two, &p).unwrap(),
            Restored::Hit { bytes: 5 }
        );
        assert_eq!(
            std::fs::read_to_string(two.join("target/deep/obj")).unwrap(),
            "12345"
        );
    }

    #[test]
    fn the_least_recently_used_entry_goes_first_and_oversized_ones_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache"), 250).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), [0u8; 100]).unwrap();
        let p = paths(&["f"]);
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        cache.save("/r", "a", &src, &p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.save("/r", "b", &src, &p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // `a` used after `b`: `b` is now the least recently used.
        assert!(matches!(
            cache.restore("/r", "a", &out, &p).unwrap(),
            Restored::Hit { .. }
        ));
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.save("/r", "c", &src, &p).unwrap();
        assert_eq!(cache.restore("/r", "b", &out, &p).unwrap(), Restored::Miss);
        assert!(matches!(
            cache.restore("/r", "a", &out, &p).unwrap(),
            Restored::Hit { .. }
        ));
        assert!(matches!(
            cache.restore("/r", "c", &out, &p).unwrap(),
            Restored::Hit { .. }
        ));
        std::fs::write(src.join("f"), [0u8; 300]).unwrap();
        assert_eq!(
            cache.save("/r", "d", &src, &p).unwrap(),
            Saved::TooLarge { bytes: 300 }
        );
    }

    #[test]
    fn two_saves_of_one_key_at_once_leave_one_whole_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(Cache::open(&dir.path().join("cache"), 1 << 30).unwrap());
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("t")).unwrap();
        for i in 0..200 {
            std::fs::write(src.join(format!("t/{i}")), [7u8; 1000]).unwrap();
        }
        let savers: Vec<_> = (0..4)
            .map(|_| {
                let (cache, src) = (cache.clone(), src.clone());
                std::thread::spawn(move || cache.save("/r", "k", &src, &paths(&["t"])).unwrap())
            })
            .collect();
        let results: Vec<Saved> = savers.into_iter().map(|s| s.join().unwrap()).collect();
        assert_eq!(
            results
                .iter()
                .filter(|r| matches!(r, Saved::Saved { .. }))
                .count(),
            1,
            "{results:?}"
        );
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        assert_eq!(
            cache.restore("/r", "k", &out, &paths(&["t"])).unwrap(),
            Restored::Hit { bytes: 200_000 }
        );
    }

    #[test]
    fn restore_does_not_write_through_a_committed_link() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f"), "x").unwrap();
        cache.save("/r", "k", &src, &paths(&["a/b"])).unwrap();
        let (out, outside) = (dir.path().join("out"), dir.path().join("outside"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, out.join("a")).unwrap();
        assert!(cache.restore("/r", "k", &out, &paths(&["a/b"])).is_err());
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn hash_files_changes_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let spec = CacheSpec {
            key_text: String::new(),
            key: vec![
                KeyPart::Text("c-".into()),
                KeyPart::HashFiles(vec!["*.lock".into()]),
            ],
            paths: vec![],
        };
        assert_eq!(evaluate_key(&spec, dir.path()).unwrap(), "c-");
        std::fs::write(dir.path().join("Cargo.lock"), "1").unwrap();
        let first = evaluate_key(&spec, dir.path()).unwrap();
        assert_eq!(first.len(), 2 + 64);
        std::fs::write(dir.path().join("Cargo.lock"), "2").unwrap();
        assert_ne!(evaluate_key(&spec, dir.path()).unwrap(), first);
    }
}
