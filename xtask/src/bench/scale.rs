//! Scenario S4 (many simulated runners on one dispatcher), its load process
//! (`xtask bench-load`, run from the release build), and scenario M (idle
//! memory of each daemon). The load process speaks `surveil-proto` as N
//! runners that build nothing: each completes the handshake and answers
//! pings, so the dispatcher carries N live sessions. It never sends
//! results and is only ever pointed at a dispatcher the benchmark started.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use surveil_proto::{Connection, Hello, Msg, Pong, Role};
use surveil_tests::cluster::wait_for;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::client::Client;
use super::{Env, Figure, Outcome, Target, cpu_time, pipeline_repo, raise_nofile, vm_mib};

/// A repository no job names, so simulated runners are never assigned work.
const NO_REPO: &str = "/nonexistent/surveil-bench-sim";
/// Handshakes in flight at once: enough to keep the dispatcher busy without
/// overflowing its listen backlog.
const IN_FLIGHT: usize = 256;

/// `xtask bench-load DISPATCH COUNT PREFIX`: connects COUNT simulated
/// runners, prints `connected OK FAILED MS` once every attempt is over, then
/// answers pings until its standard input closes.
pub fn load(args: &[String]) -> Result<()> {
    let [dispatch, count, prefix] = args else {
        bail!("usage: xtask bench-load DISPATCH COUNT PREFIX");
    };
    let count: usize = count.parse().context("COUNT")?;
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    rt.block_on(async {
        let gate = Arc::new(Semaphore::new(IN_FLIGHT));
        for i in 0..count {
            let permit = gate.clone().acquire_owned().await?;
            let (dispatch, name) = (dispatch.clone(), format!("{prefix}-{i}"));
            let (connected, failed, first_error) =
                (connected.clone(), failed.clone(), first_error.clone());
            tokio::spawn(async move {
                match handshake(&dispatch, &name).await {
                    Ok(conn) => {
                        connected.fetch_add(1, Ordering::SeqCst);
                        drop(permit);
                        answer_pings(conn).await;
                    }
                    Err(err) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(format!("{name}: {err:#}"));
                    }
                }
            });
        }
        // Every task gives its permit back once its handshake is over.
        let _all = gate.acquire_many(IN_FLIGHT as u32).await?;
        anyhow::Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "connected {} {} {elapsed:.1}",
        connected.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    if let Some(err) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        println!("error {err}");
    }
    // Stay connected (the runtime's workers answer pings) until the parent
    // closes our stdin or kills us.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn handshake(dispatch: &str, name: &str) -> Result<Connection<TcpStream>> {
    let stream = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(dispatch))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let mut conn = Connection::new(stream);
    let mut hello = Hello::new(Role::Runner, name);
    hello.slots = 1;
    hello.repos = vec![NO_REPO.to_owned()];
    conn.client_handshake(hello, Duration::from_secs(30))
        .await?;
    Ok(conn)
}

async fn answer_pings(mut conn: Connection<TcpStream>) {
    while let Ok(Some(msg)) = conn.recv().await {
        if let Msg::Ping(ping) = msg
            && conn.send(Pong { seq: ping.seq }).await.is_err()
        {
            return;
        }
    }
}

/// A running load process holding `count` sessions.
struct Load {
    child: Child,
}

impl Load {
    fn start(env: &Env, dispatch: &str, count: usize, prefix: &str) -> Result<(Load, f64)> {
        let mut child = Command::new(&env.tool)
            .args(["bench-load", dispatch, &count.to_string(), prefix])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load process")?;
        let stdout = child.stdout.take().context("load stdout")?;
        let mut load = Load { child };
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .context("the load process ended before connecting")??;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ok, failed, ms) = match fields.as_slice() {
            ["connected", ok, failed, ms] => (
                ok.parse::<usize>()?,
                failed.parse::<usize>()?,
                ms.parse::<f64>()?,
            ),
            _ => bail!("unexpected line from the load process: {line}"),
        };
        if failed > 0 || ok != count {
            let detail = lines.next().and_then(Result::ok).unwrap_or_default();
            load.stop();
            bail!("{failed} of {count} simulated runners failed to connect ({detail})");
        }
        Ok((load, ms))
    }

    fn stop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_runner_count(addr: &str, count: u32) -> Result<()> {
    let mut last = None;
    let reached = wait_for(
        &format!("the dispatcher to count {count} runners"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let runners = Client::connect(addr)?.status()?.runners;
            last = Some(runners);
            Ok((runners == count).then_some(()))
        },
    );
    reached.with_context(|| match last {
        Some(n) => format!("the dispatcher counted {n} of {count} runners"),
        None => "the dispatcher did not answer".to_owned(),
    })
}

