//! Stories of the observer against real repositories and a fake
//! dispatcher over real sockets.

mod support;

use std::time::Duration;

use support::{FakeDispatcher, RunningObserver, TestRepo, config, cursor, wait_for};

/// First start with no cursor: the current tip alone, even with
/// `--every-commit`, and the cursor follows the ack.
#[tokio::test]
async fn first_start_submits_the_current_tip() {
    let repo = TestRepo::new();
    repo.commit("one");
    let tip = repo.commit("two");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), dispatcher.addr);
    cfg.every_commit = true;
    let observer = RunningObserver::start(cfg);

    let submits = wait_for("the first submit", || {
        let s = dispatcher.submits();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(submits[0].commits, vec![tip.clone()]);
    assert_eq!(submits[0].repo, repo.name());
    assert_eq!(submits[0].branch, "main");
    wait_for("the cursor at the tip", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    observer.stop().await;
    assert_eq!(dispatcher.submitted_commits(), vec![tip]);
}

/// Commits made while the dispatcher is down are all delivered, once each
/// and oldest first, after it comes back.
#[tokio::test]
async fn commits_made_while_the_dispatcher_is_down_are_delivered_once_each() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let addr = dispatcher.addr;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), addr);
    cfg.every_commit = true;
    let observer = RunningObserver::start(cfg);
    wait_for("the base commit acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;

    let store = dispatcher.stop().await;
    let logs = support::logs();
    let new: Vec<String> = (1..=3)
        .map(|i| repo.commit(&format!("while down {i}")))
        .collect();
    // The observer saw the last of them while it could not send: it is
    // pending, not lost.
    wait_for(
        "the observer to see the new tip while the dispatcher is down",
        || {
            logs.contains(&repo.name(), &format!("tip={}", new[2]))
                .then_some(())
        },
    )
    .await;
    assert_eq!(cursor(state.path(), &repo), Some(base.clone()));

    let dispatcher = FakeDispatcher::start_with(addr, store, None).await;
    wait_for("the cursor at the last new commit", || {
        (cursor(state.path(), &repo).as_ref() == new.last()).then_some(())
    })
    .await;
    observer.stop().await;

    // After reconnecting, the cursor's commit is submitted once more to
    // check the store still knows it (it does: no new job), then the new
    // commits go out.
    let mut expected = vec![base.clone(), base];
    expected.extend(new);
    assert_eq!(
        dispatcher.submitted_commits(),
        expected,
        "each new commit once, oldest first"
    );
    assert_eq!(dispatcher.store.lock().unwrap().distinct_jobs(), 4);
}

