//! Which commits to submit when a branch moves from `old` to `new`: the new
//! tip alone, or every new commit oldest first, capped at the backlog limit;
//! and whether the move was a force push or rewind.
//!
//! Reads history with gix only (a rev walk with the old tip hidden). It
//! knows nothing of sockets, cursors or clocks, and never runs `git`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use gix::ObjectId;
use gix::revision::walk::Sorting;
use gix::traverse::commit::simple::CommitTimeOrder;

/// How many commits one branch move may produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only the new tip (the default).
    TipOnly,
    /// Every commit reachable from the new tip and not from the old one,
    /// keeping at most `max_backlog` of the newest.
    EveryCommit {
        /// The most commits submitted for one move; the oldest beyond it are
        /// skipped.
        max_backlog: usize,
    },
}

/// What to submit for one branch move.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// The commits to submit, oldest first; the new tip is always last
    /// unless the branch did not move.
    pub commits: Vec<ObjectId>,
    /// How many of the oldest new commits were left out because of the
    /// backlog limit.
    pub skipped: usize,
    /// The old tip is not an ancestor of the new one (force push, rewind,
    /// or the old commit is gone): only the new tip is selected.
    pub rewound: bool,
}

/// Why the history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CommitsError {
    /// Walking from the new tip failed (a missing or corrupt object).
    #[error("cannot walk the history of {tip}: {source}")]
    Walk {
        /// The tip the walk started from.
        tip: ObjectId,
        /// gix's explanation.
        source: gix::Error,
    },
}

/// Works out which commits to submit for a move of the branch from `old`
/// (the last acknowledged commit; `None` on first start) to `new`.
///
/// - no `old`: the current tip alone (first start);
/// - `old == new`: nothing;
/// - `old` missing from the repository or not an ancestor of `new`: the
///   new tip alone, with [`Selection::rewound`] set;
/// - otherwise the tip alone, or in [`Mode::EveryCommit`] every commit in
///   `old..new` oldest first (parents before children), the oldest beyond
///   `max_backlog` left out and counted in [`Selection::skipped`].
pub fn select(
    repo: &gix::Repository,
    old: Option<ObjectId>,
    new: ObjectId,
    mode: Mode,
) -> Result<Selection, CommitsError> {
    let tip_only = |rewound| Selection {
        commits: vec![new],
        skipped: 0,
        rewound,
    };
    let Some(old) = old else {
        return Ok(tip_only(false));
    };
    if old == new {
        return Ok(Selection::default());
    }
    // A cursor may name a commit that a force push and gc removed, or one
    // from a mirror that was deleted: nothing to walk back to.
    if repo.find_commit(old).is_err() {
        return Ok(tip_only(true));
    }

    let walk_error = |source| CommitsError::Walk { tip: new, source };
    let walk = repo
        .rev_walk([new])
        .with_hidden([old])
        .sorting(Sorting::ByCommitTime(CommitTimeOrder::NewestFirst))
        .all()
        .map_err(walk_error)?;
    let mut nodes = Vec::new();
    let mut descends_from_old = false;
    for info in walk {
        let info = info.map_err(walk_error)?;
        // `old` is an ancestor of `new` exactly when some commit reachable
        // from `new` but not from `old` has `old` as a parent: the commit
        // just after `old` on any path down from `new` is such a commit.
        descends_from_old |= info.parent_ids.contains(&old);
        nodes.push(Node {
            id: info.id,
            parents: info.parent_ids.to_vec(),
            time: info.commit_time.unwrap_or(0),
        });
    }
    if !descends_from_old {
        return Ok(tip_only(true));
    }
    match mode {
        Mode::TipOnly => Ok(tip_only(false)),
        Mode::EveryCommit { max_backlog } => {
            let mut commits = oldest_first(&nodes);
            let skipped = commits.len().saturating_sub(max_backlog);
            commits.drain(..skipped);
            Ok(Selection {
                commits,
                skipped,
                rewound: false,
            })
        }
    }
}

