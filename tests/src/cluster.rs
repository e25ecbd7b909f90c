//! A local Surveil cluster of real processes for tests and `cargo xtask`:
//! builds the binaries with `$CARGO`, starts each daemon as a child with its own log file, sends signals to the
//! processes it started (and only those), and queries the dispatcher through
//! the real `surveil` CLI with `--json`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The binaries a cluster runs, built once.
#[derive(Clone, Debug)]
pub struct Bins {
    pub dispatcher: PathBuf,
    pub runner: PathBuf,
    pub observer: PathBuf,
    pub cli: PathBuf,
}

/// Builds the four binaries with the cargo that runs xtask, in `profile`
/// (`dev` shares artefacts with the tests; `release` for benchmarks).
pub fn build(root: &Path, release: bool) -> Result<Bins> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "surveil-dispatcher",
        "-p",
        "surveil-runner",
        "-p",
        "surveil-observer",
        "-p",
        "surveil-cli",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {cargo} build"))?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let dir = target_dir(root).join(if release { "release" } else { "debug" });
    let bin = |name: &str| dir.join(name);
    Ok(Bins {
        dispatcher: bin("surveil-dispatcher"),
        runner: bin("surveil-runner"),
        observer: bin("surveil-observer"),
        cli: bin("surveil"),
    })
}

/// `CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The isolation flags every runner a harness starts gets: none where the
/// bubblewrap sandbox works on this machine (the runner's default), else
/// `--unsandboxed`, said once on stderr, so that a fresh machine with only
/// Rust still runs the cluster.
pub fn runner_isolation_args() -> Vec<String> {
    static ARGS: OnceLock<Vec<String>> = OnceLock::new();
    ARGS.get_or_init(|| {
        let path = std::env::var_os("PATH");
        match surveil_runner::sandbox::Isolation::detect(path.as_deref()) {
            Ok(_) => Vec::new(),
            Err(e) => {
                eprintln!("NOTE: starting runners with --unsandboxed: {e}");
                vec!["--unsandboxed".to_owned()]
            }
        }
    })
    .clone()
}

/// A daemon the cluster started. Killed when dropped, so a failing run
/// leaves nothing behind.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    envs: Vec<(String, String)>,
}

impl Daemon {
    /// Starts `program args…` with stdout and stderr appended to `log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        log: PathBuf,
    ) -> Result<Daemon> {
        let mut daemon = Daemon {
            name: name.to_owned(),
            child: None,
            program: program.to_owned(),
            args,
            log,
            envs,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the daemon again with the same arguments after it exited.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to this daemon's process (never to anything else).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("daemon is not running")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("daemon is not running")?;
        child.kill().ok();
        let status = child.wait()?;
        self.child = None;
        Ok(status)
    }

    /// SIGTERM, then wait up to `deadline` for the exit status.
    pub fn terminate(&mut self, deadline: Duration) -> Result<ExitStatus> {
        self.signal("TERM")?;
        let child = self.child.as_mut().context("daemon is not running")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > deadline {
                child.kill().ok();
                child.wait().ok();
                self.child = None;
                bail!("{} did not exit within {deadline:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process must be continued to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `surveil` CLI against `dispatch` and parses its `--json`
/// output.
pub struct Cli {
    pub bin: PathBuf,
    pub dispatch: String,
}

impl Cli {
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.bin)
            .arg("--dispatch")
            .arg(&self.dispatch)
            .args(args)
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .context("running surveil")?;
        if !out.status.success() {
            bail!(
                "surveil {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the JSON of surveil {}", args.join(" ")))
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Result<Vec<Value>> {
        match self.json(&["jobs", "--limit", "0"])? {
            Value::Array(jobs) => Ok(jobs),
            other => bail!("`surveil jobs --json` gave {other}, not an array"),
        }
    }

    pub fn job(&self, id: u64) -> Result<Value> {
        self.json(&["job", &id.to_string()])
    }
}

/// Polls `probe` every `every` until it yields `Some`, for at most
/// `deadline`; the error names `what` was awaited.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_err = Some(err),
        }
        if start.elapsed() > deadline {
            match last_err {
                Some(err) => bail!("timed out after {deadline:?} waiting for {what}: {err:#}"),
                None => bail!("timed out after {deadline:?} waiting for {what}"),
            }
        }
        std::thread::sleep(every);
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Runs `git` for setting up scratch repositories (test fixtures only; the
/// daemons themselves use gix).
pub fn git(repo: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Surveil E2E")
        .env("GIT_AUTHOR_EMAIL", "e2e@surveil.invalid")
        .env("GIT_COMMITTER_NAME", "Surveil E2E")
        .env("GIT_COMMITTER_EMAIL", "e2e@surveil.invalid")
        .output()
        .context("running git (needed to make the scratch repository)")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Writes `files` into the repository and commits them; returns the commit.
pub fn commit(repo: &Path, message: &str, files: &[(&str, &str)]) -> Result<String> {
    for (path, content) in files {
        let full = repo.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&full, content)?;
        git(repo, &["add", path])?;
    }
    git(repo, &["commit", "--quiet", "--allow-empty", "-m", message])?;
    git(repo, &["rev-parse", "HEAD"])
}

impl Daemon {
    /// The exit status if the daemon has exited (without blocking), so a
    /// wait can stop early instead of polling a dead process to its
    /// deadline.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} is not running", self.name),
        }
    }
}

/// A free TCP port on 127.0.0.1 *below* the kernel's ephemeral range, so
/// no outgoing connection of a parallel test can take it between this
/// check and the daemon's bind, nor while a killed daemon is restarted on
/// it. Falls back to [`free_port`] when no such port is free.
pub fn stable_port() -> Result<u16> {
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        // Spread over the range below by time and pid, then probe upwards.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let span = u32::from(low - 10_000);
        let start = 10_000 + (seed % span) as u16;
        for offset in 0..200u32 {
            let port = 10_000 + ((u32::from(start - 10_000) + offset * 97) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    free_port()
}
