//! A git smart-HTTP server for tests: the real `git http-backend`, run as
//! CGI for each request behind a small hyper server on 127.0.0.1, serving
//! a directory of bare repositories read-only (upload-pack only). Optional
//! HTTP basic auth and TLS (rustls through `surveil_common::tls`), a log of
//! every request, and a black-hole mode (connections accepted, never
//! answered) for hung-fetch tests.
//!
//! It must not accept pushes, and it never reads git objects itself: what
//! a client fetches is exactly what git serves.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use surveil_common::tls::ServerTls;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

/// The realm a 401 names.
pub const REALM: &str = "surveil-test-git";
/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of `git http-backend`'s stderr kept for [`GitHttpServer::backend_errors`].
const MAX_STDERR_KEPT: usize = 64 * 1024;

type Body = BoxBody<Bytes, io::Error>;

/// What the server serves and how.
#[derive(Debug, Clone)]
pub struct GitHttpConfig {
    root: PathBuf,
    basic_auth: Option<(String, String)>,
    tls: Option<ServerTls>,
}

impl GitHttpConfig {
    /// Serves the bare repositories under `root` (`root/app.git` is
    /// `http://…/app.git`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        GitHttpConfig {
            root: root.into(),
            basic_auth: None,
            tls: None,
        }
    }

    /// Requires HTTP basic auth with this user and password.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Serves HTTPS with this certificate.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// One request, as answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET` or `POST`.
    pub method: String,
    /// The path (`/app.git/info/refs`).
    pub path: String,
    /// The query string, without `?`.
    pub query: String,
    /// Whether an `Authorization` header came with it.
    pub authorization: bool,
    /// The status answered.
    pub status: u16,
}

struct Shared {
    config: GitHttpConfig,
    backend: PathBuf,
    log: Mutex<Vec<RequestRecord>>,
    stderr: Mutex<String>,
    black_hole: AtomicBool,
    shutdown: CancellationToken,
}

/// A running server; dropping it stops it (and every CGI child with it).
pub struct GitHttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for GitHttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHttpServer")
            .field("addr", &self.addr)
            .field("root", &self.shared.config.root)
            .finish_non_exhaustive()
    }
}

/// Where `git http-backend` is (`git --exec-path`), or why not.
pub fn http_backend() -> anyhow::Result<PathBuf> {
    let output = std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .context("cannot run `git --exec-path`: the git CLI must be installed (Debian: apt-get install git)")?;
    anyhow::ensure!(output.status.success(), "`git --exec-path` failed");
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let backend = dir.join("git-http-backend");
    anyhow::ensure!(
        backend.is_file(),
        "git http-backend not found at {} (Debian: apt-get install git)",
        backend.display()
    );
    Ok(backend)
}

impl GitHttpServer {
    /// Starts serving on 127.0.0.1 and a free port; fails, saying why,
    /// when `git http-backend` cannot be found.
    pub async fn start(config: GitHttpConfig) -> anyhow::Result<Self> {
        let backend = http_backend()?;
        anyhow::ensure!(
            config.root.is_dir(),
            "the repository root {} is not a directory",
            config.root.display()
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            backend,
            log: Mutex::new(Vec::new()),
            stderr: Mutex::new(String::new()),
            black_hole: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(GitHttpServer { shared, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn scheme(&self) -> &'static str {
        if self.shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The URL of `repo` (a path under the root, e.g. `app.git`).
    pub fn url(&self, repo: &str) -> String {
        format!("{}://{}/{repo}", self.scheme(), self.addr)
    }

    /// The URL of `repo` with `user:password@` in it.
    pub fn url_with_credentials(&self, repo: &str, user: &str, password: &str) -> String {
        format!("{}://{user}:{password}@{}/{repo}", self.scheme(), self.addr)
    }

    /// Every request answered so far, in order (black-holed connections
    /// are never answered, so never logged).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().expect("request log").clone()
    }

    /// What `git http-backend` wrote on stderr (truncated to 64 KiB).
    pub fn backend_errors(&self) -> String {
        self.shared.stderr.lock().expect("stderr log").clone()
    }

    /// In black-hole mode new connections are accepted, read and never
    /// answered, until the client gives up or the server stops.
    pub fn set_black_hole(&self, on: bool) {
        self.shared.black_hole.store(on, Ordering::SeqCst);
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    tokio::spawn(connection(tcp, shared.clone()));
                }
            }
        }
    }
}

