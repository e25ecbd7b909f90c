//! The `.surveil.toml` pipeline file: parsing and validation into
//! [`Pipeline`]. Pure: it reads bytes handed to it (or one file) and never
//! runs anything; every error names the file, the line and the problem,
//! because that text becomes the job's message and SYSTEM log line.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod graph;
mod keys;
#[cfg(test)]
mod tests_keys;

pub use keys::{ArtifactsWhen, CacheSpec, KeyPart};

/// The pipeline file's name at the repository root.
pub const PIPELINE_FILE: &str = ".surveil.toml";

/// The largest pipeline file accepted. A larger one is almost certainly not
/// a pipeline, and parsing it would cost the runner memory for nothing.
pub const MAX_PIPELINE_BYTES: usize = 1024 * 1024;

/// A task's timeout when the file gives none (the contract's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The longest `timeout` a task may ask for. A week is beyond any build
/// a CI runner should hold a slot for, and the cap keeps every deadline the
/// executor computes (start + timeout + kill grace) far from overflowing an
/// `Instant`, whatever the file says.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The largest matrix one task may expand into.
pub const MAX_MATRIX: usize = 256;

/// A validated pipeline: at least one task, unique names, needs that form
/// a DAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// The tasks (matrix tasks expanded), in file order.
    pub tasks: Vec<Task>,
    /// The file's `parallelism`: at most this many tasks at once. `None`:
    /// as many as are ready (the runner caps it).
    pub parallelism: Option<u32>,
    /// Every label the job's runner must have: the file's own `labels` and
    /// those of every task, sorted, without duplicates.
    pub labels: Vec<String>,
}

/// One `[[task]]` of the pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Unique within the pipeline.
    pub name: String,
    /// Run by `sh -c` in the checkout.
    pub run: String,
    /// After this the task's process group is terminated.
    pub timeout: Duration,
    /// Added to the task's environment.
    pub env: BTreeMap<String, String>,
    /// A failure of this task does not end the job.
    pub allow_failure: bool,
    /// `false` (`network = false`): the task gets a network namespace of
    /// its own, with only a loopback device. Default `true`.
    pub network: bool,
    /// Indices (into [`Pipeline::tasks`]) of the tasks this one waits for.
    /// A file without any `needs` chains its tasks in file order, as
    /// before the key existed.
    pub needs: Vec<usize>,
    /// This task's matrix combination (dimension, value), in the file's
    /// order; each is also in the task's environment. Empty: no matrix.
    pub matrix: Vec<(String, String)>,
    /// The task's own `labels` (also in [`Pipeline::labels`]).
    pub labels: Vec<String>,
    /// Glob patterns (relative to the checkout) of files kept after it.
    pub artifacts: Vec<String>,
    /// After which outcomes the artifacts are kept.
    pub artifacts_when: ArtifactsWhen,
    /// Restored before the task, saved after it passes.
    pub cache: Option<CacheSpec>,
    /// Glob patterns of JUnit XML files parsed after the task.
    pub reports: Vec<String>,
}

/// Why a pipeline file was refused. Its `Display` is the whole message a
/// user sees: `.surveil.toml: line 3, column 1: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PipelineError {
    /// The file as the user knows it (relative to the repository root).
    pub file: String,
    /// 1-based line and column, when the problem has a position.
    pub position: Option<(usize, usize)>,
    /// What is wrong, and where useful what to do.
    pub problem: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(
                f,
                "{}: line {line}, column {column}: {}",
                self.file, self.problem
            ),
            None => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    task: Vec<RawTask>,
    parallelism: Option<Spanned<toml::Value>>,
    labels: Option<keys::StringList>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: Spanned<String>,
    run: Spanned<String>,
    timeout: Option<Spanned<String>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    allow_failure: bool,
    // Any TOML value, so that a wrong type gets our message and position.
    network: Option<Spanned<toml::Value>>,
    needs: Option<keys::StringList>,
    matrix: Option<keys::RawMatrix>,
    exclude: Option<keys::RawExclude>,
    labels: Option<keys::StringList>,
    artifacts: Option<keys::StringList>,
    artifacts_when: Option<Spanned<String>>,
    cache: Option<Spanned<keys::RawCache>>,
    reports: Option<keys::StringList>,
}

/// Reads and parses `dir/.surveil.toml`; a missing file is an error too.
pub fn load(dir: &Path) -> Result<Pipeline, PipelineError> {
    let path = dir.join(PIPELINE_FILE);
    let error = |problem: String| PipelineError {
        file: PIPELINE_FILE.to_owned(),
        position: None,
        problem,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(error(
                "not found at the repository root of this commit; add one with at least one \
                 [[task]] (name and run)"
                    .to_owned(),
            ));
        }
        Err(e) => return Err(error(format!("cannot be read: {e}"))),
    };
    if !meta.is_file() {
        return Err(error(
            "is not a regular file (a directory or a symlink); it must be a TOML file".into(),
        ));
    }
    // Check the size before reading so a huge file is never loaded whole.
    if meta.len() > MAX_PIPELINE_BYTES as u64 {
        return Err(too_large(PIPELINE_FILE, meta.len()));
    }
    let bytes = std::fs::read(&path).map_err(|e| error(format!("cannot be read: {e}")))?;
    parse(&bytes, PIPELINE_FILE)
}

