//! Webhooks as the fake forge renders them, and hand-made edge cases:
//! each forge's signature accepted, every way of getting it wrong refused
//! with a message naming the header (and never the secret), and each
//! event read into the hint a CI needs.

use http::{HeaderMap, HeaderValue};
use surveil_fakeforge::{
    ForgeKind as Fake, PrAction as FakePr, Rendered, Repo, Signature, Webhook, ZERO_SHA,
};

use super::*;

const SECRET: &str = "correct horse battery staple";
const OLD: &str = "1111111111111111111111111111111111111111";
const NEW: &str = "2222222222222222222222222222222222222222";

fn repo(kind: Fake) -> Repo {
    Repo {
        kind,
        path: "acme/app".to_owned(),
        id: 42,
        clone_url: "https://forge.example/acme/app.git".to_owned(),
        ssh_url: "ssh://git@forge.example/acme/app.git".to_owned(),
        web_url: "https://forge.example/acme/app".to_owned(),
        default_branch: "main".to_owned(),
    }
}

fn ours(kind: Fake) -> ForgeKind {
    match kind {
        Fake::GitHub => ForgeKind::GitHub,
        Fake::Gitea => ForgeKind::Gitea,
        Fake::Forgejo => ForgeKind::Forgejo,
        Fake::GitLab => ForgeKind::GitLab,
    }
}

fn secret() -> Secret {
    Secret::from_text(SECRET).unwrap()
}

fn check(hook: &Webhook) -> Result<Parsed, String> {
    let rendered = hook.render();
    let headers = rendered.header_map();
    let verified = verify(&headers, &rendered.body, &secret()).map_err(|e| e.to_string())?;
    verified.parse().map_err(|e| e.to_string())
}

fn hint_of(hook: &Webhook) -> Hint {
    match check(&hook.clone().secret(SECRET)) {
        Ok(Parsed::Hint(hint)) => hint,
        other => panic!("expected a hint, got {other:?}"),
    }
}

fn refusal(rendered: &Rendered) -> VerifyError {
    verify(&rendered.header_map(), &rendered.body, &secret()).unwrap_err()
}

#[test]
fn each_forges_signature_verifies_and_names_the_forge() {
    for kind in Fake::ALL {
        let rendered = Webhook::push(&repo(kind), "main", OLD, NEW)
            .secret(SECRET)
            .render();
        let headers = rendered.header_map();
        let verified = verify(&headers, &rendered.body, &secret()).expect("a valid signature");
        assert_eq!(
            verified.forge(),
            ours(kind),
            "Gitea and Forgejo also send GitHub's headers"
        );
    }
}

#[test]
fn wrong_and_missing_signatures_are_refused_naming_the_header_not_the_secret() {
    for kind in Fake::ALL {
        let hook = Webhook::push(&repo(kind), "main", OLD, NEW).secret(SECRET);
        let header = ours(kind).signature_header();
        let wrong = refusal(&hook.clone().signature(Signature::Wrong).render());
        assert_eq!(
            wrong,
            VerifyError::Mismatch {
                forge: ours(kind),
                header
            }
        );
        let missing = refusal(&hook.clone().signature(Signature::Missing).render());
        assert_eq!(
            missing,
            VerifyError::Unsigned {
                forge: ours(kind),
                header
            }
        );
        for err in [wrong, missing] {
            let text = err.to_string();
            assert!(text.contains(header), "{text}");
            assert!(!text.contains(SECRET) && !text.contains("not-"), "{text}");
        }
    }
}

#[test]
fn a_body_altered_after_signing_is_refused() {
    let mut rendered = Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW)
        .secret(SECRET)
        .render();
    let text = String::from_utf8(rendered.body.clone())
        .unwrap()
        .replace(NEW, OLD);
    rendered.body = text.into_bytes();
    assert!(matches!(refusal(&rendered), VerifyError::Mismatch { .. }));
}

/// A rendered hook with one header's value replaced.
fn with_header(kind: Fake, name: &str, value: &str) -> Rendered {
    let mut rendered = Webhook::push(&repo(kind), "main", OLD, NEW)
        .secret(SECRET)
        .render();
    for (n, v) in &mut rendered.headers {
        if n == name {
            *v = value.to_owned();
        }
    }
    rendered
}

