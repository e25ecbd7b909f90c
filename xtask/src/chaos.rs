//! `cargo xtask chaos --commits N [--seed S] [--release] [--keep]`: a soak
//! that streams N commits through a local cluster of real processes (a
//! dispatcher, three runners, an observer with `--every-commit`) over a
//! scratch repository under `target/chaos/`, while SIGKILLing, SIGSTOPping
//! and restarting random daemons, then checks what the store recorded:
//! commits without a job (lost), jobs with two accepted results
//! (duplicated), jobs left `running` without a live lease (zombies), and
//! each commit's outcome against the verdict the commit itself carries.
//!
//! SIGTERMed runners drain for a short `--drain-timeout`, so drains cut
//! jobs off and hand them back; those jobs must still get their own
//! outcome (never `cancelled`).
//!
//! With `--storage-faults` the dispatcher's state dir is a small
//! filesystem of its own ([`crate::disk`]) and a second seeded schedule
//! fills it (disk full) or freezes it (every write and fsync stalls) for a
//! while; a dispatcher that fails stop on the failing store is restarted a
//! moment later, as its service manager would. The same record must hold,
//! and no job may end `error` at all.
//!
//! With `--store postgres` the dispatchers keep their store in a real
//! PostgreSQL the soak starts (as the tests do), and `--dispatchers 2` runs
//! a leader and a standby on it, with a short leader term (1 s): runners,
//! observer and probe are given both addresses and follow the leader. The
//! dispatchers are among the victims (a SIGSTOP past the term, then
//! SIGCONT: the old leader must not write), and a third seeded schedule
//! restarts PostgreSQL itself. A dispatcher that steps down on losing its
//! term exits and is restarted (as systemd would), counted apart; the
//! writes the database refused from a deposed term are counted from the
//! dispatchers' logs, and the record is read from PostgreSQL.
//!
//! The fault schedule and the commits' contents come from one seed, printed
//! first, so a failing run can be replayed; what the cluster does with the
//! faults still depends on timing. This file only drives and observes the
//! cluster through signals, the wire ([`Probe`]) and a read-only look at the
//! store ([`record`]); it must never write the store or signal a process
//! it did not start.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use surveil_proto::{JobInfo, JobStatus};
use surveil_tests::cluster::{self, Daemon, wait_for};
use surveil_tests::probe::{Probe, status_of};
use surveil_tests::record::{self, Attempt};

/// Short liveness settings so a stopped runner loses its jobs within the
/// longer stops (0.2–1.5 s) but keeps them through the shorter ones.
const HEARTBEAT: &str = "300ms";
const RUNNER_TIMEOUT: Duration = Duration::from_secs(1);
/// High enough that chaos alone does not exhaust a job's attempts; a job
/// that still ends `error` is counted apart, not as a wrong outcome.
const MAX_ATTEMPTS: u32 = 10;
/// Share of commits whose `check` task fails.
const FAILING_SHARE: f64 = 0.25;
const RUNNERS: [&str; 3] = ["runner-1", "runner-2", "runner-3"];
/// The runners' drain timeout: shorter than many jobs, so a SIGTERMed
/// runner often cuts a job off and hands it back (which must cost the job
/// nothing: it may not end `cancelled`, nor use up its attempts).
const DRAIN_TIMEOUT: &str = "100ms";
/// How long a SIGTERMed daemon may take to exit before it is SIGKILLed.
const TERM_DEADLINE: Duration = Duration::from_secs(10);
/// Chaos goes on after the last commit while jobs are unfinished, at most
/// this long, so faults also land on the tail of the backlog.
const CHAOS_TAIL: Duration = Duration::from_secs(20);
/// Milliseconds between commits, drawn evenly: slow enough that faults
/// land among running jobs (a debug-build job takes ~0.4 s), fast enough
/// that the observer often sees several new commits in one move.
const COMMIT_GAP: (u64, u64) = (100, 700);
const STARTUP: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);
const JOBS_POLL: Duration = Duration::from_millis(500);
const STATUS_POLL: Duration = Duration::from_millis(300);

const PIPELINE: &str = r#"# Written by cargo xtask chaos.
[[task]]
name = "prepare"
run = "echo chaos commit $(cat n); sleep $(cat delay)"
timeout = "1m"

[[task]]
name = "check"
run = "grep -q pass verdict"
timeout = "1m"
"#;

pub struct Options {
    pub commits: usize,
    pub seed: Option<u64>,
    pub release: bool,
    pub keep: bool,
    pub storage_faults: bool,
    /// The dispatchers' store is PostgreSQL (`--store postgres`).
    pub postgres: bool,
    /// Dispatchers on the store: 2 (a leader and a standby) needs
    /// PostgreSQL.
    pub dispatchers: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            commits: 30,
            seed: None,
            release: false,
            keep: false,
            storage_faults: false,
            postgres: false,
            dispatchers: 1,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .with_context(|| format!("chaos: {name} needs a value"))
            };
            match arg.as_str() {
                "--commits" => {
                    options.commits = value("--commits")?
                        .parse()
                        .context("chaos: --commits takes a whole number")?;
                }
                "--seed" => {
                    options.seed = Some(
                        value("--seed")?
                            .parse()
                            .context("chaos: --seed takes a whole number")?,
                    );
                }
                "--release" => options.release = true,
                "--keep" => options.keep = true,
                "--storage-faults" => options.storage_faults = true,
                "--store" => match value("--store")?.as_str() {
                    "postgres" => options.postgres = true,
                    "sqlite" => options.postgres = false,
                    other => bail!("chaos: --store {other}: expected sqlite or postgres"),
                },
                "--dispatchers" => {
                    options.dispatchers = value("--dispatchers")?
                        .parse()
                        .context("chaos: --dispatchers takes 1 or 2")?;
                }
                other => bail!(
                    "chaos: unknown argument `{other}` (usage: cargo xtask chaos [--commits N] [--seed S] [--release] [--keep] [--storage-faults] [--store sqlite|postgres] [--dispatchers 1|2])"
                ),
            }
        }
        if options.commits == 0 {
            bail!("chaos: --commits must be at least 1");
        }
        if !(1..=2).contains(&options.dispatchers) {
            bail!("chaos: --dispatchers takes 1 or 2");
        }
        if options.dispatchers > 1 && !options.postgres {
            bail!("chaos: --dispatchers 2 needs --store postgres (SQLite has one dispatcher)");
        }
        if options.storage_faults && options.postgres {
            bail!(
                "chaos: --storage-faults fills the SQLite store's disk; it does not combine with --store postgres"
            );
        }
        Ok(options)
    }
}