fn too_large(file: &str, len: u64) -> PipelineError {
    PipelineError {
        file: file.to_owned(),
        position: None,
        problem: format!("pipeline file is {len} bytes; the limit is 1 MiB"),
    }
}

/// Parses and validates a pipeline file's bytes; `file` names it in errors.
pub fn parse(bytes: &[u8], file: &str) -> Result<Pipeline, PipelineError> {
    let text = text_of(bytes, file)?;
    let at = |text: &str, offset: usize, problem: String| PipelineError {
        file: file.to_owned(),
        position: Some(line_column(text, offset)),
        problem,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start);
        at(text, offset, e.message().trim().to_owned())
    })?;
    if raw.task.is_empty() {
        return Err(PipelineError {
            file: file.to_owned(),
            position: None,
            problem: "no tasks: add at least one [[task]] with `name` and `run`".into(),
        });
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut tasks = Vec::with_capacity(raw.task.len());
    for task in raw.task {
        let name = task.name.get_ref();
        let name_at = task.name.span().start;
        if name.trim().is_empty() {
            return Err(at(text, name_at, "task name must not be empty".into()));
        }
        if let Some(first) = seen.get(name) {
            let (first_line, _) = line_column(text, *first);
            return Err(at(
                text,
                name_at,
                format!(
                    "duplicate task name `{name}` (first used on line {first_line}); task names must be unique"
                ),
            ));
        }
        seen.insert(name.clone(), name_at);
        tasks.push(task_of(task).map_err(|(offset, problem)| at(text, offset, problem))?);
    }
    let parallelism = keys::parallelism(raw.parallelism.as_ref())
        .map_err(|(offset, problem)| at(text, offset, problem))?;
    let file_labels = keys::labels(raw.labels.as_ref(), None)
        .map_err(|(offset, problem)| at(text, offset, problem))?;
    let tasks = graph::build(tasks).map_err(|(offset, problem)| at(text, offset, problem))?;
    let mut labels: Vec<String> = file_labels
        .into_iter()
        .chain(tasks.iter().flat_map(|t| t.labels.iter().cloned()))
        .collect();
    labels.sort();
    labels.dedup();
    Ok(Pipeline {
        tasks,
        parallelism,
        labels,
    })
}

/// One `[[task]]` validated on its own, before matrix expansion and the
/// resolution of its `needs`; an error is the byte offset and problem.
fn task_of(task: RawTask) -> Result<graph::Unexpanded, (usize, String)> {
    let name = task.name.get_ref().clone();
    if task.run.get_ref().trim().is_empty() {
        return Err((
            task.run.span().start,
            format!("task `{name}`: `run` must not be empty"),
        ));
    }
    let timeout = timeout(task.timeout.as_ref(), &name)?;
    if let Some(env) = &task.env {
        for key in env.get_ref().keys() {
            if key.is_empty() || key.contains('=') {
                return Err((
                    env.span().start,
                    format!("task `{name}`: env name `{key}` is not a valid variable name"),
                ));
            }
        }
    }
    let network = network(task.network.as_ref(), &name)?;
    let matrix = keys::matrix(task.matrix.as_ref(), task.exclude.as_ref(), &name)?;
    let labels = keys::labels(task.labels.as_ref(), Some(&name))?;
    let artifacts = keys::globs(task.artifacts.as_ref(), &name, "artifacts")?;
    let artifacts_when = keys::artifacts_when(task.artifacts_when.as_ref(), &name)?;
    let cache = task
        .cache
        .as_ref()
        .map(|cache| keys::cache(cache, &name))
        .transpose()?;
    let reports = keys::globs(task.reports.as_ref(), &name, "reports")?;
    let needs = task.needs.map(|needs| {
        needs
            .into_inner()
            .into_iter()
            .map(|need| (need.span().start, need.into_inner()))
            .collect()
    });
    Ok(graph::Unexpanded {
        name_at: task.name.span().start,
        needs,
        matrix,
        task: Task {
            name,
            run: task.run.into_inner(),
            timeout,
            env: task.env.map(Spanned::into_inner).unwrap_or_default(),
            allow_failure: task.allow_failure,
            network,
            needs: Vec::new(),
            matrix: Vec::new(),
            labels,
            artifacts,
            artifacts_when,
            cache,
            reports,
        },
    })
}

