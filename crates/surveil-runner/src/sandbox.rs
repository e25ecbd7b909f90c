//! How tasks are kept away from the runner's secrets and state: the
//! bubblewrap sandbox (the default, where it works), a separate
//! unprivileged task user, or — only when the operator says `--unsandboxed`
//! — nothing.
//!
//! It decides once, at start-up ([`choose`], which tries bwrap once), then
//! builds each task's command ([`Isolation::command`]), filters the
//! environment tasks get down to an allowlist ([`task_env`]), hands
//! checkouts to the task user and names the process group to signal. It
//! does not run, wait for or time tasks (the executor does), and it never
//! reads the runner's own environment: callers pass it in.
//!
//! Why the sandbox mounts an allowlist rather than `--ro-bind / /`: CI
//! runs the runner as root, and root inside a user namespace still owns
//! root's files, so it can read any root-owned 0600 file it can see (a
//! token, `/etc/shadow`, an SSH host key) whatever the mount flags say.
//! What a task does not need is therefore not mounted at all.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Top-level system directories the sandbox shows read-only when they
/// exist; a symlink (merged /usr: `/bin -> usr/bin`) is re-created as the
/// same symlink.
pub const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// All of `/etc` a task sees, read-only: name resolution, users and groups
/// (no password hashes: `/etc/shadow` is not here), the dynamic linker,
/// the time zone, Debian's alternatives (`cc` is one) and CA certificates.
/// Not `/etc/ssl/private`, not `/etc/surveil`, nothing else.
pub const ETC_ENTRIES: [&str; 26] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/networks",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust",
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/mime.types",
    "/etc/gitconfig",
];

/// The runner's environment variables tasks get, by exact name; every
/// `LC_*` too. Anything else (a token, `SSH_AUTH_SOCK`, `*_KEY`,
/// `DATABASE_URL`, whatever an operator's shell exported) stays behind.
pub const TASK_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "TERM", "TZ"];

/// How long the start-up probe of bwrap may take before it counts as
/// failed; a working bwrap answers in milliseconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the runner's variables named in [`TASK_ENV`] (and `LC_*`); with a
/// task user, `HOME` is that user's home instead of the runner's.
pub fn task_env(
    runner_env: &[(OsString, OsString)],
    user: Option<&TaskUser>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = runner_env
        .iter()
        .filter(|(name, _)| {
            let name = name.to_string_lossy();
            TASK_ENV.contains(&name.as_ref()) || name.starts_with("LC_")
        })
        .filter(|(name, _)| user.is_none() || name != "HOME")
        .cloned()
        .collect();
    if let Some(user) = user {
        env.push(("HOME".into(), user.home.clone().into_os_string()));
    }
    env
}

/// The unprivileged user tasks run as (`--task-user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskUser {
    /// As given.
    pub name: String,
    /// Its uid, never 0 nor the runner's own.
    pub uid: u32,
    /// Its primary group, the only group its tasks have.
    pub gid: u32,
    /// Its home directory from the password database: the tasks' `HOME`.
    pub home: PathBuf,
}

impl TaskUser {
    /// Looks `name` up and checks that the runner may switch to it.
    pub fn lookup(name: &str) -> Result<TaskUser, IsolationError> {
        let bad = |problem: String| IsolationError::TaskUser {
            name: name.to_owned(),
            problem,
        };
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| bad(format!("cannot read the user database: {e}")))?
            .ok_or_else(|| {
                bad(
                    "no such user; create one, e.g. `useradd --system --no-create-home \
                     --shell /usr/sbin/nologin surveil-task`"
                        .to_owned(),
                )
            })?;
        if user.uid.is_root() {
            return Err(bad(
                "is uid 0; the task user must be an unprivileged account".to_owned(),
            ));
        }
        let own = nix::unistd::geteuid();
        if user.uid == own {
            return Err(bad(format!(
                "is the runner's own user (uid {own}): tasks would reach everything the runner can"
            )));
        }
        switch_privileges().map_err(bad)?;
        Ok(TaskUser {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }

    fn describe(&self) -> String {
        format!("user {} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

/// Capabilities (by bit number) the runner needs to start tasks as another
/// user, hand it the checkout and remove the checkout afterwards.
const SWITCH_CAPS: [(u32, &str); 4] = [
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
];

/// Root may switch users; otherwise the effective capabilities must hold
/// [`SWITCH_CAPS`].
fn switch_privileges() -> Result<(), String> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = SWITCH_CAPS
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the runner runs as uid {euid} without {}; starting tasks as another user needs root \
         or these capabilities (systemd: AmbientCapabilities={})",
        missing.join(", "),
        SWITCH_CAPS.map(|(_, n)| n).join(" ")
    ))
}

/// A system directory as the sandbox re-creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemEntry {
    /// Bound read-only at the same path.
    Dir(PathBuf),
    /// The same symlink (`link` → `target`).
    Symlink {
        /// Where the link is.
        link: PathBuf,
        /// What it points to, as written.
        target: PathBuf,
    },
}

