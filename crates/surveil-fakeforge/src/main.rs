//! `surveil-fakeforge`: the fake forge as a process, for tests that drive
//! it from outside (`cargo xtask e2e`). Flags, the first stdout line, and
//! SIGTERM; everything else is the library's and its `/_fakeforge/` API.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use surveil_fakeforge::{FakeForge, ForgeKind, RepoSpec};

/// A fake GitHub / Gitea / Forgejo / GitLab for tests (commit statuses in,
/// webhooks out, control API under /_fakeforge/).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// A repository, `KIND:PATH` or `KIND:PATH=CLONE_URL`
    /// (e.g. `github:acme/app`, `gitlab:group/app=http://127.0.0.1:8080/app.git`).
    #[arg(long = "repo", value_name = "KIND:PATH[=URL]")]
    repos: Vec<String>,
    /// A file holding the token allowed to write statuses on every
    /// repository (surrounding whitespace trimmed).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Also write the base URL into this file once listening.
    #[arg(long, value_name = "FILE")]
    url_file: Option<PathBuf>,
}

fn parse_repo(text: &str) -> anyhow::Result<(ForgeKind, String, Option<String>)> {
    let (kind, rest) = text
        .split_once(':')
        .with_context(|| format!("--repo {text}: expected KIND:PATH"))?;
    let kind: ForgeKind = kind.parse().map_err(anyhow::Error::msg)?;
    let (path, url) = match rest.split_once('=') {
        Some((path, url)) => (path, Some(url.to_owned())),
        None => (rest, None),
    };
    anyhow::ensure!(
        path.contains('/'),
        "--repo {text}: the path must be OWNER/NAME"
    );
    Ok((kind, path.to_owned(), url))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("surveil-fakeforge: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = match &cli.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let repos = cli
        .repos
        .iter()
        .map(|r| parse_repo(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let forge = FakeForge::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    for (kind, path, url) in repos {
        let mut spec = RepoSpec::new(kind, path);
        if let Some(token) = &token {
            spec = spec.write_token(token.clone());
        }
        if let Some(url) = url {
            spec = spec.clone_url(url);
        }
        forge.add_repo(spec);
    }
    if let Some(path) = &cli.url_file {
        std::fs::write(path, forge.base_url())
            .with_context(|| format!("--url-file {}", path.display()))?;
    }
    println!("surveil-fakeforge listening on {}", forge.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(forge);
    Ok(())
}
