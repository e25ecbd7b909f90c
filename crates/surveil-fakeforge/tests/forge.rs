//! The fake forge as its users meet it: status calls over real sockets
//! answered and recorded as each forge would, faults on demand, and the
//! webhooks it sends, checked against an independent HMAC.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use surveil_fakeforge::client::{self, Answer, SendError};
use surveil_fakeforge::{
    Auth, FakeForge, Fault, ForgeKind, PrAction, Repo, RepoSpec, Signature, Webhook, ZERO_SHA,
};

const T: Duration = Duration::from_secs(5);
const SHA: &str = "4f1c0e6a9b2d3c5e7f8091a2b3c4d5e6f7a8b9c0";
const SHA2: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a9f0e1d2c3";

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

/// The headers a well-behaved GitHub client sends.
fn github_headers(token: &str) -> Vec<(String, String)> {
    h(&[
        ("authorization", &format!("Bearer {token}")),
        ("user-agent", "surveil-test"),
        ("accept", "application/vnd.github+json"),
        ("content-type", "application/json"),
    ])
}

async fn post(url: String, headers: &[(String, String)], body: Value) -> Answer {
    client::request("POST", &url, headers, body.to_string().into_bytes(), T)
        .await
        .expect("the fake forge answers")
}

async fn github_forge() -> (FakeForge, Repo) {
    let forge = FakeForge::start().await.unwrap();
    let repo = forge.add_repo(
        RepoSpec::new(ForgeKind::GitHub, "acme/app")
            .write_token("ghp_good")
            .read_token("ghp_reader"),
    );
    (forge, repo)
}

fn github_status_url(forge: &FakeForge, sha: &str) -> String {
    format!(
        "{}/repos/acme/app/statuses/{sha}",
        forge.api_url(ForgeKind::GitHub)
    )
}

#[tokio::test]
async fn a_github_status_with_a_wrong_token_is_401_and_recorded_as_such() {
    let (forge, _) = github_forge().await;
    let forge = Arc::new(forge);
    let waiter = tokio::spawn({
        let forge = forge.clone();
        async move {
            forge
                .wait_for(T, |calls| calls.iter().any(|c| c.accepted()))
                .await
        }
    });
    let body = json!({"state": "pending", "context": "surveil/main", "target_url": "http://ci/jobs/1", "description": "queued"});
    let answer = post(
        github_status_url(&forge, SHA),
        &github_headers("ghp_wrong"),
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["message"], "Bad credentials");

    let answer = post(
        github_status_url(&forge, SHA),
        &github_headers("ghp_good"),
        body,
    )
    .await;
    assert_eq!(answer.status, 201, "{:?}", answer.json());
    let created = answer.json();
    assert_eq!(created["state"], "pending");
    assert_eq!(created["context"], "surveil/main");
    assert_eq!(created["target_url"], "http://ci/jobs/1");
    assert_eq!(created["creator"]["login"], "surveil-bot");

    let calls = forge.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].auth, calls[0].status, calls[0].accepted()),
        (Auth::Unknown, Some(401), false)
    );
    assert_eq!((calls[1].auth, calls[1].status), (Auth::Ok, Some(201)));
    assert_eq!(calls[1].sha, SHA);
    assert_eq!(calls[1].repo, "acme/app");
    assert_eq!(calls[1].description.as_deref(), Some("queued"));
    assert_eq!(
        forge.statuses().len(),
        1,
        "only the accepted call is a status"
    );
    let waited = waiter
        .await
        .unwrap()
        .expect("wait_for sees the accepted call");
    assert_eq!(waited.len(), 2);
    let none = forge
        .wait_for(Duration::from_millis(50), |calls| calls.len() > 2)
        .await;
    assert_eq!(
        none.unwrap_err().len(),
        2,
        "a timed-out wait hands back what it saw"
    );
}