/// If the observer dies after the ack but before the cursor write, it
/// resubmits on restart and the dispatcher answers with the same job: no
/// second job exists.
#[tokio::test]
async fn restart_between_ack_and_cursor_write_creates_no_second_job() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let observer = RunningObserver::start(config(&repo, state.path(), dispatcher.addr));
    wait_for("base acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;
    let tip = repo.commit("tip");
    wait_for("tip acked", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    observer.stop().await;
    let jobs_before = dispatcher.store.lock().unwrap().distinct_jobs();
    let first_ack = dispatcher.submits().last().unwrap().clone();
    assert_eq!(first_ack.commits, vec![tip.clone()]);

    // Roll the cursor back to what it was before the tip's ack, as if the
    // process had been killed between the ack and the write.
    surveil_observer::cursor::CursorFile::new(state.path())
        .store(
            &repo.name(),
            "main",
            surveil_observer::cursor::Cursor {
                commit: gix::ObjectId::from_hex(base.as_bytes()).unwrap(),
                epoch: String::new(),
            },
        )
        .unwrap();
    let observer = RunningObserver::start(config(&repo, state.path(), dispatcher.addr));
    wait_for("tip acked again", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    observer.stop().await;
    let resubmit = dispatcher.submits().last().unwrap().clone();

    assert_eq!(resubmit.commits, vec![tip]);
    assert_eq!(
        resubmit.job_ids, first_ack.job_ids,
        "the existing job is returned"
    );
    assert_eq!(
        dispatcher.store.lock().unwrap().distinct_jobs(),
        jobs_before
    );
}

/// Five commits pushed at once: `--every-commit` submits all five oldest
/// first, the default only the new tip.
#[tokio::test]
async fn every_commit_submits_five_oldest_first_and_the_default_only_the_tip() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let every_dispatcher = FakeDispatcher::start().await;
    let tip_dispatcher = FakeDispatcher::start().await;
    let (every_state, tip_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut every_cfg = config(&repo, every_state.path(), every_dispatcher.addr);
    every_cfg.every_commit = true;
    let every = RunningObserver::start(every_cfg);
    let tip_only = RunningObserver::start(config(&repo, tip_state.path(), tip_dispatcher.addr));
    for state in [every_state.path(), tip_state.path()] {
        wait_for("base acked", || {
            (cursor(state, &repo) == Some(base.clone())).then_some(())
        })
        .await;
    }

    let pushed = repo.push_commits(&base, 5);
    let tip = pushed.last().unwrap().clone();
    for state in [every_state.path(), tip_state.path()] {
        wait_for("tip acked", || {
            (cursor(state, &repo) == Some(tip.clone())).then_some(())
        })
        .await;
    }
    every.stop().await;
    tip_only.stop().await;

    let every_submits = every_dispatcher.submits();
    assert_eq!(every_submits.len(), 2, "{every_submits:?}");
    assert_eq!(
        every_submits[1].commits, pushed,
        "all five, oldest first, in one Submit"
    );
    assert_eq!(every_submits[1].job_ids.len(), 5);
    assert_eq!(tip_dispatcher.submitted_commits(), vec![base, tip]);
}

/// Over `--max-backlog`, the newest commits are submitted and the log says
/// how many of the oldest were skipped.
#[tokio::test]
async fn a_backlog_over_the_limit_keeps_the_newest_and_names_the_skipped() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), dispatcher.addr);
    cfg.every_commit = true;
    cfg.max_backlog = 2;
    let observer = RunningObserver::start(cfg);
    wait_for("base acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;
    let pushed = repo.push_commits(&base, 5);
    wait_for("tip acked", || {
        (cursor(state.path(), &repo).as_ref() == pushed.last()).then_some(())
    })
    .await;
    observer.stop().await;

    assert_eq!(
        dispatcher.submitted_commits(),
        vec![base, pushed[3].clone(), pushed[4].clone()]
    );
    assert!(support::logs().contains(&repo.name(), "skipping the 3 oldest"));
}

/// A force push (the old tip is not an ancestor of the new one) submits the
/// new tip alone, not the rewritten line, and says so in the log.
#[tokio::test]
async fn force_push_submits_the_new_tip_only_with_a_warning() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let old_tip = repo.commit("old line");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), dispatcher.addr);
    cfg.every_commit = true;
    let observer = RunningObserver::start(cfg);
    wait_for("old tip acked", || {
        (cursor(state.path(), &repo) == Some(old_tip.clone())).then_some(())
    })
    .await;

    // Two new commits on top of base: walking new ^old would list both.
    let rewritten = repo.push_commits(&base, 2);
    let new_tip = rewritten.last().unwrap().clone();
    wait_for("new tip acked", || {
        (cursor(state.path(), &repo) == Some(new_tip.clone())).then_some(())
    })
    .await;
    observer.stop().await;

    assert_eq!(dispatcher.submitted_commits(), vec![old_tip, new_tip]);
    assert!(support::logs().contains(&repo.name(), "force push or rewind"));
}

/// With a 60 s poll interval, a new commit is still submitted within a few
/// seconds: the ref-file watch saw it.
#[tokio::test]
async fn a_commit_is_seen_by_the_ref_watch_long_before_the_next_poll() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), dispatcher.addr);
    cfg.interval = Duration::from_secs(60);
    let observer = RunningObserver::start(cfg);
    wait_for("base acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;

    let started = tokio::time::Instant::now();
    let next = repo.commit("watched");
    wait_for("the commit submitted", || {
        dispatcher.submitted_commits().contains(&next).then_some(())
    })
    .await;
    // `wait_for` gives up after 15 s, far below the 60 s poll: only the
    // ref watch can have woken the observer.
    eprintln!(
        "commit to submit via the ref watch: {:?}",
        started.elapsed()
    );
    observer.stop().await;
}