/// What happened to one daemon.
#[derive(Default, Clone, Copy)]
struct Tally {
    kills: u32,
    stops: u32,
    restarts: u32,
    /// Exits nobody asked for.
    crashes: u32,
    /// SIGTERMs that needed a SIGKILL after [`TERM_DEADLINE`].
    slow_terms: u32,
    /// Exits after SIGTERM with a non-zero status.
    unclean_terms: u32,
    /// The dispatcher's own exits on a failing store (restarted as its
    /// service manager would).
    fail_stops: u32,
    /// With PostgreSQL: a leader's own exits on losing its term (restarted
    /// as its service manager would, to stand by).
    step_downs: u32,
}

/// A storage episode in force.
#[derive(Clone, Copy, Debug)]
enum Episode {
    Full,
    Frozen,
}

/// What the storage schedule did.
#[derive(Default)]
struct StorageTally {
    full: u32,
    frozen: u32,
    /// Bytes of ballast written over all disk-full episodes.
    ballast: u64,
}

/// How long a fail-stopped dispatcher stays down before it is restarted
/// (systemd's `RestartSec` in the shipped unit is of this order).
const RESTART_AFTER_FAIL_STOP: Duration = Duration::from_millis(500);
/// The dispatcher's filesystem under `--storage-faults`: room for the
/// store of a long soak, small enough to fill in a moment.
const DISK_MIB: u64 = 256;

enum State {
    Up,
    Stopped { until: Instant },
    Down { until: Instant },
    Terminating { since: Instant },
}

struct Member {
    daemon: Daemon,
    state: State,
    tally: Tally,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Kill,
    Stop,
    Restart,
}

/// `GetStatus` counters are per dispatcher life; this sums them over
/// restarts.
#[derive(Default)]
struct Counters {
    base: (u64, u64),
    last: (u64, u64, u64),
    samples: u32,
}

impl Counters {
    fn sample(&mut self, probe: &Probe) {
        if let Ok(s) = probe.status() {
            let now = (s.reassignments, s.refused_results, s.uptime_s);
            if now.0 < self.last.0 || now.1 < self.last.1 || now.2 < self.last.2 {
                // A life we did not see end (it crashed between samples).
                self.fold();
            }
            self.last = now;
            self.samples += 1;
        }
    }

    /// The dispatcher's life ends: keep what it counted.
    fn fold(&mut self) {
        self.base.0 += self.last.0;
        self.base.1 += self.last.1;
        self.last = (0, 0, 0);
    }

    fn reassignments(&self) -> u64 {
        self.base.0 + self.last.0
    }

    fn refused(&self) -> u64 {
        self.base.1 + self.last.1
    }
}

struct Soak {
    started: Instant,
    deadline: Instant,
    dir: PathBuf,
    repo: PathBuf,
    /// One per dispatcher, in the order of `members`.
    probes: Vec<Probe>,
    /// The dispatchers (one, or a leader and a standby), runners, observer,
    /// in that order.
    members: Vec<Member>,
    /// How many of `members` are dispatchers.
    dispatchers: usize,
    /// Per dispatcher.
    counters: Vec<Counters>,
    /// With `--store postgres`: the server and the database.
    pg: Option<(surveil_tests::postgres::Postgres, String)>,
    pg_restarts: u32,
    /// Every commit made, oldest first, with the outcome it must get.
    expected: Vec<(String, &'static str)>,
    timeline: String,
    warnings: Vec<String>,
    /// The dispatcher's own filesystem, with `--storage-faults`.
    disk: Option<crate::disk::Disk>,
    storage: StorageTally,
    /// The storage episode in force and when it ends.
    episode: Option<(Episode, Instant)>,
}

const DISPATCHER: usize = 0;
/// With PostgreSQL: the leader term, short so that a SIGSTOP of the chaos
/// (0.2–1.5 s) often outlasts it and a standby takes over.
const LEADER_TTL: &str = "1s";
/// Seconds between PostgreSQL restarts, drawn evenly.
const PG_RESTART_GAP: (u64, u64) = (6000, 12000);

impl Soak {
    fn is_dispatcher(&self, i: usize) -> bool {
        i < self.dispatchers
    }

    /// The leader's probe (the one dispatcher's, with SQLite): the first
    /// dispatcher that answers as a leader, else the first one.
    fn probe(&self) -> &Probe {
        &self.probes[self.leader_index()]
    }

    fn leader_index(&self) -> usize {
        if self.probes.len() > 1 {
            for (i, probe) in self.probes.iter().enumerate() {
                if matches!(self.members[i].state, State::Up)
                    && probe.status().is_ok_and(|s| !s.standby)
                {
                    return i;
                }
            }
        }
        0
    }

    /// Reads every running dispatcher's counters.
    fn sample(&mut self) {
        for i in 0..self.dispatchers {
            if matches!(self.members[i].state, State::Up) {
                self.counters[i].sample(&self.probes[i]);
            }
        }
    }

    fn reassignments(&self) -> u64 {
        self.counters.iter().map(Counters::reassignments).sum()
    }

    fn refused(&self) -> u64 {
        self.counters.iter().map(Counters::refused).sum()
    }

    fn log_of(&self, i: usize) -> PathBuf {
        self.dir
            .join(format!("{}.log", self.members[i].daemon.name))
    }

