//! The commented example settings in `dist/config/` are what people copy to
//! `/etc/surveil/`: every key in them must be one the binary knows, with a
//! value it accepts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use surveil_common::config::{ParseError, try_parse_from};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("dist/config")
        .join(name)
}

fn parse<C: clap::Parser>(file: &str, extra: &[&str]) -> C {
    let mut argv: Vec<OsString> = vec!["surveil".into(), "--config".into()];
    argv.push(example(file).into_os_string());
    argv.extend(extra.iter().map(OsString::from));
    // An empty environment: only the file and the given flags count.
    match try_parse_from::<C>(argv, &|_| None) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) => panic!("{file}: {e}"),
        Err(ParseError::File(e)) => panic!("{file}: {e}"),
    }
}

#[test]
fn dispatcher_example_is_accepted() {
    let cli: surveil_dispatcher::Cli = parse("dispatcher.toml", &["--state-dir", "/tmp/x"]);
    let config = cli.into_config().expect("the example validates");
    assert_eq!(config.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(config.max_attempts, 3);
}

#[test]
fn runner_example_is_accepted() {
    let cli: surveil_runner::config::Cli = parse("runner.toml", &["--work-dir", "/tmp/x"]);
    let debug = format!("{cli:?}");
    assert!(
        debug.contains("/srv/git/app"),
        "repos come from the file: {debug}"
    );
}

#[test]
fn observer_example_is_accepted() {
    let cli: surveil_observer::config::Cli = parse("observer.toml", &["--state-dir", "/tmp/x"]);
    let debug = format!("{cli:?}");
    assert!(
        debug.contains("/srv/git/app"),
        "the repo comes from the file: {debug}"
    );
}

#[test]
fn cli_example_is_accepted() {
    // Nothing listens on the port: a valid configuration fails at run time
    // (exit 1), a bad one at parse time (exit 2).
    let port = surveil_tests::cluster::free_port().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bins = surveil_tests::cluster::build(root, false).unwrap();
    let out = Command::new(&bins.cli)
        .arg("--config")
        .arg(example("cli.toml"))
        .args(["--dispatch", &format!("127.0.0.1:{port}"), "status"])
        .env_remove("SURVEIL_DISPATCH")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach dispatcher"), "{stderr}");
}
