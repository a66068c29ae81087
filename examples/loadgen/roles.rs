//! The child roles this binary re-executes itself as (`__agent`, `__receiver`,
//! `__http_ceiling`), and the parent's side of them: starting this binary in a role, waiting
//! until the child listens, stopping it, and the `Agent` under test as one running child.
//!
//! A child role runs the real agent or receiver (or the agent's server without its store);
//! it measures nothing itself. The parent measures the child through `/proc`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;
use usage_agent::config::Config;

use crate::Options;

/// Hidden first argument that turns this process into the agent under test.
pub(crate) const AGENT_ROLE: &str = "__agent";
/// Hidden first argument that turns this process into the bundled receiver.
pub(crate) const RECEIVER_ROLE: &str = "__receiver";
/// Hidden first argument that turns this process into the HTTP-only ceiling.
pub(crate) const HTTP_CEILING_ROLE: &str = "__http_ceiling";
/// The enrollment token the benchmark's receiver expects and its agents present.
pub(crate) const ENROLL_TOKEN: &str = "loadgen-enroll-token";
/// How long a child process may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The child role: the real `usage-agent run` with the given config file.
pub(crate) fn run_agent(args: &[String]) -> anyhow::Result<ExitCode> {
    let [config] = args else {
        bail!("usage: loadgen {AGENT_ROLE} CONFIG")
    };
    let cli = usage_agent::cli::Cli::parse_from(["usage-agent", "--config", config, "run"]);
    usage_agent::cli::run(cli)
}

/// The child role: the real `usage-agent receiver` on the given address and database (a
/// SQLite path, or `--database-url URL`).
pub(crate) fn run_receiver(args: &[String]) -> anyhow::Result<ExitCode> {
    let store: Vec<&str> = match args {
        [_, db] => vec!["--db", db],
        [_, flag, url] if flag == "--database-url" => vec!["--database-url", url],
        _ => bail!("usage: loadgen {RECEIVER_ROLE} ADDR (DB | --database-url URL)"),
    };
    let cli = usage_agent::cli::Cli::parse_from(
        ["usage-agent", "receiver", "--listen", &args[0]]
            .into_iter()
            .chain(store),
    );
    usage_agent::cli::run(cli)
}

/// The child role: the HTTP ceiling. Same runtime, server, socket and request reading as
/// the agent (`read_typed_events` with the agent's rules), and the agent's answer, but
/// nothing is stored: what one request costs before the database.
pub(crate) fn run_http_ceiling(args: &[String]) -> anyhow::Result<ExitCode> {
    use axum::routing::{get, post};
    let [socket] = args else {
        bail!("usage: loadgen {HTTP_CEILING_ROLE} SOCKET")
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener =
            tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/events", post(answer_without_storing));
        axum::serve(listener, app).await.context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn answer_without_storing(body: Bytes) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let limits = usage_protocol::event::Limits {
        now: chrono::Utc::now(),
        max_age: chrono::Duration::days(90),
    };
    match usage_protocol::event::read_typed_events(&body, limits) {
        Some((events, _)) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"event_id": events[0].event_id.to_string(), "status": "recorded"})),
        )
            .into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// A running agent child process.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    pub(crate) database: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Writes a config into `dir` and starts the agent; with `backend`, sync targets it
    /// (with `batch_size`) but never runs on its own schedule during the benchmark.
    pub(crate) fn start(
        dir: &Path,
        options: &Options,
        backend: Option<(&str, usize)>,
    ) -> anyhow::Result<Agent> {
        Agent::start_with(dir, options, backend, "")
    }

    /// Like [`Agent::start`], with `tables` (TOML tables such as `[quota]`) appended to the
    /// config.
    pub(crate) fn start_with(
        dir: &Path,
        options: &Options,
        backend: Option<(&str, usize)>,
        tables: &str,
    ) -> anyhow::Result<Agent> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let (sync, backend_url, batch_size) = match backend {
            Some((url, batch_size)) => (true, url, batch_size),
            None => (false, "", 50),
        };
        let config = format!(
            "data_dir = {data_dir:?}\n\
             synchronous = {synchronous:?}\n\
             [sync]\n\
             enabled = {sync}\n\
             backend_url = {backend_url:?}\n\
             enroll_token = {ENROLL_TOKEN:?}\n\
             batch_size = {batch_size}\n\
             interval_secs = 86400\n\
             {tables}\n",
            data_dir = data_dir.display().to_string(),
            synchronous = options.synchronous,
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        if backend.is_some() {
            // Signed sync needs an install identity (what `usage-agent init` writes).
            let config =
                Config::from_file(&config_path).context("reading back the agent config")?;
            usage_agent::identity::Identity::generate("https://loadgen.example")
                .and_then(|identity| identity.create_once(&config.identity_path()))
                .context("creating the agent's identity")?;
        }
        let config = Config::from_file(&config_path).context("reading back the agent config")?;
        let log = dir.join("agent.log");
        let child = spawn_self(&[AGENT_ROLE, &config_path.display().to_string()], &log, &[])?;
        let mut agent = Agent {
            child,
            socket: config.socket_path(),
            database: config.database_path(),
            log,
        };
        let socket = agent.socket.clone();
        wait_until(&mut agent.child, &agent.log, "the agent socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })?;
        Ok(agent)
    }

    /// Peak resident set (VmHWM) of the agent so far, in MiB.
    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        peak_rss_mib(self.child.id())
    }

    /// SIGTERM, so the agent finishes its writes and checkpoints, then waits for it.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.child, &self.log, "agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Only reached on an error path: never leave an agent behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this same binary in a child role, its output going to `log`.
pub(crate) fn spawn_self(args: &[&str], log: &Path, env: &[(&str, &str)]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the loadgen binary")?;
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file")?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env(
            "RUST_LOG",
            std::env::var("LOADGEN_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        );
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().context("starting a child process")
}

/// Polls `ready` until it holds, failing early if the child exits or the deadline passes.
pub(crate) fn wait_until(
    child: &mut Child,
    log: &Path,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("checking a child process")? {
            bail!(
                "the child exited ({status}) before {what} was ready: {}",
                log_tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} was not ready after {START_DEADLINE:?}: {}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits (with a deadline) for a clean exit.
pub(crate) fn terminate(child: &mut Child, log: &Path, what: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("could not signal the {what}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            if !status.success() {
                bail!("the {what} exited with {status}: {}", log_tail(log));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the {what} did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// CPU time (user + system) a process has used so far, in seconds; 0 if unreadable.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/PID/stat, in USER_HZ ticks (100 per second on Linux); the
    // command name (field 2) is parenthesised and may hold spaces, so count after it.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// Peak resident set (VmHWM) of process `pid` so far, in MiB.
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The CPU time the whole machine has spent busy (every process and the kernel), in
/// seconds, from `/proc/stat`; `None` where there is none. It counts in USER_HZ, which
/// Linux fixes at 100.
pub(crate) fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().sum::<u64>() - idle) as f64 / 100.0)
}

/// The machine's busy CPU time since `busy_before` (from [`machine_busy_seconds`]) per
/// event, in µs.
pub(crate) fn busy_us_per_event(busy_before: Option<f64>, events: u64) -> Option<f64> {
    Some((machine_busy_seconds()? - busy_before?) / events as f64 * 1e6)
}
