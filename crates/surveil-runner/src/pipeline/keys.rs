//! The values of the pipeline keys that came after the first four
//! (`parallelism`, `labels`, `matrix` + `exclude`, `artifacts`,
//! `artifacts_when`, `cache`, `reports`): each checked on its own. Pure;
//! an error is the byte offset of the offending value and the problem,
//! which [`super::parse`] turns into file/line/column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A TOML array of strings, each with its position.
pub(super) type StringList = Spanned<Vec<Spanned<String>>>;

type Problem = (usize, String);

/// `matrix = { dimension = [values] }`, each value list with its position.
pub(super) type RawMatrix = Spanned<BTreeMap<String, Spanned<toml::Value>>>;

/// One matrix combination: (dimension, value) in the file's order.
pub(super) type Combination = Vec<(String, String)>;

/// `exclude = [{ dimension = value }]`.
pub(super) type RawExclude = Spanned<Vec<Spanned<BTreeMap<String, toml::Value>>>>;

/// The largest `parallelism` accepted: more is a typo, not a plan.
const MAX_PARALLELISM: i64 = 1024;

/// When a task's `artifacts` are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactsWhen {
    /// Only when the task passed (the default).
    #[default]
    OnSuccess,
    /// Only when it did not pass.
    OnFailure,
    /// Whatever its outcome.
    Always,
}

impl ArtifactsWhen {
    /// Whether a task that `passed` (or not) keeps its artifacts.
    pub fn keeps(self, passed: bool) -> bool {
        match self {
            ArtifactsWhen::OnSuccess => passed,
            ArtifactsWhen::OnFailure => !passed,
            ArtifactsWhen::Always => true,
        }
    }
}

/// A task's `cache`: where it lives (the key) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// The key as written, for messages.
    pub key_text: String,
    /// The key, parsed: text and `{{ hashFiles(...) }}` parts.
    pub key: Vec<KeyPart>,
    /// Paths relative to the checkout: directories or files.
    pub paths: Vec<String>,
}

/// A piece of a cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// Used as is.
    Text(String),
    /// `{{ hashFiles('a', 'b/**') }}`: a digest of the matching files of
    /// the checkout, as the commit has them.
    HashFiles(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    key: Spanned<String>,
    paths: StringList,
}

/// The file's `parallelism`: a positive integer.
pub(super) fn parallelism(value: Option<&Spanned<toml::Value>>) -> Result<Option<u32>, Problem> {
    let Some(spanned) = value else {
        return Ok(None);
    };
    match spanned.get_ref() {
        toml::Value::Integer(n) if (1..=MAX_PARALLELISM).contains(n) => {
            Ok(Some(u32::try_from(*n).unwrap_or(1)))
        }
        toml::Value::Integer(n) => Err((
            spanned.span().start,
            format!("`parallelism` must be between 1 and {MAX_PARALLELISM}, not {n}"),
        )),
        other => Err((
            spanned.span().start,
            format!(
                "`parallelism` must be a positive integer, not {} {other}",
                super::article(other.type_str())
            ),
        )),
    }
}

/// `labels`, of the file (`task` is `None`) or of a task.
pub(super) fn labels(
    list: Option<&StringList>,
    task: Option<&str>,
) -> Result<Vec<String>, Problem> {
    let whose = task.map_or_else(String::new, |t| format!("task `{t}`: "));
    let mut labels = Vec::new();
    for label in list.map(|l| l.get_ref().as_slice()).unwrap_or_default() {
        let text = label.get_ref();
        if text.is_empty() || text.len() > 64 || text.chars().any(|c| c.is_whitespace() || c == ',')
        {
            return Err((
                label.span().start,
                format!(
                    "{whose}label `{text}` must be 1 to 64 characters without spaces or commas"
                ),
            ));
        }
        labels.push(text.clone());
    }
    Ok(labels)
}

/// `artifacts` or `reports`: glob patterns relative to the checkout.
pub(super) fn globs(
    list: Option<&StringList>,
    task: &str,
    key: &str,
) -> Result<Vec<String>, Problem> {
    let mut patterns = Vec::new();
    for pattern in list.map(|l| l.get_ref().as_slice()).unwrap_or_default() {
        let text = pattern.get_ref();
        let problem = relative_problem(text).map(str::to_owned).or_else(|| {
            globset::Glob::new(text)
                .err()
                .map(|e| format!("is not a glob pattern ({})", e.kind()))
        });
        if let Some(problem) = problem {
            return Err((
                pattern.span().start,
                format!("task `{task}`: `{key}` pattern `{text}` {problem}"),
            ));
        }
        patterns.push(text.clone());
    }
    Ok(patterns)
}

