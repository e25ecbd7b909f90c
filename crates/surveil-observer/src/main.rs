//! `surveil-observer`: the daemon entry shared by all three daemons
//! (`surveil_common::daemon`) around [`surveil_observer::serve`]. No
//! watching logic lives here.

use std::process::ExitCode;

use surveil_common::daemon::{Daemon, SecondSignal};
use surveil_observer::config::Cli;

fn main() -> ExitCode {
    let daemon = Daemon {
        // One branch of one repository: two threads are plenty.
        worker_threads: Some(2),
        second_signal: SecondSignal::Exit,
        ready_status: "watching",
    };
    daemon.main(
        |cli: &Cli| cli.log_format,
        Cli::into_config,
        |config, shutdown, ready| {
            surveil_observer::serve(config, shutdown.graceful, || ready.notify())
        },
    )
}
