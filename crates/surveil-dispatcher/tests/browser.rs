//! The pages in a real browser: headless Chromium driven through
//! chromedriver (fantoccini) against an in-process dispatcher whose runner
//! is a fake the test drives. The job page of a running job shows new log
//! lines without a reload; signing in and pressing cancel ends the job and
//! the page shows it; a queued job for a repository no runner builds shows
//! why on the home page; the home page fits a 360 px screen; the browser
//! console has no errors. Screenshots go to `target/tmp/browser/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Without them the test says so and fails under `CI=true`.

#[path = "it/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use surveil_proto::{JobFinished, JobStatus, Log, Msg, Started, Stream};
use tokio::process::{Child, Command};

use harness::*;

const TOKEN: &str = "browser-s3cret";
const UNBUILT: &str = "/srv/git/unbuilt";

fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free loopback port, or why it could not start.
async fn chromedriver() -> Result<(Child, u16), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("chromedriver did not start: {e} (apt-get install chromium chromium-driver)")
        })?;
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("chromedriver did not listen in time".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, port))
}

async fn browser(port: u16, profile: &Path) -> Result<Client, String> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| format!("Chromium did not start under chromedriver: {e}"))
}

/// The browser console's entries so far (chromedriver's log endpoint).
async fn console(c: &Client, port: u16) -> Vec<Value> {
    let session = c.session_id().await.unwrap().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/session/{session}/se/log"))
        .json(&json!({ "type": "browser" }))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    body["value"].as_array().cloned().unwrap_or_default()
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let path = shots().join(name);
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    println!("screenshot: {}", path.display());
    path
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits (bounded) until the script `check` returns true.
async fn until(c: &Client, what: &str, check: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if c.execute(check, vec![]).await.unwrap() == json!(true) {
            return;
        }
        assert!(Instant::now() < deadline, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Job {
    id: u64,
    attempt: u32,
    offset: u64,
}

async fn log(runner: &FakeRunner, job: &mut Job, text: &str) {
    runner
        .send(Log {
            job_id: job.id,
            attempt: job.attempt,
            task: 0,
            stream: Stream::Stdout as i32,
            offset: job.offset,
            data: text.as_bytes().to_vec().into(),
        })
        .await;
    job.offset += text.len() as u64;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_in_headless_chromium() {
    let (mut driver, port) = match chromedriver().await {
        Ok(found) => found,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("{why}"),
        Err(why) => {
            eprintln!("SKIPPED: the browser tests need chromium and chromedriver: {why}");
            return;
        }
    };
    let profile = tempfile::tempdir().unwrap();
    let c = browser(port, profile.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    config.token = Some(TOKEN.to_owned().into());
    let (d, base) = Dispatcher::start_http(config).await;

    let story = run_story(&c, &d, &base, port).await;
    c.close().await.unwrap();
    let _ = driver.kill().await;
    d.stop().await;
    story.unwrap();
}

async fn run_story(c: &Client, d: &Dispatcher, base: &str, port: u16) -> Result<(), String> {
    let mut client = d.client_with_token(TOKEN).await;
    let id = client.submit(&[commit(1)]).await[0];
    client.submit_to(UNBUILT, &[commit(2)]).await;
    let mut runner = d.runner_with_token("ci-1", 1, TOKEN).await;
    let assign = runner.expect_assign().await;
    let mut job = Job {
        id,
        attempt: assign.attempt,
        offset: 0,
    };
    runner
        .send(Started {
            job_id: id,
            attempt: job.attempt,
        })
        .await;
    log(
        &runner,
        &mut job,
        "$ cargo build\n\x1b[1;32m   Compiling\x1b[0m app v0.1.0\n",
    )
    .await;

    // Home: the queued job says why it waits.
    c.goto(&format!("{base}/")).await.unwrap();
    let reason = text_of(c, "#queued td.reason").await;
    assert!(
        reason.contains("no connected runner lists this repository"),
        "{reason}"
    );
    screenshot(c, "home.png").await;
    c.set_window_size(360, 800).await.unwrap();
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    screenshot(c, "home-360px.png").await;
    assert_eq!(
        fits,
        json!(true),
        "the home page scrolls sideways at 360 px"
    );
    c.set_window_size(1280, 900).await.unwrap();

    // The job page follows the log without a reload.
    c.goto(&format!("{base}/jobs/{id}")).await.unwrap();
    assert!(text_of(c, "#log").await.contains("Compiling"));
    c.execute("window.__sameLoad = true;", vec![])
        .await
        .unwrap();
    for n in 1..=12 {
        log(
            &runner,
            &mut job,
            &format!("test unit::case_{n} ... \x1b[32mok\x1b[0m\n"),
        )
        .await;
    }
    log(
        &runner,
        &mut job,
        "\x1b[33mwarning\x1b[0m: live line arrived\n",
    )
    .await;
    until(c, "the live line", "return !!document.getElementById('L15') && document.getElementById('L15').textContent.includes('live line arrived');").await;
    assert_eq!(
        c.execute("return window.__sameLoad === true;", vec![])
            .await
            .unwrap(),
        json!(true),
        "the page reloaded"
    );
    let shot = screenshot(c, "job-live.png").await;
    if std::env::var("SURVEIL_UPDATE_SCREENSHOT").is_ok() {
        std::fs::copy(
            &shot,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/job-page.png"),
        )
        .unwrap();
    }

    // Sign in, press cancel: the runner is told, reports, the page shows it.
    c.goto(&format!("{base}/login?next=/jobs/{id}"))
        .await
        .unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    loop {
        match runner.recv().await {
            Some(Msg::Cancel(cancel)) => {
                assert_eq!(cancel.job_id, id);
                break;
            }
            Some(_) => continue,
            None => return Err("the dispatcher closed the runner".into()),
        }
    }
    log(&runner, &mut job, "stopped: cancelled by the operator\n").await;
    runner
        .send(JobFinished {
            job_id: id,
            attempt: job.attempt,
            status: JobStatus::Cancelled as i32,
            message: "cancelled".into(),
            tasks: vec![],
            infrastructure: false,
            commit: String::new(),
        })
        .await;
    until(c, "the job cancelled", "const s = document.getElementById('job-status'); return !!s && s.dataset.status === 'cancelled';").await;
    assert!(
        text_of(c, "#log")
            .await
            .contains("cancelled by the operator")
    );
    screenshot(c, "job-cancelled.png").await;

    let errors: Vec<Value> = console(c, port)
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("browser console errors: {errors:#?}"))
    }
}
