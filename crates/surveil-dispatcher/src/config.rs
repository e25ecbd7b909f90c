//! The dispatcher's settings: the command-line contract ([`Cli`], each flag
//! also read from `SURVEIL_<FLAG>` and the `--config` TOML file) and the
//! validated [`Config`] that [`run`](crate::run) takes by value.
//!
//! Everything that can be wrong with the settings is found here, once, and
//! reported together; nothing past this file reads the environment.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use surveil_common::tls::ServerTls;
use surveil_common::{LogFormat, Secret};

pub use crate::domain::LogRetention;
use crate::store::PostgresOptions;
pub use crate::web::HttpConfig;

/// `surveil-dispatcher`: the Surveil job queue and runner coordinator.
#[derive(Debug, Clone, Parser)]
#[command(name = "surveil-dispatcher", version, about)]
pub struct Cli {
    /// Address to listen on for runners, observers and clients.
    #[arg(long, env = "SURVEIL_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: String,
    /// Directory of the job store (created if missing).
    #[arg(long, env = "SURVEIL_STATE_DIR")]
    pub state_dir: PathBuf,
    /// File holding the shared token (whitespace trimmed); else `SURVEIL_TOKEN`.
    #[arg(long, env = "SURVEIL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Per-role and per-runner credentials (TOML, hashes only), written by
    /// `surveil token add`; reloaded on change and on SIGHUP.
    #[arg(long, env = "SURVEIL_TOKENS_FILE", value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// How often each runner is pinged.
    #[arg(long, env = "SURVEIL_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = surveil_common::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How long a runner may stay silent before its jobs are requeued.
    #[arg(long, env = "SURVEIL_RUNNER_TIMEOUT", default_value = "5s", value_parser = surveil_common::parse_duration)]
    pub runner_timeout: Duration,
    /// How long the jobs of a runner whose connection closed or broke (a
    /// FIN or RST) wait for it to reconnect before they are requeued; `0s`
    /// requeues at once. Kept short so a crashed runner's job moves on
    /// quickly; a runner that reconnects within it keeps its jobs.
    #[arg(long, env = "SURVEIL_DISCONNECT_GRACE", default_value = "200ms", value_parser = surveil_common::parse_duration)]
    pub disconnect_grace: Duration,
    /// Lost attempts after which a job ends `error`.
    #[arg(long, env = "SURVEIL_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long a new connection has to send a valid Hello.
    #[arg(long, env = "SURVEIL_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = surveil_common::parse_duration)]
    pub handshake_timeout: Duration,
    /// Largest frame accepted or sent.
    #[arg(long, env = "SURVEIL_MAX_FRAME", default_value = "8MiB", value_parser = surveil_common::parse_size)]
    pub max_frame: u64,
    /// How long one attempt of a job may run; then its runner is told to
    /// cancel it, and a runner timeout later it ends `error` regardless.
    #[arg(long, env = "SURVEIL_JOB_TIMEOUT", default_value = "24h", value_parser = surveil_common::parse_duration)]
    pub job_timeout: Duration,
    /// Store writes failing in a row (a full or failing disk) after which
    /// the dispatcher stops and exits non-zero, for its service manager to
    /// restart it.
    #[arg(long, env = "SURVEIL_MAX_STORE_FAILURES", default_value_t = 5)]
    pub max_store_failures: u32,
    /// How long one store write may stay in flight (a hung fsync, a wedged
    /// disk) before the dispatcher stops, as after --max-store-failures;
    /// meanwhile the systemd watchdog is no longer fed.
    #[arg(long, env = "SURVEIL_STORE_WRITE_TIMEOUT", default_value = "30s", value_parser = surveil_common::parse_duration)]
    pub store_write_timeout: Duration,
    /// Infrastructure failures in a row (a runner's fetch or checkout
    /// failing) after which that runner gets no new job for a while; 0
    /// never quarantines.
    #[arg(long, env = "SURVEIL_QUARANTINE_AFTER", default_value_t = 3)]
    pub quarantine_after: u32,
    /// A runner's first quarantine; each further one without a good result
    /// in between lasts twice as long, up to 1h.
    #[arg(long, env = "SURVEIL_QUARANTINE_FOR", default_value = "5m", value_parser = surveil_common::parse_duration)]
    pub quarantine_for: Duration,
    /// Most connections open at once (runners, observers, clients); more
    /// are refused until some close.
    #[arg(long, env = "SURVEIL_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: u32,
    /// Most connections from one source address still in their handshake
    /// (not yet authenticated); more from it are refused.
    #[arg(
        long,
        env = "SURVEIL_MAX_UNAUTHENTICATED_PER_IP",
        default_value_t = 256
    )]
    pub max_unauthenticated_per_ip: u32,
    /// Most bytes of one attempt's log stored; later output is dropped
    /// (the job keeps running, its log says it was truncated).
    #[arg(long, env = "SURVEIL_MAX_LOG_SIZE", default_value = "64MiB", value_parser = surveil_common::parse_size)]
    pub max_log_size: u64,
    /// Delete finished jobs' logs older than this (`30d`) or beyond the
    /// newest N finished jobs (`1000jobs`), in the background; `off` keeps
    /// every log. Job rows and results are always kept.
    #[arg(long, env = "SURVEIL_RETAIN_LOGS", default_value = "off", value_parser = LogRetention::parse)]
    pub retain_logs: LogRetention,
    /// Local runners to start when jobs wait and no runner is connected.
    #[arg(long, env = "SURVEIL_SPAWN_RUNNERS", default_value_t = 0)]
    pub spawn_runners: u32,
    /// Shell command starting one local runner (`sh -c`); it is told the
    /// dispatcher's address in `SURVEIL_DISPATCH`.
    #[arg(long, env = "SURVEIL_RUNNER_COMMAND")]
    pub runner_command: Option<String>,
    /// TOML file of settings (same names with `_`); flags and env win.
    #[arg(long, env = "SURVEIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "SURVEIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs
    /// --tls-key.
    #[arg(long, env = "SURVEIL_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "SURVEIL_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require every client to present a certificate signed by this CA
    /// (mutual TLS); needs --tls-cert and --tls-key.
    #[arg(long, env = "SURVEIL_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Address for the HTTP API, pages, live logs, badges and /metrics
    /// (default 127.0.0.1:9080, skipped with a warning when busy); `off`
    /// disables HTTP. An address given here that cannot be bound is a
    /// startup error.
    #[arg(long, env = "SURVEIL_HTTP_LISTEN", value_name = "ADDR|off")]
    pub http_listen: Option<String>,
    /// Let anyone read (pages, API, badges, metrics) on a non-loopback
    /// --http-listen without the token; writing still needs it.
    #[arg(long, env = "SURVEIL_HTTP_PUBLIC_READ")]
    pub http_public_read: bool,
    /// The job store: `sqlite` (the default, in --state-dir) or a
    /// PostgreSQL URL `postgres://USER@HOST:PORT/DB[?sslmode=require]`
    /// (high availability: dispatchers sharing it elect one leader).
    #[arg(
        long,
        alias = "store-url",
        env = "SURVEIL_STORE",
        default_value = "sqlite"
    )]
    pub store: String,
    /// File holding the PostgreSQL password (whitespace trimmed); else an
    /// entry of the `PGPASSFILE` file.
    #[arg(long, env = "SURVEIL_STORE_PASSWORD_FILE", value_name = "FILE")]
    pub store_password_file: Option<PathBuf>,
    /// CA certificates (PEM) the PostgreSQL server's certificate must chain
    /// to; the connection then uses TLS.
    #[arg(long, env = "SURVEIL_STORE_CA", value_name = "FILE")]
    pub store_ca: Option<PathBuf>,
    #[arg(long = "pgpassfile", env = "PGPASSFILE", hide = true)]
    pub pgpassfile: Option<PathBuf>,
    /// How long a leader term lasts without renewal (database clock); the
    /// leader renews it every third of this.
    #[arg(long, env = "SURVEIL_LEADER_TTL", default_value = "3s", value_parser = surveil_common::parse_duration)]
    pub leader_ttl: Duration,
    /// The address clients should dial to reach this dispatcher, as a
    /// standby tells them (default: --listen).
    #[arg(long, env = "SURVEIL_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// The restore step, run once after putting a backup of the store back
    /// (with every dispatcher on it stopped): give the store (--state-dir,
    /// or --store) a new epoch, print it, and exit without serving. Runners
    /// and observers then drop what they hold from before the restore and
    /// resubmit what the backup lacks. Not for a config file or unit.
    #[arg(long, env = "SURVEIL_NEW_EPOCH")]
    pub new_epoch: bool,
    // Only there to refuse `--token VALUE` with the reason.
    #[command(flatten)]
    pub refuse_token: surveil_common::RefuseTokenFlag,
}

