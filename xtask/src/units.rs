//! `cargo xtask verify-units`: runs `systemd-analyze verify` on
//! `dist/systemd/*.service`. The units name the installed paths
//! (`/usr/local/bin/…`), which a development machine does not have, so the
//! check runs on copies pointing at the freshly built binaries; everything
//! else is verified as shipped.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use surveil_tests::cluster;

pub fn verify(root: &Path) -> Result<()> {
    let bins = cluster::build(root, false)?;
    let bin_dir = bins
        .dispatcher
        .parent()
        .context("binary has a directory")?
        .display()
        .to_string();
    let scratch = cluster::target_dir(root).join("xtask-units");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    let mut units = Vec::new();
    for entry in fs::read_dir(root.join("dist/systemd"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "service") {
            let text = fs::read_to_string(&path)?;
            let dest = scratch.join(path.file_name().context("unit file name")?);
            fs::write(&dest, text.replace("/usr/local/bin", &bin_dir))?;
            units.push(dest);
        }
    }
    if units.is_empty() {
        bail!("no units found in dist/systemd");
    }
    units.sort();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .context("running systemd-analyze (package `systemd`)")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !report.trim().is_empty() {
        bail!("systemd-analyze verify reported:\n{}", report.trim());
    }
    println!("systemd-analyze verify: {} units clean", units.len());
    Ok(())
}
