//! The `surveil-dispatcher` binary: the daemon entry shared by all three
//! daemons (`surveil_common::daemon`) around [`surveil_dispatcher::serve`],
//! plus binding `--listen`. Everything else is the library's.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::process::ExitCode;

use anyhow::Context;
use surveil_common::daemon::{Daemon, Ready};
use surveil_common::shutdown::Shutdown;
use surveil_dispatcher::{Cli, Config};

fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    Daemon::new("serving").main(|cli: &Cli| cli.log_format, Cli::into_config, serve)
}

async fn serve(config: Config, shutdown: Shutdown, ready: Ready) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", config.listen))?;
    surveil_dispatcher::serve(config, listener, shutdown.graceful, || ready.notify()).await
}
