//! The drain phases: a fresh agent is filled with a backlog, then `POST /v1/sync` is timed
//! against the bundled receiver (a child process) until nothing is pending, at batch size 50
//! and 1000. Both processes' CPU time and bytes written are read from `/proc` around it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::Options;
use crate::client::{agent_url, socket_client};
use crate::phases::ingest::{Phase, run_phase};
use crate::roles::{Agent, ENROLL_TOKEN, RECEIVER_ROLE, cpu_seconds, spawn_self, wait_until};

/// Drains a backlog to the bundled receiver at batch size 50 and 1000; events per second.
pub(crate) fn drain_phases(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    options: &Options,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let dir = root.join("receiver");
    std::fs::create_dir_all(&dir).context("creating the receiver dir")?;
    let addr = free_port()?;
    let log = dir.join("receiver.log");
    let db = dir.join("receiver.db").display().to_string();
    let mut receiver = spawn_self(
        &[RECEIVER_ROLE, &addr.to_string(), &db],
        &log,
        &[
            ("ENROLLMENT_TOKEN", ENROLL_TOKEN),
            ("RATE_LIMIT_PER_MIN", "1000000000"),
        ],
    )?;
    let ready = wait_until(&mut receiver, &log, "the receiver", || {
        TcpStream::connect(addr).is_ok()
    });
    let result = ready.and_then(|()| {
        let backend = format!("http://{addr}");
        let receiver_pid = receiver.id();
        let drain50 = drain_once(
            runtime,
            &root.join("drain50"),
            options,
            &backend,
            receiver_pid,
            50,
            n,
        )?;
        let drain1000 = drain_once(
            runtime,
            &root.join("drain1000"),
            options,
            &backend,
            receiver_pid,
            1000,
            n,
        )?;
        Ok((drain50, drain1000))
    });
    let _ = receiver.kill();
    let _ = receiver.wait();
    result
}

/// Fills a fresh agent with `n` events, then times `POST /v1/sync` until none is pending.
fn drain_once(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    options: &Options,
    backend: &str,
    receiver_pid: u32,
    batch_size: usize,
    n: usize,
) -> anyhow::Result<f64> {
    let agent = Agent::start(dir, options, Some((backend, batch_size)))?;
    let fill = runtime.block_on(run_phase(
        &agent.socket,
        Phase::batch(4, 1000, n, Duration::from_secs(600)),
    ))?;
    if fill.failures > 0 {
        bail!("filling the backlog failed: {}", fill.first_failure);
    }
    let eps = runtime.block_on(async {
        let client = socket_client(&agent.socket, true)?;
        let cpu_before = (cpu_seconds(agent.child.id()), cpu_seconds(receiver_pid));
        let written_before = (bytes_written(agent.child.id()), bytes_written(receiver_pid));
        let started = Instant::now();
        sync_until_drained(&client).await?;
        let wall = started.elapsed().as_secs_f64();
        let agent_cpu = cpu_seconds(agent.child.id()) - cpu_before.0;
        let receiver_cpu = cpu_seconds(receiver_pid) - cpu_before.1;
        let per_event = |bytes: u64| bytes as f64 / fill.events.max(1) as f64;
        let agent_written = per_event(bytes_written(agent.child.id()) - written_before.0);
        let receiver_written = per_event(bytes_written(receiver_pid) - written_before.1);
        let agent_rss = agent.peak_rss_mib().unwrap_or(f64::NAN);
        eprintln!(
            "  {:<24} {:>9.0} events/s  ({} events in {wall:.2} s; CPU s: agent {agent_cpu:.2}, \
             receiver {receiver_cpu:.2}; bytes written per event: agent {agent_written:.0}, \
             receiver {receiver_written:.0}; agent peak RSS over fill and drain \
             {agent_rss:.1} MiB)",
            format!("drain, batch {batch_size}"),
            fill.events as f64 / wall,
            fill.events
        );
        anyhow::Ok(fill.events as f64 / wall)
    })?;
    agent.stop()?;
    Ok(eps)
}

/// Bytes a process has asked the kernel to write so far (`wchar` of /proc/PID/io): sockets
/// and files alike; 0 if unreadable.
fn bytes_written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("wchar:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A loopback address nobody listens on (bind port 0, note it, release it).
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    listener.local_addr().context("reading the free port")
}

/// Asks the agent to sync until nothing is pending: a run that leaves events behind (a
/// batch refused for a moment) is followed by another, for at most ten minutes.
pub(crate) async fn sync_until_drained(client: &reqwest::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let response = client
            .post(agent_url("/v1/sync"))
            .send()
            .await
            .context("POST /v1/sync")?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST /v1/sync answered {status} {answer} (is the sync engine built?)");
        }
        let pending = client
            .get(agent_url("/v1/status"))
            .send()
            .await
            .context("GET /v1/status")?
            .json::<Value>()
            .await
            .context("reading the status")?["pending_events"]
            .as_u64();
        match pending {
            Some(0) => return Ok(()),
            Some(_) if Instant::now() < deadline => {
                eprintln!("  sync ended with events pending ({answer}); syncing again");
            }
            _ => bail!("events still pending after the sync: {answer}"),
        }
    }
}