/// One commit of a walk: its id, its parents, its commit time.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) id: ObjectId,
    pub(crate) parents: Vec<ObjectId>,
    pub(crate) time: i64,
}

/// Orders `nodes` (given newest first, as the walk yields them) so that
/// every commit comes after all of its parents in the set, and among the
/// commits free to go next, the older commit time first. Commit times alone
/// cannot be trusted for this: clocks skew, and commits made in the same
/// second tie.
pub(crate) fn oldest_first(nodes: &[Node]) -> Vec<ObjectId> {
    let index: HashMap<ObjectId, usize> =
        nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut waiting_on = vec![0usize; nodes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (child, node) in nodes.iter().enumerate() {
        for parent in &node.parents {
            if let Some(&p) = index.get(parent) {
                waiting_on[child] += 1;
                children[p].push(child);
            }
        }
    }
    // Min-heap on (time, later in the walk = older): the walk's own order
    // breaks ties between equal commit times.
    let key = |i: usize| Reverse((nodes[i].time, Reverse(i)));
    let mut ready: BinaryHeap<_> = (0..nodes.len())
        .filter(|&i| waiting_on[i] == 0)
        .map(key)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse((_, Reverse(i)))) = ready.pop() {
        order.push(nodes[i].id);
        for &child in &children[i] {
            waiting_on[child] -= 1;
            if waiting_on[child] == 0 {
                ready.push(key(child));
            }
        }
    }
    order
}

