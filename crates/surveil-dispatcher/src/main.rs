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
    if config.new_epoch {
        // The restore step: no listening, no serving.
        let (old, new) = surveil_dispatcher::new_epoch(&config).await?;
        tracing::warn!(old_epoch = %old, epoch = %new, "the store has a new epoch; start the dispatcher without --new-epoch");
        println!("store epoch {old} -> {new}");
        return Ok(());
    }
    check_fd_limit(config.max_connections);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", config.listen))?;
    let hooks = surveil_dispatcher::Hooks::default().watchdog(ready.watchdog());
    surveil_dispatcher::serve_hooked(
        config,
        listener,
        shutdown.graceful,
        hooks.on_ready(|| ready.notify()),
    )
    .await
}

/// Lifts the soft limit on open files to the hard one (the usual soft
/// default, 1024, is far below `--max-connections`), and warns when even
/// the hard limit cannot hold that many connections.
fn check_fd_limit(max_connections: u32) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // The store, the listeners and the log need a few descriptors too.
    let needed = u64::from(max_connections) + 64;
    if limit < needed {
        tracing::warn!(
            open_files = limit,
            max_connections,
            "the open-file limit is below --max-connections: connections past it fail to be accepted; \
             raise LimitNOFILE (or ulimit -n) or lower --max-connections"
        );
    }
}
