//! Tidy checks over the workspace's own files, run as ordinary tests so
//! `cargo test --workspace` (and so CI) keeps them true.
//!
//! - Every dependency a crate declares is used by that crate's code: a
//!   normal dependency from `src/` (or `build.rs`), a dev-dependency from
//!   any of its code, a build-dependency from `build.rs`. An unused
//!   dependency costs every build its compile time and hides what a crate
//!   really relies on. The check is textual (a path `name::…`, a
//!   `use name`, a macro `name!` or an attribute `#[name…`), which is what
//!   cargo-machete does too, with nothing to install.
//!
//! This file reads files only; it must not build or run anything.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn read_toml(path: &Path) -> toml::Table {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()))
}

/// The Rust source files under `dir`, recursively (none if it is missing).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn concat(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `code` refers to the crate whose library is called `ident`.
fn mentions(code: &str, ident: &str) -> bool {
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(pos) = code[from..].find(ident) {
        let start = from + pos;
        let end = start + ident.len();
        from = end;
        let before_ok = start == 0 || !is_ident_byte(bytes[start - 1]);
        let after = &code[end..];
        let after_ok = after.starts_with("::")
            || after.starts_with('!')
            || after.starts_with(';')
            || after.starts_with(" as ");
        let preceded = code[..start].trim_end();
        let used = preceded.ends_with("use") || preceded.ends_with("extern crate");
        let attribute = preceded.ends_with("#[") || preceded.ends_with("#![");
        if before_ok && (after_ok || used || attribute) {
            return true;
        }
    }
    false
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The library names of a dependency table (`package = …` renames keep
/// the key as the name code uses).
fn dependency_idents(manifest: &toml::Table, section: &str) -> BTreeSet<String> {
    manifest
        .get(section)
        .and_then(toml::Value::as_table)
        .map(|deps| deps.keys().map(|k| k.replace('-', "_")).collect())
        .unwrap_or_default()
}

#[test]
fn every_declared_dependency_is_used() {
    let root = workspace_root();
    let workspace = read_toml(&root.join("Cargo.toml"));
    let members: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace.members is a list")
        .iter()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect();
    let mut unused = Vec::new();
    for member in &members {
        let dir = root.join(member);
        let manifest = read_toml(&dir.join("Cargo.toml"));
        let mut src = Vec::new();
        rust_files(&dir.join("src"), &mut src);
        let build_rs = dir.join("build.rs");
        let build = fs::read_to_string(&build_rs).unwrap_or_default();
        let mut all = src.clone();
        for extra in ["tests", "benches", "examples"] {
            rust_files(&dir.join(extra), &mut all);
        }
        let (src, all) = (concat(&src), concat(&all));
        let checks = [
            ("dependencies", format!("{src}\n{build}")),
            ("dev-dependencies", format!("{all}\n{build}")),
            ("build-dependencies", build.clone()),
        ];
        for (section, code) in &checks {
            for ident in dependency_idents(&manifest, section) {
                if !mentions(code, &ident) {
                    unused.push(format!("{member}: [{section}] {ident}"));
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies declared but never used (remove them, or move them to the section whose code uses them):\n  {}",
        unused.join("\n  ")
    );
}

#[test]
fn the_mention_check_tells_use_from_coincidence() {
    assert!(mentions("use tokio::sync;", "tokio"));
    assert!(mentions("let x = serde_json::json!({});", "serde_json"));
    assert!(mentions("#[derive(clap::Parser)]", "clap"));
    assert!(mentions("#[tokio::test]", "tokio"));
    assert!(mentions("use rusqlite;", "rusqlite"));
    assert!(mentions("anyhow!(\"x\")", "anyhow"));
    assert!(!mentions("let tokio_runtime = 1;", "tokio"));
    assert!(!mentions("// uses serde for json", "serde"));
    assert!(!mentions("my_serde::x()", "serde"));
}