/// The bubblewrap sandbox as it was found and tried at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The bwrap executable.
    pub bwrap: PathBuf,
    /// What `bwrap --version` said.
    pub version: String,
    /// [`SYSTEM_DIRS`] present on this machine.
    pub system: Vec<SystemEntry>,
    /// [`ETC_ENTRIES`] present on this machine.
    pub etc: Vec<PathBuf>,
    /// The operator's extra read-only paths (`--sandbox-ro`), canonical.
    pub read_only: Vec<PathBuf>,
    /// Tasks run as this user inside the sandbox (bwrap is started as it);
    /// `None`: as the runner's uid, mapped in a user namespace.
    pub user: Option<TaskUser>,
}

/// What differs between two tasks' sandboxes.
#[derive(Debug, Clone, Copy)]
pub struct TaskMounts<'a> {
    /// The job's checkout, bound writable at its own path and the task's
    /// working directory; `None` only for the start-up probe.
    pub checkout: Option<&'a Path>,
    /// The task's `HOME`: an empty private tmpfs is mounted there (unless
    /// it is `/` or inside a read-only system path).
    pub home: Option<&'a Path>,
    /// `false`: a new network namespace with only a loopback device.
    pub network: bool,
}

impl Sandbox {
    /// bwrap's arguments up to (not including) `--` and the command. Pure:
    /// everything it depends on was found at start-up.
    pub fn args(&self, task: &TaskMounts<'_>) -> Vec<OsString> {
        let mut args = Args::default();
        // A user namespace even as root: capabilities then stop at the
        // sandbox's edge. Its own PID namespace hides the runner (no
        // /proc/<runner>/environ) and ends every task process with it.
        args.flags(&[
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]);
        if !task.network {
            args.flags(&["--unshare-net"]);
        }
        // A new session puts the task in a process group of its own, apart
        // from bwrap's monitor: see `TaskGroup`.
        args.flags(&["--die-with-parent", "--new-session", "--cap-drop", "ALL"]);
        for entry in &self.system {
            match entry {
                SystemEntry::Dir(dir) => args.pair("--ro-bind", dir, dir),
                SystemEntry::Symlink { link, target } => args.pair("--symlink", target, link),
            }
        }
        let mut made = Vec::new();
        for entry in &self.etc {
            for parent in entry
                .ancestors()
                .skip(1)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                if parent.starts_with("/etc") && !made.contains(&parent) {
                    args.flags(&["--perms", "0755"]);
                    args.one("--dir", parent);
                    made.push(parent);
                }
            }
            args.pair("--ro-bind-try", entry, entry);
        }
        args.one("--proc", Path::new("/proc"));
        args.one("--dev", Path::new("/dev"));
        args.one("--tmpfs", Path::new("/tmp"));
        args.one("--tmpfs", Path::new("/var/tmp"));
        let home = task.home.filter(|home| {
            self.home_gets_tmpfs(home) && !task.checkout.is_some_and(|c| home.starts_with(c))
        });
        if let Some(home) = home {
            args.one("--tmpfs", home);
        }
        // After the tmpfs mounts, so that extra paths may live under /tmp
        // or HOME.
        for path in &self.read_only {
            args.pair("--ro-bind", path, path);
        }
        match task.checkout {
            Some(checkout) => {
                args.pair("--bind", checkout, checkout);
                args.one("--chdir", checkout);
            }
            None => args.one("--chdir", Path::new("/tmp")),
        }
        // The sandbox's own root (the directories bwrap made above) is
        // read-only too; only the mounts marked writable are.
        args.one("--remount-ro", Path::new("/"));
        args.0
    }

    fn home_gets_tmpfs(&self, home: &Path) -> bool {
        let covered = self.system.iter().any(|entry| match entry {
            SystemEntry::Dir(dir) => home.starts_with(dir),
            SystemEntry::Symlink { link, .. } => home.starts_with(link),
        });
        home.is_absolute()
            && home != Path::new("/")
            && !covered
            && !["/etc", "/proc", "/dev"]
                .iter()
                .any(|p| home.starts_with(p))
    }

    /// Finds bwrap on `path`, notes what the machine has, and tries the
    /// sandbox once (as the task user, if any); the error says why not.
    pub fn try_new(
        path: Option<&OsStr>,
        read_only: Vec<PathBuf>,
        user: Option<TaskUser>,
    ) -> Result<Sandbox, String> {
        let bwrap = find_program(path, "bwrap").ok_or_else(|| {
            "bwrap is not on the runner's PATH (Debian: apt-get install bubblewrap)".to_owned()
        })?;
        let version = bounded_output(std::process::Command::new(&bwrap).arg("--version"))
            .ok()
            .map(|(_, out, _)| out.trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "bubblewrap, version unknown".to_owned());
        let sandbox = Sandbox {
            bwrap,
            version,
            system: scan_system(Path::new("/")),
            etc: ETC_ENTRIES
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect(),
            read_only,
            user,
        };
        sandbox.probe(path)?;
        Ok(sandbox)
    }

    /// Runs `sh -c true` in a sandbox like a task's (without a checkout,
    /// with its own network namespace, so both kinds are proven).
    fn probe(&self, path: Option<&OsStr>) -> Result<(), String> {
        let home = self.user.as_ref().map(|u| u.home.as_path());
        let mut command = std::process::Command::new(&self.bwrap);
        command
            .args(self.args(&TaskMounts {
                checkout: None,
                home,
                network: false,
            }))
            .args(["--", "sh", "-c", "true"])
            .env_clear()
            .current_dir("/");
        if let Some(path) = path {
            command.env("PATH", path);
        }
        if let Some(user) = &self.user {
            command.uid(user.uid).gid(user.gid);
        }
        let (status, _, err) = bounded_output(&mut command)
            .map_err(|e| format!("{} could not be run: {e}", self.bwrap.display()))?;
        if status.success() {
            return Ok(());
        }
        let why = err.lines().next().unwrap_or("").trim().to_owned();
        let as_whom = self
            .user
            .as_ref()
            .map(|u| format!(" as {}", u.name))
            .unwrap_or_default();
        Err(format!(
            "{} fails here{as_whom} ({status}): {}",
            self.bwrap.display(),
            if why.is_empty() { "no message" } else { &why }
        ))
    }

    fn describe(&self) -> String {
        let who = match &self.user {
            Some(user) => format!("tasks run as {}", user.describe()),
            None => "tasks run as the runner's uid mapped into a user namespace, \
                     without capabilities"
                .to_owned(),
        };
        format!(
            "bubblewrap sandbox ({}, {}): the checkout, /tmp and HOME writable and private, \
             system directories read-only, the runner's files not mounted, its own PID \
             namespace; {who}",
            self.version,
            self.bwrap.display()
        )
    }
}

