//! Project automation, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//!
//! Everything the project automates lives here in Rust rather than in shell
//! scripts, so it runs the same on every machine that has cargo.

mod bench;
mod chaos;
mod codegen;
mod disk;
mod e2e;
mod e2e_pg;
mod story;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  bench      benchmark scenarios on a local cluster of release binaries,
             writing target/bench/report.json [--quick] [--only S1,S2,…]
  chaos      soak a local cluster with commits while killing, stopping and
             restarting daemons; check nothing was lost or recorded twice
             [--commits N (30)] [--seed S] [--release] [--keep]
             [--storage-faults: the dispatcher's disk filled and frozen too]
             [--store postgres [--dispatchers 2]: on a PostgreSQL it starts,
             a leader and a standby, PostgreSQL restarted too]
  codegen    regenerate crates/surveil-proto/src/generated/ from proto/
  e2e        run a local cluster over a scratch repository and tell its story
             and print its pages' address [--keep: leave target/e2e/ for
             inspection and keep the dispatcher serving its pages]
             [--store postgres: the failover story instead, two dispatchers
             on a PostgreSQL this starts, the leader SIGKILLed mid-job]
  verify-units
             systemd-analyze verify dist/systemd/*.service
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::Options::parse(&args[1..])
            .and_then(|options| bench::run(&workspace_root(), options)),
        // Hidden helpers the benchmark runs from the release build.
        Some("bench-load") => bench::load_tool(&args[1..]),
        Some("bench-checkout") => bench::checkout_tool(&args[1..]),
        Some("chaos") => chaos::Options::parse(&args[1..])
            .and_then(|options| chaos::run(&workspace_root(), options)),
        Some("codegen") => codegen::write(&workspace_root()),
        Some("e2e") => {
            let keep = args.iter().any(|a| a == "--keep");
            match e2e_store(&args[1..]) {
                Ok(None) => e2e::run(&workspace_root(), e2e::Options { keep }),
                Ok(Some(())) => e2e_pg::run(&workspace_root(), keep),
                Err(err) => Err(err),
            }
        }
        Some("verify-units") => units::verify(&workspace_root()),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask e2e`'s `--store`: `None` for the default (SQLite) story,
/// `Some(())` for `--store postgres`; anything else is refused.
fn e2e_store(args: &[String]) -> anyhow::Result<Option<()>> {
    let mut store = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keep" => {}
            "--store" => store = Some(args.next().map(String::as_str).unwrap_or("")),
            other => anyhow::bail!("e2e: unknown argument `{other}` (--keep, --store postgres)"),
        }
    }
    match store {
        None | Some("sqlite") => Ok(None),
        Some("postgres") => Ok(Some(())),
        Some(other) => anyhow::bail!("e2e: --store `{other}`: expected `postgres` or `sqlite`"),
    }
}

/// The workspace root: xtask's manifest lives one level below it.
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}