/// Largest `--quarantine-after`: past it, quarantine would never happen in
/// practice and 0 (off) says so honestly.
pub const MAX_QUARANTINE_AFTER: u32 = 1000;

/// Longest `--quarantine-for`: a week.
pub const MAX_QUARANTINE_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// `--job-timeout`'s default: generous, so only a job that is truly stuck
/// (a hung fetch, a deadlocked test past its task timeouts) meets it.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `--disconnect-grace`'s default: longer than a runner's first redial
/// (50–100 ms after it loses the link), so a runner whose connection was
/// reset reconnects in time to keep its jobs, and short enough that a
/// crashed runner's job is started elsewhere within the 0.3 s the
/// benchmarks hold (S3a).
pub const DEFAULT_DISCONNECT_GRACE: Duration = Duration::from_millis(200);

/// `--max-connections`' default: the S4 benchmark's 10,000 runners, with
/// room for observers and clients.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16_384;

/// `--store-write-timeout`'s default: far past any healthy fsync, well
/// inside a typical `WatchdogSec`.
pub const DEFAULT_STORE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Below this, a busy but healthy disk would trip the fail-stop.
const MIN_STORE_WRITE_TIMEOUT: Duration = Duration::from_millis(100);
/// Above this, a wedged dispatcher would sit for hours before stopping.
const MAX_STORE_WRITE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Smallest `--max-log-size`: one log chunk.
const MIN_MAX_LOG_SIZE: u64 = surveil_proto::MAX_LOG_CHUNK as u64;