/// bwrap's argument list under construction.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(OsString::from));
    }

    fn one(&mut self, flag: &str, path: &Path) {
        self.0.push(flag.into());
        self.0.push(path.into());
    }

    fn pair(&mut self, flag: &str, first: &Path, second: &Path) {
        self.0.push(flag.into());
        self.0.push(first.into());
        self.0.push(second.into());
    }
}

/// [`SYSTEM_DIRS`] as they are under `root` (`/` but in tests).
fn scan_system(root: &Path) -> Vec<SystemEntry> {
    let mut found = Vec::new();
    for dir in SYSTEM_DIRS {
        let on_disk = root.join(dir.trim_start_matches('/'));
        let Ok(meta) = std::fs::symlink_metadata(&on_disk) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&on_disk) {
                found.push(SystemEntry::Symlink {
                    link: PathBuf::from(dir),
                    target,
                });
            }
        } else if meta.is_dir() {
            found.push(SystemEntry::Dir(PathBuf::from(dir)));
        }
    }
    found
}

/// The first executable `name` in the `PATH`-style list `path`.
fn find_program(path: Option<&OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `command` to its end, for at most [`PROBE_TIMEOUT`]; returns the
/// status, stdout and stderr.
fn bounded_output(
    command: &mut std::process::Command,
) -> std::io::Result<(ExitStatus, String, String)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "no answer within {PROBE_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// How this runner isolates its tasks, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// The bubblewrap sandbox, possibly as a task user.
    Sandbox(Sandbox),
    /// Tasks run as another, unprivileged uid, without namespaces.
    TaskUser {
        /// Who.
        user: TaskUser,
        /// Why there is no sandbox (`--unsandboxed`, or why bwrap failed).
        no_sandbox: String,
    },
    /// Tasks run as the runner's own user: only with `--unsandboxed` (and
    /// the library's [`Config::new`](crate::Config::new) default, which
    /// embedders and tests replace).
    Unsandboxed,
}

