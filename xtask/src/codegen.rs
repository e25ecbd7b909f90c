//! Generates the protobuf types of `surveil-proto` from `proto/` with
//! prost-build fed by protox, so no machine ever needs `protoc`.
//!
//! The output is committed: a runner author depends on `surveil-proto` alone.
//! A test below fails when the committed file is stale.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const PROTO_FILE: &str = "surveil/v1/surveil.proto";
const GENERATED: &str = "crates/surveil-proto/src/generated/surveil.v1.rs";

/// Renders the generated Rust source for the current `.proto` files.
pub(crate) fn generate(root: &Path) -> Result<String> {
    let proto_dir = root.join("proto");
    let descriptors = protox::compile([PROTO_FILE], [&proto_dir])
        .with_context(|| format!("compiling {}", proto_dir.join(PROTO_FILE).display()))?;
    let out = tempdir(root)?;
    let mut config = prost_build::Config::new();
    config
        .out_dir(&out)
        // Log data is passed on without copying.
        .bytes(["."])
        .btree_map(["."]);
    config
        .compile_fds(descriptors)
        .context("generating Rust from the descriptors")?;
    let path = out.join("surveil.v1.rs");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    fs::remove_dir_all(&out).ok();
    Ok(text)
}

/// `cargo xtask codegen`: writes the generated file into the source tree.
pub(crate) fn write(root: &Path) -> Result<()> {
    let text = generate(root)?;
    let dest = root.join(GENERATED);
    fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
    println!("wrote {}", dest.display());
    Ok(())
}

fn tempdir(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target").join("xtask-codegen").join(format!(
        "{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_generated_code_is_fresh() {
        let root = crate::workspace_root();
        let fresh = generate(&root).expect("codegen runs");
        let committed = fs::read_to_string(root.join(GENERATED)).unwrap_or_default();
        assert!(
            fresh == committed,
            "{GENERATED} is stale: run `cargo xtask codegen` and commit the result"
        );
    }
}