pub fn s4(env: &Env, out: &mut Outcome) -> Result<()> {
    s4_on(env, out, "s4", &[])
}

/// S4 with `store` added to the dispatcher's flags (a PostgreSQL store for
/// P4), under `target/bench/<name>`.
pub fn s4_on(env: &Env, out: &mut Outcome, name: &str, store: &[&str]) -> Result<()> {
    let dir = env.scratch(name)?;
    let (dispatcher, addr) = env.dispatcher(&dir, store)?;
    let pid = dispatcher.pid().context("dispatcher pid")?;
    let sizes: &[usize] = if env.quick {
        &[1_000]
    } else {
        &[1_000, 5_000, 10_000]
    };
    let window = if env.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(20)
    };
    out.notes.push(format!(
        "idle CPU over {} s per N in 3 windows of {} s; RSS (VmRSS) at each window's end; \
         1 s dispatcher heartbeat",
        window.as_secs() * 3,
        window.as_secs()
    ));
    for &n in sizes {
        let mut connect = Figure::new(format!("N={n}: connect all"), "s", Target::AtMost(10.0));
        let mut cpu = Figure::new(
            format!("N={n}: dispatcher CPU idle"),
            "% core",
            Target::AtMost(25.0),
        );
        let mut rss = Figure::new(
            format!("N={n}: dispatcher RSS"),
            "MiB",
            Target::AtMost(200.0),
        );
        let result = rounds(
            env,
            &addr,
            pid,
            n,
            window,
            [&mut connect, &mut cpu, &mut rss],
        );
        // Whatever was measured before a failure is still reported.
        out.figures.extend([connect, cpu, rss]);
        result.with_context(|| format!("N={n}"))?;
    }
    Ok(())
}

/// Three connect rounds of `n` simulated runners; the last one stays for
/// the idle windows.
fn rounds(
    env: &Env,
    addr: &str,
    pid: u32,
    n: usize,
    window: Duration,
    [connect, cpu, rss]: [&mut Figure; 3],
) -> Result<()> {
    for round in 0..3 {
        let (mut load, ms) = Load::start(env, addr, n, &format!("sim-{n}-{round}"))?;
        wait_runner_count(addr, n as u32)?;
        connect.samples.push(ms / 1000.0);
        if round == 2 {
            std::thread::sleep(Duration::from_secs(1));
            for _ in 0..3 {
                let (cpu0, t0) = (cpu_time(pid)?, Instant::now());
                std::thread::sleep(window);
                let used = cpu_time(pid)? - cpu0;
                cpu.samples
                    .push(100.0 * used.as_secs_f64() / t0.elapsed().as_secs_f64());
                rss.samples.push(vm_mib(pid, "VmRSS")?);
            }
            // Every session must have lived through the idle windows.
            wait_runner_count(addr, n as u32)?;
        }
        load.stop();
        wait_runner_count(addr, 0)?;
    }
    Ok(())
}

pub fn memory(env: &Env, out: &mut Outcome) -> Result<()> {
    let mut dispatcher_fig = Figure::new("dispatcher VmHWM", "MiB", Target::AtMost(15.0));
    let mut runner_fig = Figure::new("runner VmHWM", "MiB", Target::AtMost(10.0));
    let mut observer_fig = Figure::new("observer VmHWM", "MiB", Target::AtMost(10.0));
    for run in 0..3 {
        let dir = env.scratch(&format!("m-{run}"))?;
        // The observer watches a repository with a commit its runner does
        // not build, so the job stays queued and every daemon stays idle.
        let repo = pipeline_repo(&dir.join("repo"), "true")?;
        let (dispatcher, addr) = env.dispatcher(&dir, &[])?;
        let other = pipeline_repo(&dir.join("other"), "true")?;
        let runner = env.runner(&dir, "runner-1", &addr, &[&other])?;
        let observer = env.observer(&dir, "observer", &addr, &repo, &[])?;
        wait_for(
            "the runner and the observer's submission",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let mut client = Client::connect(&addr)?;
                Ok((client.runners()?.len() == 1 && client.status()?.queued == 1).then_some(()))
            },
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let pid = |d: &surveil_tests::cluster::Daemon| d.pid().context("daemon pid");
        dispatcher_fig
            .samples
            .push(vm_mib(pid(&dispatcher)?, "VmHWM")?);
        runner_fig.samples.push(vm_mib(pid(&runner)?, "VmHWM")?);
        observer_fig.samples.push(vm_mib(pid(&observer)?, "VmHWM")?);
    }
    out.figures
        .extend([dispatcher_fig, runner_fig, observer_fig]);
    Ok(())
}