/// What [`choose`] decides from.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// `--task-user`.
    pub task_user: Option<&'a str>,
    /// `--unsandboxed`: no bwrap, whatever the machine has.
    pub unsandboxed: bool,
    /// `--sandbox-ro`: extra read-only paths.
    pub read_only: &'a [PathBuf],
    /// The runner's `PATH`, where bwrap is looked for.
    pub path: Option<&'a OsStr>,
    /// What tasks must never see (work dir, token and config files, TLS
    /// key): a read-only path that is or contains one is refused.
    pub private: &'a [PathBuf],
}

/// Why the runner cannot start as configured (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// Neither bwrap nor a task user, and no `--unsandboxed`.
    #[error(
        "tasks cannot be isolated on this machine: {0}. Choose one: make the bubblewrap \
         sandbox work (install bubblewrap; the kernel must allow user namespaces), or pass \
         --task-user USER (tasks run as that unprivileged user), or pass --unsandboxed (tasks \
         run as the runner's own user and can read its token, configuration and work directory)"
    )]
    Unavailable(String),
    /// `--task-user` names a user that cannot be used.
    #[error("--task-user {name}: {problem}")]
    TaskUser {
        /// As given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A `--sandbox-ro` path that cannot be used.
    #[error("--sandbox-ro {path}: {problem}")]
    ReadOnlyPath {
        /// As given.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Decides how tasks are isolated: the sandbox unless `--unsandboxed`;
/// where bwrap fails, the task user if one is given; otherwise an error
/// naming the three ways out.
pub fn choose(request: &Request<'_>) -> Result<Isolation, IsolationError> {
    let user = request.task_user.map(TaskUser::lookup).transpose()?;
    let read_only = check_read_only(request.read_only, request.private)?;
    if request.unsandboxed {
        return Ok(match user {
            Some(user) => Isolation::TaskUser {
                user,
                no_sandbox: "--unsandboxed".to_owned(),
            },
            None => Isolation::Unsandboxed,
        });
    }
    match Sandbox::try_new(request.path, read_only, user.clone()) {
        Ok(sandbox) => Ok(Isolation::Sandbox(sandbox)),
        Err(reason) => match user {
            Some(user) => Ok(Isolation::TaskUser {
                user,
                no_sandbox: reason,
            }),
            None => Err(IsolationError::Unavailable(reason)),
        },
    }
}

/// Canonical `--sandbox-ro` paths; each must exist and must not be, or
/// contain, anything in `private`.
fn check_read_only(paths: &[PathBuf], private: &[PathBuf]) -> Result<Vec<PathBuf>, IsolationError> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let bad = |problem: String| IsolationError::ReadOnlyPath {
            path: path.display().to_string(),
            problem,
        };
        if !path.is_absolute() {
            return Err(bad("must be an absolute path".to_owned()));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| bad(format!("cannot be used: {e}")))?;
        for secret in private {
            // What does not exist yet (the work dir, before the first
            // start) is compared by its absolute path.
            let secret = secret
                .canonicalize()
                .or_else(|_| std::path::absolute(secret))
                .unwrap_or_else(|_| secret.clone());
            if secret.starts_with(&canonical) {
                return Err(bad(format!(
                    "would show tasks {}, which they must not see; name a narrower path",
                    secret.display()
                )));
            }
        }
        out.push(canonical);
    }
    Ok(out)
}

/// One task's command, before isolation is applied.
#[derive(Debug, Clone, Copy)]
pub struct TaskCommand<'a> {
    /// The `run` line, for `sh -c`.
    pub run: &'a str,
    /// The job's checkout.
    pub dir: &'a Path,
    /// The whole environment the task gets (allowlist, task `env`,
    /// `SURVEIL_*`); later entries win.
    pub env: &'a [(OsString, OsString)],
    /// The pipeline's `network` key.
    pub network: bool,
}