/// Smallest frame limit that still fits a `Hello` and the replies.
const MIN_MAX_FRAME: u64 = 1024;
/// Frames are length-prefixed with a u32.
const MAX_MAX_FRAME: u64 = u32::MAX as u64;

/// The validated settings of one dispatcher. Its `Debug` never shows the
/// token.
#[derive(Clone, Debug)]
pub struct Config {
    /// The address to listen on, as resolved.
    pub listen: SocketAddr,
    /// The store's directory.
    pub state_dir: PathBuf,
    /// The shared token; `None` lets anyone connect (loopback only).
    pub token: Option<Secret>,
    /// The tokens file (per-role, per-runner credentials), if any.
    pub tokens_file: Option<PathBuf>,
    /// How often runners are pinged.
    pub heartbeat_interval: Duration,
    /// Silence after which a runner is declared dead.
    pub runner_timeout: Duration,
    /// `--disconnect-grace`: how long a closed runner's leases wait for it.
    pub disconnect_grace: Duration,
    /// Lost attempts after which a job ends `error`.
    pub max_attempts: u32,
    /// Time allowed for a valid Hello.
    pub handshake_timeout: Duration,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// `--job-timeout`: how long one attempt may run.
    pub job_timeout: Duration,
    /// `--max-store-failures`.
    pub max_store_failures: u32,
    /// `--store-write-timeout`: how long one store write may be in flight.
    pub store_write_timeout: Duration,
    /// `--quarantine-after`: infrastructure failures in a row that
    /// quarantine a runner (0: never).
    pub quarantine_after: u32,
    /// `--quarantine-for`: the first quarantine's length.
    pub quarantine_for: Duration,
    /// `--max-connections`.
    pub max_connections: u32,
    /// `--max-unauthenticated-per-ip`.
    pub max_unauthenticated_per_ip: u32,
    /// `--max-log-size`: the most bytes of one attempt's log stored.
    pub max_log_size: u64,
    /// `--retain-logs`: which finished jobs' logs are kept.
    pub retain_logs: LogRetention,
    /// Local runners to start when needed (0: never).
    pub spawn_runners: u32,
    /// The command starting one local runner.
    pub runner_command: Option<String>,
    /// TLS for every connection; `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// The HTTP side (`--http-listen`, `--http-public-read`).
    pub http: HttpConfig,
    /// Which job store.
    pub store: StoreConfig,
    /// The address a standby names as this dispatcher's, once it leads.
    pub advertise: Option<String>,
    /// `--new-epoch`: give the store a new epoch and exit (the restore
    /// step) instead of serving.
    pub new_epoch: bool,
}

/// The job store the dispatcher runs on.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// SQLite in the state directory: one dispatcher, always the leader.
    Sqlite,
    /// A shared PostgreSQL database with a leader term.
    Postgres(PostgresOptions),
}

