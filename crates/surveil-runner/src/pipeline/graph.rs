//! From validated `[[task]]`s to the pipeline's task graph: matrix tasks
//! expanded into one task per combination, `needs` resolved to indices,
//! cycles refused. Pure; an error is a byte offset and the problem.

use std::collections::HashMap;

use super::Task;

type Problem = (usize, String);

/// A `[[task]]` checked on its own, before expansion.
pub(super) struct Unexpanded {
    /// Where its `name` value starts.
    pub name_at: usize,
    /// Its `needs` as written, each with its offset; `None`: no key.
    pub needs: Option<Vec<(usize, String)>>,
    /// Its matrix combinations, if it has a matrix.
    pub matrix: Option<Vec<Vec<(String, String)>>>,
    /// Everything else, `needs` and `matrix` still empty.
    pub task: Task,
}

/// Expands and links the tasks. A file in which no task has `needs`
/// chains them in file order (each waits for the one before), which is
/// how pipelines ran before `needs` existed.
pub(super) fn build(raw: Vec<Unexpanded>) -> Result<Vec<Task>, Problem> {
    let by_name: HashMap<&str, usize> = raw
        .iter()
        .enumerate()
        .map(|(i, t)| (t.task.name.as_str(), i))
        .collect();
    let any_needs = raw.iter().any(|t| t.needs.is_some());
    let mut edges: Vec<Vec<(usize, usize)>> = Vec::with_capacity(raw.len());
    for (i, task) in raw.iter().enumerate() {
        let mut wanted = Vec::new();
        if any_needs {
            for (at, need) in task.needs.iter().flatten() {
                let Some(&j) = by_name.get(need.as_str()) else {
                    return Err((
                        *at,
                        format!(
                            "task `{}`: `needs` names `{need}`, which is not a task of this pipeline",
                            task.task.name
                        ),
                    ));
                };
                if !wanted.iter().any(|(k, _)| *k == j) {
                    wanted.push((j, *at));
                }
            }
        } else if i > 0 {
            wanted.push((i - 1, 0));
        }
        edges.push(wanted);
    }
    refuse_cycles(&raw, &edges)?;
    expand(raw, &edges)
}

/// Depth-first search; the first back edge found is the error, at the
/// `needs` entry that closes the cycle.
fn refuse_cycles(raw: &[Unexpanded], edges: &[Vec<(usize, usize)>]) -> Result<(), Problem> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; raw.len()];
    for start in 0..raw.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // (node, next edge to follow); `path` is the open chain.
        let mut stack = vec![(start, 0usize)];
        marks[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let Some(&(to, at)) = edges[node].get(*next) else {
                marks[node] = Mark::Done;
                stack.pop();
                continue;
            };
            *next += 1;
            match marks[to] {
                Mark::Done => {}
                Mark::New => {
                    marks[to] = Mark::Open;
                    stack.push((to, 0));
                }
                Mark::Open => {
                    let from = stack.iter().position(|(n, _)| *n == to).unwrap_or(0);
                    let mut names: Vec<&str> = stack[from..]
                        .iter()
                        .map(|(n, _)| raw[*n].task.name.as_str())
                        .collect();
                    names.push(raw[to].task.name.as_str());
                    return Err((
                        at,
                        format!(
                            "task `{}`: `needs` makes a cycle: {} (each of these waits for the next)",
                            raw[node].task.name,
                            names.join(" → ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One task per matrix combination (or the task itself), with `needs` on
/// every expansion of each need.
fn expand(raw: Vec<Unexpanded>, edges: &[Vec<(usize, usize)>]) -> Result<Vec<Task>, Problem> {
    // Ranges first: a task may need one further down the file.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::with_capacity(raw.len());
    for unexpanded in &raw {
        let start = groups.last().map_or(0, |g| g.end);
        let count = unexpanded.matrix.as_ref().map_or(1, Vec::len);
        groups.push(start..start + count);
    }
    let mut tasks: Vec<Task> = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    for (i, unexpanded) in raw.into_iter().enumerate() {
        let combos = unexpanded.matrix.unwrap_or_else(|| vec![Vec::new()]);
        for combo in combos {
            let mut task = unexpanded.task.clone();
            if !combo.is_empty() {
                let shown: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
                task.name = format!("{} ({})", task.name, shown.join(", "));
                for (k, v) in &combo {
                    task.env.insert(k.clone(), v.clone());
                }
            }
            task.matrix = combo;
            task.needs = edges[i]
                .iter()
                .flat_map(|(j, _)| groups[*j].clone())
                .collect();
            if names.insert(task.name.clone(), ()).is_some() {
                return Err((
                    unexpanded.name_at,
                    format!(
                        "task `{}` (from the matrix of `{}`) has the name of another task; task names must be unique",
                        task.name, unexpanded.task.name
                    ),
                ));
            }
            tasks.push(task);
        }
    }
    Ok(tasks)
}