impl Isolation {
    /// Detects the sandbox with no task user and no extra paths, the way
    /// the command line does by default: for harnesses and embedders.
    pub fn detect(path: Option<&OsStr>) -> Result<Isolation, IsolationError> {
        choose(&Request {
            path,
            ..Request::default()
        })
    }

    /// The user tasks run as, if not the runner's own.
    pub fn task_user(&self) -> Option<&TaskUser> {
        match self {
            Isolation::Sandbox(sandbox) => sandbox.user.as_ref(),
            Isolation::TaskUser { user, .. } => Some(user),
            Isolation::Unsandboxed => None,
        }
    }

    /// One line for the start-up log and each job's SYSTEM stream.
    pub fn describe(&self) -> String {
        match self {
            Isolation::Sandbox(sandbox) => sandbox.describe(),
            Isolation::TaskUser { user, no_sandbox } => format!(
                "task user: tasks run as {} without a sandbox ({no_sandbox}); they cannot read \
                 the runner's private files but see the rest of the system as that user, and \
                 `network = false` cannot be honoured",
                user.describe()
            ),
            Isolation::Unsandboxed => format!(
                "UNSANDBOXED (--unsandboxed): tasks run as the runner's own user (uid {}) and \
                 can read its token, configuration, work directory and other jobs' checkouts",
                nix::unistd::geteuid()
            ),
        }
    }

    /// The command that runs `task` under this isolation: `sh -c RUN`, in
    /// bwrap or as the task user, with exactly `task.env`. The caller adds
    /// stdio and the process group. Refuses `network = false` where it
    /// cannot be honoured.
    pub fn command(&self, task: &TaskCommand<'_>) -> Result<tokio::process::Command, String> {
        let home = task
            .env
            .iter()
            .rev()
            .find(|(name, _)| name == "HOME")
            .map(|(_, value)| PathBuf::from(value));
        let mut command = match self {
            Isolation::Sandbox(sandbox) => {
                // Bound by its real path, which is also where the task
                // finds itself.
                let checkout = task
                    .dir
                    .canonicalize()
                    .map_err(|e| format!("the checkout {}: {e}", task.dir.display()))?;
                let mut command = tokio::process::Command::new(&sandbox.bwrap);
                command
                    .args(sandbox.args(&TaskMounts {
                        checkout: Some(&checkout),
                        home: home.as_deref(),
                        network: task.network,
                    }))
                    .args(["--", "sh", "-c", task.run])
                    .current_dir("/");
                command
            }
            Isolation::TaskUser { .. } | Isolation::Unsandboxed => {
                if !task.network {
                    return Err(format!(
                        "`network = false` needs the bubblewrap sandbox, and this runner's \
                         isolation is: {}",
                        self.describe()
                    ));
                }
                let mut command = tokio::process::Command::new("sh");
                command.arg("-c").arg(task.run).current_dir(task.dir);
                command
            }
        };
        command
            .env_clear()
            .envs(task.env.iter().map(|(k, v)| (k, v)));
        if let Some(user) = self.task_user() {
            // std clears supplementary groups when it switches the uid.
            command.uid(user.uid).gid(user.gid);
        }
        Ok(command)
    }

    /// The process group to signal for a task whose spawned process is
    /// `pid`.
    pub fn task_group(&self, pid: Option<u32>) -> TaskGroup {
        TaskGroup {
            leader: pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw),
            sandboxed: matches!(self, Isolation::Sandbox(_)),
            reaped: false,
            finished: false,
        }
    }

    /// Gives the task user the checkout (recursively, never following
    /// symlinks); nothing to do without one. Blocking.
    ///
    /// Children are handed over before their directory: until a directory
    /// is the task user's, no task (another job of the same user) can swap
    /// an entry in it for a symlink that this walk would then follow.
    pub fn hand_over(&self, dir: &Path) -> std::io::Result<()> {
        let Some(user) = self.task_user() else {
            return Ok(());
        };
        let mut parents_first = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(path) = stack.pop() {
            if std::fs::symlink_metadata(&path)?.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    stack.push(entry?.path());
                }
            }
            parents_first.push(path);
        }
        for path in parents_first.iter().rev() {
            std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
        }
        Ok(())
    }

    /// With a task user: lets it reach `traverse` (the work dir and its
    /// `jobs/`: 0711, enterable but not listable), keeps `private` (mirrors,
    /// outbox) to the runner (0700), and checks that every directory above
    /// the work dir lets the user through. Blocking.
    pub fn prepare_work_dir(&self, traverse: &[&Path], private: &[&Path]) -> Result<(), String> {
        let Some(user) = self.task_user() else {
            return Ok(());
        };
        let chmod = |dir: &Path, mode: u32| {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set mode {mode:o} on {}: {e}", dir.display()))
        };
        for dir in traverse {
            chmod(dir, 0o711)?;
        }
        for dir in private {
            chmod(dir, 0o700)?;
        }
        let Some(first) = traverse.first() else {
            return Ok(());
        };
        let first = first
            .canonicalize()
            .map_err(|e| format!("{}: {e}", first.display()))?;
        for dir in first.ancestors().skip(1) {
            let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let bit = if meta.uid() == user.uid {
                0o100
            } else if meta.gid() == user.gid {
                0o010
            } else {
                0o001
            };
            if meta.mode() & bit == 0 {
                return Err(format!(
                    "the task user {} cannot reach the work directory: {} (mode {:o}, owner \
                     uid {}) does not let it through; `chmod o+x {}` or choose a --work-dir it \
                     can reach",
                    user.name,
                    dir.display(),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    dir.display()
                ));
            }
        }
        Ok(())
    }
}

