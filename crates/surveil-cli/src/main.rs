//! The `surveil` binary: parses the command line (flags, `SURVEIL_*`
//! environment, `--config` file), runs one command on a single-threaded
//! runtime, prints `surveil: <error chain>` on failure and picks the exit
//! code: 0 done, 1 runtime failure, 2 usage (clap exits with it itself).
//!
//! Everything else lives in the modules; nothing here talks to the
//! dispatcher or formats output.

// Production functions stay under 100 lines (clippy.toml); tests may be longer.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod args;
mod client;
mod commands;
mod output;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: args::Cli = surveil_common::config::parse();
    // Unusable TLS files are a usage error (exit 2), found before dialling.
    if let Err(err) = cli.connect.tls() {
        eprintln!("surveil: {err}");
        return ExitCode::from(2);
    }
    let stdout = std::io::stdout();
    let colour = surveil_common::logging::colour(&stdout);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("surveil: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = stdout.lock();
    match runtime.block_on(commands::run(cli, colour, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        // `surveil logs 7 | head` closing the pipe early is not a failure.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("surveil: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