async fn connection(tcp: TcpStream, shared: Arc<Shared>) {
    let stop = shared.shutdown.clone();
    if shared.black_hole.load(Ordering::SeqCst) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = swallow(tcp) => {}
        }
        return;
    }
    let stream = match &shared.config.tls {
        Some(tls) => {
            let accepted = tokio::time::timeout(
                TLS_HANDSHAKE_TIMEOUT,
                surveil_common::tls::accept(tcp, Some(tls)),
            );
            match accepted.await {
                Ok(Ok(stream)) => stream,
                _ => return,
            }
        }
        None => surveil_common::tls::Stream::Plain(tcp),
    };
    let service = hyper::service::service_fn(move |req| respond(shared.clone(), req));
    let serving =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        () = stop.cancelled() => {}
        _ = serving => {}
    }
}

/// Reads and drops whatever the client sends until it closes.
async fn swallow(mut tcp: TcpStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

fn plain(status: u16, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_owned()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("a valid status");
    response
}

/// The verdict on a request before any git runs: `Some` is an answer.
fn gate(config: &GitHttpConfig, req: &Request<Incoming>) -> Option<Response<Body>> {
    let path = req.uri().path();
    if path.split('/').any(|part| part == "..") {
        return Some(plain(400, "no `..` in paths\n"));
    }
    if let Some((user, password)) = &config.basic_auth {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok());
        if given.as_deref() != Some(format!("{user}:{password}").as_bytes()) {
            let mut response = plain(401, "authentication required\n");
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                format!("Basic realm=\"{REALM}\"")
                    .parse()
                    .expect("a valid header"),
            );
            return Some(response);
        }
    }
    let query = req.uri().query().unwrap_or("");
    if path.ends_with("/git-receive-pack") || query.contains("service=git-receive-pack") {
        return Some(plain(403, "this server is read-only\n"));
    }
    None
}

async fn respond(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let mut record = RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
        authorization: req.headers().contains_key(hyper::header::AUTHORIZATION),
        status: 0,
    };
    let response = match gate(&shared.config, &req) {
        Some(response) => response,
        None => match cgi(&shared, req).await {
            Ok(response) => response,
            Err(err) => plain(500, &format!("git http-backend: {err}\n")),
        },
    };
    record.status = response.status().as_u16();
    shared.log.lock().expect("request log").push(record);
    Ok(response)
}

/// The CGI environment for one request (nothing inherited but `PATH`).
fn cgi_env(config: &GitHttpConfig, req: &Request<Incoming>) -> Vec<(String, String)> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut env = vec![
        (
            "GIT_PROJECT_ROOT".to_owned(),
            config.root.display().to_string(),
        ),
        ("GIT_HTTP_EXPORT_ALL".to_owned(), "1".to_owned()),
        ("GIT_CONFIG_NOSYSTEM".to_owned(), "1".to_owned()),
        ("GIT_CONFIG_GLOBAL".to_owned(), "/dev/null".to_owned()),
        // Belt and braces: the gate already refuses receive-pack.
        ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
        ("GIT_CONFIG_KEY_0".to_owned(), "http.receivepack".to_owned()),
        ("GIT_CONFIG_VALUE_0".to_owned(), "false".to_owned()),
        ("GATEWAY_INTERFACE".to_owned(), "CGI/1.1".to_owned()),
        ("SERVER_PROTOCOL".to_owned(), "HTTP/1.1".to_owned()),
        ("REMOTE_ADDR".to_owned(), "127.0.0.1".to_owned()),
        ("REQUEST_METHOD".to_owned(), req.method().to_string()),
        ("PATH_INFO".to_owned(), req.uri().path().to_owned()),
        (
            "QUERY_STRING".to_owned(),
            req.uri().query().unwrap_or("").to_owned(),
        ),
    ];
    if let Ok(path) = std::env::var("PATH") {
        env.push(("PATH".to_owned(), path));
    }
    for (header_name, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
    ] {
        if let Some(value) = header(header_name) {
            env.push((var.to_owned(), value));
        }
    }
    if let Some((user, _)) = &config.basic_auth {
        env.push(("REMOTE_USER".to_owned(), user.clone()));
    }
    env
}

