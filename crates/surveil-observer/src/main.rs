//! `surveil-observer`: the daemon entry shared by all three daemons
//! (`surveil_common::daemon`) around [`surveil_observer::serve`]. No
//! watching logic lives here.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::process::ExitCode;

use surveil_common::daemon::Daemon;
use surveil_observer::config::Cli;

fn main() -> ExitCode {
    // One branch of one repository: two threads are plenty.
    Daemon::new("watching").worker_threads(2).main(
        |cli: &Cli| cli.log_format,
        Cli::into_config,
        |config, shutdown, ready| {
            surveil_observer::serve(config, shutdown.graceful, || ready.notify())
        },
    )
}