/// `from` and its first parents, newest first, at most `limit` commits:
/// the history behind a cursor, as a re-verification walks it back. Stops
/// early at a root commit or a commit missing from the repository.
pub fn first_parents(
    repo: &gix::Repository,
    from: ObjectId,
    limit: usize,
) -> Result<Vec<ObjectId>, CommitsError> {
    let mut chain = Vec::new();
    let mut next = Some(from);
    while let Some(id) = next {
        if chain.len() >= limit {
            break;
        }
        let Ok(commit) = repo.find_commit(id) else {
            break;
        };
        chain.push(id);
        next = commit.parent_ids().next().map(gix::Id::detach);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_repo::TestRepo;

    fn id(n: u8) -> ObjectId {
        ObjectId::from_bytes_or_panic(&[n; 20])
    }

    #[test]
    fn topological_order_puts_parents_first_even_against_the_clock() {
        // 1 ← 2 ← 3, where 3's clock ran behind 2's; walk order newest first.
        let nodes = [
            Node {
                id: id(3),
                parents: vec![id(2)],
                time: 5,
            },
            Node {
                id: id(2),
                parents: vec![id(1)],
                time: 10,
            },
            Node {
                id: id(1),
                parents: vec![id(0)],
                time: 7,
            },
        ];
        assert_eq!(oldest_first(&nodes), vec![id(1), id(2), id(3)]);
    }

    #[test]
    fn equal_times_follow_the_walk_backwards() {
        let nodes = [
            Node {
                id: id(3),
                parents: vec![id(2)],
                time: 1,
            },
            Node {
                id: id(2),
                parents: vec![id(1)],
                time: 1,
            },
            Node {
                id: id(1),
                parents: vec![],
                time: 1,
            },
        ];
        assert_eq!(oldest_first(&nodes), vec![id(1), id(2), id(3)]);
    }

    #[test]
    fn first_start_selects_the_tip() {
        let repo = TestRepo::new();
        repo.commit("a");
        let b = repo.commit("b");
        let sel = select(&repo.open(), None, b, Mode::EveryCommit { max_backlog: 10 }).unwrap();
        assert_eq!(
            sel,
            Selection {
                commits: vec![b],
                skipped: 0,
                rewound: false
            }
        );
    }

    #[test]
    fn every_commit_is_oldest_first_and_tip_only_is_the_tip() {
        let repo = TestRepo::new();
        let base = repo.commit("base");
        let new: Vec<_> = (1..=5).map(|i| repo.commit(&format!("c{i}"))).collect();
        let tip = *new.last().unwrap();
        let every = select(
            &repo.open(),
            Some(base),
            tip,
            Mode::EveryCommit { max_backlog: 100 },
        )
        .unwrap();
        assert_eq!(every.commits, new);
        assert_eq!((every.skipped, every.rewound), (0, false));
        let tip_only = select(&repo.open(), Some(base), tip, Mode::TipOnly).unwrap();
        assert_eq!(tip_only.commits, vec![tip]);
        assert!(!tip_only.rewound);
    }

    #[test]
    fn backlog_keeps_the_newest_and_counts_the_rest() {
        let repo = TestRepo::new();
        let base = repo.commit("base");
        let new: Vec<_> = (1..=5).map(|i| repo.commit(&format!("c{i}"))).collect();
        let sel = select(
            &repo.open(),
            Some(base),
            new[4],
            Mode::EveryCommit { max_backlog: 2 },
        )
        .unwrap();
        assert_eq!(sel.commits, vec![new[3], new[4]]);
        assert_eq!(sel.skipped, 3);
    }

    #[test]
    fn unchanged_tip_selects_nothing() {
        let repo = TestRepo::new();
        let a = repo.commit("a");
        let sel = select(
            &repo.open(),
            Some(a),
            a,
            Mode::EveryCommit { max_backlog: 10 },
        )
        .unwrap();
        assert!(sel.commits.is_empty());
    }

    #[test]
    fn force_push_and_rewind_select_the_new_tip_only() {
        let repo = TestRepo::new();
        let a = repo.commit("a");
        let b = repo.commit("b");
        let c = repo.commit("c");
        // Rewind: the branch goes back to a, which c descends from.
        let mode = Mode::EveryCommit { max_backlog: 10 };
        let rewind = select(&repo.open(), Some(c), a, mode).unwrap();
        assert_eq!(
            rewind,
            Selection {
                commits: vec![a],
                skipped: 0,
                rewound: true
            }
        );
        // Force push: a new line from a, not containing b or c.
        repo.git(&["reset", "--hard", &a.to_string()]);
        let d = repo.commit("d");
        let e = repo.commit("e");
        let forced = select(&repo.open(), Some(c), e, mode).unwrap();
        assert_eq!(
            forced,
            Selection {
                commits: vec![e],
                skipped: 0,
                rewound: true
            }
        );
        let forced = select(&repo.open(), Some(b), d, Mode::TipOnly).unwrap();
        assert!(forced.rewound);
    }

    #[test]
    fn unknown_old_commit_counts_as_a_rewind() {
        let repo = TestRepo::new();
        let a = repo.commit("a");
        let sel = select(&repo.open(), Some(id(9)), a, Mode::TipOnly).unwrap();
        assert_eq!(
            sel,
            Selection {
                commits: vec![a],
                skipped: 0,
                rewound: true
            }
        );
    }

    #[test]
    fn merges_list_both_sides_before_the_merge() {
        let repo = TestRepo::new();
        let base = repo.commit("base");
        repo.git(&["checkout", "-q", "-b", "side"]);
        let s1 = repo.commit("s1");
        repo.git(&["checkout", "-q", "main"]);
        let m1 = repo.commit("m1");
        repo.git(&["merge", "-q", "--no-ff", "-m", "merge", "side"]);
        let merge = repo.rev_parse("HEAD");
        let sel = select(
            &repo.open(),
            Some(base),
            merge,
            Mode::EveryCommit { max_backlog: 10 },
        )
        .unwrap();
        assert_eq!(sel.commits.len(), 3);
        assert_eq!(sel.commits[2], merge);
        assert!(sel.commits[..2].contains(&s1) && sel.commits[..2].contains(&m1));
    }
}
