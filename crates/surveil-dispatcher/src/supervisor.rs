//! Supervision: runs named tasks in a `JoinSet`, restarts one that panics
//! after a capped exponential backoff, logs its name and panic text, counts
//! the restart, and stops everything on cancellation.
//!
//! It knows nothing of what the tasks do; a task owns no state that a
//! restart could lose (the scheduler and the store hold it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// First delay before restarting a task that panicked.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest delay between restarts of a task that keeps panicking.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A task that ran this long before panicking starts again from
/// [`BACKOFF_START`]: it was not crash-looping.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// Builds one run of a task; called again for every restart.
pub(crate) type TaskFactory =
    Arc<dyn Fn(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Slot {
    name: &'static str,
    factory: TaskFactory,
    backoff: Duration,
    started: tokio::time::Instant,
}

/// Runs `tasks` until `cancel` fires; `on_restart` is told each restart.
pub(crate) async fn supervise(
    tasks: Vec<(&'static str, TaskFactory)>,
    cancel: CancellationToken,
    on_restart: impl Fn(&'static str),
) {
    let mut set = JoinSet::new();
    let mut slots: HashMap<Id, Slot> = HashMap::new();
    for (name, factory) in tasks {
        let id = spawn(&mut set, name, &factory, Duration::ZERO, &cancel);
        slots.insert(
            id,
            Slot {
                name,
                factory,
                backoff: BACKOFF_START,
                started: tokio::time::Instant::now(),
            },
        );
    }
    loop {
        let joined = tokio::select! {
            () = cancel.cancelled() => break,
            joined = set.join_next_with_id() => joined,
        };
        let Some(joined) = joined else { break };
        let (id, panic) = match joined {
            Ok((id, ())) => (id, None),
            Err(err) => {
                let id = err.id();
                let text = if err.is_panic() {
                    panic_text(err.into_panic())
                } else {
                    "cancelled".to_owned()
                };
                (id, Some(text))
            }
        };
        let Some(mut slot) = slots.remove(&id) else {
            continue;
        };
        if cancel.is_cancelled() {
            continue;
        }
        match &panic {
            Some(text) => {
                tracing::error!(task = slot.name, panic = %text, "supervised task panicked; restarting")
            }
            None => tracing::error!(
                task = slot.name,
                "supervised task returned unexpectedly; restarting"
            ),
        }
        on_restart(slot.name);
        if slot.started.elapsed() >= BACKOFF_RESET_AFTER {
            slot.backoff = BACKOFF_START;
        }
        let delay = slot.backoff;
        slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
        slot.started = tokio::time::Instant::now() + delay;
        let id = spawn(&mut set, slot.name, &slot.factory, delay, &cancel);
        slots.insert(id, slot);
    }
    // Tasks watch the token and return; wait for them so none outlives us.
    while set.join_next().await.is_some() {}
}

fn spawn(
    set: &mut JoinSet<()>,
    name: &'static str,
    factory: &TaskFactory,
    delay: Duration,
    cancel: &CancellationToken,
) -> Id {
    let run = factory(cancel.clone());
    let cancel = cancel.clone();
    let span = tracing::info_span!("task", task = name);
    set.spawn(
        async move {
            if !delay.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            run.await;
        }
        .instrument(span),
    )
    .id()
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_with_backoff_and_counted() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let r = runs.clone();
        let factory: TaskFactory = Arc::new(move |cancel: CancellationToken| {
            let r = r.clone();
            Box::pin(async move {
                if r.fetch_add(1, Ordering::SeqCst) < 3 {
                    panic!("boom");
                }
                cancel.cancelled().await;
            })
        });
        let c = counted.clone();
        let sup = tokio::spawn(supervise(
            vec![("demo", factory)],
            cancel.clone(),
            move |n| {
                c.lock().unwrap().push(n);
            },
        ));
        let start = tokio::time::Instant::now();
        for _ in 0..1000 {
            if runs.load(Ordering::SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        // 50 + 100 + 200 ms of backoff before the fourth run.
        assert!(start.elapsed() >= Duration::from_millis(350));
        assert_eq!(*counted.lock().unwrap(), vec!["demo"; 3]);
        cancel.cancel();
        sup.await.unwrap();
    }
}