/// A running task's process group, as the executor signals it.
///
/// Unsandboxed, the spawned `sh` leads it. In the sandbox, the spawned
/// process is bwrap's monitor; the task runs in the session bwrap's PID-1
/// (the monitor's only child) started with `--new-session`. Signalling
/// that group leaves the monitor alive to report the exit status, and a
/// SIGKILL of PID 1 ends everything in the namespace, even processes that
/// left the group.
///
/// Dropping it kills the group, so that no way out of a running task (a
/// timeout, a cancel, a failed wait, its future dropped by a runner that
/// shuts down or gives the job up, a panic) leaves its processes running
/// unsupervised beside the next job.
#[derive(Debug)]
pub struct TaskGroup {
    leader: Option<Pid>,
    sandboxed: bool,
    reaped: bool,
    /// [`finish`](Self::finish) sent the last SIGKILL: the group is empty,
    /// and its id may be handed to someone else's processes from now on.
    finished: bool,
}

impl TaskGroup {
    /// Sends `signal` to the task's processes; ESRCH (already gone) is
    /// what we want anyway.
    pub fn signal(&self, signal: Signal) {
        let Some(leader) = self.leader else {
            return;
        };
        if !self.sandboxed {
            let _ = killpg(leader, signal);
            return;
        }
        if self.reaped {
            // bwrap's monitor exits only after PID 1's namespace lost its
            // main process, and PID 1 dies with the monitor: nothing is
            // left, and the ids may already be someone else's.
            return;
        }
        let inner = std::fs::read_to_string(format!("/proc/{leader}/task/{leader}/children"))
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<i32>().ok())
            .map(Pid::from_raw);
        // Until bwrap has set the sandbox up there is no inner session yet:
        // then the monitor itself is stopped, and its children die with it.
        if inner.is_none_or(|inner| killpg(inner, signal).is_err()) {
            let _ = killpg(leader, signal);
        }
    }

    /// Kills whatever is left of the group, once. (The group id cannot have
    /// been reused while any member lived, and is normally empty here.)
    /// Afterwards dropping the group signals nothing.
    pub fn finish(&mut self) {
        if !self.finished {
            self.signal(Signal::SIGKILL);
            self.finished = true;
        }
    }

    /// The spawned process has been waited for.
    pub fn reaped(&mut self) {
        self.reaped = true;
    }

    /// Exit code and signal from the spawned process's status. bwrap passes
    /// a task killed by signal N on as exit code 128 + N, as shells do; it
    /// is reported as that signal.
    pub fn decode(&self, status: ExitStatus) -> (Option<i32>, Option<i32>) {
        match (status.code(), status.signal()) {
            (Some(code), _) if self.sandboxed && code > 128 && code < 128 + 65 => {
                (None, Some(code - 128))
            }
            (code, signal) => (code, signal),
        }
    }
}