/// Runs `git http-backend` for one request and streams its answer.
async fn cgi(shared: &Arc<Shared>, req: Request<Incoming>) -> io::Result<Response<Body>> {
    let env = cgi_env(&shared.config, &req);
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    let mut child = tokio::process::Command::new(&shared.backend)
        .env_clear()
        .envs(env)
        .env("CONTENT_LENGTH", body.len().to_string())
        .current_dir(&shared.config.root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written beside the read of stdout: a large answer must not wait on a
    // request body the child has not read yet.
    tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn(keep_stderr(stderr, shared.clone()));
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (status, headers) = read_cgi_headers(&mut stdout).await?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let stream = ReaderStream::new(stdout).map(|chunk| chunk.map(Frame::data));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *response.status_mut() = hyper::StatusCode::from_u16(status)
        .map_err(|_| io::Error::other(format!("CGI status {status}")))?;
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

/// Reads CGI response headers up to the blank line: the `Status:` code
/// (200 without one) and the rest.
async fn read_cgi_headers<R: tokio::io::AsyncBufRead + Unpin>(
    out: &mut R,
) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut status = 200;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "git http-backend ended before its headers",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(io::Error::other(format!("not a CGI header: {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split(' ')
                .next()
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| io::Error::other(format!("bad CGI status {value:?}")))?;
        } else {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
}

async fn keep_stderr(stderr: tokio::process::ChildStderr, shared: Arc<Shared>) {
    let mut text = String::new();
    let _ = BufReader::new(stderr).read_to_string(&mut text).await;
    if text.is_empty() {
        return;
    }
    let mut kept = shared.stderr.lock().expect("stderr log");
    if kept.len() + text.len() <= MAX_STDERR_KEPT {
        kept.push_str(&text);
    }
}

/// Makes `root/name` a bare copy of the repository at `source`, with the
/// git CLI (a test fixture, not the code under test).
pub fn bare_copy(source: &Path, root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let target = root.join(name);
    let status = std::process::Command::new("git")
        .args(["clone", "--quiet", "--bare"])
        .arg(source)
        .arg(&target)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .context("running git clone --bare")?;
    anyhow::ensure!(
        status.success(),
        "git clone --bare {} failed",
        source.display()
    );
    Ok(target)
}

/// `root/app.git`, served by a [`GitHttpServer`] rooted at `root`: one
/// commit on `main`, plus `branches` pointing at it.
pub struct ServedRepo {
    /// The directory to give [`GitHttpConfig::new`].
    pub root: PathBuf,
    /// The commit every branch points at.
    pub head: String,
}

/// Builds a [`ServedRepo`] under `dir` (a work tree beside it, `served/`
/// as the root) with the git CLI.
pub fn served_repo(dir: &Path, branches: &[&str]) -> anyhow::Result<ServedRepo> {
    let work = dir.join("work");
    std::fs::create_dir(&work)?;
    crate::cluster::git(&work, &["init", "--quiet", "--initial-branch=main"])?;
    crate::cluster::commit(&work, "first", &[("README", "served over smart HTTP\n")])?;
    for branch in branches {
        crate::cluster::git(&work, &["branch", branch])?;
    }
    let head = crate::cluster::git(&work, &["rev-parse", "HEAD"])?;
    let root = dir.join("served");
    std::fs::create_dir(&root)?;
    bare_copy(&work, &root, "app.git")?;
    Ok(ServedRepo { root, head })
}

/// Starts the server or fails the test saying what it needs.
pub async fn start_server(config: GitHttpConfig) -> GitHttpServer {
    GitHttpServer::start(config)
        .await
        .expect("the test git server needs `git http-backend` (Debian: apt-get install git)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cgi_headers_end_at_the_blank_line_and_keep_the_rest() {
        let mut out: &[u8] = b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nbody";
        let (status, headers) = read_cgi_headers(&mut out).await.unwrap();
        assert_eq!(status, 404);
        assert_eq!(
            headers,
            [("Content-Type".to_owned(), "text/plain".to_owned())]
        );
        assert_eq!(out, b"body");
        let mut lf_only: &[u8] = b"Content-Type: x\n\n";
        assert_eq!(read_cgi_headers(&mut lf_only).await.unwrap().0, 200);
        let mut truncated: &[u8] = b"Content-Type: x\r\n";
        assert!(read_cgi_headers(&mut truncated).await.is_err());
    }
}