#[test]
fn malformed_signatures_say_what_is_wrong() {
    let good = Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW)
        .secret(SECRET)
        .render();
    let hex = good
        .header("x-hub-signature-256")
        .unwrap()
        .strip_prefix("sha256=")
        .unwrap()
        .to_owned();
    let problem = |kind, name: &str, value: &str| match refusal(&with_header(kind, name, value)) {
        VerifyError::Malformed { problem, .. } => problem,
        other => panic!("{value}: {other:?}"),
    };
    let gh = "x-hub-signature-256";
    assert_eq!(
        problem(Fake::GitHub, gh, &format!("sha1={hex}")),
        SignatureProblem::MissingPrefix
    );
    assert_eq!(
        problem(Fake::GitHub, gh, &hex),
        SignatureProblem::MissingPrefix
    );
    assert_eq!(
        problem(Fake::GitHub, gh, &format!("sha256={}", &hex[..40])),
        SignatureProblem::WrongLength { digits: 40 }
    );
    assert_eq!(
        problem(Fake::GitHub, gh, &format!("sha256=zz{}", &hex[2..])),
        SignatureProblem::NotHex { position: 0 }
    );
    assert_eq!(
        problem(Fake::Gitea, "x-gitea-signature", &format!("sha256={hex}")),
        SignatureProblem::UnexpectedPrefix
    );
    assert_eq!(
        problem(Fake::Forgejo, "x-forgejo-signature", &hex[..63]),
        SignatureProblem::WrongLength { digits: 63 }
    );
    let text = refusal(&with_header(Fake::GitHub, gh, &hex[..10])).to_string();
    assert!(
        text.contains("X-Hub-Signature-256") || text.contains("x-hub-signature-256"),
        "{text}"
    );

    let mut twice = good.header_map();
    twice.append(gh, HeaderValue::from_str(&format!("sha256={hex}")).unwrap());
    let err = verify(&twice, &good.body, &secret()).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Malformed {
                problem: SignatureProblem::Repeated,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn sha1_only_no_event_header_and_empty_secrets_are_refused() {
    let good = Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW)
        .secret(SECRET)
        .render();
    let mut headers = good.header_map();
    headers.remove("x-hub-signature-256");
    headers.insert("x-hub-signature", HeaderValue::from_static("sha1=0123"));
    assert_eq!(
        verify(&headers, &good.body, &secret()).unwrap_err(),
        VerifyError::Sha1Only
    );
    assert_eq!(
        verify(&HeaderMap::new(), &good.body, &secret()).unwrap_err(),
        VerifyError::NotAWebhook
    );
    assert!(Secret::from_text(" \n").is_none());
    assert_eq!(format!("{:?}", secret()), "Secret(<redacted>)");
    let trimmed = Secret::from_text(&format!("  {SECRET}\n")).unwrap();
    assert!(
        verify(&good.header_map(), &good.body, &trimmed).is_ok(),
        "a secret file's newline is not part of it"
    );
}

#[test]
fn pushes_give_the_ref_the_claimed_sha_the_repository_and_the_delivery() {
    for kind in Fake::ALL {
        let hook = Webhook::push(&repo(kind), "release/1.0", OLD, NEW);
        let hint = hint_of(&hook);
        assert_eq!(hint.forge, ours(kind));
        assert_eq!(hint.delivery.as_deref(), Some(hook.id()), "{kind}");
        assert_eq!(hint.event, Event::Push);
        assert_eq!(hint.git_ref, "refs/heads/release/1.0");
        assert_eq!(
            hint.change,
            Change::Updated {
                new: NEW.to_owned(),
                old: Some(OLD.to_owned())
            }
        );
        assert_eq!(hint.repository.full_name, "acme/app");
        assert_eq!(
            hint.repository.clone_urls[0], "https://forge.example/acme/app.git",
            "{kind}"
        );
        let created = hint_of(&Webhook::push(&repo(kind), "new", ZERO_SHA, NEW));
        assert_eq!(
            created.change,
            Change::Updated {
                new: NEW.to_owned(),
                old: None
            },
            "{kind}"
        );
    }
}

#[test]
fn branch_deletions_are_deletions_on_every_forge() {
    for kind in Fake::ALL {
        let hint = hint_of(&Webhook::delete_branch(&repo(kind), "gone", OLD));
        assert_eq!(hint.git_ref, "refs/heads/gone", "{kind}");
        assert!(
            matches!(hint.change, Change::Deleted { .. }),
            "{kind}: {:?}",
            hint.change
        );
    }
}