    /// Restarts PostgreSQL (an abrupt stop, as a crash would) on its own
    /// seeded schedule.
    fn postgres(&mut self, now: Instant, rng: &mut StdRng, next: &mut Instant) -> Result<()> {
        if self.pg.is_none() || now < *next {
            return Ok(());
        }
        let (pg, _) = self.pg.as_mut().expect("checked above");
        let began = Instant::now();
        pg.restart().context("restarting PostgreSQL")?;
        self.pg_restarts += 1;
        self.note(&format!(
            "PostgreSQL restarted (down {:.2}s)",
            began.elapsed().as_secs_f64()
        ));
        *next = Instant::now() + gap(rng, PG_RESTART_GAP.0, PG_RESTART_GAP.1);
        Ok(())
    }

    fn at(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&mut self, line: &str) {
        let line = format!("[{:7.2}s] {line}", self.at());
        println!("{line}");
        self.timeline.push_str(&line);
        self.timeline.push('\n');
    }

    /// The timeline goes to a file too, quietly.
    fn log(&mut self, line: &str) {
        let _ = writeln!(self.timeline, "[{:7.2}s] {line}", self.at());
    }

    /// Whether a dispatcher (with two, either) is up.
    fn dispatcher_up(&self) -> bool {
        self.members[..self.dispatchers]
            .iter()
            .any(|m| matches!(m.state, State::Up))
    }