/// A URL is fetched into a mirror under the state directory and its new
/// commits are submitted under the URL, exactly as given.
#[tokio::test]
async fn a_url_is_mirrored_and_its_commits_submitted() {
    let upstream = TestRepo::new();
    let base = upstream.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let state = tempfile::tempdir().unwrap();
    let url = format!("file://{}", upstream.path().display());
    let mut cfg = config(&upstream, state.path(), dispatcher.addr);
    cfg.repo = url.clone();
    cfg.every_commit = true;
    let observer = RunningObserver::start(cfg);
    let load = |state: &std::path::Path| {
        surveil_observer::cursor::CursorFile::new(state)
            .load(&url, "main")
            .unwrap()
            .map(|c| c.commit.to_string())
    };
    wait_for("base acked", || {
        (load(state.path()) == Some(base.clone())).then_some(())
    })
    .await;
    let next = [upstream.commit("a"), upstream.commit("b")];
    wait_for("new commits acked", || {
        (load(state.path()).as_ref() == Some(&next[1])).then_some(())
    })
    .await;
    observer.stop().await;

    let submits = dispatcher.submits();
    assert!(submits.iter().all(|s| s.repo == url));
    let commits: Vec<String> = submits.into_iter().flat_map(|s| s.commits).collect();
    assert_eq!(commits, [vec![base], next.to_vec()].concat());
    assert!(
        state
            .path()
            .join("mirrors")
            .read_dir()
            .unwrap()
            .next()
            .is_some()
    );
}

/// An ack without one job id per commit is not an ack: the cursor stays,
/// and the commit is submitted again until properly acknowledged.
#[tokio::test]
async fn an_ack_with_the_wrong_number_of_ids_is_not_trusted() {
    let repo = TestRepo::new();
    let tip = repo.commit("base");
    let store = std::sync::Arc::<std::sync::Mutex<support::Store>>::default();
    store.lock().unwrap().bad_acks = 1;
    let dispatcher = FakeDispatcher::start_with("127.0.0.1:0".parse().unwrap(), store, None).await;
    let state = tempfile::tempdir().unwrap();
    let observer = RunningObserver::start(config(&repo, state.path(), dispatcher.addr));
    wait_for("the tip acked properly", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    observer.stop().await;

    let submits = dispatcher.submits();
    assert_eq!(submits.len(), 2, "{submits:?}");
    assert!(submits[0].job_ids.is_empty() && submits[1].job_ids.len() == 1);
    assert!(support::logs().contains(&repo.name(), "SubmitAck carries 0 job ids for 1 commits"));
}

/// A dispatcher refusing the token stops the observer with an error that
/// says so, instead of retrying forever.
#[tokio::test]
async fn a_refused_token_stops_the_observer_with_an_error() {
    let repo = TestRepo::new();
    repo.commit("base");
    let dispatcher = FakeDispatcher::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Default::default(),
        Some("right".into()),
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), dispatcher.addr);
    cfg.token = Some("wrong".into());
    let error = RunningObserver::start(cfg).join().await.unwrap_err();
    assert!(format!("{error:#}").contains("BAD_TOKEN"), "{error:#}");
    assert_eq!(
        cursor(state.path(), &repo),
        None,
        "nothing acked, nothing recorded"
    );
}