#[test]
fn pull_requests_point_at_their_head_ref() {
    let actions = [
        (FakePr::Opened, PrAction::Opened),
        (FakePr::Synchronized, PrAction::Synchronized),
        (FakePr::Reopened, PrAction::Reopened),
        (FakePr::Closed, PrAction::Closed),
    ];
    for kind in Fake::ALL {
        for (fake, action) in actions {
            let hook = Webhook::pull_request(&repo(kind), fake, 17, ("topic", NEW), ("main", OLD))
                .before(OLD);
            let hint = hint_of(&hook);
            let expected_ref = if kind == Fake::GitLab {
                "refs/merge-requests/17/head"
            } else {
                "refs/pull/17/head"
            };
            assert_eq!(hint.git_ref, expected_ref, "{kind}");
            assert_eq!(
                hint.event,
                Event::PullRequest {
                    number: 17,
                    action,
                    head_branch: "topic".to_owned(),
                    base_branch: "main".to_owned()
                },
                "{kind} {fake:?}"
            );
            assert!(
                matches!(&hint.change, Change::Updated { new, .. } if new == NEW),
                "{kind}"
            );
        }
    }
}

#[test]
fn a_gitlab_update_without_new_commits_and_a_ping_are_ignored() {
    let update = Webhook::pull_request(
        &repo(Fake::GitLab),
        FakePr::Synchronized,
        3,
        ("t", NEW),
        ("main", OLD),
    );
    match check(&update.secret(SECRET)).unwrap() {
        Parsed::Ignored(ignored) => {
            assert!(ignored.reason.contains("oldrev"), "{}", ignored.reason)
        }
        other => panic!("{other:?}"),
    }
    let ping = Webhook::ping(&repo(Fake::GitHub));
    match check(&ping.clone().secret(SECRET)).unwrap() {
        Parsed::Ignored(ignored) => {
            assert_eq!(
                (ignored.event.as_str(), ignored.delivery.as_deref()),
                ("ping", Some(ping.id()))
            );
        }
        other => panic!("{other:?}"),
    }
    let issues = Webhook::other(
        &repo(Fake::Gitea),
        "issues",
        serde_json::json!({"action": "opened"}),
    );
    match check(&issues.secret(SECRET)).unwrap() {
        Parsed::Ignored(ignored) => {
            assert!(ignored.reason.contains("`issues`"), "{}", ignored.reason)
        }
        other => panic!("{other:?}"),
    }
    let labelled = Webhook::other(
        &repo(Fake::GitHub),
        "pull_request",
        serde_json::json!({"action": "labeled"}),
    );
    match check(&labelled.secret(SECRET)).unwrap() {
        Parsed::Ignored(ignored) => {
            assert!(ignored.reason.contains("labeled"), "{}", ignored.reason)
        }
        other => panic!("{other:?}"),
    }
}

/// A signed GitHub push whose body is `body`.
fn signed_body(kind: Fake, body: &[u8]) -> Result<Parsed, String> {
    let mut rendered = Webhook::push(&repo(kind), "main", OLD, NEW)
        .secret(SECRET)
        .render();
    rendered.body = body.to_vec();
    let signature = surveil_fakeforge::sign(SECRET.as_bytes(), body);
    for (name, value) in &mut rendered.headers {
        match name.as_str() {
            "x-hub-signature-256" => *value = format!("sha256={signature}"),
            "x-gitea-signature" | "x-forgejo-signature" => value.clone_from(&signature),
            _ => {}
        }
    }
    let headers = rendered.header_map();
    verify(&headers, &rendered.body, &secret())
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|e| e.to_string())
}

#[test]
fn malformed_payloads_name_the_field() {
    let base = Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW)
        .render()
        .body;
    let mut doc: serde_json::Value = serde_json::from_slice(&base).unwrap();
    doc["repository"]
        .as_object_mut()
        .unwrap()
        .remove("clone_url");
    let err = signed_body(Fake::GitHub, doc.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        err,
        "GitHub push payload: `repository.clone_url` is missing"
    );

    let mut doc: serde_json::Value = serde_json::from_slice(&base).unwrap();
    doc["after"] = serde_json::json!("not-a-sha");
    let err = signed_body(Fake::GitHub, doc.to_string().as_bytes()).unwrap_err();
    assert!(err.contains("`after` is not a commit id"), "{err}");

    let mut doc: serde_json::Value = serde_json::from_slice(&base).unwrap();
    doc["ref"] = serde_json::json!(5);
    let err = signed_body(Fake::Gitea, doc.to_string().as_bytes()).unwrap_err();
    assert_eq!(err, "Gitea push payload: `ref` is not a string");

    let err = signed_body(Fake::GitHub, b"{\"ref\": ").unwrap_err();
    assert!(
        err.starts_with("GitHub push payload is not a JSON object: EOF"),
        "{err}"
    );
    let err = signed_body(Fake::Forgejo, b"[1, 2]").unwrap_err();
    assert!(err.contains("not a JSON object"), "{err}");

    let mr = Webhook::pull_request(
        &repo(Fake::GitLab),
        FakePr::Opened,
        3,
        ("t", NEW),
        ("main", OLD),
    )
    .render();
    let mut doc: serde_json::Value = serde_json::from_slice(&mr.body).unwrap();
    doc["object_attributes"]["iid"] = serde_json::json!("3");
    let mut headers = mr.header_map();
    headers.insert("x-gitlab-token", HeaderValue::from_static(SECRET));
    let body = doc.to_string();
    let err = verify(&headers, body.as_bytes(), &secret())
        .unwrap()
        .parse()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "GitLab Merge Request Hook payload: `object_attributes.iid` is not a whole number"
    );
}

