//! The scene every story starts from: the binaries built once per test
//! binary, a scratch directory with a git repository, a dispatcher on its
//! own port with short intervals, runners added on demand, and a `Probe`
//! asking the dispatcher over the wire. Jobs are held open by a *gate*
//! file the test creates, so "mid-job" is a state the test controls rather
//! than a sleep it hopes is long enough.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use surveil_proto::{JobInfo, JobStatus};
use surveil_tests::cluster::{self, Bins, Daemon, wait_for};
use surveil_tests::probe::{Probe, describe, status_of};

/// The longest any single awaited step may take; generous because the
/// machine is shared, and only reached when something is broken.
pub const STEP: Duration = Duration::from_secs(30);
/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(50);

/// The stdout of a command that must have succeeded (else its stderr is
/// the failure).
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the daemons once for all the stories in this binary.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ is inside the workspace");
        cluster::build(root, false).expect("building the daemons")
    })
}

/// One story's cluster. Dropping it kills every daemon it started and
/// opens every gate (so task processes orphaned by a SIGKILLed runner end).
pub struct Scene {
    pub dir: tempfile::TempDir,
    /// The repository, canonical, as jobs and runners name it.
    pub repo: String,
    pub repo_dir: PathBuf,
    pub addr: String,
    pub state: PathBuf,
    pub dispatcher: Daemon,
    pub runners: Vec<Daemon>,
    pub probe: Probe,
    /// The shared token, given to the daemons in `SURVEIL_TOKEN`.
    pub token: Option<String>,
    gates: Vec<PathBuf>,
}

impl Scene {
    /// A dispatcher on a free port with `args` added to `--listen` and
    /// `--state-dir`; returns once it answers `GetStatus`.
    pub fn new(args: &[&str]) -> Result<Scene> {
        Self::with_token(args, None)
    }

    /// [`Scene::new`] with a dispatcher requiring `token`.
    pub fn with_token(args: &[&str], token: Option<&str>) -> Result<Scene> {
        Self::prepared(args, token, |_| Ok(()))
    }

