//! `surveil-runner`: the daemon entry shared by all three daemons
//! (`surveil_common::daemon`) around [`surveil_runner::serve`]. No job or
//! protocol logic lives here.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::process::ExitCode;

use surveil_common::daemon::Daemon;
use surveil_runner::config::Cli;

fn main() -> ExitCode {
    // The first signal drains; a second cancels the running jobs at once
    // (their process groups are killed) instead of orphaning them.
    Daemon::new("running").immediate_on_second_signal().main(
        |cli: &Cli| cli.log_format,
        // Tasks get only an allowlist of the runner's environment (see
        // `sandbox::TASK_ENV`), never SURVEIL_TOKEN or other secrets.
        |cli| cli.into_config(std::env::vars_os().collect()),
        |config, shutdown, ready| surveil_runner::serve(config, shutdown, || ready.notify()),
    )
}
