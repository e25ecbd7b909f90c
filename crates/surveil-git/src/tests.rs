//! Mirrors against real repositories made with the git CLI (test set-up
//! only), fetched over gix's local transport.

use std::process::Command;

use super::*;

/// Runs git in `dir` for test set-up; returns its trimmed stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn commit(dir: &Path, name: &str) -> ObjectId {
    std::fs::write(dir.join(name), name).unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", name]);
    ObjectId::from_hex(git(dir, &["rev-parse", "HEAD"]).as_bytes()).unwrap()
}

/// An upstream repository with one commit on `main`, a `side` branch and a
/// tag.
fn upstream() -> (tempfile::TempDir, ObjectId, ObjectId) {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q"]);
    let main = commit(dir.path(), "a");
    git(dir.path(), &["checkout", "-q", "-b", "side"]);
    let side = commit(dir.path(), "s");
    git(dir.path(), &["tag", "v1"]);
    git(dir.path(), &["checkout", "-q", "main"]);
    (dir, main, side)
}

fn tip(repo: &gix::Repository, name: &str) -> Option<ObjectId> {
    let mut reference = repo.try_find_reference(name).unwrap()?;
    Some(reference.peel_to_id().unwrap().detach())
}

#[test]
fn everything_brings_every_branch_and_tag() {
    let (up, main, side) = upstream();
    let state = tempfile::tempdir().unwrap();
    let mirror = Mirror::new(up.path().to_str().unwrap(), state.path().join("m.git"));
    assert!(!mirror.exists());
    let no = AtomicBool::new(false);
    let repo = mirror.fetch(Wanted::Everything, &no).unwrap();
    assert!(repo.is_bare());
    assert_eq!(tip(&repo, "refs/heads/main"), Some(main));
    assert_eq!(tip(&repo, "refs/heads/side"), Some(side));
    assert_eq!(tip(&repo, "refs/tags/v1"), Some(side));
    assert!(!state.path().join("m.git.partial").exists());

    let newer = commit(up.path(), "b");
    let repo = mirror.fetch(Wanted::Everything, &no).unwrap();
    assert_eq!(tip(&repo, "refs/heads/main"), Some(newer));
}

#[test]
fn one_branch_follows_force_pushes_and_brings_nothing_else() {
    let (up, main, _) = upstream();
    let state = tempfile::tempdir().unwrap();
    let url = format!("file://{}", up.path().display());
    let mirror = Mirror::new(url, state.path().join("mirrors").join("m"));
    let no = AtomicBool::new(false);
    let repo = mirror.fetch(Wanted::Branch("main"), &no).unwrap();
    assert_eq!(tip(&repo, "refs/heads/main"), Some(main));
    assert_eq!(tip(&repo, "refs/heads/side"), None);
    assert_eq!(tip(&repo, "refs/tags/v1"), None);

    git(up.path(), &["reset", "-q", "--hard", &main.to_string()]);
    git(up.path(), &["commit", "-q", "--amend", "-m", "rewritten"]);
    let rewritten = ObjectId::from_hex(git(up.path(), &["rev-parse", "HEAD"]).as_bytes()).unwrap();
    let repo = mirror.fetch(Wanted::Branch("main"), &no).unwrap();
    assert_eq!(tip(&repo, "refs/heads/main"), Some(rewritten));
}

#[test]
fn with_commit_fetches_only_what_is_missing() {
    let (up, main, _) = upstream();
    let state = tempfile::tempdir().unwrap();
    let mirror = Mirror::new(up.path().to_str().unwrap(), state.path().join("m.git"));
    let no = AtomicBool::new(false);
    let (_, fetched) = mirror.with_commit(main, &no).unwrap();
    assert!(fetched, "a new mirror is fetched");
    let (repo, fetched) = mirror.with_commit(main, &no).unwrap();
    assert!(!fetched, "the commit is there already");
    assert!(repo.has_object(main));
    let newer = commit(up.path(), "c");
    let (repo, fetched) = mirror.with_commit(newer, &no).unwrap();
    assert!(fetched && repo.has_object(newer));
}

#[test]
fn leftovers_of_a_crash_are_replaced_and_an_old_in_place_mirror_is_kept() {
    let (up, main, _) = upstream();
    let state = tempfile::tempdir().unwrap();
    let no = AtomicBool::new(false);

    // A crash during creation left a half-made `.partial`, and something
    // that is no repository sits at the final path.
    let path = state.path().join("m.git");
    std::fs::create_dir_all(state.path().join("m.git.partial/objects")).unwrap();
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("HEAD"), "garbage").unwrap();
    let mirror = Mirror::new(up.path().to_str().unwrap(), &path);
    let repo = mirror.fetch(Wanted::Everything, &no).unwrap();
    assert_eq!(tip(&repo, "refs/heads/main"), Some(main));
    assert!(!state.path().join("m.git.partial").exists());

    // A mirror an older runner created in place is used as it is.
    let old = state.path().join("old.git");
    gix::init_bare(&old).unwrap();
    std::fs::write(old.join("marker"), "kept").unwrap();
    let mirror = Mirror::new(up.path().to_str().unwrap(), &old);
    mirror.fetch(Wanted::Everything, &no).unwrap();
    assert!(old.join("marker").exists(), "not recreated");
}

#[test]
fn an_unreachable_remote_names_its_url() {
    let state = tempfile::tempdir().unwrap();
    let gone = state.path().join("no-such-repo");
    let url = gone.to_str().unwrap();
    let mirror = Mirror::new(url, state.path().join("m.git"));
    let no = AtomicBool::new(false);
    let err = mirror.fetch(Wanted::Everything, &no).unwrap_err();
    assert!(matches!(err, MirrorError::Fetch { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("fetching {url} failed: ")),
        "{err}"
    );
    assert!(mirror.exists(), "the empty mirror is complete and kept");
    let err = Mirror::new(url, state.path().join("never-made"))
        .open()
        .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot open the mirror "),
        "{err}"
    );
}

#[test]
fn the_partial_name_is_appended_not_an_extension() {
    assert_eq!(
        partial_path(Path::new("/m/https_3A_2F_2Fx.org_2Fa.git")),
        Path::new("/m/https_3A_2F_2Fx.org_2Fa.git.partial")
    );
}