    /// [`Scene::with_token`], calling `prepare` with the dispatcher's state
    /// directory (created, empty) before the dispatcher starts (a story
    /// mounts a small file system there).
    pub fn prepared(
        args: &[&str],
        token: Option<&str>,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Scene> {
        let envs: Vec<(String, String)> = token
            .map(|t| ("SURVEIL_TOKEN".to_owned(), t.to_owned()))
            .into_iter()
            .collect();
        let bins = bins();
        let dir = tempfile::Builder::new()
            .prefix("surveil-story-")
            .tempdir()?;
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir_all(&repo_dir)?;
        cluster::git(&repo_dir, &["init", "--quiet", "--initial-branch=main"])?;
        let repo_dir = repo_dir.canonicalize()?;
        let repo = repo_dir.to_str().context("UTF-8 temp path")?.to_owned();
        let state = dir.path().join("dispatcher");
        std::fs::create_dir_all(&state)?;
        prepare(&state)?;
        std::fs::create_dir_all(dir.path().join("gates"))?;
        let log = dir.path().join("dispatcher.log");
        // A port below the ephemeral range cannot be taken by a parallel
        // test's outgoing connection; a bind that fails anyway (another
        // story picked it too) is retried on another port.
        let mut started = None;
        for _ in 0..3 {
            let addr = format!("127.0.0.1:{}", cluster::stable_port()?);
            let mut argv: Vec<String> = vec![
                "--listen".into(),
                addr.clone(),
                "--state-dir".into(),
                state.display().to_string(),
            ];
            argv.extend(args.iter().map(|a| (*a).to_owned()));
            // The HTTP side's default port is fixed: stories that run at
            // once would collide on it, so only those that ask get HTTP.
            if !args.contains(&"--http-listen") {
                argv.extend(["--http-listen".to_owned(), "off".to_owned()]);
            }
            let mut dispatcher = Daemon::start(
                "dispatcher",
                &bins.dispatcher,
                argv,
                envs.clone(),
                log.clone(),
            )?;
            let mut probe = Probe::new(&addr)?;
            if let Some(token) = token {
                probe = probe.with_token(token);
            }
            let up = wait_for("the dispatcher to answer GetStatus", STEP, POLL, || {
                if let Some(status) = dispatcher.exited()? {
                    return Ok(Some(Err(status)));
                }
                Ok(probe.status().ok().map(Ok))
            })?;
            match up {
                Ok(_) => {
                    started = Some((addr, dispatcher, probe));
                    break;
                }
                Err(status) => eprintln!("dispatcher on {addr} exited ({status}); another port"),
            }
        }
        let (addr, dispatcher, probe) = started.with_context(|| {
            format!(
                "the dispatcher would not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(Scene {
            dir,
            repo,
            repo_dir,
            addr,
            state,
            dispatcher,
            runners: Vec::new(),
            probe,
            token: token.map(str::to_owned),
            gates: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until the dispatcher answers a query (failing at once if it
    /// exited).
    pub fn wait_answering(&mut self) -> Result<()> {
        let (dispatcher, probe) = (&mut self.dispatcher, &self.probe);
        wait_for("the dispatcher to answer GetStatus", STEP, POLL, || {
            if let Some(status) = dispatcher.exited()? {
                bail!("the dispatcher exited ({status})");
            }
            Ok(probe.status().ok())
        })
        .map(|_| ())
    }

    /// Starts runner `name` dialling `dispatch` (the dispatcher, or a relay
    /// in front of it); its work dir is `DIR/<name>`.
    pub fn add_runner(&mut self, name: &str, dispatch: &str) -> Result<usize> {
        let isolation = cluster::runner_isolation_args();
        let args: Vec<&str> = isolation.iter().map(String::as_str).collect();
        self.add_runner_with(name, dispatch, &args, &[])
    }

    /// [`Scene::add_runner`] with `args` before the repository and `envs`
    /// added to its environment. Its sandbox shows the gates, read-only.
    pub fn add_runner_with(
        &mut self,
        name: &str,
        dispatch: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<usize> {
        let work = self.work_dir(name);
        std::fs::create_dir_all(&work)?;
        let mut all_envs: Vec<(String, String)> = self
            .token
            .as_ref()
            .map(|t| ("SURVEIL_TOKEN".to_owned(), t.clone()))
            .into_iter()
            .collect();
        all_envs.extend(envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let mut argv: Vec<String> = vec![
            "--dispatch".into(),
            dispatch.to_owned(),
            "--work-dir".into(),
            work.display().to_string(),
            "--name".into(),
            name.into(),
            "--sandbox-ro".into(),
            self.gates_dir().display().to_string(),
        ];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv.push(self.repo.clone());
        self.runners.push(Daemon::start(
            name,
            &bins().runner,
            argv,
            all_envs,
            self.path().join(format!("{name}.log")),
        )?);
        Ok(self.runners.len() - 1)
    }

    /// Where gates are made: the one host directory tasks may look at.
    pub fn gates_dir(&self) -> PathBuf {
        self.path().join("gates")
    }

    pub fn work_dir(&self, runner: &str) -> PathBuf {
        self.path().join(runner)
    }

    /// The runner daemon named `name`.
    pub fn runner(&mut self, name: &str) -> Result<&mut Daemon> {
        self.runners
            .iter_mut()
            .find(|r| r.name == name)
            .with_context(|| format!("no runner `{name}` in this scene"))
    }

    /// Waits until exactly `names` are connected (in any order).
    pub fn wait_runners(&self, names: &[&str]) -> Result<()> {
        let mut want: Vec<&str> = names.to_vec();
        want.sort_unstable();
        wait_for(
            &format!("runners {want:?} to be connected"),
            STEP,
            POLL,
            || {
                let runners = self.probe.runners()?;
                let mut have: Vec<&str> = runners.iter().map(|r| r.name.as_str()).collect();
                have.sort_unstable();
                Ok((have == want).then_some(()))
            },
        )
    }

    /// A gate path; the job of a gated commit runs until it exists.
    pub fn gate(&mut self, name: &str) -> PathBuf {
        let gate = self.gates_dir().join(format!("gate-{name}"));
        self.gates.push(gate.clone());
        gate
    }

    /// Commits a pipeline whose one task waits for `gate` (at most 60 s, so
    /// nothing outlives a broken test for long) and passes once it exists.
    pub fn commit_gated(&self, message: &str, gate: &Path) -> Result<String> {
        let gate = gate.display().to_string();
        let pipeline = format!(
            "[[task]]\nname = \"wait-for-gate\"\nrun = \"i=0; while [ ! -e '{gate}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; test -e '{gate}'\"\ntimeout = \"90s\"\n"
        );
        cluster::commit(&self.repo_dir, message, &[(".surveil.toml", &pipeline)])
    }

    /// Commits a pipeline that passes at once.
    pub fn commit_quick(&self, message: &str) -> Result<String> {
        cluster::commit(
            &self.repo_dir,
            message,
            &[(
                ".surveil.toml",
                "[[task]]\nname = \"quick\"\nrun = \"echo quick\"\n",
            )],
        )
    }

    /// Submits `commits` of the scene's repository on `main`.
    pub fn submit(&self, commits: &[&str]) -> Result<Vec<u64>> {
        self.probe.submit(&self.repo, "main", commits)
    }

    /// Waits until job `id` satisfies `done`; the error shows its last state.
    pub fn wait_job(
        &self,
        id: u64,
        what: &str,
        deadline: Duration,
        done: impl Fn(&JobInfo) -> bool,
    ) -> Result<JobInfo> {
        let mut last = None;
        let result = wait_for(what, deadline, POLL, || {
            let job = self
                .probe
                .job(id)?
                .with_context(|| format!("no job {id}"))?;
            let ok = done(&job);
            last = Some(job.clone());
            Ok(ok.then_some(job))
        });
        result.with_context(|| {
            format!(
                "last seen: {}",
                last.as_ref()
                    .map(describe)
                    .unwrap_or_else(|| "nothing".into())
            )
        })
    }

    /// Waits until job `id` runs (and has been started by its runner).
    pub fn wait_running(&self, id: u64) -> Result<JobInfo> {
        self.wait_job(id, &format!("job {id} to run"), STEP, |j| {
            status_of(j) == JobStatus::Running && j.runner.is_some()
        })
    }

    /// Waits until job `id` has a final status.
    pub fn wait_final(&self, id: u64) -> Result<JobInfo> {
        self.wait_job(id, &format!("job {id} to finish"), STEP, |j| {
            status_of(j).is_final()
        })
    }

    /// Runs `surveil --dispatch ADDR args…` against this scene's dispatcher.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&bins().cli)
            .args(["--dispatch", &self.addr])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Opens `gate`: the jobs waiting on it pass.
    pub fn open(&self, gate: &Path) -> Result<()> {
        std::fs::write(gate, b"open\n").with_context(|| format!("opening {}", gate.display()))
    }

    /// A runner's outbox files (`<job>-<attempt>.pb`): results it still
    /// holds without an acknowledgement.
    pub fn outbox(&self, runner: &str) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.work_dir(runner).join("outbox"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".pb"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for gate in &self.gates {
            let _ = std::fs::write(gate, b"open\n");
        }
        if std::thread::panicking() {
            // Keep the logs of a failed story for the person reading it.
            let kept = self.dir.path().to_path_buf();
            eprintln!("story failed; logs kept in {}", kept.display());
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a scratch directory"),
            );
            let _ = dir.keep();
        }
    }
}

/// Runs `program args` to completion, killing it after `deadline` (a
/// daemon that should have refused its flags would otherwise run forever).
pub fn run_bounded(program: &Path, args: &[&str], deadline: Duration) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("SURVEIL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > deadline {
            child.kill().ok();
            let out = child.wait_with_output()?;
            bail!(
                "{} {args:?} still ran after {deadline:?}; stderr: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