#[tokio::test]
async fn github_checks_client_headers_permissions_repository_and_body() {
    let (forge, _) = github_forge().await;
    let ok = json!({"state": "success"});
    let mut no_agent = github_headers("ghp_good");
    no_agent.retain(|(n, _)| n != "user-agent");
    let answer = post(github_status_url(&forge, SHA), &no_agent, ok.clone()).await;
    assert_eq!(answer.status, 403);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("User-Agent")
    );

    let mut xml = github_headers("ghp_good");
    xml[2].1 = "application/xml".to_owned();
    assert_eq!(
        post(github_status_url(&forge, SHA), &xml, ok.clone())
            .await
            .status,
        415
    );

    let mut no_token = github_headers("x");
    no_token.remove(0);
    let answer = post(github_status_url(&forge, SHA), &no_token, ok.clone()).await;
    assert_eq!(
        (answer.status, answer.json()["message"].clone()),
        (401, json!("Requires authentication"))
    );

    let reader = post(
        github_status_url(&forge, SHA),
        &github_headers("ghp_reader"),
        ok.clone(),
    )
    .await;
    assert_eq!(reader.status, 403);
    let elsewhere = format!("{}/repos/acme/other/statuses/{SHA}", forge.base_url());
    assert_eq!(
        post(elsewhere, &github_headers("ghp_good"), ok.clone())
            .await
            .status,
        404
    );

    let long = json!({"state": "failure", "description": "x".repeat(141)});
    let answer = post(
        github_status_url(&forge, SHA),
        &github_headers("ghp_good"),
        long,
    )
    .await;
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json()["errors"][0]["field"], "description");
    let running = post(
        github_status_url(&forge, SHA),
        &github_headers("ghp_good"),
        json!({"state": "running"}),
    )
    .await;
    assert_eq!(running.status, 422, "`running` is GitLab's, not GitHub's");
    let bad_sha = post(
        github_status_url(&forge, "main"),
        &github_headers("ghp_good"),
        ok,
    )
    .await;
    assert_eq!(bad_sha.status, 422);

    let auth: Vec<Auth> = forge.calls().iter().map(|c| c.auth).collect();
    assert_eq!(auth[3..5], [Auth::Forbidden, Auth::Ok]);
    assert!(forge.statuses().is_empty(), "{:#?}", forge.calls());
}

#[tokio::test]
async fn gitlab_state_names_auth_headers_and_transitions_are_gitlabs() {
    let forge = FakeForge::start().await.unwrap();
    let repo =
        forge.add_repo(RepoSpec::new(ForgeKind::GitLab, "group/sub/app").write_token("glpat-good"));
    let api = forge.api_url(ForgeKind::GitLab);
    let by_path = format!("{api}/projects/group%2Fsub%2Fapp/statuses/{SHA}");
    let by_id = format!("{api}/projects/{}/statuses/{SHA}", repo.id);
    let token = h(&[
        ("private-token", "glpat-good"),
        ("content-type", "application/json"),
    ]);

    let wrong_name = post(
        by_path.clone(),
        &token,
        json!({"state": "failure", "name": "surveil/main"}),
    )
    .await;
    assert_eq!(wrong_name.status, 400);
    assert_eq!(
        wrong_name.json()["error"],
        "state does not have a valid value"
    );

    let pending = post(
        by_path.clone(),
        &token,
        json!({"state": "pending", "name": "surveil/main", "ref": "main"}),
    )
    .await;
    assert_eq!(pending.status, 201, "{:?}", pending.json());
    assert_eq!(pending.json()["status"], "pending");
    assert_eq!(pending.json()["name"], "surveil/main");
    assert_eq!(pending.json()["sha"], SHA);

    let again = post(
        by_id.clone(),
        &token,
        json!({"state": "pending", "name": "surveil/main", "ref": "main"}),
    )
    .await;
    assert_eq!(again.status, 400);
    assert!(
        again.json()["message"]
            .as_str()
            .unwrap()
            .contains("Cannot transition status via :enqueue from :pending")
    );

    // Query parameters and a bearer token work too.
    let bearer = h(&[("authorization", "Bearer glpat-good")]);
    let running = client::request(
        "POST",
        &format!("{by_id}?state=running&name=surveil%2Fmain&ref=main"),
        &bearer,
        Vec::new(),
        T,
    )
    .await
    .unwrap();
    assert_eq!(running.status, 201, "{:?}", running.json());
    let failed = post(
        by_id.clone(),
        &token,
        json!({"state": "failed", "context": "surveil/main", "ref": "main"}),
    )
    .await;
    assert_eq!(failed.status, 201);
    assert_eq!(
        failed.json()["name"],
        "surveil/main",
        "`context` stands in for `name`"
    );
    assert!(failed.json()["finished_at"].is_string());

    let no_token = post(by_id.clone(), &[], json!({"state": "success"})).await;
    assert_eq!(
        (no_token.status, no_token.json()["message"].clone()),
        (401, json!("401 Unauthorized"))
    );
    let unknown = post(
        format!("{api}/projects/999/statuses/{SHA}"),
        &token,
        json!({"state": "success"}),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.json()["message"].clone()),
        (404, json!("404 Project Not Found"))
    );

    let states: Vec<_> = forge
        .statuses()
        .iter()
        .map(|c| c.state.clone().unwrap())
        .collect();
    assert_eq!(states, ["pending", "running", "failed"]);
    assert!(
        forge
            .statuses()
            .iter()
            .all(|c| c.forge == ForgeKind::GitLab && c.git_ref.as_deref() == Some("main"))
    );
}

