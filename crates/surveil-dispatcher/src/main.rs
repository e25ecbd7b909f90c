//! The `surveil-dispatcher` binary: flags, logging, signals, systemd
//! notification and the exit code. Everything else is the library's.

use std::process::ExitCode;

use surveil_dispatcher::Cli;

fn main() -> ExitCode {
    let cli: Cli = surveil_common::config::parse();
    surveil_common::logging::init(cli.log_format);
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = surveil_common::shutdown::install();
        surveil_common::notify::spawn_watchdog(shutdown.clone());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on --listen {}: {e}", config.listen))?;
        surveil_dispatcher::serve(config, listener, shutdown, || {
            surveil_common::notify::ready();
            surveil_common::notify::status("serving");
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