impl Config {
    /// Settings for tests and embedding: the contract's defaults with the
    /// given store directory, no token, listening on 127.0.0.1:0, no HTTP.
    pub fn for_state_dir(state_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: state_dir.into(),
            token: None,
            tokens_file: None,
            heartbeat_interval: Duration::from_secs(1),
            runner_timeout: Duration::from_secs(5),
            disconnect_grace: DEFAULT_DISCONNECT_GRACE,
            max_attempts: 3,
            handshake_timeout: Duration::from_secs(5),
            max_frame: surveil_proto::DEFAULT_MAX_FRAME,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            max_store_failures: 5,
            store_write_timeout: DEFAULT_STORE_WRITE_TIMEOUT,
            quarantine_after: 3,
            quarantine_for: Duration::from_secs(300),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated_per_ip: 256,
            max_log_size: crate::service::DEFAULT_MAX_LOG_SIZE,
            retain_logs: LogRetention::Off,
            spawn_runners: 0,
            runner_command: None,
            tls: None,
            http: HttpConfig {
                listen: None,
                explicit: false,
                public_read: false,
            },
            store: StoreConfig::Sqlite,
            advertise: None,
            new_epoch: false,
        }
    }
}

/// Every problem found in the settings, one line each, naming the flag.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

impl Cli {
    /// Validates the flags and reads the token into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let token = match surveil_common::read_token(self.token_file.as_deref()) {
            Ok(token) => token,
            Err(err) => {
                problems.push(format!("--token-file: {err:#}"));
                None
            }
        };
        if let Some(path) = &self.tokens_file
            && let Err(err) = surveil_common::tokens::TokensFile::load(path)
        {
            problems.push(format!("--tokens-file: {err:#}"));
        }
        validate(&self, token, &mut problems).ok_or(ConfigError(problems))
    }
}

/// The limits on what fails: the store's writes (in a row, or one stalled)
/// and a runner's infrastructure (quarantine).
fn check_failure_limits(cli: &Cli, problems: &mut Vec<String>) {
    if cli.max_store_failures == 0 {
        problems.push("--max-store-failures must be at least 1".to_owned());
    }
    if !(MIN_STORE_WRITE_TIMEOUT..=MAX_STORE_WRITE_TIMEOUT).contains(&cli.store_write_timeout) {
        problems.push(format!(
            "--store-write-timeout must be between {} and {} (got {})",
            humantime::format_duration(MIN_STORE_WRITE_TIMEOUT),
            humantime::format_duration(MAX_STORE_WRITE_TIMEOUT),
            humantime::format_duration(cli.store_write_timeout)
        ));
    }
    if cli.quarantine_after > MAX_QUARANTINE_AFTER {
        problems.push(format!(
            "--quarantine-after must be at most {MAX_QUARANTINE_AFTER} (0 turns quarantine off; got {})",
            cli.quarantine_after
        ));
    }
    if !(Duration::from_secs(1)..=MAX_QUARANTINE_FOR).contains(&cli.quarantine_for) {
        problems.push(format!(
            "--quarantine-for must be between 1s and 7d (got {:?})",
            cli.quarantine_for
        ));
    }
}

fn validate(cli: &Cli, token: Option<String>, problems: &mut Vec<String>) -> Option<Config> {
    check_intervals(cli, problems);
    if cli.max_attempts == 0 {
        problems.push("--max-attempts must be at least 1".to_owned());
    }
    if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&cli.max_frame) {
        problems.push(format!(
            "--max-frame must be between {MIN_MAX_FRAME} bytes and {MAX_MAX_FRAME} bytes (got {})",
            cli.max_frame
        ));
    }
    if cli.job_timeout < Duration::from_secs(1) {
        problems.push(format!(
            "--job-timeout must be at least 1s (got {:?})",
            cli.job_timeout
        ));
    }
    check_failure_limits(cli, problems);
    if cli.max_connections == 0 {
        problems.push("--max-connections must be at least 1".to_owned());
    }
    if cli.max_unauthenticated_per_ip == 0 {
        problems.push("--max-unauthenticated-per-ip must be at least 1".to_owned());
    }
    if cli.max_log_size < MIN_MAX_LOG_SIZE || i64::try_from(cli.max_log_size).is_err() {
        problems.push(format!(
            "--max-log-size must be at least {} (one log chunk) and fit the store (got {})",
            surveil_common::format_size(MIN_MAX_LOG_SIZE),
            cli.max_log_size
        ));
    }
    let runner_command = cli
        .runner_command
        .as_ref()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    if cli.spawn_runners > 0 && runner_command.is_none() {
        problems.push(format!(
            "--spawn-runners {} needs --runner-command, the command that starts one runner",
            cli.spawn_runners
        ));
    }
    if cli.state_dir.as_os_str().is_empty() {
        problems.push("--state-dir must not be empty".to_owned());
    }
    let listen = listen_addr(cli, problems);
    let tls = server_tls(cli, problems);
    // Both kinds of token guard the HTTP side as they guard the protocol port.
    let http = http_config(cli, token.is_some() || cli.tokens_file.is_some(), problems);
    let store = store_config(cli, problems);
    if let Some(addr) = listen {
        check_exposure(
            cli,
            addr,
            token.is_some() || cli.tokens_file.is_some(),
            problems,
        );
    }
    if !problems.is_empty() {
        return None;
    }
    Some(Config {
        listen: listen?,
        state_dir: cli.state_dir.clone(),
        token: token.map(Secret::new),
        tokens_file: cli.tokens_file.clone(),
        heartbeat_interval: cli.heartbeat_interval,
        runner_timeout: cli.runner_timeout,
        disconnect_grace: cli.disconnect_grace,
        max_attempts: cli.max_attempts,
        handshake_timeout: cli.handshake_timeout,
        max_frame: usize::try_from(cli.max_frame).ok()?,
        job_timeout: cli.job_timeout,
        max_store_failures: cli.max_store_failures,
        store_write_timeout: cli.store_write_timeout,
        quarantine_after: cli.quarantine_after,
        quarantine_for: cli.quarantine_for,
        max_connections: cli.max_connections,
        max_unauthenticated_per_ip: cli.max_unauthenticated_per_ip,
        max_log_size: cli.max_log_size,
        retain_logs: cli.retain_logs,
        spawn_runners: cli.spawn_runners,
        runner_command,
        tls,
        http: http?,
        store: store?,
        advertise: cli.advertise.clone(),
        new_epoch: cli.new_epoch,
    })
}

