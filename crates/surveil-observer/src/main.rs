//! `surveil-observer`: flags, logging, signals, readiness and exit codes
//! around [`surveil_observer::Observer`]. No watching logic lives here.

use std::process::ExitCode;
use std::time::Duration;

use surveil_common::notify;
use surveil_observer::Observer;
use surveil_observer::config::Cli;

/// How long shutdown waits for a blocking fetch or cursor write to finish
/// before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli: Cli = surveil_common::config::parse();
    surveil_common::logging::init(cli.log_format);
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
        let shutdown = surveil_common::shutdown::install();
        notify::spawn_watchdog(shutdown.clone());
        let observer = tokio::task::spawn_blocking(move || Observer::open(config)).await??;
        notify::ready();
        notify::status("watching");
        observer.run(shutdown).await
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
