//! What the Surveil daemons and the CLI share beyond the wire: reading
//! configuration (flags, `SURVEIL_*` environment, TOML file), value parsers
//! for durations, sizes and addresses, tokens ([`Secret`]), repository
//! names; the clients' way to the dispatcher ([`dial`](mod@dial), [`Backoff`]); and
//! the daemons' one entry point ([`daemon`]: signals, systemd
//! notification, logging, exit codes).
//!
//! Binaries' `main.rs` and config code read the environment through this
//! crate; the daemon libraries receive already-validated values and never
//! read it themselves. Nothing here knows what a role does after its
//! handshake.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod backoff;
pub mod config;
pub mod daemon;
pub mod dial;
pub mod logging;
pub mod notify;
pub mod private;
pub mod secret;
pub mod shutdown;
pub mod tls;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

pub use backoff::Backoff;
pub use dial::{DialError, Dialer, DispatchArgs, dial, parse_addr};
pub use logging::LogFormat;
pub use secret::Secret;

/// `err` and its sources, `: `-separated, as anyhow's `{:#}` prints them:
/// for log lines of typed errors whose `Display` leaves the cause out.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses a duration such as `500ms`, `5s`, `10m` or `1h 30m`; a clap
/// `value_parser` for every duration flag.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 500ms, 5s or 10m"))
}

/// Parses a byte size such as `8MiB`, `64KiB`, `1MB` or `1024`; a clap
/// `value_parser` for size flags.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("`{text}` is not a size ({e}); write e.g. 8MiB, 64KiB or 1024"))
}

/// A size as [`parse_size`] reads it back, in the largest binary unit
/// that divides it exactly (`64MiB`, `1536KiB`, `1000`), for messages that
/// name a configured limit.
///
/// ```
/// assert_eq!(surveil_common::format_size(64 << 20), "64MiB");
/// assert_eq!(surveil_common::format_size(1000), "1000");
/// ```
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(unit, _)| bytes != 0 && bytes.is_multiple_of(*unit))
        .map_or_else(
            || bytes.to_string(),
            |(unit, name)| format!("{}{name}", bytes / unit),
        )
}

/// Reads the shared secret: the contents of `token_file` with surrounding
/// whitespace trimmed, or else the `SURVEIL_TOKEN` environment variable.
/// `None` when neither is set. A token file group or others may read is
/// refused (see [`private::read_credential`]).
pub fn read_token(token_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let token = match token_file {
        Some(path) => {
            let text = private::read_credential(path, credentials_dir().as_deref())
                .context("cannot read token file")?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                bail!("token file {} is empty", path.display());
            }
            Some(token)
        }
        None => std::env::var("SURVEIL_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    Ok(token)
}

/// systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`): private to the
/// service, so its files need no mode check.
pub fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Why `--token VALUE` is refused: a command line is readable by every
/// user through `ps` and `/proc`.
pub const TOKEN_FLAG_REFUSED: &str = "a token on the command line would be visible to every user in `ps`; put it in a file and pass --token-file FILE, or set SURVEIL_TOKEN";

/// A hidden `--token` that every binary flattens into its command line,
/// only to refuse it (exit 2) with [`TOKEN_FLAG_REFUSED`] instead of clap's
/// "unexpected argument": whoever tries it learns the safe ways.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RefuseTokenFlag {
    /// Never set: parsing it always fails.
    #[arg(long = "token", hide = true, num_args = 0..=1, default_missing_value = "",
          value_name = "TOKEN", value_parser = RefuseToken)]
    pub token_on_command_line: Option<String>,
}

/// Fails every value with a message that does not repeat it (clap's
/// own "invalid value 'VALUE'" would echo the secret).
#[derive(Clone)]
struct RefuseToken;

impl clap::builder::TypedValueParser for RefuseToken {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        _value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        Err(clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("--token is not accepted: {TOKEN_FLAG_REFUSED}\n"),
        )
        .with_cmd(cmd))
    }
}

/// Whether `repo` names a remote repository (a URL or scp-like
/// `host:path`) rather than a local path.
pub fn is_remote_repo(repo: &str) -> bool {
    if repo.contains("://") {
        return true;
    }
    // scp-like syntax: `host:path` or `user@host:path`, with the colon
    // before any slash. Windows-style `C:\` never reaches us on Unix.
    match (repo.find(':'), repo.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 0,
        (Some(colon), None) => colon > 0,
        _ => false,
    }
}

/// The name under which jobs and runners match a repository: URLs (and
/// `file://` URLs) exactly as given, local paths made absolute with symlinks
/// resolved. The observer, the runner and `surveil submit` all use it, so
/// the same repository always gets the same name.
pub fn canonical_repo(repo: &str) -> anyhow::Result<String> {
    if repo.is_empty() {
        bail!("repository must not be empty");
    }
    if is_remote_repo(repo) {
        return Ok(repo.to_owned());
    }
    let path = std::fs::canonicalize(repo)
        .with_context(|| format!("repository path `{repo}` cannot be resolved"))?;
    path.into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("repository path {} is not valid UTF-8", p.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot reach dispatcher at x:1")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("connection refused"));
        assert_eq!(
            error_chain(&err),
            "cannot reach dispatcher at x:1: connection refused"
        );
    }

    #[test]
    fn durations_in_the_contract_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("`soon` is not a duration"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 * 1024 * 1024));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn token_file_is_trimmed_and_empty_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        private::write_atomic(&file, b"  s3cret\n").unwrap();
        assert_eq!(read_token(Some(&file)).unwrap().as_deref(), Some("s3cret"));
        private::write_atomic(&file, b" \n").unwrap();
        let err = read_token(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
        let missing = dir.path().join("nope");
        let err = read_token(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("cannot read token file"), "{err}");
    }

    #[test]
    fn token_flag_is_refused_with_the_reason() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            _no_token: RefuseTokenFlag,
        }
        for args in [
            &["x", "--token", "s3cret"][..],
            &["x", "--token=s3cret"],
            &["x", "--token"],
        ] {
            let err = <Cli as clap::Parser>::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(text.contains(TOKEN_FLAG_REFUSED), "{text}");
            assert!(
                !text.contains("s3cret"),
                "the refusal echoes the token: {text}"
            );
        }
    }

    #[test]
    fn repos_urls_kept_paths_canonical() {
        assert_eq!(
            canonical_repo("https://example.com/a.git").unwrap(),
            "https://example.com/a.git"
        );
        assert_eq!(
            canonical_repo("git@host:org/a.git").unwrap(),
            "git@host:org/a.git"
        );
        assert_eq!(canonical_repo("file:///srv/a").unwrap(), "file:///srv/a");
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            canonical_repo(link.to_str().unwrap()).unwrap(),
            canonical.to_str().unwrap()
        );
        let err = canonical_repo(dir.path().join("missing").to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("cannot be resolved"), "{err}");
    }
}