/// Where HTTP listens when `--http-listen` is not given.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9080";

fn http_config(cli: &Cli, has_token: bool, problems: &mut Vec<String>) -> Option<HttpConfig> {
    let explicit = cli.http_listen.is_some();
    let text = cli
        .http_listen
        .as_deref()
        .unwrap_or(DEFAULT_HTTP_LISTEN)
        .trim();
    if text == "off" {
        return Some(HttpConfig {
            listen: None,
            explicit,
            public_read: cli.http_public_read,
        });
    }
    let addr = match text.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            problems.push(format!("--http-listen {text}: resolves to no address"));
            return None;
        }
        Err(err) => {
            problems.push(format!(
                "--http-listen {text}: not an address (write host:port, e.g. 127.0.0.1:9080, or `off`): {err}"
            ));
            return None;
        }
    };
    if !addr.ip().is_loopback() && !has_token && !cli.http_public_read {
        problems.push(format!(
            "--http-listen {addr} is not a loopback address and no token is set: anyone who can reach it could read every log; set --token-file (or SURVEIL_TOKEN) or --tokens-file, give --http-public-read to make reading anonymous (writing still needs the token), or listen on 127.0.0.1"
        ));
        return None;
    }
    Some(HttpConfig {
        listen: Some(addr),
        explicit,
        public_read: cli.http_public_read,
    })
}

/// Smallest leader TTL: renewals every third of it must fit round trips.
const MIN_LEADER_TTL: Duration = Duration::from_millis(300);

fn store_config(cli: &Cli, problems: &mut Vec<String>) -> Option<StoreConfig> {
    if cli.leader_ttl < MIN_LEADER_TTL {
        problems.push(format!(
            "--leader-ttl must be at least {MIN_LEADER_TTL:?} (got {:?})",
            cli.leader_ttl
        ));
    }
    let url = cli.store.trim();
    if url == "sqlite" {
        return Some(StoreConfig::Sqlite);
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        problems.push(format!(
            "--store {url:?}: write `sqlite` or a PostgreSQL URL postgres://USER@HOST:PORT/DB"
        ));
        return None;
    }
    let mut options = PostgresOptions::new(url);
    options.leader_ttl = cli.leader_ttl;
    options.ca_file = cli.store_ca.clone();
    let pg = match options.pg_config() {
        Ok(pg) => pg,
        Err(err) => {
            problems.push(
                err.to_string()
                    .trim_start_matches("store: invalid request: ")
                    .to_owned(),
            );
            return None;
        }
    };
    options.password = match (&cli.store_password_file, &cli.pgpassfile) {
        (Some(file), _) => match std::fs::read_to_string(file) {
            Ok(text) => Some(Secret::new(text.trim().to_owned())),
            Err(err) => {
                problems.push(format!("--store-password-file {}: {err}", file.display()));
                return None;
            }
        },
        (None, Some(file)) => pgpass_lookup(file, &pg).map(Secret::new),
        (None, None) => None,
    };
    Some(StoreConfig::Postgres(options))
}