/// Why `path` is not a path inside the checkout, if it is not.
fn relative_problem(path: &str) -> Option<&'static str> {
    if path.trim().is_empty() {
        Some("is empty")
    } else if path.starts_with('/') {
        Some("is absolute; it must be relative to the checkout")
    } else if path.starts_with('~') {
        Some(
            "is in HOME; only paths inside the checkout are kept (point the tool's cache there, e.g. CARGO_HOME=.cargo)",
        )
    } else if path.split('/').any(|part| part == "..") {
        Some("leaves the checkout (`..`)")
    } else {
        None
    }
}

/// `artifacts_when`: `on_success`, `on_failure` or `always`.
pub(super) fn artifacts_when(
    value: Option<&Spanned<String>>,
    task: &str,
) -> Result<ArtifactsWhen, Problem> {
    match value.map(|v| v.get_ref().as_str()) {
        None | Some("on_success") => Ok(ArtifactsWhen::OnSuccess),
        Some("on_failure") => Ok(ArtifactsWhen::OnFailure),
        Some("always") => Ok(ArtifactsWhen::Always),
        Some(other) => Err((
            value.map_or(0, |v| v.span().start),
            format!(
                "task `{task}`: `artifacts_when` must be \"on_success\", \"on_failure\" or \"always\", not \"{other}\""
            ),
        )),
    }
}

/// `cache = { key = "...", paths = [...] }`.
pub(super) fn cache(raw: &Spanned<RawCache>, task: &str) -> Result<CacheSpec, Problem> {
    let cache = raw.get_ref();
    let key_text = cache.key.get_ref();
    let key = cache_key(key_text).map_err(|problem| {
        (
            cache.key.span().start,
            format!("task `{task}`: cache key {problem}"),
        )
    })?;
    if cache.paths.get_ref().is_empty() {
        return Err((
            cache.paths.span().start,
            format!("task `{task}`: cache `paths` must name at least one path"),
        ));
    }
    let mut paths = Vec::new();
    for path in cache.paths.get_ref() {
        let text = path.get_ref().trim_end_matches('/');
        let problem = relative_problem(text).or_else(|| {
            text.contains(['*', '?', '[', '{'])
                .then_some("is a pattern; cache paths are plain paths")
        });
        if let Some(problem) = problem {
            return Err((
                path.span().start,
                format!("task `{task}`: cache path `{}` {problem}", path.get_ref()),
            ));
        }
        paths.push(text.to_owned());
    }
    Ok(CacheSpec {
        key_text: key_text.clone(),
        key,
        paths,
    })
}