/// The file as text: at most [`MAX_PIPELINE_BYTES`], UTF-8, no NUL byte.
fn text_of<'a>(bytes: &'a [u8], file: &str) -> Result<&'a str, PipelineError> {
    if bytes.len() > MAX_PIPELINE_BYTES {
        return Err(too_large(file, bytes.len() as u64));
    }
    let at = |text: &str, offset: usize, problem: &str| PipelineError {
        file: file.to_owned(),
        position: Some(line_column(text, offset)),
        problem: problem.to_owned(),
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
            return Err(at(
                valid,
                valid.len(),
                "the file is not UTF-8 text; a pipeline file is TOML, which must be UTF-8",
            ));
        }
    };
    if let Some(nul) = text.find('\0') {
        return Err(at(
            text,
            nul,
            "the file contains a NUL byte: it looks binary, not TOML",
        ));
    }
    Ok(text)
}

/// The `timeout` key: a positive duration up to [`MAX_TIMEOUT`],
/// [`DEFAULT_TIMEOUT`] when absent; a bad value is the byte offset of the value and the problem.
fn timeout(value: Option<&Spanned<String>>, name: &str) -> Result<Duration, (usize, String)> {
    let Some(spanned) = value else {
        return Ok(DEFAULT_TIMEOUT);
    };
    let text = spanned.get_ref();
    let too_long = || {
        (
            spanned.span().start,
            format!(
                "task `{name}`: timeout `{text}` is too long; a task's timeout is at most {}",
                humantime::format_duration(MAX_TIMEOUT)
            ),
        )
    };
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err((
            spanned.span().start,
            format!("task `{name}`: timeout must be greater than zero"),
        )),
        Ok(d) if d > MAX_TIMEOUT => Err(too_long()),
        Ok(d) => Ok(d),
        // Past u64 seconds: the same mistake as any other huge value.
        Err(humantime::DurationError::NumberOverflow) => Err(too_long()),
        Err(e) => Err((
            spanned.span().start,
            format!(
                "task `{name}`: timeout `{text}` is not a duration ({e}); write e.g. 90s, 10m or 1h"
            ),
        )),
    }
}

/// The `network` key: a boolean, `true` when absent; a wrong type is the
/// byte offset of the value and the problem.
fn network(value: Option<&Spanned<toml::Value>>, task: &str) -> Result<bool, (usize, String)> {
    let Some(spanned) = value else {
        return Ok(true);
    };
    match spanned.get_ref() {
        toml::Value::Boolean(network) => Ok(*network),
        other => Err((
            spanned.span().start,
            format!(
                "task `{task}`: `network` must be true or false, not {} {other}",
                article(other.type_str())
            ),
        )),
    }
}

