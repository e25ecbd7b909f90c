//! The real `surveil-dispatcher` binary and its secrets: `--token` on the
//! command line is refused, and with `RUST_LOG=trace` neither a right nor
//! a wrong token ever reaches its log, while a plaintext client on its TLS
//! port is logged with a clear reason.

use std::process::Stdio;
use std::time::Duration;

use surveil_common::tls::{self, ClientTls};
use surveil_proto::{Connection, HandshakeError, Hello, RejectCode, Role};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "tok-5f2a9c1e-never-logged";
const WRONG: &str = "tok-wrong-guess-never-logged";

#[tokio::test]
async fn token_on_the_command_line_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_surveil-dispatcher"))
        .args(["--state-dir", dir.path().to_str().unwrap()])
        .args(["--token", TOKEN])
        .output();
    let out = tokio::time::timeout(LIMIT, out).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("visible to every user in `ps`"), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

async fn hello(addr: &str, tls: &ClientTls, token: &str) -> Result<(), HandshakeError> {
    let stream = tls::connect(addr, Some(tls)).await.unwrap();
    let mut conn = Connection::new(stream);
    let mut hello = Hello::new(Role::Client, "security-test");
    hello.token = token.to_owned();
    conn.client_handshake(hello, LIMIT).await.map(|_| ())
}

#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tls::test_certs::write(dir.path());
    let token_file = dir.path().join("token");
    surveil_common::private::write_atomic(&token_file, format!("{TOKEN}\n").as_bytes()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_surveil-dispatcher"))
        .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--token-file", token_file.to_str().unwrap()])
        .args(["--tls-cert", certs.server_cert.to_str().unwrap()])
        .args(["--tls-key", certs.server_key.to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .env_remove("SURVEIL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();

    // The listening port, from the start-up line.
    let addr = tokio::time::timeout(LIMIT, async {
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
                return format!("127.0.0.1:{port}");
            }
        }
        panic!("the dispatcher exited before serving:\n{log}");
    })
    .await
    .expect("the dispatcher starts");

    let client = ClientTls::new(&certs.ca, None, "127.0.0.1").unwrap();
    hello(&addr, &client, TOKEN).await.unwrap();
    match hello(&addr, &client, WRONG).await {
        Err(HandshakeError::Rejected { code, .. }) => assert_eq!(code, RejectCode::BadToken),
        other => panic!("expected a BadToken reject, got {other:?}"),
    }
    // A plaintext client on the TLS port, then the log is read to the
    // line that reports it.
    let plain = tls::connect(&addr, None).await.unwrap();
    let mut conn = Connection::new(plain);
    let err = conn
        .client_handshake(Hello::new(Role::Client, "plain"), LIMIT)
        .await
        .unwrap_err();
    assert_eq!(
        tls::handshake_hint(&err),
        Some(tls::PLAINTEXT_TO_TLS_HINT),
        "{err}"
    );
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.contains("client did not start TLS (plaintext on a TLS port?)") {
                return;
            }
        }
        panic!("the dispatcher exited:\n{log}");
    })
    .await
    .expect("the plaintext client is logged");

    child.kill().await.unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("wrong token"), "{log}");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not at trace level:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the token was logged:\n{log}");
    assert!(!log.contains(WRONG), "a wrong token was logged:\n{log}");
}
