//! `dist/hooks/post-receive`, installed in a bare repository and pushed to,
//! with a stand-in `surveil` that records how it was called.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::TestRepo;

const HOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../dist/hooks/post-receive");

#[test]
fn post_receive_submits_each_pushed_branch_tip_and_skips_deletions_and_tags() {
    let work = TestRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("srv.git");
    work.git(&["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()]);
    let bare = std::fs::canonicalize(&bare).unwrap();
    let hook = bare.join("hooks").join("post-receive");
    std::fs::copy(HOOK, &hook).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The stand-in client: one line per call, its arguments and the
    // environment the real client would read.
    let calls = dir.path().join("calls");
    let fake = dir.path().join("surveil");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$* dispatch=$SURVEIL_DISPATCH\" >> '{}'\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let push = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("push")
            .arg("-q")
            .arg(&bare)
            .args(args)
            .current_dir(work.path())
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("SURVEIL", &fake)
            .env("SURVEIL_DISPATCH", "127.0.0.1:9123")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let first = work.commit("first");
    push(&["main"]);
    let second = work.commit("second");
    push(&["main", "main:refs/heads/feature/x"]);
    work.git(&["tag", "v1"]);
    push(&["v1"]);
    push(&[":refs/heads/feature/x"]);

    let recorded = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();
    let repo = bare.to_str().unwrap();
    let expect = |commit: &str, branch: &str| {
        format!("submit {repo} {commit} --branch {branch} dispatch=127.0.0.1:9123")
    };
    assert_eq!(lines.len(), 3, "{recorded}");
    assert_eq!(lines[0], expect(&first, "main"));
    let rest = [lines[1].to_owned(), lines[2].to_owned()];
    assert!(rest.contains(&expect(&second, "main")), "{recorded}");
    assert!(rest.contains(&expect(&second, "feature/x")), "{recorded}");
}
