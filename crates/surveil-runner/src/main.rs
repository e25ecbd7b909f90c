//! `surveil-runner`: flags, logging, signals, readiness and exit codes
//! around [`surveil_runner::Runner`]. No job or protocol logic lives here.

use std::process::ExitCode;
use std::time::Duration;

use surveil_common::notify;
use surveil_runner::Runner;
use surveil_runner::config::Cli;

/// How long the runtime waits for stray blocking work (a fetch) after the
/// runner returned, before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli: Cli = surveil_common::config::parse();
    surveil_common::logging::init(cli.log_format);
    // Tasks get only an allowlist of the runner's environment (see
    // `sandbox::TASK_ENV`), never SURVEIL_TOKEN or other secrets.
    let config = match cli.into_config(std::env::vars_os().collect()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // First signal drains; a second cancels the running jobs at once
        // (their process groups are killed) instead of orphaning them.
        let shutdown = surveil_common::shutdown::install_two_stage();
        // Keep-alives continue through the drain, which can take minutes.
        let stopped = tokio_util::sync::CancellationToken::new();
        notify::spawn_watchdog(stopped.clone());
        let runner = tokio::task::spawn_blocking(move || Runner::prepare(config)).await??;
        notify::ready();
        notify::status("running");
        runner.run(shutdown.graceful, shutdown.immediate).await;
        stopped.cancel();
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
