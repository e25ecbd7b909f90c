//! What happens around a job's tasks in its checkout: caches restored
//! before the first task, and after the last one ended caches saved, test
//! reports read and artifacts found.
//!
//! Both run while no task process exists (before the first one starts,
//! after every task's process group and sandbox are gone), so the
//! checkout cannot change under the runner's reads and writes. It reports
//! in the job's log; a cache or report problem never fails a task.

use std::collections::HashSet;
use std::path::Path;

use surveil_proto::{TaskResult, TaskStatus};

use crate::cache::{Restored, Saved};
use crate::executor::{ExecOptions, JobEnv};
use crate::joblog::JobLog;
use crate::pipeline::Pipeline;

/// Per task, the cache key it uses (evaluated on the commit's files) and
/// whether it was found.
#[derive(Debug, Default)]
pub struct CacheKeys {
    keys: Vec<Option<String>>,
    hits: HashSet<String>,
}

/// Restores the cache of every task that has one, each key once.
pub async fn restore_caches(
    pipeline: &Pipeline,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
    log: &mut JobLog,
) -> CacheKeys {
    let mut keys = CacheKeys::default();
    let mut tried = HashSet::new();
    for (i, task) in pipeline.tasks.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let (Some(spec), Some(cache)) = (&task.cache, &options.cache) else {
            if task.cache.is_some() {
                log.system(
                    index,
                    &format!("task `{}`: this runner keeps no cache", task.name),
                )
                .await;
            }
            keys.keys.push(None);
            continue;
        };
        let key = {
            let (spec, dir) = (spec.clone(), dir.to_owned());
            blocking(move || crate::cache::evaluate_key(&spec, &dir)).await
        };
        let key = match key {
            Ok(key) => key,
            Err(e) => {
                log.system(
                    index,
                    &format!(
                        "task `{}`: cache key `{}` cannot be computed: {e}",
                        task.name, spec.key_text
                    ),
                )
                .await;
                keys.keys.push(None);
                continue;
            }
        };
        keys.keys.push(Some(key.clone()));
        if !tried.insert(key.clone()) {
            continue;
        }
        let restored = {
            let (cache, repo, dir, paths, key) = (
                cache.clone(),
                job.repo.clone(),
                dir.to_owned(),
                spec.paths.clone(),
                key.clone(),
            );
            blocking(move || cache.restore(&repo, &key, &dir, &paths)).await
        };
        let line = match restored {
            Ok(Restored::Hit { bytes }) => {
                keys.hits.insert(key.clone());
                format!("cache `{key}` restored ({bytes} bytes)")
            }
            Ok(Restored::Miss) => {
                format!("cache `{key}` not found: it is saved after the task passes")
            }
            Err(e) => format!("cache `{key}` could not be restored: {e}"),
        };
        log.system(index, &format!("task `{}`: {line}", task.name))
            .await;
    }
    keys
}

/// Saves the caches of tasks that passed, reads their test reports into
/// their results, and lists the artifacts found.
pub async fn after_tasks(
    pipeline: &Pipeline,
    dir: &Path,
    job: &JobEnv,
    options: &ExecOptions,
    log: &mut JobLog,
    keys: &CacheKeys,
    results: &mut [TaskResult],
) {
    let mut saved = keys.hits.clone();
    for (i, (task, result)) in pipeline.tasks.iter().zip(results.iter_mut()).enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let status = result.status();
        if status == TaskStatus::Skipped {
            continue;
        }
        let key = keys.keys.get(i).cloned().flatten();
        if let (Some(key), Some(spec), Some(cache), TaskStatus::Passed) =
            (key, &task.cache, &options.cache, status)
            && saved.insert(key.clone())
        {
            let done = {
                let (cache, repo, dir, paths, key) = (
                    cache.clone(),
                    job.repo.clone(),
                    dir.to_owned(),
                    spec.paths.clone(),
                    key.clone(),
                );
                blocking(move || cache.save(&repo, &key, &dir, &paths)).await
            };
            let line = match done {
                Ok(Saved::Saved { bytes }) => format!("cache `{key}` saved ({bytes} bytes)"),
                Ok(Saved::Exists) => format!("cache `{key}` already saved by another job"),
                Ok(Saved::TooLarge { bytes }) => format!(
                    "cache `{key}` not saved: {bytes} bytes is more than the runner's whole cache ({} bytes)",
                    cache.cap()
                ),
                Err(e) => format!("cache `{key}` could not be saved: {e}"),
            };
            log.system(index, &format!("task `{}`: {line}", task.name))
                .await;
        }
        if !task.reports.is_empty() {
            let (dir, patterns) = (dir.to_owned(), task.reports.clone());
            result.report = blocking(move || Ok(crate::reports::collect(&dir, &patterns)))
                .await
                .unwrap_or_default();
            let line = match &result.report {
                Some(r) => format!(
                    "tests: {} passed, {} failed, {} skipped{}",
                    r.passed,
                    r.failed,
                    r.skipped,
                    if r.problems.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", r.problems.join("; "))
                    }
                ),
                None => format!("no test report matches {:?}", task.reports),
            };
            log.system(index, &format!("task `{}`: {line}", task.name))
                .await;
        }
        if !task.artifacts.is_empty() && task.artifacts_when.keeps(status == TaskStatus::Passed) {
            let (dir, patterns) = (dir.to_owned(), task.artifacts.clone());
            let line = match blocking(move || crate::files::matching(&dir, &patterns)).await {
                Ok(files) => format!(
                    "artifacts: {} files match ({}); this runner does not upload artifacts to the dispatcher yet",
                    files.len(),
                    files.join(", ")
                ),
                Err(e) => format!("artifacts cannot be searched: {e}"),
            };
            log.system(index, &format!("task `{}`: {line}", task.name))
                .await;
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
