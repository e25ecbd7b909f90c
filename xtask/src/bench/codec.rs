//! The codec figures: runs the criterion bench
//! `crates/surveil-proto/benches/codec.rs` (encode and decode of `Assign`
//! and 64 KiB `Log` frames) and reads its throughput lines. Criterion does
//! the measuring; this only shortens its timing for `--quick` and turns its
//! output into figures.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{Env, Figure, Outcome, Target};

pub fn codec(env: &Env, out: &mut Outcome) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let measure = if env.quick { "1" } else { "3" };
    let output = Command::new(&cargo)
        .current_dir(&env.root)
        .args([
            "bench",
            "--quiet",
            "-p",
            "surveil-proto",
            "--bench",
            "codec",
            "--",
        ])
        .args(["--warm-up-time", "1", "--measurement-time", measure])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench -p surveil-proto --bench codec")?;
    if !output.status.success() {
        bail!("cargo bench of the codec failed ({})", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    out.figures.extend(parse(&text)?);
    out.notes.push(
        "min / median / max here are criterion's 95 % confidence bounds and estimate \
         of the throughput in frame bytes (prefix included)"
            .to_owned(),
    );
    Ok(())
}

/// Criterion's `NAME time: […]` then `thrpt: [a U b U c U]` lines.
fn parse(text: &str) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut name: Option<String> = None;
    for line in text.lines() {
        if let Some((before, _)) = line.split_once("time:") {
            let before = before.trim();
            if !before.is_empty() {
                name = Some(before.to_owned());
            }
        } else if !line.trim().is_empty() && !line.contains("thrpt:") && !line.starts_with(' ') {
            // A long name is printed on a line of its own.
            name = Some(line.trim().to_owned());
        }
        let Some((_, values)) = line.split_once("thrpt:") else {
            continue;
        };
        // The `change:` block against a saved baseline repeats `thrpt:`
        // with percentages.
        if values.contains('%') {
            continue;
        }
        let words: Vec<&str> = values
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split_whitespace()
            .collect();
        let mut figure = Figure::new(
            name.take()
                .context("a throughput line without a benchmark name")?,
            "MB/s",
            Target::Info,
        );
        for pair in words.chunks(2) {
            let [value, unit] = pair else {
                bail!("unreadable criterion line: {line}");
            };
            let value: f64 = value.parse().with_context(|| format!("reading {line}"))?;
            let scale = match *unit {
                "B/s" => 1e-6,
                "KB/s" => 1e-3,
                "MB/s" => 1.0,
                "GB/s" => 1e3,
                "TB/s" => 1e6,
                other => bail!("unknown throughput unit {other} in: {line}"),
            };
            figure.samples.push(value * scale);
        }
        figures.push(figure);
    }
    if figures.is_empty() {
        bail!("no throughput lines in criterion's output");
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_and_converts_units() {
        let text = "codec/encode/Assign     time:   [27.1 ns 27.5 ns 28.0 ns]\n\
                    \x20                       thrpt:  [2.9 GB/s 3.0 GB/s 3.1 GB/s]\n\
                    \x20                change:\n\
                    \x20                       thrpt:  [+15.725% +47.393% +80.600%]\n\
                    codec/decode/a-very-long-benchmark-name\n\
                    \x20                       time:   [329.69 ns 351.38 ns 373.57 ns]\n\
                    \x20                       thrpt:  [222.18 MB/s 236.21 MB/s 251.75 MB/s]\n";
        let figures = parse(text).unwrap();
        assert_eq!(figures.len(), 2);
        assert_eq!(figures[0].name, "codec/encode/Assign");
        assert_eq!(figures[0].samples, vec![2900.0, 3000.0, 3100.0]);
        assert_eq!(figures[1].name, "codec/decode/a-very-long-benchmark-name");
        assert_eq!(figures[1].samples[1], 236.21);
    }
}