#[tokio::test]
async fn gitea_and_forgejo_share_api_v1_with_their_own_states() {
    let forge = FakeForge::start().await.unwrap();
    forge.add_repo(RepoSpec::new(ForgeKind::Gitea, "team/web").write_token("gitea-t"));
    forge.add_repo(RepoSpec::new(ForgeKind::Forgejo, "team/api").write_token("forgejo-t"));
    let api = forge.api_url(ForgeKind::Gitea);
    let token = |t: &str| {
        h(&[
            ("authorization", &format!("token {t}")),
            ("content-type", "application/json"),
        ])
    };

    let warning = post(
        format!("{api}/repos/team/web/statuses/{SHA}"),
        &token("gitea-t"),
        json!({"state": "warning", "context": "ci"}),
    )
    .await;
    assert_eq!(warning.status, 201, "{:?}", warning.json());
    assert_eq!(
        warning.json()["status"],
        "warning",
        "Gitea answers the state as `status`"
    );
    let running = post(
        format!("{api}/repos/team/web/statuses/{SHA}"),
        &token("gitea-t"),
        json!({"state": "running"}),
    )
    .await;
    assert_eq!(running.status, 422);
    let forgejo = post(
        format!("{api}/repos/team/api/statuses/{SHA}"),
        &token("forgejo-t"),
        json!({"state": "success"}),
    )
    .await;
    assert_eq!(forgejo.status, 201);
    assert_eq!(forgejo.json()["context"], "default");
    let cross = post(
        format!("{api}/repos/team/api/statuses/{SHA}"),
        &token("gitea-t"),
        json!({"state": "success"}),
    )
    .await;
    assert_eq!(
        cross.status, 403,
        "a token of another repository on the same forge"
    );

    let kinds: Vec<ForgeKind> = forge.statuses().iter().map(|c| c.forge).collect();
    assert_eq!(kinds, [ForgeKind::Gitea, ForgeKind::Forgejo]);
}

#[tokio::test]
async fn injected_errors_rate_limits_and_hangs_then_normal_answers() {
    let (forge, _) = github_forge().await;
    let url = github_status_url(&forge, SHA);
    let headers = github_headers("ghp_good");
    forge.fail_next(2, Fault::Status { code: 500 });
    forge.fail_next(
        1,
        Fault::RateLimited {
            retry_after: Duration::from_secs(3),
        },
    );
    let mut codes = Vec::new();
    for _ in 0..4 {
        let answer = post(url.clone(), &headers, json!({"state": "pending"})).await;
        if answer.status == 429 {
            assert_eq!(answer.header("retry-after"), Some("3"));
        }
        codes.push(answer.status);
    }
    assert_eq!(codes, [500, 500, 429, 201]);

    forge.fail_next(1, Fault::Hang);
    let hung = client::request(
        "POST",
        &url,
        &headers,
        br#"{"state":"success"}"#.to_vec(),
        Duration::from_millis(300),
    )
    .await;
    assert!(matches!(hung, Err(SendError::Timeout(_))), "{hung:?}");
    let answer = post(url.clone(), &headers, json!({"state": "success"})).await;
    assert_eq!(answer.status, 201, "the hang was for one call");

    forge.fail_for(Duration::from_secs(60), Fault::Status { code: 503 });
    assert_eq!(
        post(url.clone(), &headers, json!({"state": "success"}))
            .await
            .status,
        503
    );
    forge.clear_faults();
    assert_eq!(
        post(url, &headers, json!({"state": "success"}))
            .await
            .status,
        201
    );

    let calls = forge.calls();
    assert_eq!(calls[4].fault, Some(Fault::Hang));
    assert_eq!(
        calls[4].status, None,
        "a hung call is recorded as unanswered"
    );
    assert_eq!(calls.iter().filter(|c| c.fault.is_some()).count(), 5);
    assert_eq!(forge.statuses().len(), 3);
}

