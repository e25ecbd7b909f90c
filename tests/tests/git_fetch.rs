//! Surveil's own fetch (`surveil_git::Mirror`, used by observer and
//! runner) against the real `git http-backend` behind the test smart-HTTP
//! server: basic auth, a wrong password refused with a message naming the
//! URL but never the secret, HTTPS trusting the test CA only when told,
//! a silent server given up on after the read timeout, and glob refspecs
//! that forget deleted branches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use surveil_common::tls::{ServerTls, test_certs};
use surveil_git::{Auth, Credential, FetchSettings, Mirror, MirrorError, Wanted};
use surveil_tests::cluster::git;
use surveil_tests::githttp::{GitHttpConfig, served_repo, start_server as start};

struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    head: gix::ObjectId,
}

/// `served/app.git` with `main` and two release branches.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let served = served_repo(dir.path(), &["release/1", "release/2"]).unwrap();
    let head = gix::ObjectId::from_hex(served.head.as_bytes()).unwrap();
    Fixture {
        dir,
        root: served.root,
        head,
    }
}

fn basic(user: &str, password: &str) -> FetchSettings {
    FetchSettings {
        auth: Auth::Basic {
            user: user.to_owned(),
            password: Credential::new(password),
        },
        ..FetchSettings::default()
    }
}

/// Fetches `wanted` into `mirror` off the async runtime; the refs fetched
/// or the error.
async fn fetch(
    mirror: &Arc<Mirror>,
    wanted: Vec<String>,
) -> Result<Vec<(String, gix::ObjectId)>, MirrorError> {
    let mirror = mirror.clone();
    tokio::task::spawn_blocking(move || {
        let no = AtomicBool::new(false);
        let repo = if wanted.is_empty() {
            mirror.fetch(Wanted::Everything, &no)?
        } else {
            mirror.fetch(Wanted::Refs(&wanted), &no)?
        };
        let refs = repo.references().unwrap();
        let mut all: Vec<_> = refs
            .all()
            .unwrap()
            .map(|r| {
                let mut r = r.unwrap();
                (
                    r.name().as_bstr().to_string(),
                    r.peel_to_id().unwrap().detach(),
                )
            })
            .collect();
        all.sort();
        Ok(all)
    })
    .await
    .unwrap()
}

