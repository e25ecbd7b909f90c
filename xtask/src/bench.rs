//! `cargo xtask bench [--quick] [--only S]`: runs the benchmark scenarios on
//! a local cluster of release binaries, prints each figure's min/median/max
//! beside its target and writes `target/bench/report.json`.
//!
//! A benchmark reports; it never fails the build: a missed target or a
//! scenario that could not run is recorded (`met: false`, `error`) and the
//! command still exits 0. Only a failure to build the binaries is an error.
//! The scenarios live in submodules; this file owns the options, the figure
//! and report types, the `/proc` readers and the shared cluster helpers.

mod checkout;
mod client;
mod codec;
mod ha;
mod http;
mod latency;
mod logs;
mod scale;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use surveil_tests::cluster::{self, Bins, Daemon};

pub use checkout::tool as checkout_tool;
pub use scale::load as load_tool;

use client::Client;

/// Every scenario id, in the order they run.
pub const SCENARIOS: [&str; 15] = [
    "S1", "S2", "S3a", "S3b", "S4", "M", "C", "codec", "H1", "H2", "H3", "L", "P2", "P4", "F",
];

#[derive(Debug, Default)]
pub struct Options {
    pub quick: bool,
    /// Scenario ids to run (case-insensitive); empty means all.
    pub only: Vec<String>,
}

impl Options {
    /// Parses `--quick` and `--only S[,S…]` (repeatable).
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--only" => {
                    let value = args.next().context("--only needs a scenario id")?;
                    for id in value.split(',').filter(|s| !s.is_empty()) {
                        let known = SCENARIOS.iter().find(|s| s.eq_ignore_ascii_case(id));
                        match known {
                            Some(id) => options.only.push((*id).to_owned()),
                            None => bail!(
                                "--only {id}: unknown scenario (known: {})",
                                SCENARIOS.join(", ")
                            ),
                        }
                    }
                }
                other => bail!("bench: unknown argument `{other}` (expected --quick, --only S)"),
            }
        }
        Ok(options)
    }

    fn selected(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == id)
    }
}

/// What a figure is held against; decided on the median.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
    /// Shown for context; no target of its own.
    Info,
}

impl Target {
    fn met(self, median: f64) -> Option<bool> {
        match self {
            Target::AtMost(limit) => Some(median <= limit),
            Target::AtLeast(floor) => Some(median >= floor),
            Target::Info => None,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Target::AtMost(v) => format!("≤ {} {unit}", number(v)),
            Target::AtLeast(v) => format!("≥ {} {unit}", number(v)),
            Target::Info => "—".to_owned(),
        }
    }
}

/// One measured quantity and its samples (one per run).
#[derive(Debug)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    pub target: Target,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: &'static str, target: Target) -> Figure {
        Figure {
            name: name.into(),
            unit,
            samples: Vec::new(),
            target,
        }
    }

    /// (min, median, max); `None` without samples.
    fn stats(&self) -> Option<(f64, f64, f64)> {
        let mut sorted = self.samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some((sorted[0], median, sorted[n - 1]))
    }

    fn met(&self) -> Option<bool> {
        match self.stats() {
            Some((_, median, _)) => self.target.met(median),
            None => match self.target {
                Target::Info => None,
                _ => Some(false),
            },
        }
    }
}

