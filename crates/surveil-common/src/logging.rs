//! Log set-up for the binaries: `RUST_LOG` filtering (default `info`) and a
//! choice of human text or JSON lines on stderr; and the one rule for
//! colour, shared with the CLI's tables: only on a terminal, and never
//! when `NO_COLOR` is set (a daemon under systemd or with its output piped
//! must not write escape codes into the journal or a file).

use std::ffi::OsString;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Installs the global subscriber, writing to stderr. Call once, first
/// thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests starting several daemons in one process) keeps
    // the first subscriber.
    let _ = result;
}

/// Whether output to `stream` may carry ANSI colour: it is a terminal and
/// `NO_COLOR` is unset or empty (<https://no-color.org>).
pub fn colour(stream: &impl IsTerminal) -> bool {
    colour_for(stream.is_terminal(), std::env::var_os("NO_COLOR"))
}

fn colour_for(terminal: bool, no_color: Option<OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_for(true, None));
        assert!(
            colour_for(true, Some(OsString::new())),
            "an empty NO_COLOR does not count"
        );
        assert!(!colour_for(true, Some("1".into())));
        assert!(!colour_for(false, None));
        assert!(!colour_for(false, Some("1".into())));
    }

    #[test]
    fn a_file_is_not_a_terminal() {
        let file = tempfile::tempfile().unwrap();
        assert!(!colour(&file));
    }
}