/// HTTPS with basic auth, trusting the test CA.
fn basic_tls(user: &str, password: &str, ca: &Path) -> FetchSettings {
    FetchSettings {
        ca_file: Some(ca.to_owned()),
        ..basic(user, password)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_fetches_and_a_wrong_password_is_named_without_the_secret() {
    let f = fixture();
    let certs = test_certs::write(f.dir.path());
    let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
    let config = GitHttpConfig::new(&f.root)
        .tls(tls)
        .basic_auth("alice", "s3cret");
    let server = start(config).await;
    let url = server.url("app.git");

    let settings = basic_tls("alice", "s3cret", &certs.ca);
    let good = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("good.git"),
        settings,
    ));
    let refs = fetch(&good, Vec::new())
        .await
        .expect("fetched with the password");
    assert!(
        refs.contains(&("refs/heads/main".to_owned(), f.head)),
        "{refs:?}"
    );
    let log = server.requests();
    assert!(
        log.iter().any(|r| r.authorization && r.status == 200),
        "{log:#?}"
    );

    let before = server.requests().len();
    let settings = basic_tls("alice", "guess-that", &certs.ca);
    let wrong = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("bad.git"),
        settings,
    ));
    let err = fetch(&wrong, Vec::new()).await.unwrap_err().to_string();
    assert!(err.contains(&url), "the URL is named: {err}");
    assert!(!err.contains("guess-that"), "the secret is not: {err}");
    assert!(
        err.contains("401") || err.to_lowercase().contains("auth"),
        "the cause is clear: {err}"
    );
    let log = server.requests();
    assert!(
        log[before..].iter().all(|r| r.status == 401),
        "nothing served: {log:#?}"
    );

    let settings = FetchSettings {
        ca_file: Some(certs.ca.clone()),
        ..FetchSettings::default()
    };
    let anonymous = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("anon.git"),
        settings,
    ));
    let err = fetch(&anonymous, Vec::new()).await.unwrap_err().to_string();
    assert!(err.contains(&url), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_never_sent_over_plain_http() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root).basic_auth("alice", "s3cret")).await;
    let url = server.url("app.git");
    let mirror = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("p.git"),
        basic("alice", "s3cret"),
    ));
    let err = fetch(&mirror, Vec::new()).await.unwrap_err().to_string();
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("clear text"), "the refusal says why: {err}");
    assert!(
        server.requests().iter().all(|r| !r.authorization),
        "no request carried the password: {:#?}",
        server.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_needs_the_test_ca_and_a_password_in_the_url_is_never_shown() {
    let f = fixture();
    let certs = test_certs::write(f.dir.path());
    let tls = ServerTls::new(&certs.server_cert, &certs.server_key, None).unwrap();
    let server = start(
        GitHttpConfig::new(&f.root)
            .tls(tls)
            .basic_auth("bob", "pw-9"),
    )
    .await;
    let url = server.url("app.git");
    assert!(url.starts_with("https://"), "{url}");

    let settings = basic("bob", "pw-9");
    let untrusted = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("u.git"),
        settings,
    ));
    let err = fetch(&untrusted, Vec::new()).await.unwrap_err().to_string();
    assert!(err.contains(&url), "{err}");
    assert!(
        server.requests().is_empty(),
        "nothing got past the handshake"
    );

    let settings = FetchSettings {
        ca_file: Some(certs.ca.clone()),
        ..basic("bob", "pw-9")
    };
    let trusted = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("t.git"),
        settings,
    ));
    let refs = fetch(&trusted, Vec::new())
        .await
        .expect("the test CA is trusted");
    assert!(
        refs.contains(&("refs/heads/main".to_owned(), f.head)),
        "{refs:?}"
    );

    // Credentials in the URL work (gix reads them) but never appear in an
    // error.
    let in_url = server.url_with_credentials("missing.git", "bob", "pw-9");
    let settings = FetchSettings {
        ca_file: Some(certs.ca.clone()),
        ..FetchSettings::default()
    };
    let mirror = Arc::new(Mirror::with_settings(
        &in_url,
        f.dir.path().join("m.git"),
        settings,
    ));
    let err = fetch(&mirror, Vec::new()).await.unwrap_err().to_string();
    assert!(!err.contains("pw-9"), "{err}");
    assert!(err.contains(&server.url("missing.git")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_given_up_on_after_the_read_timeout() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root)).await;
    server.set_black_hole(true);
    let settings = FetchSettings {
        read_timeout: Duration::from_secs(1),
        ..FetchSettings::default()
    };
    let url = server.url("app.git");
    let mirror = Arc::new(Mirror::with_settings(
        &url,
        f.dir.path().join("h.git"),
        settings,
    ));
    // Bounded: a fetch that ignored its timeout would hang this test.
    let err = tokio::time::timeout(Duration::from_secs(60), fetch(&mirror, Vec::new()))
        .await
        .expect("the fetch ends on its own read timeout")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url), "{err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("timedout") || lower.contains("timed out"),
        "{err}"
    );

    server.set_black_hole(false);
    let refs = fetch(&mirror, Vec::new())
        .await
        .expect("served once answering");
    assert!(refs.contains(&("refs/heads/main".to_owned(), f.head)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_refspecs_fetch_matching_branches_and_forget_deleted_ones() {
    let f = fixture();
    let server = start(GitHttpConfig::new(&f.root)).await;
    let mirror = Arc::new(Mirror::new(
        server.url("app.git"),
        f.dir.path().join("g.git"),
    ));
    let wanted = vec!["refs/heads/release/*".to_owned()];
    let refs = fetch(&mirror, wanted.clone()).await.unwrap();
    let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["refs/heads/release/1", "refs/heads/release/2"]);

    git(&f.root.join("app.git"), &["branch", "-D", "release/1"]).unwrap();
    let refs = fetch(&mirror, wanted).await.unwrap();
    let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["refs/heads/release/2"],
        "the deleted branch is gone"
    );
}
