//! Scenario C: checking out one commit of a generated 2,000-file,
//! 200-commit repository with the runner's own gix code
//! (`surveil_runner::workspace::Workspace::checkout`) against the `git`
//! CLI doing the same (`git clone --mirror`, then a checkout of the commit's
//! tree into an empty directory), with a cold mirror (none yet) and a warm
//! one (the commit already there). The timing runs in `xtask bench-checkout`
//! from the release build, so gix runs at the speed a release runner has.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use surveil_runner::workspace::Workspace;
use surveil_tests::cluster;

use super::{Env, Figure, Outcome, Target};

const FILES: usize = 2_000;
const COMMITS: usize = 200;
const FILES_PER_CHANGE: usize = 10;

/// Deterministic text of about 1 KiB for file `file` at `version`.
fn content(file: usize, version: usize) -> String {
    let mut state = (file as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version as u64;
    let mut text = String::with_capacity(1100);
    for line in 0..24 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = writeln!(
            text,
            "line {line} of file {file} v{version}: {state:016x} {}",
            state >> 7
        );
    }
    text
}

fn path(file: usize) -> String {
    format!("src/mod{:02}/file{:04}.txt", file % 20, file)
}

/// Generates the repository with one `git fast-import`: the first commit
/// adds every file, each later one rewrites ten of them.
fn generate(repo: &Path) -> Result<String> {
    std::fs::create_dir_all(repo)?;
    cluster::git(repo, &["init", "--quiet", "--initial-branch=main"])?;
    let mut stream = String::new();
    for commit in 0..COMMITS {
        let message = format!("commit {commit}\n");
        let _ = write!(
            stream,
            "commit refs/heads/main\ncommitter Bench <bench@surveil.invalid> {} +0000\ndata {}\n{message}",
            1_800_000_000 + commit,
            message.len()
        );
        let files: Vec<usize> = if commit == 0 {
            (0..FILES).collect()
        } else {
            (0..FILES_PER_CHANGE)
                .map(|k| (commit * 37 + k * 211) % FILES)
                .collect()
        };
        for file in files {
            let text = content(file, commit);
            let _ = write!(
                stream,
                "M 100644 inline {}\ndata {}\n{text}\n",
                path(file),
                text.len()
            );
        }
        stream.push('\n');
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running git fast-import")?;
    child
        .stdin
        .take()
        .context("fast-import stdin")?
        .write_all(stream.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("git fast-import failed ({status})");
    }
    // A repository as people have it: packed, as after a clone or a gc.
    cluster::git(repo, &["repack", "-a", "-d", "--quiet"])?;
    cluster::git(repo, &["rev-parse", "main"])
}

fn git(args: &[&str], envs: &[(&str, &Path)]) -> Result<()> {
    let out = Command::new("git")
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// CPU time (user + system, ms) of this process and its reaped children:
/// gix's local fetch runs `git upload-pack`, the git CLI runs as children.
fn cpu_ms() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .filter_map(|who| getrusage(who).ok())
        .map(|u| {
            let ms =
                |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
            ms(u.user_time()) + ms(u.system_time())
        })
        .sum()
}

/// `xtask bench-checkout REPO COMMIT SCRATCH`: prints one JSON line of
/// milliseconds: gix and git, cold and warm.
pub fn tool(args: &[String]) -> Result<()> {
    let [repo, commit, scratch] = args else {
        bail!("usage: xtask bench-checkout REPO COMMIT SCRATCH");
    };
    let scratch = Path::new(scratch);
    std::fs::create_dir_all(scratch)?;
    let interrupt = AtomicBool::new(false);
    let ms = |start: Instant| start.elapsed().as_secs_f64() * 1000.0;
    let mut cpu = std::collections::BTreeMap::new();

    let workspace = Workspace::open(&scratch.join("gix"))?;
    let (start, c0) = (Instant::now(), cpu_ms());
    let info = workspace.checkout(repo, commit, &scratch.join("gix-cold"), &interrupt)?;
    let gix_cold = ms(start);
    cpu.insert("gix_cold_cpu", cpu_ms() - c0);
    if !info.fetched || info.files != FILES {
        bail!(
            "gix cold checkout: fetched {}, {} files",
            info.fetched,
            info.files
        );
    }
    let (start, c0) = (Instant::now(), cpu_ms());
    let info = workspace.checkout(repo, commit, &scratch.join("gix-warm"), &interrupt)?;
    let gix_warm = ms(start);
    cpu.insert("gix_warm_cpu", cpu_ms() - c0);
    if info.fetched || info.files != FILES {
        bail!(
            "gix warm checkout: fetched {}, {} files",
            info.fetched,
            info.files
        );
    }

    let mirror = scratch.join("git/mirror.git");
    let checkout = |dest: &Path, index: &Path| -> Result<()> {
        std::fs::create_dir_all(dest)?;
        let (git_dir, work_tree) = (mirror.display().to_string(), dest.display().to_string());
        // The commit is checked for first, as the runner does before
        // deciding whether to fetch.
        git(
            &[
                "--git-dir",
                &git_dir,
                "cat-file",
                "-e",
                &format!("{commit}^{{commit}}"),
            ],
            &[],
        )?;
        git(
            &[
                "--git-dir",
                &git_dir,
                "--work-tree",
                &work_tree,
                "checkout",
                commit,
                "--",
                ".",
            ],
            &[("GIT_INDEX_FILE", index)],
        )
    };
    let (start, c0) = (Instant::now(), cpu_ms());
    git(
        &[
            "clone",
            "--mirror",
            "--quiet",
            repo,
            &mirror.display().to_string(),
        ],
        &[],
    )?;
    checkout(&scratch.join("git-cold"), &scratch.join("git/index-cold"))?;
    let git_cold = ms(start);
    cpu.insert("git_cold_cpu", cpu_ms() - c0);
    let (start, c0) = (Instant::now(), cpu_ms());
    checkout(&scratch.join("git-warm"), &scratch.join("git/index-warm"))?;
    let git_warm = ms(start);
    cpu.insert("git_warm_cpu", cpu_ms() - c0);

    let mut report = serde_json::json!({
        "gix_cold": gix_cold, "gix_warm": gix_warm,
        "git_cold": git_cold, "git_warm": git_warm,
    });
    for (key, value) in cpu {
        report[key] = value.into();
    }
    println!("{report}");
    Ok(())
}

pub fn c(env: &Env, out: &mut Outcome) -> Result<()> {
    let dir = env.scratch("c")?;
    let repo = dir.join("repo");
    let commit = generate(&repo)?;
    let repo = std::fs::canonicalize(&repo)?.display().to_string();
    let runs = if env.quick { 3 } else { 7 };
    let mut figures: Vec<Figure> = [
        ("gix cold (mirror fetched)", "gix_cold"),
        ("git cold (clone --mirror)", "git_cold"),
        ("gix warm", "gix_warm"),
        ("git warm", "git_warm"),
    ]
    .iter()
    .map(|(name, _)| Figure::new(*name, "ms", Target::Info))
    .collect();
    let mut cold = Figure::new("gix / git, cold", "ratio", Target::AtMost(1.0));
    let mut warm = Figure::new("gix / git, warm", "ratio", Target::AtMost(1.0));
    let mut cold_cpu = Figure::new("gix / git CPU time, cold", "ratio", Target::Info);
    let mut warm_cpu = Figure::new("gix / git CPU time, warm", "ratio", Target::Info);
    // One unrecorded run first, so every recorded one sees warm page caches.
    for run in 0..=runs {
        let scratch = dir.join(format!("run-{run}"));
        let output = Command::new(&env.tool)
            .args([
                "bench-checkout",
                &repo,
                &commit,
                &scratch.display().to_string(),
            ])
            .stdin(Stdio::null())
            .output()
            .context("running xtask bench-checkout")?;
        if !output.status.success() {
            bail!(
                "bench-checkout failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let value: Value =
            serde_json::from_slice(&output.stdout).context("reading bench-checkout's output")?;
        std::fs::remove_dir_all(&scratch).ok();
        if run == 0 {
            continue;
        }
        let get = |key: &str| value[key].as_f64().with_context(|| format!("no {key}"));
        for (figure, key) in figures
            .iter_mut()
            .zip(["gix_cold", "git_cold", "gix_warm", "git_warm"])
        {
            figure.samples.push(get(key)?);
        }
        cold.samples.push(get("gix_cold")? / get("git_cold")?);
        warm.samples.push(get("gix_warm")? / get("git_warm")?);
        cold_cpu
            .samples
            .push(get("gix_cold_cpu")? / get("git_cold_cpu")?);
        warm_cpu
            .samples
            .push(get("gix_warm_cpu")? / get("git_warm_cpu")?);
    }
    out.figures.append(&mut figures);
    out.figures.extend([cold, warm, cold_cpu, warm_cpu]);
    out.notes.push(format!(
        "{FILES} files, {COMMITS} commits, tip checked out; git: clone --mirror, cat-file -e, \
         then `checkout COMMIT -- .` into an empty work tree with a fresh index"
    ));
    Ok(())
}
