//! The `surveil-dispatcher` binary: the daemon entry shared by all three
//! daemons (`surveil_common::daemon`) around [`surveil_dispatcher::serve`],
//! plus binding `--listen`. Everything else is the library's.

use std::process::ExitCode;

use surveil_common::daemon::{Daemon, SecondSignal};
use surveil_dispatcher::Cli;

fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let daemon = Daemon {
        worker_threads: None,
        second_signal: SecondSignal::Exit,
        ready_status: "serving",
    };
    daemon.main(
        |cli: &Cli| cli.log_format,
        Cli::into_config,
        |config, shutdown, ready| async move {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --listen {}: {e}", config.listen))?;
            surveil_dispatcher::serve(config, listener, shutdown.graceful, || ready.notify()).await
        },
    )
}