/// The password of the first `PGPASSFILE` entry matching the connection
/// (`host:port:database:user:password`, `*` matching anything, `\:`
/// and `\\` escaped); an unreadable file gives none, as libpq does.
fn pgpass_lookup(file: &std::path::Path, pg: &tokio_postgres::Config) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = pg.get_user().unwrap_or_default().to_owned();
    let db = pg.get_dbname().unwrap_or(&user).to_owned();
    let wanted = [host, port, db, user];
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = pgpass_fields(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(&wanted)
                .all(|(field, want)| field == "*" || field == want);
            matches.then(|| fields[4].clone())
        })
}

fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

fn check_intervals(cli: &Cli, problems: &mut Vec<String>) {
    for (flag, value) in [
        ("--heartbeat-interval", cli.heartbeat_interval),
        ("--runner-timeout", cli.runner_timeout),
        ("--handshake-timeout", cli.handshake_timeout),
    ] {
        if value.is_zero() {
            problems.push(format!("{flag} must be greater than 0"));
        }
    }
    if cli.heartbeat_interval >= cli.runner_timeout && !cli.runner_timeout.is_zero() {
        problems.push(format!(
            "--heartbeat-interval ({:?}) must be shorter than --runner-timeout ({:?}), or every runner would time out between pings",
            cli.heartbeat_interval, cli.runner_timeout
        ));
    }
    if cli.disconnect_grace > cli.runner_timeout && !cli.runner_timeout.is_zero() {
        problems.push(format!(
            "--disconnect-grace ({:?}) must not be longer than --runner-timeout ({:?}): a runner that closed its connection is not waited for longer than a silent one",
            cli.disconnect_grace, cli.runner_timeout
        ));
    }
    for (flag, value) in [
        ("--runner-timeout", cli.runner_timeout),
        ("--heartbeat-interval", cli.heartbeat_interval),
    ] {
        if value.as_millis() > u128::from(u32::MAX) {
            problems.push(format!("{flag} is too long (at most {} ms)", u32::MAX));
        }
    }
}

fn listen_addr(cli: &Cli, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match cli.listen.to_socket_addrs() {
        Ok(mut addrs) => {
            let addr = addrs.next();
            if addr.is_none() {
                problems.push(format!("--listen {}: resolves to no address", cli.listen));
            }
            addr
        }
        Err(err) => {
            problems.push(format!(
                "--listen {}: not an address (write host:port, e.g. 127.0.0.1:9000): {err}",
                cli.listen
            ));
            None
        }
    }
}

fn server_tls(cli: &Cli, problems: &mut Vec<String>) -> Option<ServerTls> {
    match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => match ServerTls::new(cert, key, cli.tls_client_ca.as_deref()) {
            Ok(tls) => Some(tls),
            Err(err) => {
                problems.push(err.to_string());
                None
            }
        },
        (Some(_), None) => {
            problems.push("--tls-cert needs --tls-key, the certificate's private key".to_owned());
            None
        }
        (None, Some(_)) => {
            problems.push("--tls-key needs --tls-cert, the certificate it belongs to".to_owned());
            None
        }
        (None, None) => {
            if cli.tls_client_ca.is_some() {
                problems.push(
                    "--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked only over TLS".to_owned(),
                );
            }
            None
        }
    }
}

