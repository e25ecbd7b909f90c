//! The disk fills up under the dispatcher, for real: its state dir is a
//! small tmpfs, three chatty jobs stream their output, a ballast file
//! takes the last free byte mid-stream (SQLite's writes fail with
//! SQLITE_FULL), then goes. Nothing is lost: every job ends `passed` at
//! attempt 1 with its whole log, recorded once; no job is left running;
//! the runner's connection was not ended by a failed write (only by the
//! fail-stop, if it tripped; then the dispatcher is restarted as systemd
//! would).
//!
//! Mounting needs root (CI runs as root). Where it is impossible the story
//! says so loudly and skips, unless `CI=true`, where it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use surveil_proto::JobStatus;
use surveil_tests::cluster::{self, wait_for};
use surveil_tests::probe::{describe, status_of};

use crate::common::*;

const JOBS: usize = 3;
/// Lines each task prints before the gate and after it (~260 bytes each:
/// ~1.5 MiB of log per job in all, well within the runner's retained 4 MiB).
const HALF: usize = 3000;

/// A tmpfs mounted on the dispatcher's state dir, lazily unmounted when
/// dropped, whatever the story's outcome.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Tmpfs> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the dispatcher may still hold the database open.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a ballast file until the file system is full; returns its path.
fn fill(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0xa5u8; 256 * 1024];
    // 24 MiB at most: the loop ends well before its bound.
    for _ in 0..200 {
        if file
            .write_all(&block)
            .and_then(|()| file.sync_all())
            .is_err()
        {
            return Ok(path);
        }
    }
    bail!("{} never filled up", dir.display())
}

fn pipeline(gate: &Path) -> String {
    let pad = "x".repeat(240);
    let gate = gate.display();
    format!(
        "[[task]]\nname = \"chatty\"\n\
         run = \"seq -f 'line-%06g-{pad}' 0 {first}; \
         i=0; while [ ! -e '{gate}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         seq -f 'line-%06g-{pad}' {HALF} {last}\"\ntimeout = \"90s\"\n",
        first = HALF - 1,
        last = 2 * HALF - 1,
    )
}

/// The printed lines of a job's log (not the runner's SYSTEM lines, which
/// echo the command), whole lines only: read mid-stream, the log may end
/// inside a line where a chunk ended.
fn printed(s: &Scene, id: u64) -> Vec<String> {
    let text = ok_stdout(&s.cli(&["logs", &id.to_string()]));
    text.split_inclusive('\n')
        .filter(|l| {
            l.ends_with('\n')
                && l.starts_with("line-")
                && l.as_bytes()
                    .get(5..11)
                    .is_some_and(|n| n.iter().all(u8::is_ascii_digit))
        })
        .map(|l| l[..11].to_owned())
        .collect()
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn a_disk_full_mid_stream_loses_nothing_and_records_each_result_once() {
    let mut mounted = None;
    let scene = Scene::prepared(&["--runner-timeout", "10s"], None, |state| {
        mounted = Some(Tmpfs::mount(state)?);
        Ok(())
    });
    let mut s = match scene {
        Ok(s) => s,
        Err(err) if mounted.is_none() => {
            let why = format!("{err:#}");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the disk-full story cannot mount its tmpfs: {why}"
            );
            eprintln!(
                "\n*** SKIP diskfull::a_disk_full_mid_stream_loses_nothing_and_records_each_result_once: \
                 cannot mount a tmpfs as the dispatcher's state dir (needs root): {why} ***\n"
            );
            return;
        }
        Err(err) => panic!("starting the dispatcher: {err:#}"),
    };
    // Dropped before the scene, so the unmount comes first (lazily) and the
    // scene's scratch directory can then be removed.
    let _mounted = mounted.take();
    let isolation = cluster::runner_isolation_args();
    let mut args: Vec<&str> = isolation.iter().map(String::as_str).collect();
    args.extend(["--slots", "3"]);
    s.add_runner_with("r1", &s.addr.clone(), &args, &[])
        .unwrap();
    s.wait_runners(&["r1"]).unwrap();

    let gate = s.gate("flood");
    let pipeline = pipeline(&gate);
    let mut ids = Vec::new();
    for n in 0..JOBS {
        let commit = cluster::commit(
            &s.repo_dir,
            &format!("chatty {n}"),
            &[(".surveil.toml", &pipeline), ("n.txt", &n.to_string())],
        )
        .unwrap();
        ids.push(s.submit(&[&commit]).unwrap()[0]);
    }
    // The first half of every log is stored before the disk fills.
    for &id in &ids {
        s.wait_running(id).unwrap();
        wait_for("the first half of the log", STEP, POLL, || {
            Ok((printed(&s, id).len() == HALF).then_some(()))
        })
        .unwrap();
    }

    let ballast = fill(&s.state).unwrap();
    s.open(&gate).unwrap();
    // The writes fail, and the runner is asked to resend on its connection.
    let dispatcher_log = s.path().join("dispatcher.log");
    let runner_log = s.path().join("r1.log");
    wait_for("a store write to fail", STEP, POLL, || {
        Ok((count(&dispatcher_log, "store write batch failed") > 0).then_some(()))
    })
    .unwrap();
    wait_for("the runner to be asked to resend", STEP, POLL, || {
        Ok((count(&runner_log, "sending it again") > 0).then_some(()))
    })
    .unwrap();
    // Every task ends meanwhile; the runner holds the results.
    wait_for("every task to end", STEP, POLL, || {
        Ok((s.outbox("r1").len() == JOBS).then_some(()))
    })
    .unwrap();

    std::fs::remove_file(&ballast).unwrap();
    let mut restarts = 0;
    if let Some(status) = s.dispatcher.exited().unwrap() {
        // The fail-stop: non-zero, naming why, and restarted as systemd's
        // Restart=on-failure would.
        assert!(!status.success(), "{status}");
        let log = std::fs::read_to_string(&dispatcher_log).unwrap();
        assert!(log.contains("--max-store-failures"), "{log}");
        s.dispatcher.restart().unwrap();
        s.wait_answering().unwrap();
        restarts += 1;
    }

    for &id in &ids {
        let job = s.wait_final(id).unwrap();
        assert_eq!(
            (status_of(&job), job.attempt),
            (JobStatus::Passed, 1),
            "{}",
            describe(&job)
        );
        assert_eq!(job.attempts.len(), 1, "recorded once: {}", describe(&job));
        let lines = printed(&s, id);
        let want: Vec<String> = (0..2 * HALF).map(|n| format!("line-{n:06}")).collect();
        assert!(
            lines == want,
            "job {id}: {} of {} lines, in order",
            lines.len(),
            want.len()
        );
    }
    let status = s.probe.status().unwrap();
    assert_eq!((status.running, status.queued), (0, 0));
    assert_eq!(status.store_healthy, Some(true));
    wait_for("the runner's outbox to empty", STEP, POLL, || {
        Ok(s.outbox("r1").is_empty().then_some(()))
    })
    .unwrap();
    // Only a fail-stop's exit ended the runner's connection, never a
    // failed write.
    assert!(
        count(&runner_log, "disconnected from the dispatcher") <= restarts,
        "{}",
        std::fs::read_to_string(&runner_log).unwrap_or_default()
    );
}
