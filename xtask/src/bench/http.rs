//! H1–H3, the dispatcher's HTTP side: pages and API answered with 100,000
//! jobs in the store, a task's line reaching an SSE follower, and what 200
//! followers of one busy job cost the dispatcher. HTTP is spoken over
//! plain `TcpStream`s (one request per connection), so the figures hold
//! the dispatcher's work plus loopback, not a client library's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::{Env, Figure, Outcome, Target, cpu_time, pipeline_repo, wait_idle_runners};
use crate::bench::client::Client;
use surveil_tests::cluster;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One GET; the time until the whole response was read, and its status
/// line.
fn get(addr: &str, path: &str) -> Result<(f64, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = String::from_utf8_lossy(&body[..body.len().min(12)]).into_owned();
    Ok((ms, status))
}

fn p99(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

fn http_dispatcher(env: &Env, dir: &std::path::Path) -> Result<(cluster::Daemon, String, String)> {
    let http = format!("127.0.0.1:{}", cluster::free_port()?);
    let (daemon, addr) = env.dispatcher(dir, &["--http-listen", &http])?;
    cluster::wait_for(
        "the HTTP side to answer",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            Ok(get(&http, "/api/v1/status")
                .ok()
                .filter(|(_, s)| s.ends_with("200")))
        },
    )?;
    Ok((daemon, addr, http))
}

/// H1: `/api/v1/jobs?limit=50` and the home page with 100,000 jobs stored.
pub fn h1(env: &Env, out: &mut Outcome) -> Result<()> {
    let dir = env.scratch("h1")?;
    let (_dispatcher, addr, http) = http_dispatcher(env, &dir)?;
    let mut client = Client::connect(&addr)?;
    let jobs: u64 = if env.quick { 20_000 } else { 100_000 };
    let started = Instant::now();
    for batch in 0..jobs / 1000 {
        let commits = (0..1000)
            .map(|i| format!("{:040x}", batch * 1000 + i + 1))
            .collect();
        client.submit("/srv/git/bench", "main", commits)?;
    }
    out.notes.push(format!(
        "{jobs} jobs submitted in {:.1} s (1,000 per Submit), all queued: the home page lists the newest 50 of each section",
        started.elapsed().as_secs_f64()
    ));
    let requests = if env.quick { 200 } else { 500 };
    for (name, path) in [
        ("GET /api/v1/jobs?limit=50 p99", "/api/v1/jobs?limit=50"),
        ("GET / (home page) p99", "/"),
    ] {
        let mut figure = Figure::new(name, "ms", Target::AtMost(20.0));
        for _ in 0..3 {
            let mut samples = Vec::with_capacity(requests);
            for _ in 0..requests {
                let (ms, status) = get(&http, path)?;
                if !status.ends_with("200") {
                    bail!("{path} answered {status}");
                }
                samples.push(ms);
            }
            figure.samples.push(p99(samples));
        }
        out.figures.push(figure);
    }
    Ok(())
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Opens the log stream of `job`; the reader after the response head.
fn follow(http: &str, job: u64) -> Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect(http)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET /api/v1/jobs/{job}/log/stream HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.contains(" 200") {
        bail!("the log stream answered {line}");
    }
    Ok(reader)
}

/// Waits for the newest job of `repo` to run; its id.
fn running_job(client: &mut Client, repo: &str) -> Result<u64> {
    cluster::wait_for(
        "the job to start",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || {
            Ok(client
                .jobs(Some(repo), 1)?
                .first()
                .filter(|j| j.started_at_ms.is_some())
                .map(|j| j.id))
        },
    )
}