/// A non-loopback listener needs clients to authenticate. TLS alone
/// authenticates the dispatcher to its clients, not the clients to it;
/// only mutual TLS (or a token) keeps strangers out.
fn check_exposure(cli: &Cli, addr: SocketAddr, has_token: bool, problems: &mut Vec<String>) {
    let clients_authenticated = has_token || cli.tls_client_ca.is_some();
    if addr.ip().is_loopback() || clients_authenticated {
        return;
    }
    problems.push(format!(
        "--listen {addr} is not a loopback address and no token is set: anyone who can reach it could submit jobs or pose as a runner; set --tokens-file (see `surveil token add`) or --token-file (or SURVEIL_TOKEN), require client certificates with --tls-client-ca, or listen on 127.0.0.1{}",
        if cli.tls_cert.is_some() {
            " (TLS proves the dispatcher to its clients, not the clients to the dispatcher)"
        } else {
            ""
        }
    ));
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv: Vec<OsString> = std::iter::once("surveil-dispatcher")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let cli: Cli = surveil_common::config::try_parse_from(argv, &|_| None)
            .map_err(|e| format!("{e:?}"))?;
        // The token comes from the file only: SURVEIL_TOKEN may be set in
        // the environment running the tests.
        let mut problems = Vec::new();
        let token = cli
            .token_file
            .as_deref()
            .map(|p| std::fs::read_to_string(p).unwrap().trim().to_owned());
        validate(&cli, token, &mut problems).ok_or_else(|| problems.join("\n"))
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&["--state-dir", "/tmp/x"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.runner_timeout, Duration::from_secs(5));
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
        assert_eq!(c.max_frame, 8 * 1024 * 1024);
        assert_eq!(c.spawn_runners, 0);
        assert_eq!(c.max_log_size, 64 * 1024 * 1024);
        assert_eq!(c.retain_logs, LogRetention::Off);
        assert_eq!(c.max_connections, 16_384);
        assert_eq!(c.job_timeout, Duration::from_secs(24 * 3600));
        let err = parse(&["--state-dir", "/tmp/x", "--job-timeout", "0s"]).unwrap_err();
        assert!(err.contains("--job-timeout must be at least 1s"), "{err}");
        assert_eq!(c.max_unauthenticated_per_ip, 256);
        let err = parse(&["--state-dir", "/tmp/x", "--max-connections", "0"]).unwrap_err();
        assert!(
            err.contains("--max-connections must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn quarantine_flags_have_defaults_and_ranges() {
        let c = parse(&["--state-dir", "/tmp/x"]).unwrap();
        assert_eq!(
            (c.quarantine_after, c.quarantine_for),
            (3, Duration::from_secs(300))
        );
        let c = parse(&["--state-dir", "/tmp/x", "--quarantine-after", "0"]).unwrap();
        assert_eq!(c.quarantine_after, 0, "0 turns quarantine off");
        let c = parse(&["--state-dir", "/tmp/x", "--quarantine-for", "90s"]).unwrap();
        assert_eq!(c.quarantine_for, Duration::from_secs(90));
        let err = parse(&["--state-dir", "/tmp/x", "--quarantine-after", "1001"]).unwrap_err();
        assert!(
            err.contains("--quarantine-after must be at most 1000"),
            "{err}"
        );
        for bad in ["500ms", "8d"] {
            let err = parse(&["--state-dir", "/tmp/x", "--quarantine-for", bad]).unwrap_err();
            assert!(
                err.contains("--quarantine-for must be between 1s and 7d"),
                "{err}"
            );
        }
    }

    #[test]
    fn log_bounds_parse_and_name_what_is_wrong() {
        let c = parse(&[
            "--state-dir",
            "/tmp/x",
            "--max-log-size",
            "1MiB",
            "--retain-logs",
            "30d",
        ])
        .unwrap();
        assert_eq!(c.max_log_size, 1 << 20);
        assert_eq!(
            c.retain_logs,
            LogRetention::Age(Duration::from_secs(30 * 86_400))
        );
        let rule = c.retain_logs.rule(40 * 86_400_000);
        assert_eq!(rule.finished_before_ms, Some(10 * 86_400_000));
        assert_eq!(rule.keep_jobs, None);
        assert_eq!(
            LogRetention::parse("1000jobs").unwrap().rule(5).keep_jobs,
            Some(1000)
        );
        assert!(LogRetention::Off.rule(5).is_empty());
        let err = parse(&["--state-dir", "/tmp/x", "--max-log-size", "1KiB"]).unwrap_err();
        assert!(
            err.contains("--max-log-size must be at least 64KiB"),
            "{err}"
        );
        for bad in ["0s", "ten", "xjobs"] {
            let err = LogRetention::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        let err = parse(&["--state-dir", "/tmp/x", "--retain-logs", "soon"]).unwrap_err();
        assert!(err.contains("retain-logs"), "{err}");
    }

    #[test]
    fn invalid_values_are_all_reported_naming_the_flag() {
        let err = parse(&[
            "--state-dir",
            "/tmp/x",
            "--heartbeat-interval",
            "5s",
            "--runner-timeout",
            "2s",
            "--max-attempts",
            "0",
            "--spawn-runners",
            "2",
        ])
        .unwrap_err();
        assert!(
            err.contains("--heartbeat-interval (5s) must be shorter than --runner-timeout"),
            "{err}"
        );
        assert!(err.contains("--max-attempts must be at least 1"), "{err}");
        assert!(
            err.contains("--spawn-runners 2 needs --runner-command"),
            "{err}"
        );
        let err = parse(&["--state-dir", "/tmp/x", "--disconnect-grace", "6s"]).unwrap_err();
        assert!(
            err.contains("--disconnect-grace (6s) must not be longer than --runner-timeout (5s)"),
            "{err}"
        );
        let off = parse(&["--state-dir", "/tmp/x", "--disconnect-grace", "0s"]).unwrap();
        assert_eq!(off.disconnect_grace, Duration::ZERO, "0s revokes at once");
        let err = parse(&["--state-dir", "/tmp/x", "--handshake-timeout", "0s"]).unwrap_err();
        assert!(
            err.contains("--handshake-timeout must be greater than 0"),
            "{err}"
        );
    }

    #[test]
    fn non_loopback_listen_needs_a_token() {
        let err = parse(&["--state-dir", "/tmp/x", "--listen", "0.0.0.0:9000"]).unwrap_err();
        assert!(
            err.contains("not a loopback address and no token is set"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  s3cret\n").unwrap();
        let c = parse(&[
            "--state-dir",
            "/tmp/x",
            "--listen",
            "0.0.0.0:9000",
            "--token-file",
            token.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            c.token.as_ref().map(|t| t.expose().as_str()),
            Some("s3cret")
        );
    }

    #[test]
    fn http_listen_is_on_by_default_can_be_off_and_needs_a_token_or_public_read_off_loopback() {
        let c = parse(&["--state-dir", "/tmp/x"]).unwrap();
        assert_eq!(c.http.listen, Some("127.0.0.1:9080".parse().unwrap()));
        assert!(!c.http.explicit, "the default address is soft");
        let c = parse(&["--state-dir", "/tmp/x", "--http-listen", "127.0.0.1:9080"]).unwrap();
        assert!(c.http.explicit, "a given address must bind or fail");
        let c = parse(&["--state-dir", "/tmp/x", "--http-listen", "off"]).unwrap();
        assert_eq!(c.http.listen, None);
        let err = parse(&["--state-dir", "/tmp/x", "--http-listen", "0.0.0.0:9080"]).unwrap_err();
        assert!(
            err.contains("--http-listen 0.0.0.0:9080 is not a loopback address"),
            "{err}"
        );
        assert!(err.contains("--http-public-read"), "{err}");
        let c = parse(&[
            "--state-dir",
            "/tmp/x",
            "--http-listen",
            "0.0.0.0:9080",
            "--http-public-read",
        ])
        .unwrap();
        assert!(c.http.public_read);
        let err = parse(&["--state-dir", "/tmp/x", "--http-listen", "nowhere"]).unwrap_err();
        assert!(
            err.contains("--http-listen nowhere: not an address"),
            "{err}"
        );
    }

    #[test]
    fn tls_flags_come_in_pairs_and_name_the_flag() {
        let err = parse(&["--state-dir", "/tmp/x", "--tls-cert", "/nonexistent.pem"]).unwrap_err();
        assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
        let err = parse(&["--state-dir", "/tmp/x", "--tls-key", "/nonexistent.key"]).unwrap_err();
        assert!(err.contains("--tls-key needs --tls-cert"), "{err}");
        let err = parse(&["--state-dir", "/tmp/x", "--tls-client-ca", "/ca.pem"]).unwrap_err();
        assert!(
            err.contains("--tls-client-ca needs --tls-cert and --tls-key"),
            "{err}"
        );
        let err = parse(&[
            "--state-dir",
            "/tmp/x",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ])
        .unwrap_err();
        assert!(err.starts_with("--tls-cert /nonexistent.pem:"), "{err}");
    }

    #[test]
    fn tls_without_a_token_is_still_refused_off_loopback_unless_mutual() {
        let dir = tempfile::tempdir().unwrap();
        let certs = surveil_common::tls::test_certs::write(dir.path());
        let (cert, key, ca) = (
            certs.server_cert.to_str().unwrap(),
            certs.server_key.to_str().unwrap(),
            certs.ca.to_str().unwrap(),
        );
        let base = [
            "--state-dir",
            "/tmp/x",
            "--listen",
            "0.0.0.0:9000",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ];
        let err = parse(&base).unwrap_err();
        assert!(err.contains("no token is set"), "{err}");
        assert!(
            err.contains("TLS proves the dispatcher to its clients, not the clients"),
            "{err}"
        );
        let mut mutual = base.to_vec();
        mutual.extend(["--tls-client-ca", ca]);
        let c = parse(&mutual).unwrap();
        assert!(c.token.is_none());
        assert!(c.tls.as_ref().is_some_and(|t| t.requires_client_certs()));
        let c = parse(&base[..4]).unwrap_err();
        assert!(c.contains("no token is set"), "{c}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let mut config = Config::for_state_dir("/tmp/x");
        config.token = Some("s3cret-token".into());
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn token_flag_is_refused() {
        let err = parse(&["--state-dir", "/tmp/x", "--token", "s3cret"]).unwrap_err();
        assert!(err.contains("visible to every user in `ps`"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