/// "a string", "an integer": for messages about a value's type.
fn article(type_name: &str) -> String {
    if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {type_name}")
    } else {
        format!("a {type_name}")
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text.as_bytes(), PIPELINE_FILE)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn full_task_and_defaults() {
        let p = parse(
            br#"
[[task]]
name = "unit"
run = "cargo test"
timeout = "10m"
env = { RUST_LOG = "info" }
allow_failure = true

[[task]]
name = "lint"
run = "cargo clippy"
"#,
            PIPELINE_FILE,
        )
        .unwrap();
        assert_eq!(p.tasks.len(), 2);
        assert_eq!(p.tasks[0].timeout, Duration::from_secs(600));
        assert_eq!(p.tasks[0].env["RUST_LOG"], "info");
        assert!(p.tasks[0].allow_failure);
        assert_eq!(p.tasks[1].timeout, DEFAULT_TIMEOUT);
        assert!(p.tasks[1].env.is_empty());
        assert!(!p.tasks[1].allow_failure);
    }

    #[test]
    fn network_is_a_boolean_defaulting_to_true() {
        let p = parse(
            b"[[task]]\nname = \"offline\"\nrun = \"make\"\nnetwork = false\n[[task]]\nname = \"online\"\nrun = \"curl\"\nnetwork = true\n[[task]]\nname = \"default\"\nrun = \"true\"\n",
            PIPELINE_FILE,
        )
        .unwrap();
        let network: Vec<bool> = p.tasks.iter().map(|t| t.network).collect();
        assert_eq!(network, [false, true, true]);
    }

    #[test]
    fn network_of_the_wrong_type_names_file_line_and_value() {
        assert_eq!(
            err("[[task]]\nname = \"a\"\nrun = \"true\"\nnetwork = \"off\"\n"),
            ".surveil.toml: line 4, column 11: task `a`: `network` must be true or false, not a string \"off\""
        );
        assert_eq!(
            err("[[task]]\nname = \"a\"\nrun = \"true\"\n\nnetwork = 0\n"),
            ".surveil.toml: line 5, column 11: task `a`: `network` must be true or false, not an integer 0"
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("[[task]]\nname = \"a\"\nrun = \"true\"\ntmeout = \"5s\"\n");
        assert!(e.starts_with(".surveil.toml: line 4, column 1: "), "{e}");
        assert!(e.contains("unknown field `tmeout`"), "{e}");
    }

    #[test]
    fn missing_run_is_named() {
        let e = err("[[task]]\nname = \"a\"\n");
        assert!(e.contains("missing field `run`"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("[[task]]\nname = \"a\"\nrun = = \"true\"\n");
        assert!(e.starts_with(".surveil.toml: line 3, column 7: "), "{e}");
    }

    #[test]
    fn no_tasks() {
        assert_eq!(
            err("# nothing here\n"),
            ".surveil.toml: no tasks: add at least one [[task]] with `name` and `run`"
        );
    }

    #[test]
    fn duplicate_names() {
        let e = err(
            "[[task]]\nname = \"a\"\nrun = \"true\"\n[[task]]\nname = \"a\"\nrun = \"false\"\n",
        );
        assert_eq!(
            e,
            ".surveil.toml: line 5, column 8: duplicate task name `a` (first used on line 2); task names must be unique"
        );
    }

    #[test]
    fn empty_run() {
        let e = err("[[task]]\nname = \"a\"\nrun = \"  \"\n");
        assert_eq!(
            e,
            ".surveil.toml: line 3, column 7: task `a`: `run` must not be empty"
        );
    }

    #[test]
    fn bad_duration() {
        let e = err("[[task]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"soon\"\n");
        assert!(
            e.starts_with(
                ".surveil.toml: line 4, column 11: task `a`: timeout `soon` is not a duration"
            ),
            "{e}"
        );
        let e = err("[[task]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"0s\"\n");
        assert!(e.ends_with("timeout must be greater than zero"), "{e}");
    }

    #[test]
    fn timeout_is_capped_at_a_week() {
        let timeout = |value: &str| {
            parse(
                format!("[[task]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"{value}\"\n")
                    .as_bytes(),
                PIPELINE_FILE,
            )
            .map(|p| p.tasks[0].timeout)
            .map_err(|e| e.to_string())
        };
        assert_eq!(timeout("7d"), Ok(MAX_TIMEOUT));
        assert_eq!(
            timeout("7d 1s"),
            Err(".surveil.toml: line 4, column 11: task `a`: timeout `7d 1s` is too long; a task's timeout is at most 7days".to_owned())
        );
        // Fits in a Duration, but start + timeout overflowed the executor's
        // Instant after the task was spawned.
        assert!(
            timeout("100000000000d").unwrap_err().ends_with(
                "timeout `100000000000d` is too long; a task's timeout is at most 7days"
            )
        );
    }

    #[test]
    fn a_timeout_past_u64_seconds_is_the_same_error_not_a_parse_failure() {
        let e =
            err("[[task]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"99999999999999999999999s\"\n");
        assert_eq!(
            e,
            ".surveil.toml: line 4, column 11: task `a`: timeout `99999999999999999999999s` is too long; a task's timeout is at most 7days"
        );
        let e =
            err("[[task]]\nname = \"a\"\nrun = \"true\"\ntimeout = \"300000000000000000000y\"\n");
        assert!(
            e.ends_with("is too long; a task's timeout is at most 7days"),
            "{e}"
        );
    }

    #[test]
    fn too_large() {
        let big = vec![b'#'; MAX_PIPELINE_BYTES + 1];
        assert_eq!(
            parse(&big, PIPELINE_FILE).unwrap_err().to_string(),
            format!(
                ".surveil.toml: pipeline file is {} bytes; the limit is 1 MiB",
                MAX_PIPELINE_BYTES + 1
            )
        );
    }

    #[test]
    fn binary_and_non_utf8() {
        let e = parse(b"[[task]]\nname = \"\xff\"\n", PIPELINE_FILE)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(".surveil.toml: line 2, column 9: the file is not UTF-8"),
            "{e}"
        );
        let e = parse(b"\0\x01\x02", PIPELINE_FILE).unwrap_err().to_string();
        assert!(
            e.contains("line 1, column 1: the file contains a NUL byte"),
            "{e}"
        );
    }

    #[test]
    fn load_reports_a_missing_file_and_reads_a_present_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.starts_with(".surveil.toml: not found"), "{e}");
        std::fs::write(
            dir.path().join(PIPELINE_FILE),
            "[[task]]\nname = \"a\"\nrun = \"true\"\n",
        )
        .unwrap();
        assert_eq!(load(dir.path()).unwrap().tasks[0].name, "a");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é\nx", 3), (2, 1));
        assert_eq!(line_column("", 5), (1, 1));
    }
}