/// H2: a line a task prints (its own clock time) → the SSE client reads it.
pub fn h2(env: &Env, out: &mut Outcome) -> Result<()> {
    let dir = env.scratch("h2")?;
    let repo_dir = dir.join("repo");
    let lines = if env.quick { 30 } else { 100 };
    let repo = pipeline_repo(
        &repo_dir,
        &format!("for i in $(seq 1 {lines}); do date +%s%N; sleep 0.05; done"),
    )?;
    let (_dispatcher, addr, http) = http_dispatcher(env, &dir)?;
    let _runner = env.runner(&dir, "runner-1", &addr, &[&repo])?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 1, Duration::from_secs(30))?;
    let mut figure = Figure::new(
        "task line → SSE client, median of a run",
        "ms",
        Target::AtMost(100.0),
    );
    for run in 0..3 {
        let commit = cluster::commit(
            &repo_dir,
            &format!("h2 {run}"),
            &[("run", &run.to_string())],
        )?;
        client.submit(&repo, "main", vec![commit])?;
        let job = running_job(&mut client, &repo)?;
        let mut reader = follow(&http, job)?;
        let mut latencies = Vec::new();
        let mut line = String::new();
        while latencies.len() < lines {
            line.clear();
            if reader
                .read_line(&mut line)
                .context("reading the log stream")?
                == 0
            {
                break;
            }
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            let received = now_ns();
            let Ok(text) = serde_json::from_str::<String>(data) else {
                continue;
            };
            for printed in text.lines().filter_map(|l| l.trim().parse::<u128>().ok()) {
                latencies.push(received.saturating_sub(printed) as f64 / 1e6);
            }
        }
        latencies.sort_by(f64::total_cmp);
        if latencies.is_empty() {
            bail!("no line arrived");
        }
        figure.samples.push(latencies[latencies.len() / 2]);
    }
    out.figures.push(figure);
    Ok(())
}

/// H3: the dispatcher's CPU while a busy job is followed by 200 SSE
/// clients, less its CPU for the same job followed by none.
pub fn h3(env: &Env, out: &mut Outcome) -> Result<()> {
    let dir = env.scratch("h3")?;
    let repo_dir = dir.join("repo");
    let window = Duration::from_secs(if env.quick { 2 } else { 5 });
    let repo = pipeline_repo(
        &repo_dir,
        "i=0; while [ $i -lt 40000 ]; do echo line $i of a busy job; i=$((i+1)); sleep 0.002; done",
    )?;
    let (dispatcher, addr, http) = http_dispatcher(env, &dir)?;
    let _runner = env.runner(&dir, "runner-1", &addr, &[&repo])?;
    let mut client = Client::connect(&addr)?;
    wait_idle_runners(&mut client, 1, Duration::from_secs(30))?;
    let pid = dispatcher.pid().context("the dispatcher's pid")?;
    let followers = 200;
    let mut figure = Figure::new(
        "200 followers: extra dispatcher CPU",
        "% of a core",
        Target::AtMost(10.0),
    );
    let mut alone = Figure::new(
        "the busy job with no follower: dispatcher CPU",
        "% of a core",
        Target::Info,
    );
    for run in 0..3 {
        let commit = cluster::commit(
            &repo_dir,
            &format!("h3 {run}"),
            &[("run", &run.to_string())],
        )?;
        client.submit(&repo, "main", vec![commit])?;
        let job = running_job(&mut client, &repo)?;
        let busy = |w: Duration| -> Result<f64> {
            let before = cpu_time(pid)?;
            std::thread::sleep(w);
            Ok((cpu_time(pid)? - before).as_secs_f64() / w.as_secs_f64() * 100.0)
        };
        let base = busy(window)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..followers {
            let mut reader = follow(&http, job)?;
            let stop = Arc::clone(&stop);
            readers.push(std::thread::spawn(move || {
                let mut sink = [0u8; 16 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match reader.read(&mut sink) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            }));
        }
        // Let every follower catch up with the log so far first.
        std::thread::sleep(Duration::from_secs(1));
        let with = busy(window)?;
        stop.store(true, Ordering::Relaxed);
        client.cancel(job)?;
        for r in readers {
            let _ = r.join();
        }
        alone.samples.push(base);
        figure.samples.push((with - base).max(0.0));
    }
    out.figures.extend([figure, alone]);
    Ok(())
}
