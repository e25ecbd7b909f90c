//! Log lines carry ANSI colour only when stderr is a terminal and
//! `NO_COLOR` is unset: a daemon under systemd or with its output piped
//! must not write escape codes into the journal or a file.
//!
//! Each real daemon binary runs for a few seconds under `timeout` (which
//! sends it SIGTERM, so every run is bounded and nothing is left behind):
//! once with stderr piped to the test, once on a pseudo-terminal made by
//! `script` (util-linux), once on that terminal with `NO_COLOR=1`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use surveil_tests::cluster;

/// How long each daemon runs before `timeout` stops it.
const RUN_FOR: &str = "3";
const ESC: &str = "\x1b[";

/// One daemon's command line and a message it logs within [`RUN_FOR`].
struct Case {
    program: String,
    args: Vec<String>,
    logs: &'static str,
}

impl Case {
    fn command_line(&self) -> String {
        let mut line = format!("timeout -s TERM {RUN_FOR} {}", self.program);
        for arg in &self.args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

fn run(mut command: Command) -> String {
    let Output { stdout, stderr, .. } = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("the command starts");
    // Piped runs log on stderr; `script` copies the terminal to stdout.
    String::from_utf8_lossy(&[stdout, stderr].concat()).into_owned()
}

fn piped(case: &Case) -> String {
    let mut command = Command::new("timeout");
    command
        .args(["-s", "TERM", RUN_FOR, &case.program])
        .args(&case.args)
        .env_remove("NO_COLOR");
    run(command)
}

fn on_a_terminal(case: &Case, no_color: bool) -> String {
    let mut command = Command::new("script");
    command.args(["-q", "-e", "-c", &case.command_line(), "/dev/null"]);
    if no_color {
        command.env("NO_COLOR", "1");
    } else {
        command.env_remove("NO_COLOR");
    }
    run(command)
}

fn cases(scratch: &Path, bins: &cluster::Bins) -> Vec<Case> {
    let dir = |name: &str| {
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir.display().to_string()
    };
    let repo = scratch.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    cluster::git(&repo, &["init", "--quiet", "--initial-branch=main"]).unwrap();
    cluster::commit(&repo, "first", &[("README", "hi\n")]).unwrap();
    // Nothing listens here: the runner and the observer log their retries.
    let dispatch = format!("127.0.0.1:{}", cluster::free_port().unwrap());
    let s = |text: &str| text.to_owned();
    vec![
        Case {
            program: bins.dispatcher.display().to_string(),
            args: vec![
                s("--listen"),
                s("127.0.0.1:0"),
                s("--http-listen"),
                s("off"),
                s("--state-dir"),
                dir("d"),
            ],
            logs: "dispatcher serving",
        },
        Case {
            program: bins.runner.display().to_string(),
            args: vec![
                s("--dispatch"),
                dispatch.clone(),
                s("--work-dir"),
                dir("r"),
                s("--name"),
                s("colour-test"),
                repo.display().to_string(),
            ],
            logs: "cannot reach the dispatcher",
        },
        Case {
            program: bins.observer.display().to_string(),
            args: vec![
                s("--dispatch"),
                dispatch,
                s("--state-dir"),
                dir("o"),
                repo.display().to_string(),
            ],
            logs: "dispatcher unreachable",
        },
    ]
}

#[test]
fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bins = cluster::build(root, false).expect("building the daemons");
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_script,
        "`script` (util-linux, Debian's bsdutils) is needed to give a daemon a terminal"
    );
    let scratch = tempfile::tempdir().unwrap();
    // Each run has its own state directories: all nine run at once, each
    // taking RUN_FOR seconds of waiting.
    let runs = |mode: &str| cases(&scratch.path().join(mode), &bins);
    let (piped, terminal, no_color) = (runs("piped"), runs("terminal"), runs("no-color"));
    std::thread::scope(|threads| {
        for case in &piped {
            threads.spawn(move || check_piped(case));
        }
        for case in &terminal {
            threads.spawn(move || check_terminal(case, false));
        }
        for case in &no_color {
            threads.spawn(move || check_terminal(case, true));
        }
    });
}

fn name(case: &Case) -> String {
    let name = Path::new(&case.program).file_name().unwrap_or_default();
    name.to_string_lossy().into_owned()
}

fn check_piped(case: &Case) {
    let (name, text) = (name(case), piped(case));
    assert!(
        text.contains(case.logs),
        "{name}, piped: no `{}` in {text:?}",
        case.logs
    );
    assert!(
        !text.contains(ESC),
        "{name}, piped: escape codes in {text:?}"
    );
}

fn check_terminal(case: &Case, no_color: bool) {
    let (name, text) = (name(case), on_a_terminal(case, no_color));
    assert!(
        text.contains(case.logs),
        "{name}, terminal (NO_COLOR: {no_color}): no `{}` in {text:?}",
        case.logs
    );
    if no_color {
        assert!(
            !text.contains(ESC),
            "{name}, NO_COLOR: escape codes in {text:?}"
        );
    } else {
        assert!(
            text.contains(ESC),
            "{name}, terminal: no colour in {text:?}"
        );
    }
}