#[tokio::test]
async fn down_refuses_connections_then_serves_on_the_same_port() {
    let (forge, _) = github_forge().await;
    let url = github_status_url(&forge, SHA);
    let headers = github_headers("ghp_good");
    assert_eq!(
        post(url.clone(), &headers, json!({"state": "pending"}))
            .await
            .status,
        201
    );

    forge.down();
    let mut refused = None;
    for _ in 0..50 {
        match client::request(
            "POST",
            &url,
            &headers,
            br#"{"state":"success"}"#.to_vec(),
            T,
        )
        .await
        {
            // A connection accepted just before the port closed is reset.
            Err(SendError::Io { reason, .. }) if reason.contains("refused") => {
                refused = Some(reason);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused.is_some(), "the port closes");

    forge.up();
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(answer) = client::request(
            "POST",
            &url,
            &headers,
            br#"{"state":"success"}"#.to_vec(),
            T,
        )
        .await
        {
            answered = Some(answer.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered, Some(201), "listening again on {}", forge.addr());

    forge.down_for(Duration::from_millis(200));
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if client::request(
            "POST",
            &url,
            &headers,
            br#"{"state":"success"}"#.to_vec(),
            T,
        )
        .await
        .is_ok()
        {
            back = true;
            break;
        }
    }
    assert!(back, "a timed down period ends by itself");
    assert_eq!(
        forge.statuses().len(),
        3,
        "calls refused at the port are never recorded"
    );
}

/// A webhook receiver: records each request's headers and body, answers 202.
async fn receiver() -> (String, Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            record.lock().unwrap().push((parts.headers, body));
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(202)
                                    .body(Full::new(Bytes::from_static(b"queued")))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, seen)
}

/// HMAC-SHA256 written out from RFC 2104 over plain SHA-256, independent
/// of the `hmac` crate the forge signs with.
fn rfc2104_hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn sent_signatures_verify_with_an_independent_hmac() {
    let forge = FakeForge::start().await.unwrap();
    let (url, seen) = receiver().await;
    let secret = "s3cr3t-with-more-than-sixty-four-bytes-so-the-key-gets-hashed-first-0123456789";
    for kind in ForgeKind::ALL {
        let repo = forge.add_repo(RepoSpec::new(kind, format!("acme/{kind}")));
        for signature in [Signature::Valid, Signature::Wrong, Signature::Missing] {
            let hook = Webhook::push(&repo, "main", ZERO_SHA, SHA)
                .secret(secret)
                .signature(signature);
            let delivery = forge.send(&url, &hook).await;
            assert_eq!(
                (delivery.status, delivery.response.as_str()),
                (Some(202), "queued")
            );
            let (headers, body) = seen.lock().unwrap().last().cloned().unwrap();
            let expected = rfc2104_hmac_sha256(secret.as_bytes(), &body);
            let (name, value) = match kind {
                ForgeKind::GitHub => ("x-hub-signature-256", format!("sha256={expected}")),
                ForgeKind::Gitea => ("x-gitea-signature", expected),
                ForgeKind::Forgejo => ("x-forgejo-signature", expected),
                ForgeKind::GitLab => ("x-gitlab-token", secret.to_owned()),
            };
            let sent = header(&headers, name);
            match signature {
                Signature::Valid => assert_eq!(sent, Some(value.as_str()), "{kind}"),
                Signature::Wrong => assert!(sent.is_some_and(|s| s != value), "{kind}"),
                Signature::Missing => assert_eq!(sent, None, "{kind}"),
            }
        }
    }
    assert_eq!(forge.deliveries().len(), 12);
}

#[tokio::test]
async fn each_forge_sends_its_own_event_and_delivery_headers_and_replays_keep_the_id() {
    let forge = FakeForge::start().await.unwrap();
    let (url, seen) = receiver().await;
    let expect = [
        (
            ForgeKind::GitHub,
            "x-github-event",
            "push",
            "x-github-delivery",
        ),
        (
            ForgeKind::Gitea,
            "x-gitea-event",
            "push",
            "x-gitea-delivery",
        ),
        (
            ForgeKind::Forgejo,
            "x-forgejo-event",
            "push",
            "x-forgejo-delivery",
        ),
        (
            ForgeKind::GitLab,
            "x-gitlab-event",
            "Push Hook",
            "x-gitlab-event-uuid",
        ),
    ];
    for (kind, event_header, event, delivery_header) in expect {
        let repo = forge.add_repo(RepoSpec::new(kind, "acme/app"));
        let hook = Webhook::push(&repo, "main", SHA, SHA2).secret("k");
        forge.send(&url, &hook).await;
        forge.send(&url, &hook).await;
        forge.send(&url, &hook.clone().new_delivery()).await;
        let seen = seen.lock().unwrap();
        let last: Vec<_> = seen[seen.len() - 3..]
            .iter()
            .map(|(h, _)| h.clone())
            .collect();
        assert_eq!(header(&last[0], event_header), Some(event), "{kind}");
        let ids: Vec<_> = last
            .iter()
            .map(|h| header(h, delivery_header).unwrap().to_owned())
            .collect();
        assert_eq!(ids[0], hook.id());
        assert_eq!(
            ids[0], ids[1],
            "{kind}: sending the same webhook again replays its id"
        );
        assert_ne!(ids[1], ids[2], "{kind}");
    }
    let pr = forge.repos()[0].clone();
    let hook = Webhook::pull_request(&pr, PrAction::Opened, 1, ("f", SHA2), ("main", SHA));
    forge.send(&url, &hook).await;
    assert_eq!(
        header(&seen.lock().unwrap().last().unwrap().0, "x-github-event"),
        Some("pull_request")
    );
}

fn body_of(hook: &Webhook) -> Value {
    serde_json::from_slice(&hook.render().body).unwrap()
}

#[tokio::test]
async fn payloads_carry_what_a_ci_reads() {
    let forge = FakeForge::start().await.unwrap();
    let spec = |kind| RepoSpec::new(kind, "acme/app").clone_url("http://127.0.0.1:1/app.git");
    let gh = forge.add_repo(spec(ForgeKind::GitHub));
    let push = body_of(&Webhook::push(&gh, "main", SHA, SHA2));
    assert_eq!(
        (
            push["ref"].clone(),
            push["before"].clone(),
            push["after"].clone()
        ),
        (json!("refs/heads/main"), json!(SHA), json!(SHA2))
    );
    assert_eq!(
        push["repository"]["clone_url"],
        "http://127.0.0.1:1/app.git"
    );
    assert_eq!(push["repository"]["full_name"], "acme/app");
    assert_eq!(push["head_commit"]["id"], SHA2);
    let pr = body_of(
        &Webhook::pull_request(
            &gh,
            PrAction::Synchronized,
            12,
            ("feature", SHA2),
            ("main", SHA),
        )
        .before(SHA),
    );
    assert_eq!(
        (pr["action"].clone(), pr["number"].clone()),
        (json!("synchronize"), json!(12))
    );
    assert_eq!(
        (
            pr["pull_request"]["head"]["sha"].clone(),
            pr["pull_request"]["head"]["ref"].clone()
        ),
        (json!(SHA2), json!("feature"))
    );
    let gone = body_of(&Webhook::delete_branch(&gh, "old", SHA));
    assert_eq!(
        (gone["deleted"].clone(), gone["after"].clone()),
        (json!(true), json!(ZERO_SHA))
    );

    let gitea = forge.add_repo(spec(ForgeKind::Gitea));
    let pr = body_of(&Webhook::pull_request(
        &gitea,
        PrAction::Synchronized,
        3,
        ("f", SHA2),
        ("main", SHA),
    ));
    assert_eq!(pr["action"], "synchronized", "Gitea's spelling");
    assert_eq!(pr["pull_request"]["head"]["sha"], SHA2);
    let gone = body_of(&Webhook::delete_branch(&gitea, "old", SHA));
    assert_eq!(
        (gone["ref"].clone(), gone["ref_type"].clone()),
        (json!("old"), json!("branch"))
    );

    let gl = forge.add_repo(spec(ForgeKind::GitLab));
    let push = body_of(&Webhook::push(&gl, "main", SHA, SHA2));
    assert_eq!(
        push["project"]["git_http_url"],
        "http://127.0.0.1:1/app.git"
    );
    assert_eq!(push["project"]["path_with_namespace"], "acme/app");
    assert_eq!(push["checkout_sha"], SHA2);
    let gone = body_of(&Webhook::delete_branch(&gl, "old", SHA));
    assert_eq!(
        (gone["after"].clone(), gone["checkout_sha"].clone()),
        (json!(ZERO_SHA), Value::Null)
    );
    let mr = body_of(
        &Webhook::pull_request(
            &gl,
            PrAction::Synchronized,
            4,
            ("topic", SHA2),
            ("main", SHA),
        )
        .before(SHA),
    );
    let attributes = &mr["object_attributes"];
    assert_eq!(
        (attributes["iid"].clone(), attributes["action"].clone()),
        (json!(4), json!("update"))
    );
    assert_eq!(
        (
            attributes["last_commit"]["id"].clone(),
            attributes["source_branch"].clone()
        ),
        (json!(SHA2), json!("topic"))
    );
    assert_eq!(attributes["oldrev"], SHA);

    let other = Repo {
        path: "evil/app".to_owned(),
        clone_url: "http://127.0.0.1:2/evil.git".to_owned(),
        ..gh.clone()
    };
    let forged = body_of(&Webhook::push(&gh, "main", SHA, SHA2).naming(&other));
    assert_eq!(
        (
            forged["repository"]["full_name"].clone(),
            forged["repository"]["clone_url"].clone()
        ),
        (json!("evil/app"), json!("http://127.0.0.1:2/evil.git"))
    );
}

#[tokio::test]
async fn the_binary_serves_the_control_api_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("fakeforge-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "ghp_file\n").unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_surveil-fakeforge"))
        .args(["--repo", "github:acme/app", "--token-file"])
        .arg(&token_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(T, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = line.rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");

    let control = |path: &str| format!("{base}/_fakeforge/{path}");
    let json_headers = h(&[("content-type", "application/json")]);
    let fault = post(
        control("faults"),
        &json_headers,
        json!({"fault": {"kind": "status", "code": 502}, "calls": 1}),
    )
    .await;
    assert_eq!(fault.status, 204);
    let limited = json!({"fault": {"kind": "rate_limited", "retry_after": "7s"}, "calls": 1});
    assert_eq!(
        post(control("faults"), &json_headers, limited).await.status,
        204
    );
    let unclear = json!({"fault": {"kind": "hang"}, "calls": 1, "for": "1s"});
    assert_eq!(
        post(control("faults"), &json_headers, unclear).await.status,
        400
    );
    let url = format!("{base}/repos/acme/app/statuses/{SHA}");
    assert_eq!(
        post(
            url.clone(),
            &github_headers("ghp_file"),
            json!({"state": "pending"})
        )
        .await
        .status,
        502
    );
    let limited = post(
        url.clone(),
        &github_headers("ghp_file"),
        json!({"state": "pending"}),
    )
    .await;
    assert_eq!(
        (limited.status, limited.header("retry-after")),
        (429, Some("7"))
    );
    assert_eq!(
        post(
            url,
            &github_headers("ghp_file"),
            json!({"state": "pending"})
        )
        .await
        .status,
        201
    );
    let calls = client::request("GET", &control("calls"), &[], Vec::new(), T)
        .await
        .unwrap()
        .json();
    let statuses: Vec<_> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(502), json!(429), json!(201)]);

    let (hook_url, seen) = receiver().await;
    let hook = json!({"url": hook_url, "kind": "github", "repo": "acme/app", "secret": "k", "event": "push",
                      "branch": "main", "before": ZERO_SHA, "after": SHA, "signature": "wrong"});
    let delivery = post(control("webhooks"), &json_headers, hook).await.json();
    assert_eq!(delivery["status"], 202);
    assert_eq!(delivery["signature"], "wrong");
    assert_eq!(seen.lock().unwrap().len(), 1);
    let bad = post(
        control("webhooks"),
        &json_headers,
        json!({"url": "x", "kind": "github", "repo": "no/such", "secret": "", "event": "push"}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("no/such"));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
