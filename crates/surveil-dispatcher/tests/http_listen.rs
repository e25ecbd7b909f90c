//! The real `surveil-dispatcher` binary and its HTTP address: without
//! `--http-listen`, a busy default address (`127.0.0.1:9080`) costs only
//! the HTTP side, with a warning naming it, so two dispatchers on one host
//! both serve the protocol; an explicitly given address that cannot be
//! bound is a startup error naming it.

use std::process::Stdio;
use std::time::Duration;

use surveil_proto::{Connection, Hello, Role};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

const LIMIT: Duration = Duration::from_secs(30);
const DEFAULT_HTTP: &str = "127.0.0.1:9080";

fn dispatcher(state: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_surveil-dispatcher"))
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("SURVEIL_HTTP_LISTEN")
        .env_remove("SURVEIL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads the log up to the start-up line; returns the protocol address
/// and the log so far.
async fn serving(lines: &mut Lines<BufReader<ChildStderr>>) -> (String, String) {
    let mut log = String::new();
    let found = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.contains("dispatcher serving")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let port: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                return Some(format!("127.0.0.1:{port}"));
            }
        }
        None
    })
    .await
    .expect("the dispatcher starts in time");
    let addr = found.unwrap_or_else(|| panic!("the dispatcher exited before serving:\n{log}"));
    (addr, log)
}

async fn answers_the_protocol(addr: &str) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = Connection::new(stream);
    conn.client_handshake(Hello::new(Role::Client, "http-listen-test"), LIMIT)
        .await
        .unwrap_or_else(|e| panic!("{addr} does not serve the protocol: {e}"));
}

#[tokio::test]
async fn two_dispatchers_without_the_flag_both_serve_when_the_default_is_busy() {
    // Held for the whole test so that the default address is busy for
    // both (if another process holds it already, it is busy all the same).
    let held = std::net::TcpListener::bind(DEFAULT_HTTP).ok();
    let dir = tempfile::tempdir().unwrap();
    let mut first = dispatcher(&dir.path().join("a"), &[]);
    let mut second = dispatcher(&dir.path().join("b"), &[]);
    let mut first_lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut second_lines = BufReader::new(second.stderr.take().unwrap()).lines();
    let (first_addr, first_log) = serving(&mut first_lines).await;
    let (second_addr, second_log) = serving(&mut second_lines).await;
    answers_the_protocol(&first_addr).await;
    answers_the_protocol(&second_addr).await;

    let warning = format!("cannot bind the default HTTP address {DEFAULT_HTTP}");
    let warned = [&first_log, &second_log]
        .iter()
        .filter(|log| log.contains(&warning) && log.contains("serving without HTTP"))
        .count();
    if held.is_some() {
        assert_eq!(warned, 2, "both warn:\n{first_log}\n---\n{second_log}");
    } else {
        // Someone else's process has it, or one of ours took it.
        assert!(warned >= 1, "one warns:\n{first_log}\n---\n{second_log}");
    }
    for log in [&first_log, &second_log] {
        assert!(!log.contains("ERROR"), "{log}");
    }
    first.kill().await.unwrap();
    second.kill().await.unwrap();
}

#[tokio::test]
async fn an_explicit_http_address_that_is_busy_is_a_startup_error_naming_it() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let child = dispatcher(dir.path(), &["--http-listen", &busy]);
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("the dispatcher exits in time")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("binding --http-listen {busy}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
    assert!(!err.contains("dispatcher serving"), "{err}");
}
