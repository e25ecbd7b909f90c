//! The crate's promise to runner authors: depending on it brings no
//! application frameworks. Checked against cargo's own view of the graph.

use std::process::Command;

/// Crates that belong in binaries, never in the protocol library.
const FORBIDDEN: [&str; 3] = ["anyhow", "clap", "tracing-subscriber"];

/// `no-proc-macro` because prost-derive, a proc-macro, uses anyhow at
/// compile time; nothing of it is linked into a program that uses
/// surveil-proto, so it does not break the promise.
#[test]
fn normal_dependencies_exclude_application_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(&cargo)
        .args(["tree", "-p", "surveil-proto", "--prefix", "none"])
        .args(["-e", "normal,no-proc-macro"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} tree: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // Each line is "name vX.Y.Z [(path)] [(*)]".
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    // The listing is the real graph, not an empty or unrelated one.
    assert_eq!(names.first(), Some(&"surveil-proto"), "{stdout}");
    assert!(names.contains(&"prost"), "{stdout}");
    for name in FORBIDDEN {
        assert!(
            !names.contains(&name),
            "surveil-proto depends on {name}:\n{stdout}"
        );
    }
}