    /// Restarts daemons whose stop, downtime or SIGTERM is over, and any
    /// that exited on their own.
    fn tend(&mut self, now: Instant) -> Result<()> {
        for i in 0..self.members.len() {
            let name = self.members[i].daemon.name.clone();
            match self.members[i].state {
                State::Up => {
                    if let Some(status) = self.members[i].daemon.exited()? {
                        if self.is_dispatcher(i) && self.pg.is_some() && self.stepped_down(i) {
                            self.members[i].tally.step_downs += 1;
                            self.counters[i].fold();
                            self.members[i].state = State::Down {
                                until: now + RESTART_AFTER_FAIL_STOP,
                            };
                            self.note(&format!(
                                "{name} stepped down, having lost its term ({status}); restarting it in {RESTART_AFTER_FAIL_STOP:?}"
                            ));
                            continue;
                        }
                        if i == DISPATCHER && self.disk.is_some() && self.failed_stop() {
                            self.members[i].tally.fail_stops += 1;
                            self.counters[i].fold();
                            self.members[i].state = State::Down {
                                until: now + RESTART_AFTER_FAIL_STOP,
                            };
                            self.note(&format!(
                                "{name} failed stop on its store ({status}); restarting it in {RESTART_AFTER_FAIL_STOP:?}"
                            ));
                            continue;
                        }
                        self.members[i].tally.crashes += 1;
                        self.note(&format!("{name} EXITED on its own ({status}); restarting"));
                        self.restart(i)?;
                    }
                }
                State::Stopped { until } if now >= until => {
                    self.members[i].daemon.signal("CONT")?;
                    self.members[i].state = State::Up;
                    self.log(&format!("SIGCONT {name}"));
                }
                State::Down { until } if now >= until => {
                    self.restart(i)?;
                    self.log(&format!("restarted {name} after SIGKILL"));
                }
                State::Terminating { since } => {
                    if let Some(status) = self.members[i].daemon.exited()? {
                        if !status.success() {
                            self.members[i].tally.unclean_terms += 1;
                            self.warnings
                                .push(format!("{name} exited with {status} after SIGTERM"));
                        }
                        self.restart(i)?;
                        self.log(&format!(
                            "{name} exited ({status}) {:.2}s after SIGTERM; restarted",
                            since.elapsed().as_secs_f64()
                        ));
                    } else if since.elapsed() > TERM_DEADLINE {
                        self.members[i].tally.slow_terms += 1;
                        self.warnings.push(format!(
                            "{name} had not exited {TERM_DEADLINE:?} after SIGTERM; SIGKILLed"
                        ));
                        self.restart(i)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the dispatcher's last exit was its fail-stop on a failing
    /// store (its log's last error says so).
    fn failed_stop(&self) -> bool {
        let tail = log_tail(&self.log_of(DISPATCHER));
        tail.contains("writes in a row") || tail.contains("--store-write-timeout")
    }

    /// Whether dispatcher `i`'s last exit was a leader's step-down (it
    /// lost or could not renew its term, or the database refused its
    /// term's writes), or a start that found no database (PostgreSQL was
    /// restarting) — both exits a service manager restarts.
    fn stepped_down(&self, i: usize) -> bool {
        let tail = log_tail(&self.log_of(i));
        [
            "stepping down",
            "closing after losing the term",
            "refused a write of this term",
            "opening the PostgreSQL job store",
        ]
        .iter()
        .any(|needle| tail.contains(needle))
            && !tail.contains("panicked")
    }

    /// Starts or ends storage episodes.
    fn storage(&mut self, now: Instant, rng: &mut StdRng, next: &mut Instant) -> Result<()> {
        if self.disk.is_none() {
            return Ok(());
        }
        if let Some((episode, until)) = self.episode
            && now >= until
        {
            self.end_episode()?;
            self.log(&format!("storage: {episode:?} over"));
            *next = now + gap(rng, 1000, 4000);
        }
        if self.episode.is_none() && now >= *next {
            let full = rng.random_bool(0.5);
            let hold = gap(rng, 500, 3000);
            let disk = self.disk.as_mut().expect("checked above");
            let what = if full {
                let bytes = disk.fill()?;
                self.storage.full += 1;
                self.storage.ballast += bytes;
                self.episode = Some((Episode::Full, now + hold));
                format!("DISK FULL ({} MiB of ballast)", bytes >> 20)
            } else {
                disk.freeze()?;
                self.storage.frozen += 1;
                self.episode = Some((Episode::Frozen, now + hold));
                "FSFREEZE the dispatcher's disk".to_owned()
            };
            self.note(&format!("{what} for {:.2}s", hold.as_secs_f64()));
        }
        Ok(())
    }

    fn end_episode(&mut self) -> Result<()> {
        if let Some(disk) = self.disk.as_mut() {
            disk.thaw()?;
            disk.free()?;
        }
        self.episode = None;
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        if self.is_dispatcher(i) {
            self.counters[i].fold();
        }
        let member = &mut self.members[i];
        member.daemon.restart()?;
        member.state = State::Up;
        Ok(())
    }

    /// Applies one drawn fault if its victim is up (the draw happens
    /// either way, so the schedule depends on the seed alone).
    fn strike(&mut self, victim: usize, action: Action, hold: Duration) -> Result<()> {
        if !matches!(self.members[victim].state, State::Up) {
            let name = self.members[victim].daemon.name.clone();
            self.log(&format!("skip {action:?} {name}: not up"));
            return Ok(());
        }
        if self.is_dispatcher(victim) && !matches!(action, Action::Stop) {
            // Its counters die with it: read them first.
            self.counters[victim].sample(&self.probes[victim]);
        }
        let is_dispatcher = self.is_dispatcher(victim);
        let now = Instant::now();
        let member = &mut self.members[victim];
        let name = member.daemon.name.clone();
        match action {
            Action::Kill => {
                member.daemon.kill()?;
                member.tally.kills += 1;
                member.state = State::Down { until: now + hold };
                if is_dispatcher {
                    self.counters[victim].fold();
                }
            }
            Action::Stop => {
                member.daemon.signal("STOP")?;
                member.tally.stops += 1;
                member.state = State::Stopped { until: now + hold };
            }
            Action::Restart => {
                member.daemon.signal("TERM")?;
                member.tally.restarts += 1;
                member.state = State::Terminating { since: now };
            }
        }
        let what = match action {
            Action::Kill => format!("SIGKILL {name} (down {:.2}s)", hold.as_secs_f64()),
            Action::Stop => format!("SIGSTOP {name} ({:.2}s)", hold.as_secs_f64()),
            Action::Restart => format!("SIGTERM {name} and restart"),
        };
        self.note(&what);
        Ok(())
    }

    /// The jobs of the commits made so far, by commit, when the dispatcher
    /// answers.
    fn jobs_by_commit(&self) -> Result<BTreeMap<String, Vec<JobInfo>>> {
        let mut by_commit: BTreeMap<String, Vec<JobInfo>> = BTreeMap::new();
        for job in self.probe().jobs()? {
            by_commit.entry(job.commit.clone()).or_default().push(job);
        }
        Ok(by_commit)
    }

    /// How many of the commits made have a job in a final status.
    fn finished(&self, by_commit: &BTreeMap<String, Vec<JobInfo>>) -> usize {
        self.expected
            .iter()
            .filter(|(c, _)| {
                by_commit
                    .get(c)
                    .is_some_and(|js| js.iter().all(|j| status_of(j).is_final()))
            })
            .count()
    }

    fn overdue(&self) -> bool {
        Instant::now() > self.deadline
    }
}

pub fn run(root: &Path, options: Options) -> Result<()> {
    let seed = options.seed.unwrap_or_else(rand::random);
    let n = options.commits;
    println!(
        "chaos: seed {seed} — replay with `cargo xtask chaos --commits {n} --seed {seed}{}{}{}`",
        if options.release { " --release" } else { "" },
        if options.storage_faults {
            " --storage-faults"
        } else {
            ""
        },
        match (options.postgres, options.dispatchers) {
            (false, _) => String::new(),
            (true, d) => format!(" --store postgres --dispatchers {d}"),
        }
    );
    let building = Instant::now();
    println!(
        "chaos: building the binaries ({})",
        if options.release { "release" } else { "debug" }
    );
    let bins = cluster::build(root, options.release)?;
    println!(
        "chaos: built in {:.1}s; the times below count from here",
        building.elapsed().as_secs_f64()
    );
    let started = Instant::now();

    let dir = cluster::target_dir(root).join("chaos");
    crate::disk::release_stale(&dir.join("dispatcher"));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let repo = dir.join("repo");
    fs::create_dir_all(&repo)?;
    cluster::git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
    let repo = repo.canonicalize()?;
    let repo_arg = repo.display().to_string();
    let first = cluster::commit(
        &repo,
        "chaos 0: passes",
        &[
            (".surveil.toml", PIPELINE),
            ("verdict", "pass\n"),
            ("delay", "0\n"),
            ("n", "0\n"),
        ],
    )?;

    let pg = if options.postgres {
        let pg = surveil_tests::postgres::Postgres::start().context(
            "PostgreSQL is needed for --store postgres (Debian: apt-get install postgresql)",
        )?;
        let db = pg.create_database()?;
        println!("chaos: PostgreSQL on {}, database {db}", pg.addr());
        Some((pg, db))
    } else {
        None
    };
    let names: Vec<&str> = if options.dispatchers == 1 {
        vec!["dispatcher"]
    } else {
        vec!["dispatcher-a", "dispatcher-b"]
    };
    let mut members = Vec::new();
    let mut probes = Vec::new();
    let mut addrs = Vec::new();
    let mut disk = None;
    for name in &names {
        // On a port below the ephemeral range, so nothing else takes it
        // while the dispatcher is down between a SIGKILL and its restart.
        let addr = format!("127.0.0.1:{}", cluster::stable_port()?);
        let state = dir.join(name);
        fs::create_dir_all(&state)?;
        if options.storage_faults {
            disk = Some(crate::disk::Disk::mount(
                &dir.join("dispatcher.img"),
                &state,
                DISK_MIB,
            )?);
        }
        let mut argv: Vec<String> = vec![
            "--listen".into(),
            addr.clone(),
            "--http-listen".into(),
            "off".into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--heartbeat-interval".into(),
            HEARTBEAT.into(),
            "--runner-timeout".into(),
            format!("{}ms", RUNNER_TIMEOUT.as_millis()),
            "--max-attempts".into(),
            MAX_ATTEMPTS.to_string(),
        ];
        if let Some((pg, db)) = &pg {
            argv.extend([
                "--store".into(),
                pg.url(db),
                "--store-password-file".into(),
                pg.password_file().display().to_string(),
                "--leader-ttl".into(),
                LEADER_TTL.into(),
            ]);
        }
        let daemon = Daemon::start(
            name,
            &bins.dispatcher,
            argv,
            vec![],
            dir.join(format!("{name}.log")),
        )?;
        let probe = Probe::new(&addr)?;
        members.push(Member {
            daemon,
            state: State::Up,
            tally: Tally::default(),
        });
        let i = members.len() - 1;
        // The first leads; a second stands by (its status says so).
        let want_standby = i > 0;
        wait_for(
            &format!(
                "{name} to answer GetStatus as a {}",
                if want_standby { "standby" } else { "leader" }
            ),
            STARTUP,
            POLL * 5,
            || {
                if let Some(status) = members[i].daemon.exited()? {
                    bail!("{name} exited at startup ({status})");
                }
                Ok(probe
                    .status()
                    .ok()
                    .filter(|s| pg.is_none() || s.standby == want_standby))
            },
        )
        .with_context(|| format!("see {}", dir.join(format!("{name}.log")).display()))?;
        probes.push(probe);
        addrs.push(addr);
    }
    let dispatch = addrs.join(",");
    for name in RUNNERS {
        let work = dir.join(name);
        fs::create_dir_all(&work)?;
        members.push(Member {
            daemon: Daemon::start(
                name,
                &bins.runner,
                vec![
                    "--dispatch".into(),
                    dispatch.clone(),
                    "--work-dir".into(),
                    work.display().to_string(),
                    "--name".into(),
                    name.into(),
                    "--drain-timeout".into(),
                    DRAIN_TIMEOUT.into(),
                ]
                .into_iter()
                .chain(cluster::runner_isolation_args())
                .chain([repo_arg.clone()])
                .collect(),
                vec![],
                dir.join(format!("{name}.log")),
            )?,
            state: State::Up,
            tally: Tally::default(),
        });
    }
    let observer_state = dir.join("observer");
    fs::create_dir_all(&observer_state)?;
    members.push(Member {
        daemon: Daemon::start(
            "observer",
            &bins.observer,
            vec![
                "--dispatch".into(),
                dispatch.clone(),
                "--state-dir".into(),
                observer_state.display().to_string(),
                "--every-commit".into(),
                "--interval".into(),
                "500ms".into(),
                repo_arg.clone(),
            ],
            vec![],
            dir.join("observer.log"),
        )?,
        state: State::Up,
        tally: Tally::default(),
    });

    let mut soak = Soak {
        started,
        // Generous because the machine may be shared; only reached when
        // something is stuck.
        deadline: Instant::now() + Duration::from_secs(n as u64) + Duration::from_secs(120),
        dir: dir.clone(),
        repo,
        probes,
        members,
        dispatchers: names.len(),
        counters: names.iter().map(|_| Counters::default()).collect(),
        pg,
        pg_restarts: 0,
        expected: vec![(first.clone(), "passed")],
        timeline: String::new(),
        warnings: Vec::new(),
        disk,
        storage: StorageTally::default(),
        episode: None,
    };
    soak.note(&format!(
        "cluster in {} ({} on {dispatch}{}, 3 runners, observer --every-commit)",
        dir.display(),
        names.join(" and "),
        if soak.pg.is_some() {
            ", PostgreSQL store"
        } else {
            ""
        }
    ));

    let result = drive(&mut soak, n, seed).and_then(|()| check(&mut soak));
    let shutdown = shut_down(&mut soak);
    if let Some(mut disk) = soak.disk.take() {
        let failed = !matches!(&result, Ok(f) if f.is_empty());
        let keep = (failed || options.keep).then(|| soak.dir.join("dispatcher-store"));
        disk.unmount(keep.as_deref())?;
    }
    let _ = fs::write(soak.dir.join("chaos.log"), &soak.timeline);
    let verdict = match result {
        Ok(failures) if failures.is_empty() => Ok(()),
        Ok(failures) => {
            for failure in &failures {
                eprintln!("chaos: FAILED: {failure}");
            }
            Err(anyhow::anyhow!("{} check(s) failed", failures.len()))
        }
        Err(err) => Err(err),
    };
    shutdown?;
    match verdict {
        Ok(()) => {
            if options.keep {
                println!("cluster directory kept: {}", soak.dir.display());
            } else {
                fs::remove_dir_all(&soak.dir).ok();
            }
            println!(
                "chaos: OK — {n} commits, seed {seed}, {:.1}s",
                soak.started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(err) => {
            println!(
                "\nchaos: logs and store kept in {} (dispatcher.log, runner-*.log, observer.log, chaos.log, dispatcher/surveil.db or, with --storage-faults, dispatcher-store/surveil.db); seed {seed}",
                soak.dir.display()
            );
            Err(err)
        }
    }
}

/// Waits for the cluster to be whole, then streams the commits under
/// chaos, then lets everything settle.
fn drive(soak: &mut Soak, n: usize, seed: u64) -> Result<()> {
    let (probe, first) = (soak.probe(), soak.expected[0].0.clone());
    wait_for(
        "three runners connected and the first commit submitted",
        STARTUP,
        POLL * 10,
        || {
            let runners = probe.runners()?.len();
            let submitted = probe.job_of(&first)?.is_some();
            Ok((runners == RUNNERS.len() && submitted).then_some(()))
        },
    )?;
    soak.note("runners connected, first commit submitted: chaos starts");

    // Separate streams, so a change in how many commits are made does not
    // shift the fault schedule and vice versa.
    let mut faults = StdRng::seed_from_u64(seed);
    let mut contents = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut pace = StdRng::seed_from_u64(seed.rotate_left(17) ^ 0x5851_f42d);
    let mut storage = StdRng::seed_from_u64(seed.rotate_right(23) ^ 0x2545_f491_4f6c_dd1d);
    let mut next_storage = Instant::now() + gap(&mut storage, 1000, 4000);
    let mut pg_faults = StdRng::seed_from_u64(seed.rotate_left(41) ^ 0x94d0_49bb_1331_11eb);
    let mut next_pg = Instant::now() + gap(&mut pg_faults, PG_RESTART_GAP.0, PG_RESTART_GAP.1);

    let mut made = 0usize;
    let mut next_commit = Instant::now();
    let mut next_fault = Instant::now() + gap(&mut faults, 500, 2000);
    let mut next_status = Instant::now();
    let mut next_jobs = Instant::now();
    let mut last_commit_at = None::<Instant>;
    let mut all_final = false;
    loop {
        let now = Instant::now();
        if soak.overdue() {
            bail!("the soak passed its deadline during the chaos phase");
        }
        soak.tend(now)?;
        soak.storage(now, &mut storage, &mut next_storage)?;
        soak.postgres(now, &mut pg_faults, &mut next_pg)?;
        if made < n && now >= next_commit {
            made += 1;
            let fails = contents.random_bool(FAILING_SHARE);
            let delay_ms: u32 = contents.random_range(0..=300);
            let verdict = if fails { "fail\n" } else { "pass\n" };
            let commit = cluster::commit(
                &soak.repo,
                &format!("chaos {made}: {}", if fails { "fails" } else { "passes" }),
                &[
                    ("verdict", verdict),
                    (
                        "delay",
                        &format!("{}.{:03}\n", delay_ms / 1000, delay_ms % 1000),
                    ),
                    ("n", &format!("{made}\n")),
                ],
            )?;
            soak.log(&format!(
                "commit {made}/{n} {} {}",
                &commit[..10],
                if fails { "fails" } else { "passes" }
            ));
            soak.expected
                .push((commit, if fails { "failed" } else { "passed" }));
            next_commit = now + gap(&mut pace, COMMIT_GAP.0, COMMIT_GAP.1);
            if made == n {
                last_commit_at = Some(now);
                soak.note(&format!("all {n} commits made"));
            }
        }
        if now >= next_fault {
            let victim = faults.random_range(0..soak.members.len());
            let action = match faults.random_range(0..3) {
                0 => Action::Kill,
                1 => Action::Stop,
                _ => Action::Restart,
            };
            let hold = gap(&mut faults, 200, 1500);
            soak.strike(victim, action, hold)?;
            next_fault = Instant::now() + gap(&mut faults, 500, 2000);
        }
        if now >= next_status && soak.dispatcher_up() {
            soak.sample();
            next_status = Instant::now() + STATUS_POLL;
        }
        if let Some(last) = last_commit_at {
            if now >= next_jobs && soak.dispatcher_up() {
                if let Ok(by_commit) = soak.jobs_by_commit() {
                    all_final = soak.finished(&by_commit) == soak.expected.len();
                }
                next_jobs = Instant::now() + JOBS_POLL;
            }
            if all_final || now.duration_since(last) > CHAOS_TAIL {
                break;
            }
        }
        std::thread::sleep(POLL);
    }
    soak.note(&format!(
        "chaos ends ({}); continuing stopped daemons and restarting dead ones",
        if all_final {
            "every job final"
        } else {
            "tail over"
        }
    ));
    settle(soak)
}

/// The last 4 KiB of a daemon's log, where its exit's reason is.
fn log_tail(path: &Path) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    let mut from = log.len().saturating_sub(4096);
    while !log.is_char_boundary(from) {
        from += 1;
    }
    log[from..].to_owned()
}

/// A random duration in `lo..=hi` milliseconds.
fn gap(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// Every daemon back up; waits (bounded by the overall deadline) until
/// every commit has a job in a final status and no runner holds a lease.
fn settle(soak: &mut Soak) -> Result<()> {
    if soak.episode.is_some() {
        soak.end_episode()?;
        soak.log("storage: episode ended (settling)");
    }
    for i in 0..soak.members.len() {
        let name = soak.members[i].daemon.name.clone();
        match soak.members[i].state {
            State::Stopped { .. } => {
                soak.members[i].daemon.signal("CONT")?;
                soak.members[i].state = State::Up;
                soak.log(&format!("SIGCONT {name} (settling)"));
            }
            State::Down { .. } => {
                soak.restart(i)?;
                soak.log(&format!("restarted {name} (settling)"));
            }
            State::Up | State::Terminating { .. } => {}
        }
    }
    let mut last_report = Instant::now();
    let mut phase = "every commit's job in a final status";
    loop {
        if soak.overdue() {
            soak.note(&format!("deadline reached while waiting for {phase}"));
            return Ok(());
        }
        soak.tend(Instant::now())?;
        let up = soak.members.iter().all(|m| matches!(m.state, State::Up));
        if up {
            soak.sample();
            if let (Ok(by_commit), Ok(runners)) = (soak.jobs_by_commit(), soak.probe().runners()) {
                let finished = soak.finished(&by_commit);
                let leases: usize = runners.iter().map(|r| r.running.len()).sum();
                if finished == soak.expected.len() {
                    phase = "the runners to release their leases";
                    if leases == 0 {
                        soak.note(&format!(
                            "settled: {finished} jobs final, no lease held, {} runners connected",
                            runners.len()
                        ));
                        return Ok(());
                    }
                }
                if last_report.elapsed() > Duration::from_secs(5) {
                    let missing = soak
                        .expected
                        .iter()
                        .filter(|(c, _)| !by_commit.contains_key(c))
                        .count();
                    soak.note(&format!(
                        "waiting for {phase}: {finished}/{} final, {missing} commits without a job, {leases} leases held",
                        soak.expected.len()
                    ));
                    last_report = Instant::now();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads the record and returns the failed checks (empty when all held).
fn check(soak: &mut Soak) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let leader = soak.leader_index();
    let probe = &soak.probes[leader];
    let jobs = probe
        .jobs()
        .context("listing the jobs for the final check")?;
    let attempts = match &soak.pg {
        Some((pg, db)) => record::attempts_pg(pg, db)?,
        None => record::attempts(&soak.dir.join("dispatcher"))?,
    };
    let mut by_commit: BTreeMap<&str, Vec<&JobInfo>> = BTreeMap::new();
    for job in &jobs {
        by_commit.entry(job.commit.as_str()).or_default().push(job);
    }
    let made: BTreeSet<&str> = soak.expected.iter().map(|(c, _)| c.as_str()).collect();

    let lost: Vec<&str> = soak
        .expected
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !by_commit.contains_key(c))
        .collect();
    let doubled_jobs: Vec<&str> = by_commit
        .iter()
        .filter(|(_, js)| js.len() > 1)
        .map(|(c, _)| *c)
        .collect();
    let strangers = jobs
        .iter()
        .filter(|j| !made.contains(j.commit.as_str()))
        .count();

    let mut duplicated = Vec::new();
    let mut one_final = 0usize;
    let mut wrong = Vec::new();
    let mut exhausted = Vec::new();
    let mut unfinished = Vec::new();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (commit, want) in &soak.expected {
        let Some(job) = by_commit.get(commit.as_str()).and_then(|js| js.first()) else {
            continue;
        };
        let status = status_of(job);
        *outcomes.entry(status.label()).or_default() += 1;
        let results = record::results_of(&attempts, job.id);
        if results.len() > 1 {
            duplicated.push(format!(
                "job {} ({}) has {} recorded results: {}",
                job.id,
                &commit[..10],
                results.len(),
                describe_attempts(&results)
            ));
        }
        if !status.is_final() {
            unfinished.push(job);
            continue;
        }
        let recorded_matches = match status {
            JobStatus::Passed | JobStatus::Failed => {
                results.len() == 1 && results[0].result_status.as_deref() == Some(status.label())
            }
            _ => results.is_empty(),
        };
        if recorded_matches {
            one_final += 1;
        } else if results.len() <= 1 {
            wrong.push(format!(
                "job {} is {} but its recorded results are [{}]",
                job.id,
                status.label(),
                describe_attempts(&results)
            ));
        }
        match status {
            JobStatus::Error if job.attempt >= MAX_ATTEMPTS => exhausted.push(format!(
                "job {} ({}) after {} attempts: {}",
                job.id,
                &commit[..10],
                job.attempt,
                job.message.as_deref().unwrap_or("-")
            )),
            s if s.label() == *want => {}
            s => wrong.push(format!(
                "commit {} should be {want}, job {} is {} (attempt {}{})",
                &commit[..10],
                job.id,
                s.label(),
                job.attempt,
                job.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
        }
    }

    // A `running` job no runner holds a lease on is a zombie only if it
    // stays so past a runner timeout: a runner may be reattaching.
    let leased = |probe: &Probe| -> Result<BTreeSet<u64>> {
        Ok(probe
            .runners()?
            .iter()
            .flat_map(|r| r.running.iter().copied())
            .collect())
    };
    let orphaned = |probe: &Probe| -> Result<BTreeSet<u64>> {
        let held = leased(probe)?;
        Ok(probe
            .jobs()?
            .iter()
            .filter(|j| status_of(j) == JobStatus::Running && !held.contains(&j.id))
            .map(|j| j.id)
            .collect())
    };
    let mut zombies = orphaned(probe)?;
    if !zombies.is_empty() {
        std::thread::sleep(RUNNER_TIMEOUT * 3);
        let again = orphaned(probe)?;
        zombies = zombies.intersection(&again).copied().collect();
    }
    let final_ids: BTreeSet<u64> = jobs
        .iter()
        .filter(|j| status_of(j).is_final())
        .map(|j| j.id)
        .collect();
    let stale_leases: Vec<u64> = leased(probe)?
        .into_iter()
        .filter(|id| final_ids.contains(id))
        .collect();
    soak.counters[leader].sample(probe);

    // Why attempts ended early, from the store: each is a reassignment or
    // a revoked lease.
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a.ended_reason.is_some()) {
        *ended
            .entry(reason_kind(a.ended_reason.as_deref().unwrap_or("")))
            .or_default() += 1;
    }
    let mut by_attempts: BTreeMap<u32, usize> = BTreeMap::new();
    for job in &jobs {
        *by_attempts.entry(job.attempt).or_default() += 1;
    }

    println!("\n== chaos: record ==");
    println!("commits made                    {:>6}", soak.expected.len());
    println!("jobs                            {:>6}", jobs.len());
    println!("lost (commit without a job)     {:>6}", lost.len());
    println!("commits with more than one job  {:>6}", doubled_jobs.len());
    println!("jobs for commits not made       {:>6}", strangers);
    println!(
        "jobs with exactly one final status {:>3}/{}",
        one_final,
        soak.expected.len()
    );
    println!("duplicated (two results)        {:>6}", duplicated.len());
    println!("zombies (running, no lease)     {:>6}", zombies.len());
    println!("unfinished (queued/running)     {:>6}", unfinished.len());
    println!("wrong outcome                   {:>6}", wrong.len());
    println!(
        "error after {MAX_ATTEMPTS} attempts (exhausted) {:>3}",
        exhausted.len()
    );
    println!("leases held on final jobs       {:>6}", stale_leases.len());
    println!(
        "outcomes                        {}",
        outcomes
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "jobs by attempts                {}",
        by_attempts
            .iter()
            .map(|(a, n)| format!("{a}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "reassignments (GetStatus, summed over dispatcher lives) {}",
        soak.reassignments()
    );
    println!(
        "refused results (GetStatus, summed)                     {}",
        soak.refused()
    );
    println!(
        "attempts ended without a result (store)                 {}{}",
        ended.values().sum::<usize>(),
        if ended.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                ended
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );

    println!("\n== chaos: faults ==");
    println!(
        "{:<12} {:>5} {:>5} {:>8} {:>7} {:>9} {:>12} {:>10} {:>10}",
        "DAEMON",
        "KILLS",
        "STOPS",
        "RESTARTS",
        "CRASHES",
        "SLOW-TERM",
        "UNCLEAN-TERM",
        "FAIL-STOPS",
        "STEP-DOWNS"
    );
    let mut total = Tally::default();
    for m in &soak.members {
        let t = m.tally;
        println!(
            "{:<12} {:>5} {:>5} {:>8} {:>7} {:>9} {:>12} {:>10} {:>10}",
            m.daemon.name,
            t.kills,
            t.stops,
            t.restarts,
            t.crashes,
            t.slow_terms,
            t.unclean_terms,
            t.fail_stops,
            t.step_downs
        );
        total.kills += t.kills;
        total.stops += t.stops;
        total.restarts += t.restarts;
        total.crashes += t.crashes;
    }
    println!(
        "{:<12} {:>5} {:>5} {:>8} {:>7}",
        "total", total.kills, total.stops, total.restarts, total.crashes
    );
    if let Some((pg, db)) = &soak.pg {
        // The database refuses every write of a term that is no longer
        // the leader row's; a deposed dispatcher logs each refusal.
        let refused: usize = (0..soak.dispatchers)
            .map(|i| {
                fs::read_to_string(soak.log_of(i))
                    .unwrap_or_default()
                    .matches("refused a write of this term")
                    .count()
            })
            .sum();
        let term = pg.psql(db, "SELECT term FROM leader").unwrap_or_default();
        println!(
            "postgres: {} restarts; leader term now {term}; writes refused from a deposed term (dispatchers' logs) {refused}",
            soak.pg_restarts
        );
    }
    if soak.disk.is_some() {
        println!(
            "storage: {} disk-full episodes ({} MiB of ballast in all), {} freezes of the dispatcher's disk",
            soak.storage.full,
            soak.storage.ballast >> 20,
            soak.storage.frozen
        );
    }
    println!("elapsed {:.1}s", soak.started.elapsed().as_secs_f64());

    for (what, list) in [
        ("duplicated", &duplicated),
        ("wrong outcome", &wrong),
        ("exhausted (not a failure)", &exhausted),
    ] {
        for line in list.iter() {
            println!("  {what}: {line}");
        }
    }
    for warning in &soak.warnings {
        println!("  warning: {warning}");
    }

    if !lost.is_empty() {
        failures.push(format!(
            "{} commit(s) lost: {}",
            lost.len(),
            lost.iter().map(|c| &c[..10]).collect::<Vec<_>>().join(" ")
        ));
    }
    if !doubled_jobs.is_empty() {
        failures.push(format!(
            "{} commit(s) with more than one job",
            doubled_jobs.len()
        ));
    }
    if !duplicated.is_empty() {
        failures.push(format!(
            "{} job(s) with two recorded results",
            duplicated.len()
        ));
    }
    if !zombies.is_empty() {
        failures.push(format!(
            "{} zombie job(s) (running, no runner holds the lease): {zombies:?}",
            zombies.len()
        ));
    }
    if !unfinished.is_empty() {
        failures.push(format!(
            "{} job(s) never reached a final status: {}",
            unfinished.len(),
            unfinished
                .iter()
                .map(|j| surveil_tests::probe::describe(j))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !wrong.is_empty() {
        failures.push(format!("{} wrong outcome(s)", wrong.len()));
    }
    if !stale_leases.is_empty() {
        failures.push(format!(
            "runners still hold leases on final jobs {stale_leases:?}"
        ));
    }
    if soak.disk.is_some() && !exhausted.is_empty() {
        // With storage faults the promise is stronger: a failing disk
        // alone must never turn a build red or into `error`.
        failures.push(format!(
            "{} job(s) ended error after exhausting their attempts under storage faults",
            exhausted.len()
        ));
    }
    if total.crashes > 0 {
        failures.push(format!("{} daemon exit(s) nobody asked for", total.crashes));
    }
    Ok(failures)
}

fn describe_attempts(attempts: &[&Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            format!(
                "attempt {} on {} {}",
                a.attempt,
                a.runner,
                a.result_status.as_deref().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An attempt's end reason without the runner's name, so the same cause
/// on different runners groups together.
fn reason_kind(reason: &str) -> String {
    // A drain's hand-back: "runner NAME shutting down: WHAT".
    if let Some((_, what)) = reason.split_once(" shutting down: ") {
        let what = if what.contains("never started") {
            "never started"
        } else {
            "cut off"
        };
        return format!("handed back by a draining runner ({what})");
    }
    match reason
        .strip_prefix("runner ")
        .and_then(|r| r.split_once(": "))
    {
        Some((_name, rest)) => rest.trim().to_owned(),
        None => reason.trim().to_owned(),
    }
}

/// SIGCONT anything stopped, then SIGTERM every daemon, observer first.
fn shut_down(soak: &mut Soak) -> Result<()> {
    for member in &mut soak.members {
        if matches!(member.state, State::Stopped { .. }) {
            member.daemon.signal("CONT").ok();
            member.state = State::Up;
        }
    }
    let order: Vec<usize> = (soak.dispatchers..soak.members.len())
        .rev()
        .chain(0..soak.dispatchers)
        .collect();
    for i in order {
        let member = &mut soak.members[i];
        let name = member.daemon.name.clone();
        if member.daemon.pid().is_none() {
            continue;
        }
        match member.daemon.terminate(Duration::from_secs(20)) {
            Ok(status) if status.success() => {}
            Ok(status) => soak
                .warnings
                .push(format!("{name} exited with {status} at the final SIGTERM")),
            Err(err) => soak.warnings.push(format!("{name}: {err:#}")),
        }
    }
    for warning in soak.warnings.iter().filter(|w| w.contains("final SIGTERM")) {
        println!("  warning: {warning}");
    }
    Ok(())
}