/// A scenario's outcome: its figures, and the error that cut it short.
#[derive(Debug)]
pub struct Outcome {
    pub id: &'static str,
    pub title: &'static str,
    pub target: &'static str,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl Outcome {
    pub fn new(id: &'static str, title: &'static str, target: &'static str) -> Outcome {
        Outcome {
            id,
            title,
            target,
            figures: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    /// Every figure with a target met it, and the scenario ran to its end.
    fn met(&self) -> bool {
        self.error.is_none() && self.figures.iter().all(|f| f.met() != Some(false))
    }

    fn to_json(&self) -> Value {
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|f| {
                let stats = f.stats();
                let target = match f.target {
                    Target::AtMost(v) => json!({"max": v}),
                    Target::AtLeast(v) => json!({"min": v}),
                    Target::Info => Value::Null,
                };
                (
                    f.name.clone(),
                    json!({
                        "unit": f.unit,
                        "min": stats.map(|s| s.0),
                        "median": stats.map(|s| s.1),
                        "max": stats.map(|s| s.2),
                        "samples": f.samples,
                        "target": target,
                        "met": f.met(),
                    }),
                )
            })
            .collect();
        json!({
            "title": self.title,
            "target": self.target,
            "met": self.met(),
            "figures": figures,
            "notes": self.notes,
            "error": self.error,
        })
    }
}

/// What every scenario gets: the binaries, where to put its files, the mode.
pub struct Env {
    /// The workspace root.
    pub root: PathBuf,
    pub bins: Bins,
    /// The release build of this xtask, for the load and checkout tools.
    pub tool: PathBuf,
    pub dir: PathBuf,
    pub quick: bool,
}

impl Env {
    /// A fresh, empty directory `target/bench/<name>`.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Starts a dispatcher on a free port with its state under `dir`, and
    /// waits until it answers a client.
    pub fn dispatcher(&self, dir: &Path, extra: &[&str]) -> Result<(Daemon, String)> {
        let addr = format!("127.0.0.1:{}", cluster::free_port()?);
        let state = dir.join("dispatcher");
        fs::create_dir_all(&state)?;
        let mut args = vec![
            "--listen".to_owned(),
            addr.clone(),
            "--state-dir".to_owned(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        if !extra.contains(&"--http-listen") {
            args.extend(["--http-listen".to_owned(), "off".to_owned()]);
        }
        let daemon = Daemon::start(
            "dispatcher",
            &self.bins.dispatcher,
            args,
            vec![],
            dir.join("dispatcher.log"),
        )?;
        Client::connect_within(&addr, Duration::from_secs(20))?;
        Ok((daemon, addr))
    }

    pub fn runner(&self, dir: &Path, name: &str, dispatch: &str, repos: &[&str]) -> Result<Daemon> {
        let work = dir.join(name);
        fs::create_dir_all(&work)?;
        let mut args = vec![
            "--dispatch".to_owned(),
            dispatch.to_owned(),
            "--work-dir".to_owned(),
            work.display().to_string(),
            "--name".to_owned(),
            name.to_owned(),
        ];
        args.extend(cluster::runner_isolation_args());
        args.extend(repos.iter().map(|s| (*s).to_owned()));
        Daemon::start(
            name,
            &self.bins.runner,
            args,
            vec![],
            dir.join(format!("{name}.log")),
        )
    }

    pub fn observer(
        &self,
        dir: &Path,
        name: &str,
        dispatch: &str,
        repo: &str,
        extra: &[&str],
    ) -> Result<Daemon> {
        let state = dir.join(name);
        fs::create_dir_all(&state)?;
        let mut args = vec![
            "--dispatch".to_owned(),
            dispatch.to_owned(),
            "--state-dir".to_owned(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(repo.to_owned());
        Daemon::start(
            name,
            &self.bins.observer,
            args,
            vec![],
            dir.join(format!("{name}.log")),
        )
    }
}

/// A scratch repository whose pipeline is one task running `command`; its
/// canonical path (what jobs name) is returned.
pub fn pipeline_repo(dir: &Path, command: &str) -> Result<String> {
    fs::create_dir_all(dir)?;
    cluster::git(dir, &["init", "--quiet", "--initial-branch=main"])?;
    let pipeline = format!("[[task]]\nname = \"bench\"\nrun = \"{command}\"\n");
    cluster::commit(dir, "pipeline", &[(".surveil.toml", &pipeline)])?;
    Ok(fs::canonicalize(dir)?.display().to_string())
}

/// Waits until `count` runners are connected with nothing running.
pub fn wait_idle_runners(client: &mut Client, count: usize, deadline: Duration) -> Result<()> {
    cluster::wait_for(
        &format!("{count} idle runners"),
        deadline,
        Duration::from_millis(20),
        || {
            let runners = client.runners()?;
            Ok(
                (runners.len() == count && runners.iter().all(|r| r.running.is_empty()))
                    .then_some(()),
            )
        },
    )
}

/// Milliseconds since the Unix epoch, the dispatcher's timestamp unit.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after
    // the last `)`. utime and stime are fields 14 and 15 of the line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("non-numeric /proc/PID/stat field")
    };
    let total = ticks(11)? + ticks(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .filter(|&h| h > 0)
        .unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// A `Vm…` line of `/proc/PID/status`, in MiB.
pub fn vm_mib(pid: u32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: f64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("reading {line}"))?;
    Ok(kib / 1024.0)
}

/// Raises this process's open-file soft limit to its hard limit, so it and
/// the daemons it starts (which inherit it) can hold many connections.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

pub fn run(root: &Path, options: Options) -> Result<()> {
    let started = Instant::now();
    println!("bench: building release binaries (once; later runs reuse them)");
    let bins = build_daemons(root)?;
    let tool = release_tool(root)?;
    let dir = cluster::target_dir(root).join("bench");
    fs::create_dir_all(&dir)?;
    let nofile = raise_nofile();
    // Other work on the machine skews every figure: say how busy it was.
    let load_at_start = loadavg();
    let env = Env {
        root: root.to_owned(),
        bins,
        tool,
        dir: dir.clone(),
        quick: options.quick,
    };
    println!(
        "bench: {} mode, open-file limit {nofile}, build took {:.0} s, load average {load_at_start}",
        if options.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );

    let mut outcomes = Vec::new();
    type Scenario = fn(&Env, &mut Outcome) -> Result<()>;
    let scenarios: [(&'static str, &'static str, &'static str, Scenario); 15] = [
        (
            "S1",
            "commit → result, 1 runner, pipeline `true`",
            "≤ 100 ms median with ref watch; ≤ interval + 100 ms polling",
            latency::s1,
        ),
        (
            "S2",
            "200 commits at once, --every-commit, 4 runners",
            "≥ 50 jobs/s; dispatcher CPU ≤ 5 ms per job; all 200 built",
            latency::s2,
        ),
        (
            "S3a",
            "SIGKILL the runner 1 s into `sleep 5`: kill → started on the other",
            "≤ 0.3 s",
            latency::s3a,
        ),
        (
            "S3b",
            "SIGSTOP the runner, default timeouts: stop → started on the other",
            "≤ runner timeout + 1 s",
            latency::s3b,
        ),
        (
            "S4",
            "N simulated runners from one load process",
            "10,000 connected in ≤ 10 s; ≤ 25 % of one core idle; ≤ 200 MiB",
            scale::s4,
        ),
        (
            "M",
            "idle memory (VmHWM) of each daemon",
            "dispatcher ≤ 15 MiB, runner ≤ 10 MiB, observer ≤ 10 MiB",
            scale::memory,
        ),
        (
            "C",
            "checkout of a commit in a 2,000-file, 200-commit repo",
            "gix ≤ git",
            checkout::c,
        ),
        (
            "codec",
            "criterion: encode and decode of Assign and 64 KiB Log frames",
            "MB/s (no target)",
            codec::codec,
        ),
        (
            "H1",
            "HTTP with 100,000 jobs stored: /api/v1/jobs?limit=50 and the home page",
            "≤ 20 ms at p99 each",
            http::h1,
        ),
        (
            "H2",
            "a line printed by a task → an SSE follower of its log",
            "≤ 100 ms median",
            http::h2,
        ),
        (
            "H3",
            "200 SSE followers of one busy job",
            "≤ 10 % of a core for the dispatcher",
            http::h3,
        ),
        (
            "L",
            "log ingest: a task printing 1 GiB, --max-log-size raised",
            "MiB/s into the store (no target); dispatcher VmHWM ≤ 64 MiB; status ≤ 100 ms median",
            logs::l,
        ),
        (
            "P2",
            "S2 with the dispatcher's store in PostgreSQL",
            "≥ 100 jobs/s; dispatcher CPU ≤ 5 ms per job; all 200 built",
            ha::p2,
        ),
        (
            "P4",
            "S4 with the leader's store in PostgreSQL",
            "10,000 connected in ≤ 10 s; ≤ 25 % of one core idle; ≤ 200 MiB",
            ha::p4,
        ),
        (
            "F",
            "failover: the leader SIGKILLed while a job streams its log",
            "standby leads and the next log line is accepted ≤ TTL + 1 s (4 s); the job keeps its attempt",
            ha::f,
        ),
    ];
    for (id, title, target, scenario) in scenarios {
        if !options.selected(id) {
            continue;
        }
        let mut outcome = Outcome::new(id, title, target);
        let at = Instant::now();
        println!("bench: {id}: {title}");
        if let Err(err) = scenario(&env, &mut outcome) {
            println!("bench: {id} stopped: {err:#}");
            outcome.error = Some(format!("{err:#}"));
        }
        println!(
            "bench: {id} took {:.1} s{}",
            at.elapsed().as_secs_f64(),
            if outcome.met() {
                ""
            } else {
                " (target missed)"
            }
        );
        outcomes.push(outcome);
    }

    let table = table(&outcomes);
    println!("\n{table}");
    let report = json!({
        "quick": options.quick,
        "machine": machine(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": loadavg(),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "scenarios": outcomes
            .iter()
            .map(|o| (o.id.to_owned(), o.to_json()))
            .collect::<serde_json::Map<_, _>>(),
    });
    let path = dir.join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!(
        "bench: report written to {} ({:.0} s in all; load average now {})",
        path.display(),
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

/// The daemons in release. `cluster::build` also builds the CLI, which the
/// benchmark does not use; when the CLI alone does not build, the three
/// daemons are built without it so the benchmark still runs.
fn build_daemons(root: &Path) -> Result<Bins> {
    match cluster::build(root, true) {
        Ok(bins) => Ok(bins),
        Err(err) => {
            println!("bench: building all four binaries failed ({err:#}); building the daemons");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = Command::new(&cargo)
                .current_dir(root)
                .args(["build", "--quiet", "--release", "--bins"])
                .args(["-p", "surveil-dispatcher", "-p", "surveil-runner"])
                .args(["-p", "surveil-observer"])
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build --release of the daemons failed ({status})");
            }
            let dir = cluster::target_dir(root).join("release");
            Ok(Bins {
                dispatcher: dir.join("surveil-dispatcher"),
                runner: dir.join("surveil-runner"),
                observer: dir.join("surveil-observer"),
                cli: dir.join("surveil"),
            })
        }
    }
}

/// This xtask in release, which runs the load process of S4 and the gix
/// side of C at the speed a runner has: the running binary when it is
/// already optimised, else a release build of it.
fn release_tool(root: &Path) -> Result<PathBuf> {
    if !cfg!(debug_assertions) {
        return std::env::current_exe().context("locating this xtask binary");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--quiet", "--release", "-p", "xtask"])
        .status()
        .context("running cargo build -p xtask --release")?;
    if !status.success() {
        bail!("cargo build --release -p xtask failed ({status})");
    }
    Ok(cluster::target_dir(root).join("release").join("xtask"))
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The results as a Markdown table (readable in a terminal too).
fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    out.push_str("| id | figure | min | median | max | unit | target | met |\n");
    out.push_str("| --- | --- | ---: | ---: | ---: | --- | --- | --- |\n");
    for outcome in outcomes {
        for figure in &outcome.figures {
            let (min, median, max) = match figure.stats() {
                Some((a, b, c)) => (number(a), number(b), number(c)),
                None => ("—".into(), "—".into(), "—".into()),
            };
            let met = match figure.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {min} | {median} | {max} | {} | {} | {met} |",
                outcome.id,
                figure.name,
                figure.unit,
                figure.target.describe(figure.unit),
            );
        }
        if let Some(err) = &outcome.error {
            let _ = writeln!(
                out,
                "| {} | (stopped: {}) | | | | | {} | **no** |",
                outcome.id,
                err.replace('|', "/").replace('\n', " "),
                outcome.target
            );
        }
    }
    for outcome in outcomes {
        for note in &outcome.notes {
            let _ = writeln!(out, "\n{}: {note}", outcome.id);
        }
    }
    out
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The machine the figures come from.
fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "memory_mib": mem_kib.map(|k| k / 1024),
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
    })
}
