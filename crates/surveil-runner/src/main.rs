//! `surveil-runner`: the daemon entry shared by all three daemons
//! (`surveil_common::daemon`) around [`surveil_runner::serve`]. No job or
//! protocol logic lives here.

use std::process::ExitCode;

use surveil_common::daemon::{Daemon, SecondSignal};
use surveil_runner::config::Cli;

fn main() -> ExitCode {
    let daemon = Daemon {
        worker_threads: None,
        // The first signal drains; a second cancels the running jobs at
        // once (their process groups are killed) instead of orphaning them.
        second_signal: SecondSignal::Immediate,
        ready_status: "running",
    };
    daemon.main(
        |cli: &Cli| cli.log_format,
        // Tasks start from the runner's environment; the executor removes
        // SURVEIL_TOKEN and anything else that looks like a secret.
        |cli| cli.into_config(std::env::vars_os().collect()),
        |config, shutdown, ready| surveil_runner::serve(config, shutdown, || ready.notify()),
    )
}