/// The dispatcher's store is restored from a backup taken after the first
/// two jobs: the three commits acknowledged after it are gone from the
/// store, though the observer's cursor is past them. When the observer
/// reconnects it re-verifies: the cursor's commit and its first parents
/// are submitted again, newest first, until one the store knows, so none
/// is skipped; the cursor then records the new epoch. `restore_epoch` is
/// the epoch after the restore: a new one (the restore step), or the
/// backup's own (the step forgotten), which is caught the same way.
async fn a_restored_store_gets_back_every_commit_behind_the_cursor(restore_epoch: &str) {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let store = std::sync::Arc::<std::sync::Mutex<support::Store>>::default();
    store.lock().unwrap().epoch = "e1".repeat(16);
    let dispatcher = FakeDispatcher::start_with("127.0.0.1:0".parse().unwrap(), store, None).await;
    let addr = dispatcher.addr;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&repo, state.path(), addr);
    cfg.every_commit = true;
    let observer = RunningObserver::start(cfg);
    wait_for("base acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;
    let next: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|m| repo.commit(m))
        .collect();
    let tip = next.last().unwrap().clone();
    wait_for("the tip acked", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    let store = dispatcher.stop().await;
    let before = store.lock().unwrap().submits.len();
    // The backup holds base and a (jobs 1 and 2).
    store.lock().unwrap().restore(2, restore_epoch);
    assert!(!store.lock().unwrap().knows(&repo.name(), &tip));
    let dispatcher = FakeDispatcher::start_with(addr, store, None).await;
    wait_for("every commit known again", || {
        let store = dispatcher.store.lock().unwrap();
        [&base, &next[0], &next[1], &next[2], &next[3]]
            .iter()
            .all(|c| store.knows(&repo.name(), c))
            .then_some(())
    })
    .await;
    let epoch_recorded = || {
        surveil_observer::cursor::CursorFile::new(state.path())
            .load(&repo.name(), "main")
            .unwrap()
            .map(|c| c.epoch)
    };
    wait_for("the new epoch recorded", || {
        (epoch_recorded().as_deref() == Some(restore_epoch)).then_some(())
    })
    .await;
    observer.stop().await;
    let resubmitted: Vec<Vec<String>> = dispatcher.submits()[before..]
        .iter()
        .map(|s| s.commits.clone())
        .collect();
    assert_eq!(
        resubmitted,
        [
            vec![next[3].clone()],
            vec![next[2].clone()],
            vec![next[1].clone()],
            vec![next[0].clone()],
        ],
        "newest first, down to the first commit the store knows (a)"
    );
    assert_eq!(cursor(state.path(), &repo), Some(tip), "the cursor stays");
    assert!(support::logs().contains(&repo.name(), "had lost commits already acknowledged"));
}

#[tokio::test]
async fn after_a_restore_with_a_new_epoch_the_lost_commits_are_resubmitted() {
    a_restored_store_gets_back_every_commit_behind_the_cursor(&"e2".repeat(16)).await;
}

#[tokio::test]
async fn after_a_restore_that_kept_the_old_epoch_the_lost_commits_are_resubmitted_too() {
    a_restored_store_gets_back_every_commit_behind_the_cursor(&"e1".repeat(16)).await;
}

/// Without `--every-commit` only tips are built: after a restore, the
/// cursor's tip alone is submitted again, not the commits before it.
#[tokio::test]
async fn after_a_restore_a_tip_only_observer_resubmits_its_tip() {
    let repo = TestRepo::new();
    let base = repo.commit("base");
    let dispatcher = FakeDispatcher::start().await;
    let addr = dispatcher.addr;
    let state = tempfile::tempdir().unwrap();
    let observer = RunningObserver::start(config(&repo, state.path(), addr));
    wait_for("base acked", || {
        (cursor(state.path(), &repo) == Some(base.clone())).then_some(())
    })
    .await;
    repo.commit("a");
    let tip = repo.commit("b");
    wait_for("the tip acked", || {
        (cursor(state.path(), &repo) == Some(tip.clone())).then_some(())
    })
    .await;
    let store = dispatcher.stop().await;
    let before = store.lock().unwrap().submits.len();
    store.lock().unwrap().restore(1, &"e3".repeat(16));
    let dispatcher = FakeDispatcher::start_with(addr, store, None).await;
    wait_for("the tip known again", || {
        dispatcher
            .store
            .lock()
            .unwrap()
            .knows(&repo.name(), &tip)
            .then_some(())
    })
    .await;
    // Give it the time a further walk would take: none must come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    observer.stop().await;
    let resubmitted: Vec<Vec<String>> = dispatcher.submits()[before..]
        .iter()
        .map(|s| s.commits.clone())
        .collect();
    assert_eq!(resubmitted, [vec![tip]]);
}