#[test]
fn delivery_ids_are_bounded() {
    let hook = Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW).secret(SECRET);
    let long = hook
        .clone()
        .delivery_id("x".repeat(MAX_DELIVERY_ID_LEN + 1));
    let err = check(&long).unwrap_err();
    assert!(
        err.contains("x-github-delivery is longer than 200 characters"),
        "{err}"
    );
    let spaced = check(&hook.delivery_id("a b")).unwrap_err();
    assert!(spaced.contains("spaces"), "{spaced}");
}

#[test]
fn a_payload_naming_another_repository_is_read_as_such() {
    let other = Repo {
        path: "evil/app".to_owned(),
        clone_url: "https://evil.example/app.git".to_owned(),
        ..repo(Fake::GitHub)
    };
    let forged = hint_of(&Webhook::push(&repo(Fake::GitHub), "main", OLD, NEW).naming(&other));
    assert_eq!(forged.repository.full_name, "evil/app");
    assert_eq!(
        forged.repository.clone_urls[0],
        "https://evil.example/app.git"
    );
}

#[test]
fn verify_with_picks_the_secret_of_the_repository_named() {
    let secrets = [
        ("acme/app", secret()),
        ("acme/other", Secret::from_text("other").unwrap()),
    ];
    let lookup = |_: ForgeKind, repo: &Repository| {
        secrets
            .iter()
            .find(|(n, _)| *n == repo.full_name)
            .map(|(_, s)| s)
    };
    for kind in Fake::ALL {
        let rendered = Webhook::push(&repo(kind), "main", OLD, NEW)
            .secret(SECRET)
            .render();
        let headers = rendered.header_map();
        assert!(
            verify_with(&headers, &rendered.body, lookup).is_ok(),
            "{kind}"
        );
        let stranger = Repo {
            path: "nobody/x".to_owned(),
            ..repo(kind)
        };
        let rendered = Webhook::push(&stranger, "main", OLD, NEW)
            .secret(SECRET)
            .render();
        let err = verify_with(&rendered.header_map(), &rendered.body, lookup).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} webhook for nobody/x, which has no webhook secret configured",
                ours(kind)
            )
        );
    }
}

#[test]
fn gitlab_tag_pushes_name_the_commit_not_the_tag_object() {
    let mut rendered = Webhook::push(&repo(Fake::GitLab), "refs/tags/v1.0", ZERO_SHA, NEW)
        .secret(SECRET)
        .render();
    assert_eq!(rendered.header("x-gitlab-event"), Some("Tag Push Hook"));
    let mut doc: serde_json::Value = serde_json::from_slice(&rendered.body).unwrap();
    doc["after"] = serde_json::json!(OLD);
    rendered.body = doc.to_string().into_bytes();
    let headers = rendered.header_map();
    let Parsed::Hint(hint) = verify(&headers, &rendered.body, &secret())
        .unwrap()
        .parse()
        .unwrap()
    else {
        panic!("a tag push is a hint");
    };
    assert_eq!(hint.git_ref, "refs/tags/v1.0");
    assert_eq!(
        hint.change,
        Change::Updated {
            new: NEW.to_owned(),
            old: None
        }
    );
}

#[test]
fn detection_prefers_the_most_specific_forge() {
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", HeaderValue::from_static("push"));
    assert_eq!(detect(&headers), Some(ForgeKind::GitHub));
    headers.insert("x-gitea-event", HeaderValue::from_static("push"));
    assert_eq!(detect(&headers), Some(ForgeKind::Gitea));
    headers.insert("x-forgejo-event", HeaderValue::from_static("push"));
    assert_eq!(detect(&headers), Some(ForgeKind::Forgejo));
}
