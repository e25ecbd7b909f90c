//! A real PostgreSQL server for tests: `initdb` into a temporary directory,
//! `postgres` on a free 127.0.0.1 port, run as an unprivileged user when
//! the tests run as root (PostgreSQL refuses root), with password
//! authentication on TCP so the dispatcher's credential handling is
//! exercised too.
//!
//! Each server is owned by a small `sh` keeper whose standard input is a
//! pipe from this process: a line on it stops the server by its pid (a
//! restart); the pipe closing — the test process died in any way, SIGKILL
//! included — stops the server and removes its directory. So a server in a `static`
//! (see [`shared`]) does not outlive its test binary.
//!
//! This module must not decide whether a missing PostgreSQL is an error:
//! [`available`] reports why it cannot start, and [`require`] turns that
//! into a loud failure under `CI=true` and a loud skip otherwise.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The unprivileged system user the server runs as when tests run as root.
pub const SERVER_USER: &str = "surveil-pg";
/// The database superuser every test connects as.
pub const DB_USER: &str = "surveil";
/// How long a server may take to accept connections after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many free ports to try: another process may take the one we found
/// between probing it and the server binding it.
const PORT_TRIES: usize = 3;

/// A running PostgreSQL server with its own data directory.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    password_file: PathBuf,
    keeper: Option<Child>,
    keeper_stdin: Option<ChildStdin>,
    run_as: Option<String>,
}

impl Postgres {
    /// Initialises a new cluster and starts it.
    pub fn start() -> Result<Postgres> {
        let bin = find_bin()?;
        let run_as = server_user()?;
        let dir = make_dir(run_as.as_deref())?;
        let password = format!("pw-{}-{}", std::process::id(), nanos());
        let password_file = dir.join("password");
        std::fs::write(&password_file, format!("{password}\n"))
            .context("writing the password file")?;
        let mut pg = Postgres {
            bin,
            dir,
            port: 0,
            password,
            password_file,
            keeper: None,
            keeper_stdin: None,
            run_as,
        };
        pg.initdb()?;
        pg.start_server()?;
        Ok(pg)
    }

    /// The server's TCP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file holding the superuser's password (and a newline).
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// A connection URL for `database`, without the password.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{DB_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A connection URL for `database` through another address (a relay
    /// in front of this server), without the password.
    pub fn url_via(&self, addr: SocketAddr, database: &str) -> String {
        format!("postgres://{DB_USER}@{addr}/{database}")
    }

    /// Creates a database with a name unique in this process and returns
    /// its name.
    pub fn create_database(&self) -> Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// Runs `sql` in `database` with `psql` over the local socket and
    /// returns its unaligned, tuples-only output (`|` between columns).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = self
            .command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.socket_dir(), "-p", &self.port.to_string()])
            .args(["-U", DB_USER, "-d", database, "-c", sql])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server abruptly (as a crash would: no checkpoint), then
    /// starts it again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_server();
        self.start_server()
    }

    /// Stops the server abruptly; [`start_again`](Self::start_again)
    /// brings it back.
    pub fn stop(&mut self) {
        self.stop_server();
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        self.start_server()
    }

    fn socket_dir(&self) -> String {
        self.dir.join("sock").display().to_string()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command running one of the server's binaries as the server user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    &format!("--reuid={user}"),
                    &format!("--regid={user}"),
                    "--clear-groups",
                    "--",
                ]);
                cmd.arg(path);
                cmd
            }
            None => Command::new(path),
        };
        cmd.env("LC_ALL", "C").env_remove("PGPASSWORD");
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", DB_USER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", self.password_file.display()))
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..PORT_TRIES {
            if self.port == 0 || last.is_some() {
                self.port = free_port()?;
            }
            match self.spawn_keeper() {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no port tried")))
    }

    /// Starts the keeper shell, which starts the server and stops it when
    /// its standard input closes; returns once the server accepts
    /// connections.
    fn spawn_keeper(&mut self) -> Result<()> {
        let log = self.dir.join("server.log");
        let mut server = self.command("postgres");
        server
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-k", &self.socket_dir()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Tests check what survives a process crash, which does not
            // need fsync; a test machine's power loss is not under test.
            .args(["-c", "fsync=off", "-c", "max_connections=200"]);
        let server_line = shell_words(&server);
        // setpriv execs the server, so `$!` is the postmaster's own pid.
        let script = format!(
            "{server_line} >>'{log}' 2>&1 </dev/null & pg=$!\n\
             if read -r _stop; then kill -QUIT $pg; wait $pg\n\
             else kill -QUIT $pg; wait $pg; rm -rf '{dir}'; fi\n",
            log = log.display(),
            dir = self.dir.display(),
        );
        let mut keeper = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL keeper shell")?;
        let stdin = keeper.stdin.take();
        self.keeper = Some(keeper);
        self.keeper_stdin = stdin;
        self.wait_ready(&log)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            let exited = self
                .keeper
                .as_mut()
                .and_then(|k| k.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() > deadline {
                self.stop_server();
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                bail!(
                    "PostgreSQL did not start on port {} ({}): {}",
                    self.port,
                    if exited { "it exited" } else { "timed out" },
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_server(&mut self) {
        // Closing the keeper's stdin makes it send SIGQUIT (immediate
        // shutdown) to the server's pid and wait for it.
        if let Some(mut stdin) = self.keeper_stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        if let Some(mut keeper) = self.keeper.take() {
            let _ = keeper.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command line as `sh` words, each single-quoted.
fn shell_words(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| format!("'{}'", w.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The directory holding `postgres`, `initdb`, `pg_isready`, `psql`: the
/// newest `/usr/lib/postgresql/N/bin`, else wherever `initdb` is on PATH.
fn find_bin() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
        .context(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin and no initdb on PATH \
             (apt-get install postgresql)",
        )
}

/// `Some(user)` when running as root: the server must run as someone else.
fn server_user() -> Result<Option<String>> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(None);
    }
    let known = Command::new("id")
        .arg(SERVER_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running id")?;
    if !known.success() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(SERVER_USER)
            .output()
            .context("running useradd")?;
        // 9: another test process created it meanwhile.
        if !out.status.success() && out.status.code() != Some(9) {
            bail!(
                "cannot create the unprivileged user {SERVER_USER} for PostgreSQL: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(Some(SERVER_USER.to_owned()))
}

/// A fresh directory the server user owns (data, socket, log).
fn make_dir(run_as: Option<&str>) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("surveil-pg-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(dir.join("sock")).context("creating the PostgreSQL directory")?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    if let Some(user) = run_as {
        let out = Command::new("chown")
            .args(["-R", &format!("{user}:"), &dir.display().to_string()])
            .output()
            .context("running chown")?;
        if !out.status.success() {
            bail!(
                "chown {} to {user}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(dir)
}

/// One server shared by every test of this process; it stops when the
/// process ends. `Err` says why it could not start.
pub fn shared() -> Result<&'static Postgres, String> {
    static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| Postgres::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether PostgreSQL can run here; `Err` says why not.
pub fn available() -> Result<(), String> {
    shared().map(|_| ())
}

/// The shared server, or `None` after saying loudly why the test is
/// skipped. Under `CI=true` a server that cannot start fails the test.
pub fn require(test: &str) -> Option<&'static Postgres> {
    match shared() {
        Ok(pg) => Some(pg),
        Err(why) => {
            skip_or_fail(test, &why);
            None
        }
    }
}

/// Panics under `CI=true`; otherwise prints that `test` is skipped and why.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: PostgreSQL is required in CI and cannot start: {why}");
    }
    eprintln!("SKIPPED {test}: PostgreSQL cannot start here: {why}");
}