impl Drop for TaskGroup {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox {
            bwrap: "/usr/bin/bwrap".into(),
            version: "bubblewrap 0.8.0".into(),
            system: vec![
                SystemEntry::Dir("/usr".into()),
                SystemEntry::Symlink {
                    link: "/bin".into(),
                    target: "usr/bin".into(),
                },
            ],
            etc: vec!["/etc/passwd".into(), "/etc/ssl/certs".into()],
            read_only: vec!["/opt/toolchain".into(), "/root/.cargo".into()],
            user: None,
        }
    }

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    /// Where `seq` starts in `args`, if it is there.
    fn find(args: &[&str], seq: &[&str]) -> Option<usize> {
        args.windows(seq.len()).position(|w| w == seq)
    }

    #[test]
    fn the_sandbox_mounts_an_allowlist_and_the_checkout_writable() {
        let checkout = Path::new("/tmp/w/jobs/7-1");
        let args = sandbox().args(&TaskMounts {
            checkout: Some(checkout),
            home: Some(Path::new("/root")),
            network: true,
        });
        let args = strings(&args);
        for seq in [
            &["--unshare-user"][..],
            &["--unshare-pid"],
            &["--die-with-parent"],
            &["--new-session"],
            &["--cap-drop", "ALL"],
            &["--ro-bind", "/usr", "/usr"],
            &["--symlink", "usr/bin", "/bin"],
            &["--ro-bind-try", "/etc/passwd", "/etc/passwd"],
            &["--perms", "0755", "--dir", "/etc"],
            &["--perms", "0755", "--dir", "/etc/ssl"],
            &["--ro-bind-try", "/etc/ssl/certs", "/etc/ssl/certs"],
            &["--proc", "/proc"],
            &["--dev", "/dev"],
            &["--tmpfs", "/root"],
            &["--ro-bind", "/root/.cargo", "/root/.cargo"],
            &["--bind", "/tmp/w/jobs/7-1", "/tmp/w/jobs/7-1"],
            &["--chdir", "/tmp/w/jobs/7-1"],
        ] {
            assert!(find(&args, seq).is_some(), "{seq:?} missing from {args:?}");
        }
        assert!(!args.contains(&"--unshare-net"), "{args:?}");
        // Nothing mounts the whole root, /etc whole, /home or /run.
        for path in ["/", "/etc", "/home", "/run", "/var", "/tmp/w"] {
            for flag in ["--ro-bind", "--bind", "--ro-bind-try", "--dev-bind"] {
                assert!(
                    find(&args, &[flag, path]).is_none(),
                    "{flag} {path}: {args:?}"
                );
            }
        }
        let at = |seq: &[&str]| find(&args, seq).unwrap();
        // /tmp and HOME are fresh tmpfs mounts; what is bound inside them
        // comes after, or it would be hidden.
        assert!(at(&["--tmpfs", "/tmp"]) < at(&["--bind", "/tmp/w/jobs/7-1"]));
        assert!(at(&["--tmpfs", "/root"]) < at(&["--ro-bind", "/root/.cargo"]));
        assert!(at(&["--dir", "/etc"]) < at(&["--dir", "/etc/ssl"]));
        assert_eq!(args[args.len() - 2..], ["--remount-ro", "/"]);
    }

    #[test]
    fn network_false_unshares_the_network_and_home_in_usr_gets_no_tmpfs() {
        let args = sandbox().args(&TaskMounts {
            checkout: None,
            home: Some(Path::new("/usr/local/home")),
            network: false,
        });
        let args = strings(&args);
        assert!(args.contains(&"--unshare-net"), "{args:?}");
        assert!(find(&args, &["--tmpfs", "/usr/local/home"]).is_none());
        assert!(find(&args, &["--chdir", "/tmp"]).is_some());
        let args = sandbox().args(&TaskMounts {
            checkout: None,
            home: Some(Path::new("/")),
            network: true,
        });
        assert!(find(&strings(&args), &["--tmpfs", "/"]).is_none());
    }

    #[test]
    fn the_environment_is_an_allowlist() {
        let runner: Vec<(OsString, OsString)> = [
            ("PATH", "/usr/bin:/bin"),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("TERM", "dumb"),
            ("TZ", "UTC"),
            ("SURVEIL_TOKEN", "t"),
            ("SSH_AUTH_SOCK", "/tmp/ssh-x/agent.1"),
            ("FOO_KEY", "k"),
            ("DATABASE_URL", "postgres://u:p@h/db"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("SURVEIL_WORK_DIR", "/var/lib/surveil"),
            ("LD_PRELOAD", "/x.so"),
            ("path", "lower-case is another name"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
        let names = |env: &[(OsString, OsString)]| -> Vec<String> {
            env.iter()
                .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
                .collect()
        };
        assert_eq!(
            names(&task_env(&runner, None)),
            [
                "PATH=/usr/bin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8",
                "LC_ALL=C",
                "TERM=dumb",
                "TZ=UTC"
            ]
        );
        let user = TaskUser {
            name: "ci".into(),
            uid: 990,
            gid: 990,
            home: "/home/ci".into(),
        };
        let env = names(&task_env(&runner, Some(&user)));
        assert!(env.contains(&"HOME=/home/ci".to_owned()), "{env:?}");
        assert!(!env.contains(&"HOME=/root".to_owned()), "{env:?}");
    }

    #[test]
    fn exit_codes_over_128_from_bwrap_are_signals() {
        let group = |sandboxed| TaskGroup {
            leader: None,
            sandboxed,
            reaped: false,
            finished: false,
        };
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert_eq!(group(true).decode(code(137)), (None, Some(9)));
        assert_eq!(group(true).decode(code(3)), (Some(3), None));
        assert_eq!(group(true).decode(ExitStatus::from_raw(9)), (None, Some(9)));
        assert_eq!(group(false).decode(code(137)), (Some(137), None));
    }

    #[test]
    fn read_only_paths_must_not_reveal_the_runners_files() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&tools).unwrap();
        let private = [work.clone(), dir.path().join("token")];
        let ok = check_read_only(std::slice::from_ref(&tools), &private).unwrap();
        assert_eq!(ok, [tools.canonicalize().unwrap()]);
        for (path, words) in [
            (dir.path().to_owned(), "would show tasks"),
            (PathBuf::from("/"), "would show tasks"),
            (PathBuf::from("relative/tools"), "absolute"),
            (dir.path().join("missing"), "cannot be used"),
        ] {
            let err = check_read_only(std::slice::from_ref(&path), &private)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("--sandbox-ro {}: ", path.display())),
                "{err}"
            );
            assert!(err.contains(words), "{err}");
        }
    }

    #[test]
    fn merged_usr_symlinks_are_kept_as_symlinks() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.path().join("sbin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).unwrap();
        assert_eq!(
            scan_system(root.path()),
            [
                SystemEntry::Dir("/usr".into()),
                SystemEntry::Symlink {
                    link: "/bin".into(),
                    target: "usr/bin".into()
                },
                SystemEntry::Dir("/sbin".into()),
            ]
        );
    }

    #[test]
    fn a_missing_bwrap_is_named_with_its_package() {
        let empty = tempfile::tempdir().unwrap();
        let err = Sandbox::try_new(Some(empty.path().as_os_str()), Vec::new(), None).unwrap_err();
        assert!(err.contains("bwrap is not on the runner's PATH"), "{err}");
        assert!(err.contains("bubblewrap"), "{err}");
        let err = Isolation::detect(Some(empty.path().as_os_str()))
            .unwrap_err()
            .to_string();
        for option in ["bubblewrap", "--task-user USER", "--unsandboxed"] {
            assert!(err.contains(option), "{err}");
        }
    }

    #[test]
    fn the_checkout_is_handed_over_whole_and_symlinks_are_not_followed() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root and must run this test"
            );
            eprintln!("SKIPPED: handing a checkout to another uid needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let checkout = dir.path().join("jobs/1-1");
        std::fs::create_dir_all(checkout.join("src/deep")).unwrap();
        std::fs::write(checkout.join("src/deep/main.c"), "int main;\n").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "the runner's\n").unwrap();
        std::os::unix::fs::symlink(&outside, checkout.join("src/link")).unwrap();
        let isolation = Isolation::TaskUser {
            user: TaskUser {
                name: "t".into(),
                uid: 4242,
                gid: 4343,
                home: "/nonexistent".into(),
            },
            no_sandbox: "test".into(),
        };
        isolation.hand_over(&checkout).unwrap();
        for path in ["", "src", "src/deep", "src/deep/main.c", "src/link"] {
            let meta = std::fs::symlink_metadata(checkout.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{path}");
        }
        assert_eq!(
            std::fs::metadata(&outside).unwrap().uid(),
            0,
            "followed a symlink"
        );
        // Without a task user there is nothing to hand over.
        Isolation::Unsandboxed.hand_over(&outside).unwrap();
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);
    }

    #[test]
    fn task_user_root_and_unknown_users_are_refused() {
        let err = TaskUser::lookup("root").unwrap_err().to_string();
        assert!(err.starts_with("--task-user root: is uid 0"), "{err}");
        let err = TaskUser::lookup("surveil-no-such-user")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such user"), "{err}");
    }
}