/// Splits a cache key into text and `{{ hashFiles('...') }}` parts.
fn cache_key(text: &str) -> Result<Vec<KeyPart>, String> {
    if text.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(KeyPart::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find("}}") else {
            return Err(format!("`{text}`: `{{{{` without its `}}}}`"));
        };
        let expr = rest[open + 2..open + close].trim();
        parts.push(KeyPart::HashFiles(
            hash_files_args(expr).map_err(|p| format!("`{text}`: `{{{{ {expr} }}}}` {p}"))?,
        ));
        rest = &rest[open + close + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("`{text}`: `}}}}` without its `{{{{`"));
    }
    if !rest.is_empty() {
        parts.push(KeyPart::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// The quoted patterns of `hashFiles('a', "b")`.
fn hash_files_args(expr: &str) -> Result<Vec<String>, String> {
    let inner = expr
        .strip_prefix("hashFiles(")
        .and_then(|e| e.strip_suffix(')'))
        .ok_or("is not understood; the only expression is hashFiles('pattern', ...)")?;
    let mut patterns = Vec::new();
    for arg in inner.split(',') {
        let arg = arg.trim();
        let unquoted = ['\'', '"'].iter().find_map(|q| {
            arg.strip_prefix(*q)
                .and_then(|a| a.strip_suffix(*q))
                .filter(|a| !a.is_empty())
        });
        let Some(pattern) = unquoted else {
            return Err(format!(
                "has argument `{arg}`; hashFiles takes quoted, non-empty patterns"
            ));
        };
        if let Some(problem) = relative_problem(pattern) {
            return Err(format!("pattern `{pattern}` {problem}"));
        }
        globset::Glob::new(pattern)
            .map_err(|e| format!("pattern `{pattern}` is not a glob pattern ({})", e.kind()))?;
        patterns.push(pattern.to_owned());
    }
    Ok(patterns)
}

/// `matrix` and `exclude`: the combinations, each (dimension, value) in
/// the file's order of dimensions; `None` without a matrix.
pub(super) fn matrix(
    matrix: Option<&RawMatrix>,
    exclude: Option<&RawExclude>,
    task: &str,
) -> Result<Option<Vec<Combination>>, Problem> {
    let Some(matrix) = matrix else {
        return match exclude {
            Some(exclude) => Err((
                exclude.span().start,
                format!("task `{task}`: `exclude` needs a `matrix` to exclude from"),
            )),
            None => Ok(None),
        };
    };
    let dims = dimensions(matrix, task)?;
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (dim, values) in &dims {
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                values.iter().map(move |value| {
                    let mut next = combo.clone();
                    next.push((dim.clone(), value.clone()));
                    next
                })
            })
            .collect();
        if combos.len() > super::MAX_MATRIX {
            return Err((
                matrix.span().start,
                format!(
                    "task `{task}`: the matrix has more than {} combinations",
                    super::MAX_MATRIX
                ),
            ));
        }
    }
    for rule in exclude.map(|e| e.get_ref().as_slice()).unwrap_or_default() {
        let wanted = exclusion(rule, &dims, task)?;
        combos.retain(|combo| !wanted.iter().all(|pair| combo.contains(pair)));
    }
    if combos.is_empty() {
        return Err((
            exclude.map_or(matrix.span().start, |e| e.span().start),
            format!("task `{task}`: `exclude` removes every combination of the matrix"),
        ));
    }
    Ok(Some(combos))
}

/// The matrix's dimensions in the file's order, each with its values.
fn dimensions(matrix: &RawMatrix, task: &str) -> Result<Vec<(String, Vec<String>)>, Problem> {
    if matrix.get_ref().is_empty() {
        return Err((
            matrix.span().start,
            format!("task `{task}`: `matrix` must have at least one dimension"),
        ));
    }
    let mut in_order: Vec<_> = matrix.get_ref().iter().collect();
    in_order.sort_by_key(|(_, values)| values.span().start);
    let mut dims = Vec::new();
    for (dim, values) in in_order {
        let at = values.span().start;
        if !env_name(dim) {
            return Err((
                at,
                format!(
                    "task `{task}`: matrix dimension `{dim}` must be a variable name (letters, digits, _)"
                ),
            ));
        }
        let toml::Value::Array(items) = values.get_ref() else {
            return Err((
                at,
                format!("task `{task}`: matrix dimension `{dim}` must be an array of values"),
            ));
        };
        if items.is_empty() {
            return Err((
                at,
                format!("task `{task}`: matrix dimension `{dim}` has no values"),
            ));
        }
        let mut texts = Vec::new();
        for item in items {
            let text = scalar(item).ok_or_else(|| {
                (
                    at,
                    format!(
                        "task `{task}`: matrix dimension `{dim}` has {} {item}; values are strings, numbers or booleans",
                        super::article(item.type_str())
                    ),
                )
            })?;
            if texts.contains(&text) {
                return Err((
                    at,
                    format!("task `{task}`: matrix dimension `{dim}` lists `{text}` twice"),
                ));
            }
            texts.push(text);
        }
        dims.push((dim.clone(), texts));
    }
    Ok(dims)
}

/// One `exclude` entry as (dimension, value) pairs, all of which must
/// exist in the matrix.
fn exclusion(
    rule: &Spanned<BTreeMap<String, toml::Value>>,
    dims: &[(String, Vec<String>)],
    task: &str,
) -> Result<Vec<(String, String)>, Problem> {
    let at = rule.span().start;
    if rule.get_ref().is_empty() {
        return Err((
            at,
            format!("task `{task}`: an `exclude` entry must name a dimension"),
        ));
    }
    let mut pairs = Vec::new();
    for (dim, value) in rule.get_ref() {
        let Some((_, values)) = dims.iter().find(|(d, _)| d == dim) else {
            return Err((
                at,
                format!("task `{task}`: `exclude` names `{dim}`, which is not a matrix dimension"),
            ));
        };
        let text = scalar(value).unwrap_or_else(|| value.to_string());
        if !values.contains(&text) {
            return Err((
                at,
                format!(
                    "task `{task}`: `exclude` has {dim} = {value}, which is not a value of the matrix"
                ),
            ));
        }
        pairs.push((dim.clone(), text));
    }
    Ok(pairs)
}

/// A matrix value as text: strings as they are, numbers and booleans as
/// TOML writes them.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
            Some(value.to_string())
        }
        _ => None,
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: usable as an environment variable by `sh`.
fn env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
