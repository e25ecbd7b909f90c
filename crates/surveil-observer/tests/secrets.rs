//! The token stays secret: `--token VALUE` on the real binary's command
//! line is refused (exit 2) with the safe ways, and the library's
//! `Config` never shows the token in its `Debug` form.

const TOKEN: &str = "tok-3b8e-never-shown";

#[test]
fn token_on_the_command_line_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_surveil-observer"))
        .args(["--token", TOKEN])
        .args(["--state-dir", dir.path().to_str().unwrap(), "/srv/git/app"])
        .env_remove("SURVEIL_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("visible to every user in `ps`"), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn debug_never_shows_the_token() {
    let mut config = surveil_observer::Config::new("/srv/git/app", "/tmp/s");
    config.token = Some(TOKEN.into());
    let shown = format!("{config:?} {config:#?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}
