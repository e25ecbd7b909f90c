//! The HTTP side over real HTTP against an in-process dispatcher: paging
//! while jobs arrive, filters, error bodies, auth (bearer, sign-in cookie,
//! CSRF), the log as text and over SSE resumed with `Last-Event-ID`, the
//! `end` event, waiting reasons, badges and metrics.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LINK, SET_COOKIE};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use surveil_proto::{JobStatus, Log, Started, Stream};

use crate::harness::*;

const TOKEN: &str = "op-s3cret";

async fn start(token: bool) -> (tempfile::TempDir, Dispatcher, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(dir.path());
    if token {
        config.token = Some(TOKEN.to_owned().into());
    }
    let (d, base) = Dispatcher::start_http(config).await;
    (dir, d, base)
}

async fn runner(d: &Dispatcher) -> FakeRunner {
    let mut hello = surveil_proto::Hello::new(surveil_proto::Role::Runner, "ci-1");
    hello.slots = 1;
    hello.repos = vec![REPO.to_owned()];
    hello.token = TOKEN.to_owned();
    FakeRunner::connect(d.addr, hello).await
}

fn http() -> Client {
    http_client()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn submit(base: &str, commits: &[String]) -> Vec<u64> {
    let r = http()
        .post(format!("{base}/api/v1/submit"))
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
        .json(&json!({ "repo": REPO, "branch": "main", "commits": commits }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    body["job_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

async fn get_json(url: &str) -> (StatusCode, Value) {
    let r = http().get(url).send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

fn next_link(r: &reqwest::Response) -> Option<String> {
    let link = r.headers().get(LINK)?.to_str().ok()?;
    assert!(link.ends_with("rel=\"next\""), "{link}");
    Some(link[1..link.find('>')?].to_owned())
}

#[tokio::test]
async fn paging_misses_and_repeats_no_job_while_new_jobs_arrive() {
    let (_dir, d, base) = start(true).await;
    let first = submit(&base, &(1..=23).map(commit).collect::<Vec<_>>()).await;
    let mut seen = Vec::new();
    let mut url = format!(
        "{base}/api/v1/jobs?repo={}&limit=5",
        REPO.replace('/', "%2F")
    );
    for page in 0.. {
        assert!(page < 10, "paging did not end");
        // New jobs arrive between pages: they are newer than every page.
        submit(&base, &[commit(100 + page)]).await;
        let r = http().get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let next = next_link(&r);
        let jobs: Vec<Value> = r.json().await.unwrap();
        assert!(jobs.len() <= 5);
        seen.extend(jobs.iter().map(|j| j["id"].as_u64().unwrap()));
        match next {
            Some(path) => url = format!("{base}{path}"),
            None => break,
        }
    }
    let newest_first_at_start: Vec<u64> = seen
        .iter()
        .copied()
        .filter(|id| first.contains(id))
        .collect();
    let mut expected = first.clone();
    expected.reverse();
    assert_eq!(
        newest_first_at_start, expected,
        "every job once, newest first"
    );
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no job repeated: {seen:?}");
    d.stop().await;
}

#[tokio::test]
async fn filters_and_bad_requests_answer_json_errors_naming_the_problem() {
    let (_dir, d, base) = start(true).await;
    let ids = submit(&base, &[commit(1), commit(2)]).await;
    let (code, jobs) = get_json(&format!("{base}/api/v1/jobs?status=queued&branch=main")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(jobs.as_array().unwrap().len(), 2);
    assert_eq!(jobs[0]["waiting"]["code"], "no_runner", "{jobs}");
    assert_eq!(jobs[0]["queued_at"].as_str().unwrap().len(), 24);
    let (_, none) = get_json(&format!("{base}/api/v1/jobs?repo=%2Fother")).await;
    assert_eq!(none, json!([]));
    let (_, none) = get_json(&format!("{base}/api/v1/jobs?status=passed")).await;
    assert_eq!(none, json!([]));
    for (query, says) in [
        ("status=bogus", "`status=bogus` is not a status"),
        ("limit=0", "`limit=0` is out of range"),
        ("limit=501", "out of range: 1 to 500"),
        ("before=x", "`before=x` is not a number"),
        ("colour=red", "unknown field `colour`"),
    ] {
        let (code, body) = get_json(&format!("{base}/api/v1/jobs?{query}")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{query}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{query}: {error}");
    }
    let (code, body) = get_json(&format!("{base}/api/v1/jobs/abc")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("`abc` is not a job id")
    );
    let (code, body) = get_json(&format!("{base}/api/v1/nothing")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(
        body["error"].as_str().unwrap().contains("/api/v1/nothing"),
        "{body}"
    );
    let (code, body) = get_json(&format!("{base}/api/v1/jobs/999")).await;
    assert_eq!(
        (code, body),
        (StatusCode::NOT_FOUND, json!({ "error": "no job 999" }))
    );
    let (code, body) = get_json(&format!("{base}/api/v1/jobs/{}", ids[0])).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["commit"], commit(1));
    assert_eq!(body["repo_key"], "srv-git-app");
    let r = http()
        .post(format!("{base}/api/v1/submit"))
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
        .json(&json!({ "repo": REPO, "commits": ["abc"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a full 40-hex commit id"),
        "{body}"
    );
    d.stop().await;
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..at + 64].to_owned()
}

#[tokio::test]
async fn writes_need_the_token_and_signed_in_forms_need_their_csrf_token() {
    let (_dir, d, base) = start(true).await;
    let ids = submit(&base, &[commit(1), commit(2)]).await;
    let cancel = format!("{base}/api/v1/jobs/{}/cancel", ids[0]);
    let r = http().post(&cancel).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    let r = http()
        .post(&cancel)
        .header(AUTHORIZATION, "Bearer wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Sign in: a wrong token is refused, the right one sets the cookie.
    let form = |token: &str| format!("token={token}&next=%2Fjobs%2F{}", ids[0]);
    let r = http()
        .post(format!("{base}/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("not a token this dispatcher knows")
    );
    let r = http()
        .post(format!("{base}/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], format!("/jobs/{}", ids[0]));
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();

    // The cookie alone is not enough: the CSRF token must come along.
    let r = http()
        .post(&cancel)
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let page_form = format!("{base}/jobs/{}/cancel", ids[0]);
    let post_form = |csrf: String| {
        http()
            .post(&page_form)
            .header(COOKIE, &cookie)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(format!("csrf={csrf}"))
            .send()
    };
    let r = post_form("f".repeat(64)).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("CSRF"));
    let page = http()
        .get(format!("{base}/jobs/{}", ids[0]))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=\"cancel\""),
        "a signed-in operator sees the button"
    );
    let r = post_form(csrf_of(&page)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, job) = get_json(&format!("{base}/api/v1/jobs/{}", ids[0])).await;
    assert_eq!(job["status"], "cancelled");

    // Already ended: 409; the bearer token works without CSRF.
    let r = http()
        .post(&cancel)
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already ended cancelled"),
        "{body}"
    );
    let r = http()
        .post(format!("{base}/api/v1/jobs/{}/cancel", ids[1]))
        .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    d.stop().await;

    // Without a token configured, nothing can be written over HTTP.
    let (_dir, d, base) = start(false).await;
    let r = http()
        .post(format!("{base}/api/v1/submit"))
        .header(AUTHORIZATION, "Bearer anything")
        .json(&json!({ "repo": REPO, "commits": [commit(1)] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("--token-file"),
        "{body}"
    );
    d.stop().await;
}

/// One SSE event: (event name, id, data).
type SseEvent = (String, Option<String>, String);

/// Reads SSE events from `r` until `stop` says so (or the stream ends).
async fn read_events(
    r: reqwest::Response,
    mut stop: impl FnMut(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let mut body = r.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut name, mut id, mut data) = ("message".to_owned(), None, Vec::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                }
            }
            if data.is_empty() && id.is_none() {
                continue; // a keep-alive comment
            }
            let event = (name, id, data.join("\n"));
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
        match tokio::time::timeout(WAIT, body.next())
            .await
            .expect("an event in time")
        {
            Some(Ok(bytes)) => buf.push_str(std::str::from_utf8(&bytes).unwrap()),
            _ => return events,
        }
    }
}

fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.0 == "message")
        .map(|e| serde_json::from_str::<String>(&e.2).unwrap())
        .collect()
}

#[tokio::test]
async fn the_log_stream_resumes_after_last_event_id_with_every_byte_once_then_ends() {
    let (_dir, d, base) = start(true).await;
    let id = submit(&base, &[commit(1)]).await[0];
    let mut runner = runner(&d).await;
    let attempt = runner.expect_assign().await.attempt;
    runner
        .send(Started {
            job_id: id,
            attempt,
        })
        .await;
    let mut offset = 0u64;
    let mut log = Vec::new();
    macro_rules! send {
        ($data:expr) => {{
            let data: &[u8] = $data;
            runner
                .send(Log {
                    job_id: id,
                    attempt,
                    task: 0,
                    stream: Stream::Stdout as i32,
                    offset,
                    data: data.to_vec().into(),
                })
                .await;
            offset += data.len() as u64;
            log.extend_from_slice(data);
        }};
    }
    let euro = "€".as_bytes();
    send!(b"line 1\r\n\x1b[32mgreen\x1b[0m ");
    send!(&euro[..1]); // a character split across chunks
    send!(&euro[1..]);
    send!(b"\n");
    let stream = format!("{base}/api/v1/jobs/{id}/log/stream");
    let r = http().get(&stream).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    assert_eq!(r.headers()[CONTENT_TYPE], "text/event-stream");
    let got = read_events(r, |e| e.2.contains('\n') && e.2.contains("€")).await;
    let last_id = got.iter().rev().find_map(|e| e.1.clone()).unwrap();
    assert_eq!(
        last_id.parse::<u64>().unwrap(),
        offset,
        "id is the offset after the data"
    );
    // The connection is dropped; more output arrives meanwhile.
    send!(b"second part\n");
    send!(b"third part\n");
    let r = http()
        .get(&stream)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let end = tokio::spawn(read_events(r, |e| e.0 == "end"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(runner.finish(id, attempt, JobStatus::Passed).await.accepted);
    let rest = end.await.unwrap();
    let mut all = got.clone();
    all.extend(rest.iter().cloned());
    assert_eq!(text_of(&all).as_bytes(), log, "every byte exactly once");
    let (name, _, data) = rest.last().unwrap();
    assert_eq!(name, "end");
    let end: Value = serde_json::from_str(data).unwrap();
    assert_eq!(end, json!({ "status": "passed", "offset": offset }));

    // The plain-text log, whole and from an offset.
    let text = http()
        .get(format!("{base}/api/v1/jobs/{id}/log"))
        .send()
        .await
        .unwrap();
    assert_eq!(text.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(text.bytes().await.unwrap(), log);
    let tail = http()
        .get(format!("{base}/api/v1/jobs/{id}/log?from={last_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(tail.text().await.unwrap(), "second part\nthird part\n");
    let (code, _) = get_json(&format!("{base}/api/v1/jobs/77/log/stream")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    d.stop().await;
}

#[tokio::test]
async fn waiting_reasons_badges_metrics_and_pages_show_the_real_state() {
    let (_dir, d, base) = start(true).await;
    let ids = submit(&base, &[commit(1), commit(2)]).await;
    let home = http()
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(home.contains("no runner is connected"), "{home}");
    let mut runner = runner(&d).await;
    let attempt = runner.expect_assign().await.attempt;
    let (_, job) = get_json(&format!("{base}/api/v1/jobs/{}", ids[1])).await;
    assert_eq!(job["waiting"]["code"], "all_busy", "{job}");
    assert!(
        job["waiting"]["reason"]
            .as_str()
            .unwrap()
            .contains("the one runner that builds it is busy")
    );
    let home = http()
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        home.contains("the one runner that builds it is busy"),
        "{home}"
    );
    assert!(
        runner
            .finish(ids[0], attempt, JobStatus::Passed)
            .await
            .accepted
    );

    let badge = http()
        .get(format!("{base}/badge/srv-git-app/main.svg"))
        .send()
        .await
        .unwrap();
    assert_eq!(badge.status(), StatusCode::OK);
    assert_eq!(badge.headers()[CONTENT_TYPE], "image/svg+xml");
    assert_eq!(badge.headers()["cache-control"], "no-cache");
    let svg = badge.text().await.unwrap();
    // The branch's newest job is the second one, now running.
    assert!(
        svg.contains(">running<") || svg.contains(">queued<"),
        "{svg}"
    );
    let unknown = http()
        .get(format!("{base}/badge/nope/main.svg"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.text().await.unwrap().contains(">unknown<"));

    let repo = http()
        .get(format!("{base}/repos/srv-git-app"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(repo.contains("Pass rate <strong>100%</strong>"), "{repo}");
    assert!(repo.contains("<svg class=\"chart\""));
    let (_, repos) = get_json(&format!("{base}/api/v1/repos")).await;
    assert_eq!(repos[0]["key"], "srv-git-app");

    let metrics = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "surveil_jobs_running 1",
        "surveil_runners_connected 1",
        "surveil_runners_draining 0",
        "surveil_runners_quarantined 0",
        "surveil_jobs_finished_total{status=\"passed\"} 1",
        "surveil_queue_wait_seconds_count 2",
        "surveil_job_duration_seconds_count 1",
        "surveil_reassignments_total 0",
        "surveil_supervisor_restarts_total{task=\"monitor\"} 0",
        "surveil_http_requests_total{route=\"/api/v1/submit\",code=\"200\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    assert!(
        metrics.contains("surveil_store_commit_seconds_count"),
        "{metrics}"
    );
    d.stop().await;
}

fn log_chunk(job: u64, attempt: u32, data: &[u8]) -> Log {
    Log {
        job_id: job,
        attempt,
        task: 0,
        stream: Stream::Stdout as i32,
        offset: 0,
        data: data.to_vec().into(),
    }
}

async fn post_rerun(base: &str, id: u64, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = http().post(format!("{base}/api/v1/jobs/{id}/rerun"));
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let r = request.send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test]
async fn rerun_queues_a_new_attempt_of_a_finished_job_and_keeps_the_first_attempts_log() {
    let (_dir, d, base) = start(true).await;
    let id = submit(&base, &[commit(1)]).await[0];
    let mut runner = runner(&d).await;
    assert_eq!(runner.expect_assign().await.attempt, 1);

    // Refused while it runs (409), without the token (401), unknown (404).
    let (code, body) = post_rerun(&base, id, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("only a finished job"),
        "{body}"
    );
    let (code, _) = post_rerun(&base, id, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, body) = post_rerun(&base, 4242, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");

    runner.send(log_chunk(id, 1, b"first: broken\n")).await;
    assert!(runner.finish(id, 1, JobStatus::Failed).await.accepted);
    let (code, body) = post_rerun(&base, id, Some(TOKEN)).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["job"]["status"], "queued", "{body}");
    assert_eq!(body["job"]["attempts"][0]["status"], "failed", "{body}");

    // The second attempt runs and passes.
    let assign = runner.expect_assign().await;
    assert_eq!((assign.job_id, assign.attempt), (id, 2));
    runner.send(log_chunk(id, 2, b"second: fixed\n")).await;
    assert!(runner.finish(id, 2, JobStatus::Passed).await.accepted);

    let (code, job) = get_json(&format!("{base}/api/v1/jobs/{id}")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("passed"), Some(2))
    );
    let attempts: Vec<(u64, &str)> = job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(attempts, vec![(1, "failed"), (2, "passed")], "{job}");
    let log = |q: &str| {
        let url = format!("{base}/api/v1/jobs/{id}/log{q}");
        async move { http().get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(log("").await, "second: fixed\n");
    assert_eq!(log("?attempt=1").await, "first: broken\n");
    assert_eq!(log("?attempt=2").await, "second: fixed\n");
    let r = http()
        .get(format!("{base}/api/v1/jobs/{id}/log?attempt=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The page lists both attempts, each linking its own log.
    let page = http()
        .get(format!("{base}/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("/api/v1/jobs/{id}/log?attempt=1")),
        "{page}"
    );
    assert!(
        page.contains(&format!("/api/v1/jobs/{id}/log?attempt=2")),
        "{page}"
    );
    d.stop().await;
}

#[tokio::test]
async fn tokens_file_credentials_write_over_http_within_their_role_and_scope() {
    use surveil_common::tokens::{self, Role, Scope};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let reader = tokens::add(&path, "reader", Role::Client, Some(Scope::Read)).unwrap();
    let operator = tokens::add(&path, "op", Role::Client, Some(Scope::Operate)).unwrap();
    let observer = tokens::add(&path, "obs", Role::Observer, None).unwrap();
    let mut config = fast_config(dir.path());
    config.tokens_file = Some(path);
    let (_d, base) = Dispatcher::start_http(config).await;
    let post = |url: String, token: &str, body: Value| {
        http()
            .post(url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .json(&body)
            .send()
    };
    let submit_body = json!({ "repo": REPO, "branch": "main", "commits": [commit(1)] });

    // The observer's token submits; the reader's may not.
    let r = post(
        format!("{base}/api/v1/submit"),
        reader.expose(),
        submit_body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    let why = body["error"].as_str().unwrap();
    assert!(
        why.contains("token:reader") && why.contains("scope read"),
        "the refusal names the credential and what it lacks: {why}"
    );
    let r = post(
        format!("{base}/api/v1/submit"),
        observer.expose(),
        submit_body,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.json::<Value>().await.unwrap()["job_ids"][0]
        .as_u64()
        .unwrap();

    // Cancel needs scope operate: neither the observer nor the reader has it.
    let cancel = format!("{base}/api/v1/jobs/{id}/cancel");
    for token in [observer.expose(), reader.expose()] {
        let r = post(cancel.clone(), token, json!({})).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    let r = post(cancel, operator.expose(), json!({})).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, job) = get_json(&format!("{base}/api/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    // Signing in takes a reading credential; the job page then offers the
    // operator's buttons only to the operator.
    let form = |token: &str| format!("token={token}&next=%2F");
    let sign_in = |token: String| {
        http()
            .post(format!("{base}/login"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&token))
            .send()
    };
    let r = sign_in(observer.expose().clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("token:obs"));
    for (token, operates) in [(reader.expose(), false), (operator.expose(), true)] {
        let r = sign_in(token.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
        let pair = cookie.split(';').next().unwrap().to_owned();
        let page = http()
            .get(format!("{base}/jobs/{id}"))
            .header(COOKIE, pair)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page.contains("Rerun"), operates, "{page}");
    }
}
