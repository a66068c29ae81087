//! Load generator: measures the agent against its physical limits (issue 5).
//!
//! ```text
//! cargo run --release --example loadgen -- [--events N] [--quick] [--json] [--synchronous full|normal]
//! ```
//!
//! It starts its own agent as a separate process (this same binary, re-executed with the
//! hidden first argument `__agent CONFIG`, so the agent's peak RSS can be read from
//! `/proc/<pid>/status`), drives it over the real Unix socket with hyper's HTTP/1.1 client, and prints a
//! table; with `--json`, one JSON object on the last line with exactly the keys of issue 5.
//! The drain phases re-execute it once more as the bundled receiver (`__receiver ADDR DB`).
//! The `http` phase re-executes it as an HTTP-only ceiling (`__http_ceiling SOCKET`): the
//! agent's own request reading and validation behind the same axum server and socket,
//! answering without storing anything, so `single_c32_eps` can be read against it.
//!
//! Phases, in order: single-event POSTs at 1, 32 and 128 keep-alive clients, 32 clients that
//! open a new connection per request (a PHP site without a persistent client), batches of 100
//! at 8 clients, then the agent is stopped with SIGTERM (it checkpoints) to measure bytes per
//! event, and the same rows are inserted straight into the same schema in-process, 1000 per
//! transaction, as the ceiling. Last, the drain phases fill a backlog in a fresh agent and time
//! `POST /v1/sync` against the bundled receiver until nothing is pending.
//!
//! This file measures; it asserts nothing. Targets are checked by reading its output.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use usage_agent::config::{Config, Synchronous};
use usage_agent::event::{Event, ModelName, Source, Tokens};
use usage_agent::store::Store;
use uuid::Uuid;

/// Hidden first argument that turns this process into the agent under test.
const AGENT_ROLE: &str = "__agent";
/// Hidden first argument that turns this process into the bundled receiver.
const RECEIVER_ROLE: &str = "__receiver";
/// Hidden first argument that turns this process into the HTTP-only ceiling.
const HTTP_CEILING_ROLE: &str = "__http_ceiling";
/// The enrollment token the benchmark's receiver expects and its agents present.
const ENROLL_TOKEN: &str = "loadgen-enroll-token";
/// How long a child process may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Benchmark the usage-agent over its Unix socket"
)]
struct Options {
    /// Events per major phase, at least 100 (the 1-client phase sends a twentieth of it).
    #[arg(long, default_value_t = 100_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(100..))]
    events: usize,
    /// A run under 30 s: at most 10,000 events and about 2.5 s per phase.
    #[arg(long)]
    quick: bool,
    /// Also print one JSON object with every figure on the last line.
    #[arg(long)]
    json: bool,
    /// Durability mode of the agent and of the SQLite ceiling.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    synchronous: String,
    /// Where to create the temporary data directories (default: the system temp dir).
    /// Must be a real disk, not tmpfs, or fsync costs nothing.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these phases (for profiling); figures of skipped phases are null.
    #[arg(long, value_delimiter = ',', default_value = "http,c1,c32,c128,newconn,batch100,limit,drain",
          value_parser = ["http", "c1", "c32", "c128", "newconn", "batch100", "limit", "drain"])]
    phases: Vec<String>,
}

impl Options {
    fn wants(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    fn synchronous(&self) -> Synchronous {
        match self.synchronous.as_str() {
            "normal" => Synchronous::Normal,
            _ => Synchronous::Full,
        }
    }

    /// Events in each major phase.
    fn phase_events(&self) -> usize {
        if self.quick {
            self.events.min(10_000)
        } else {
            self.events
        }
    }

    /// The longest one phase may run; it then reports what it managed.
    fn phase_cap(&self) -> Duration {
        if self.quick {
            Duration::from_millis(2500)
        } else {
            Duration::from_secs(60)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).map(String::as_str);
    if matches!(role, Some(AGENT_ROLE | HTTP_CEILING_ROLE)) {
        // As `usage-agent`'s `main` does for every command but the receiver.
        usage_agent::daemon::limit_malloc_arenas();
    }
    let outcome = match role {
        Some(AGENT_ROLE) => run_agent(&args[2..]),
        Some(RECEIVER_ROLE) => run_receiver(&args[2..]),
        Some(HTTP_CEILING_ROLE) => run_http_ceiling(&args[2..]),
        _ => bench(Options::parse()).map(|()| ExitCode::SUCCESS),
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("loadgen: {error:#}");
        ExitCode::FAILURE
    })
}

/// The child role: the real `usage-agent run` with the given config file.
fn run_agent(args: &[String]) -> anyhow::Result<ExitCode> {
    let [config] = args else {
        bail!("usage: loadgen {AGENT_ROLE} CONFIG")
    };
    let cli = usage_agent::cli::Cli::parse_from(["usage-agent", "--config", config, "run"]);
    usage_agent::cli::run(cli)
}

/// The child role: the real `usage-agent receiver` on the given address and database.
fn run_receiver(args: &[String]) -> anyhow::Result<ExitCode> {
    let [listen, db] = args else {
        bail!("usage: loadgen {RECEIVER_ROLE} ADDR DB")
    };
    let cli = usage_agent::cli::Cli::parse_from([
        "usage-agent",
        "receiver",
        "--listen",
        listen,
        "--db",
        db,
    ]);
    usage_agent::cli::run(cli)
}

/// The child role: the HTTP ceiling. Same runtime, server, socket and request reading as
/// the agent (`read_typed_events` with the agent's rules), and the agent's answer, but
/// nothing is stored: what one request costs before the database.
fn run_http_ceiling(args: &[String]) -> anyhow::Result<ExitCode> {
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
    let limits = usage_agent::event::Limits {
        now: chrono::Utc::now(),
        max_age: chrono::Duration::days(90),
    };
    match usage_agent::event::read_typed_events(&body, limits) {
        Some((events, _)) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"event_id": events[0].event_id.to_string(), "status": "recorded"})),
        )
            .into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// Every figure of one run; `None` is printed as `null`.
#[derive(Debug, Default)]
struct Figures {
    single_c1_eps: Option<f64>,
    single_c32_eps: Option<f64>,
    single_c128_eps: Option<f64>,
    single_c32_p50_ms: Option<f64>,
    single_c32_p99_ms: Option<f64>,
    single_c32_newconn_eps: Option<f64>,
    batch100_eps: Option<f64>,
    sqlite_limit_eps: Option<f64>,
    ratio_batch_vs_limit: Option<f64>,
    drain50_eps: Option<f64>,
    drain1000_eps: Option<f64>,
    rss_peak_mib: Option<f64>,
    bytes_per_event: Option<f64>,
    synchronous: String,
}

fn bench(options: Options) -> anyhow::Result<()> {
    usage_agent::sync::install_tls_provider();
    let parent = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("loadgen-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
    // One client thread: the agent under test gets the rest of the machine.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    let started = Instant::now();
    let mut figures = Figures {
        synchronous: options.synchronous.clone(),
        ..Figures::default()
    };
    let mut notes = Vec::new();
    let mut http_ceiling: Option<PhaseResult> = None;
    let n = options.phase_events();
    let cap = options.phase_cap();
    eprintln!(
        "loadgen: {n} events per phase, synchronous={}, data in {}",
        options.synchronous,
        root.path().display()
    );

    // The physical floor of an acknowledged write: one small overwrite plus fdatasync.
    let floor = fsync_floor(root.path())?;
    notes.push(format!(
        "fdatasync of a 4 KiB overwrite here: p50 {:.3} ms, p99 {:.3} ms (so at most ~{:.0} acknowledged \
         groups/s; with 32 clients each waiting for its own commit, at most ~{:.0} events/s)",
        floor.0,
        floor.1,
        1000.0 / floor.0,
        32_000.0 / floor.0
    ));

    // The HTTP ceiling: the c32 phase against a server that stores nothing.
    if options.wants("http") {
        let dir = root.path().join("http");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("ceiling.sock");
        let log = dir.join("ceiling.log");
        let mut child = spawn_self(
            &[HTTP_CEILING_ROLE, &socket.display().to_string()],
            &log,
            &[],
        )?;
        let ready = wait_until(&mut child, &log, "the HTTP ceiling socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        let result =
            ready.and_then(|()| runtime.block_on(run_phase(&socket, Phase::single(32, n, cap))));
        let _ = child.kill();
        let _ = child.wait();
        let result = result?;
        eprintln!(
            "  http      {:>3} clients {}  (HTTP only, nothing stored)",
            32,
            result.summary()
        );
        http_ceiling = Some(result);
    }

    // Ingest phases against one agent.
    let agent = Agent::start(&root.path().join("ingest"), &options, None)?;
    let socket = agent.socket.clone();
    let stored = std::cell::Cell::new(0);
    let phase = |name: &str, spec: Phase| -> anyhow::Result<Option<PhaseResult>> {
        if !options.wants(name) {
            return Ok(None);
        }
        let result = runtime.block_on(run_phase(&socket, spec))?;
        eprintln!(
            "  {name:<9} {:>3} clients {}",
            spec.clients,
            result.summary()
        );
        if result.failures > 0 {
            bail!(
                "{name}: {} requests failed: {}",
                result.failures,
                result.first_failure
            );
        }
        stored.set(stored.get() + result.events);
        Ok(Some(result))
    };
    if let Some(c1) = phase("c1", Phase::single(1, (n / 20).max(50), cap))? {
        figures.single_c1_eps = Some(c1.eps());
    }
    if let Some(c32) = phase("c32", Phase::single(32, n, cap))? {
        figures.single_c32_eps = Some(c32.eps());
        figures.single_c32_p50_ms = Some(c32.percentile_ms(0.50));
        figures.single_c32_p99_ms = Some(c32.percentile_ms(0.99));
    }
    if let (Some(ceiling), Some(c32)) = (&http_ceiling, figures.single_c32_eps) {
        notes.push(format!(
            "HTTP ceiling (the agent's server and request reading, nothing stored) at 32 clients: \
             {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms; single_c32_eps is {:.2} of it",
            ceiling.eps(),
            ceiling.percentile_ms(0.50),
            ceiling.percentile_ms(0.99),
            c32 / ceiling.eps()
        ));
        // Each client waits for its answer before sending again, so 32 clients make at most
        // 32 requests per round trip, and an acknowledged round trip holds at least the HTTP
        // exchange and one fdatasync.
        let round_trip_ms = ceiling.percentile_ms(0.50) + floor.0;
        notes.push(format!(
            "closed loop: 32 clients / (HTTP p50 {:.2} ms + fdatasync p50 {:.3} ms) = about \
             {:.0} acknowledged events/s at 32 clients; single_c32_eps is {:.2} of it",
            ceiling.percentile_ms(0.50),
            floor.0,
            32_000.0 / round_trip_ms,
            c32 * round_trip_ms / 32_000.0
        ));
    }
    if let Some(c128) = phase("c128", Phase::single(128, n, cap))? {
        figures.single_c128_eps = Some(c128.eps());
    }
    let newconn = Phase {
        new_connection_per_request: true,
        ..Phase::single(32, n / 2, cap)
    };
    if let Some(newconn) = phase("newconn", newconn)? {
        figures.single_c32_newconn_eps = Some(newconn.eps());
    }
    // The ceiling below starts from a database as full as the agent's when batching began,
    // so the ratio compares the API with SQLite, not a small database with a big one.
    let stored_before_batch = stored.get();
    if let Some(batch) = phase("batch100", Phase::batch(8, 100, n, cap))? {
        figures.batch100_eps = Some(batch.eps());
    }

    figures.rss_peak_mib = agent.peak_rss_mib();
    let database = agent.database.clone();
    agent.stop()?;
    let (bytes, events) = database_size(&database)?;
    if events > 0 {
        figures.bytes_per_event = Some(bytes as f64 / events as f64);
    }
    eprintln!("  on disk   {bytes} bytes for {events} events after a checkpoint");

    // The ceiling: the same rows straight into the same schema, 1000 per transaction.
    if options.wants("limit") {
        let path = root.path().join("limit/usage.db");
        let (stored, took) =
            sqlite_limit(&path, options.synchronous(), stored_before_batch, n, cap)?;
        let limit_eps = stored as f64 / took.as_secs_f64();
        eprintln!(
            "  limit     in-process {limit_eps:>9.0} events/s  ({stored} events in {:.2} s, 1000 per transaction)",
            took.as_secs_f64()
        );
        figures.sqlite_limit_eps = Some(limit_eps);
        figures.ratio_batch_vs_limit = figures.batch100_eps.map(|batch| batch / limit_eps);
    }

    // Draining a backlog to the bundled receiver.
    if options.wants("drain") {
        match drain_phases(&runtime, root.path(), &options, n) {
            Ok((drain50, drain1000)) => {
                figures.drain50_eps = Some(drain50);
                figures.drain1000_eps = Some(drain1000);
            }
            Err(why) => notes.push(format!("drain50_eps and drain1000_eps are null: {why:#}")),
        }
    }

    print_table(&figures, &notes, started.elapsed());
    if options.json {
        println!("{}", figures_json(&figures));
    }
    Ok(())
}

/// A running agent child process.
struct Agent {
    child: Child,
    socket: PathBuf,
    database: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Writes a config into `dir` and starts the agent; with `backend`, sync targets it
    /// (with `batch_size`) but never runs on its own schedule during the benchmark.
    fn start(
        dir: &Path,
        options: &Options,
        backend: Option<(&str, usize)>,
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
             interval_secs = 86400\n",
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
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// SIGTERM, so the agent finishes its writes and checkpoints, then waits for it.
    fn stop(mut self) -> anyhow::Result<()> {
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
fn spawn_self(args: &[&str], log: &Path, env: &[(&str, &str)]) -> anyhow::Result<Child> {
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
fn wait_until(
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
fn terminate(child: &mut Child, log: &Path, what: &str) -> anyhow::Result<()> {
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

/// File size of the checkpointed database (plus any WAL left) and its event count.
fn database_size(database: &Path) -> anyhow::Result<(u64, u64)> {
    let size = |path: PathBuf| std::fs::metadata(path).map_or(0, |m| m.len());
    let mut wal = database.as_os_str().to_owned();
    wal.push("-wal");
    let bytes = size(database.to_path_buf()) + size(PathBuf::from(wal));
    let store = Store::open(database, Synchronous::Normal).context("opening the agent database")?;
    let events = store.event_count().context("counting events")?;
    Ok((bytes, events))
}

/// One load phase: how many clients, what each request carries, how much in total.
#[derive(Debug, Clone, Copy)]
struct Phase {
    clients: usize,
    /// Events per request; 1 posts a single event object, more post `{"events": [...]}`.
    per_request: usize,
    requests: usize,
    new_connection_per_request: bool,
    cap: Duration,
}

impl Phase {
    fn single(clients: usize, events: usize, cap: Duration) -> Phase {
        Phase {
            clients,
            per_request: 1,
            requests: events,
            new_connection_per_request: false,
            cap,
        }
    }

    fn batch(clients: usize, per_request: usize, events: usize, cap: Duration) -> Phase {
        Phase {
            clients,
            per_request,
            requests: events.div_ceil(per_request),
            new_connection_per_request: false,
            cap,
        }
    }
}

/// What one phase achieved.
#[derive(Debug, Default)]
struct PhaseResult {
    events: usize,
    elapsed: Duration,
    /// Acknowledgment latency of each request, in microseconds, sorted.
    latencies_us: Vec<u32>,
    failures: usize,
    first_failure: String,
}

impl PhaseResult {
    fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        f64::from(self.latencies_us[rank - 1]) / 1000.0
    }

    fn summary(&self) -> String {
        format!(
            "{:>9.0} events/s  ({} events in {:.2} s, p50 {:.2} ms, p99 {:.2} ms)",
            self.eps(),
            self.events,
            self.elapsed.as_secs_f64(),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
        )
    }
}

/// An HTTP client that speaks to the agent over its Unix socket.
fn socket_client(socket: &Path, keep_alive: bool) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().unix_socket(socket);
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().context("building the HTTP client")
}

/// The URL host is ignored over a Unix socket, but HTTP/1.1 needs one.
fn agent_url(path: &str) -> String {
    format!("http://agent{path}")
}

/// One keep-alive HTTP/1.1 connection to the agent's socket. hyper's connection API is
/// used directly (no pool, no redirects) so the load generator, which shares the two
/// cores with the agent, spends as little CPU per request as it can.
type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(socket: &Path) -> anyhow::Result<Connection> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on `connection` and returns the status and body.
async fn exchange(
    connection: &mut Connection,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, Bytes)> {
    connection.ready().await.context("connection closed")?;
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = connection.send_request(request).await?;
    let status = response.status().as_u16();
    let answer = response.into_body().collect().await?.to_bytes();
    Ok((status, answer))
}

/// Runs one phase: `clients` tasks share a counter of requests still to send.
async fn run_phase(socket: &Path, phase: Phase) -> anyhow::Result<PhaseResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(phase.clients + 1));
    let mut tasks = Vec::with_capacity(phase.clients);
    for client_index in 0..phase.clients {
        let socket = socket.to_path_buf();
        let next = Arc::clone(&next);
        let barrier = Arc::clone(&barrier);
        let new_connection_per_request = phase.new_connection_per_request;
        tasks.push(tokio::spawn(async move {
            let mut result = PhaseResult::default();
            // Open the keep-alive connection before the clock starts.
            let warm = match connect(&socket).await {
                Ok(mut connection) => exchange(&mut connection, "GET", "/healthz", String::new())
                    .await
                    .map(|_| connection),
                Err(error) => Err(error),
            };
            barrier.wait().await;
            let mut connection = match warm {
                Ok(connection) => connection,
                Err(error) => {
                    result.failures += 1;
                    result.first_failure = format!("warm-up: {error:#}");
                    return result;
                }
            };
            let deadline = Instant::now() + phase.cap;
            let mut generator = Generator::new(client_index as u64);
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < phase.requests && Instant::now() < deadline
            {
                let body = if phase.per_request == 1 {
                    generator.next_json()
                } else {
                    generator.batch_json(phase.per_request)
                };
                let sent = Instant::now();
                let outcome = if new_connection_per_request {
                    match connect(&socket).await {
                        Ok(mut fresh) => exchange(&mut fresh, "POST", "/v1/events", body).await,
                        Err(error) => Err(error),
                    }
                } else {
                    exchange(&mut connection, "POST", "/v1/events", body).await
                };
                let status = match outcome {
                    Ok((202, _)) => Ok(()),
                    Ok((status, answer)) => {
                        Err(format!("{status}: {}", String::from_utf8_lossy(&answer)))
                    }
                    Err(error) => Err(format!("{error:#}")),
                };
                match status {
                    Ok(()) => {
                        latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        result.events += phase.per_request;
                    }
                    Err(why) => {
                        if result.failures == 0 {
                            result.first_failure = why;
                        }
                        result.failures += 1;
                    }
                }
            }
            result.latencies_us = latencies;
            result
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut total = PhaseResult::default();
    for task in tasks {
        let part = task.await.context("a client task panicked")?;
        total.events += part.events;
        total.latencies_us.extend(part.latencies_us);
        if total.failures == 0 {
            total.first_failure = part.first_failure;
        }
        total.failures += part.failures;
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    Ok(total)
}

/// Makes realistic events: a handful of models and users, mostly small token counts,
/// a quarter with cached tokens, and a ~100-byte attachment context. Cheap and
/// deterministic per client (xorshift), with fresh UUIDv4 ids as a site would make.
struct Generator {
    state: u64,
}

const MODELS: [&str; 6] = [
    "gpt-4o-mini",
    "gpt-4o",
    "claude-3-5-haiku-20241022",
    "claude-sonnet-4-5",
    "gemini-2.0-flash",
    "mistral-small-latest",
];
const MIMES: [&str; 4] = ["image/jpeg", "image/png", "image/webp", "image/gif"];

/// The fields of one generated event, rendered either as JSON or as a store row.
struct Sample {
    event_id: Uuid,
    user_id: u64,
    source: Source,
    model: &'static str,
    prompt: u64,
    completion: u64,
    cached: u64,
    /// Compact JSON with sorted keys, as the agent itself stores a context.
    context: String,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        Generator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn sample(&mut self) -> Sample {
        let prompt = 50 + self.below(4000);
        let cached = if self.below(4) == 0 {
            self.below(prompt)
        } else {
            0
        };
        let width = 320 + self.below(3500);
        let context = format!(
            r#"{{"attachment_id":{},"filename":"IMG_{:04}.jpg","height":{},"mime":"{}","width":{}}}"#,
            1000 + self.below(5_000_000),
            self.below(10_000),
            width * 3 / 4,
            MIMES[self.below(MIMES.len() as u64) as usize],
            width,
        );
        Sample {
            event_id: Uuid::new_v4(),
            user_id: self.below(500),
            source: Source::ALL[self.below(4) as usize],
            model: MODELS[self.below(MODELS.len() as u64) as usize],
            prompt,
            completion: 10 + self.below(800),
            cached,
            context,
        }
    }

    fn write_json(&mut self, out: &mut String) {
        use std::fmt::Write;
        let s = self.sample();
        let _ = write!(
            out,
            r#"{{"event_id":"{}","user_id":{},"source":"{}","model":"{}","prompt_tokens":{},"completion_tokens":{},"#,
            s.event_id,
            s.user_id,
            s.source.as_str(),
            s.model,
            s.prompt,
            s.completion
        );
        if s.cached > 0 {
            let _ = write!(out, r#""cached_tokens":{},"#, s.cached);
        }
        let _ = write!(out, r#""context":{}}}"#, s.context);
    }

    fn next_json(&mut self) -> String {
        let mut out = String::with_capacity(320);
        self.write_json(&mut out);
        out
    }

    fn batch_json(&mut self, events: usize) -> String {
        let mut out = String::with_capacity(20 + 320 * events);
        out.push_str(r#"{"events":["#);
        for i in 0..events {
            if i > 0 {
                out.push(',');
            }
            self.write_json(&mut out);
        }
        out.push_str("]}");
        out
    }

    fn next_event(&mut self, created_at_ms: i64) -> Event {
        let s = self.sample();
        Event {
            event_id: s.event_id,
            user_id: s.user_id,
            source: s.source,
            model: ModelName::parse(s.model).expect("the benchmark's model names are valid"),
            tokens: Tokens {
                prompt: s.prompt,
                completion: s.completion,
                cached: s.cached,
                ..Tokens::default()
            },
            context: Some(s.context),
            created_at_ms,
        }
    }
}

/// Inserts `events` rows in-process into a database of the same schema and durability,
/// 1000 per transaction, after `prefill` untimed rows; returns how many went in and how
/// long it took.
fn sqlite_limit(
    path: &Path,
    synchronous: Synchronous,
    prefill: usize,
    events: usize,
    cap: Duration,
) -> anyhow::Result<(usize, Duration)> {
    let mut store = Store::open(path, synchronous).context("opening the ceiling database")?;
    let mut generator = Generator::new(7);
    let now = chrono::Utc::now().timestamp_millis();
    for start in (0..prefill).step_by(1000) {
        let rows: Vec<Event> = (start..prefill.min(start + 1000))
            .map(|_| generator.next_event(now))
            .collect();
        store
            .record(&rows)
            .context("prefilling the ceiling database")?;
    }
    // Rows are made before the clock starts: the ceiling is the database alone.
    let rows: Vec<Event> = (0..events).map(|_| generator.next_event(now)).collect();
    let started = Instant::now();
    let mut stored = 0;
    for chunk in rows.chunks(1000) {
        store
            .record(chunk)
            .context("inserting a transaction of rows")?;
        stored += chunk.len();
        if started.elapsed() > cap {
            break;
        }
    }
    Ok((stored, started.elapsed()))
}

/// Drains a backlog to the bundled receiver at batch size 50 and 1000; events per second.
fn drain_phases(
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
        let deadline = started + Duration::from_secs(600);
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
                Some(0) => break,
                Some(_) if Instant::now() < deadline => {
                    eprintln!("  sync ended with events pending ({answer}); syncing again");
                }
                _ => bail!("events still pending after the sync: {answer}"),
            }
        }
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

/// CPU time (user + system) a process has used so far, in seconds; 0 if unreadable.
fn cpu_seconds(pid: u32) -> f64 {
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

/// Times `fdatasync` after overwriting one 4 KiB block of a preallocated file in `dir`
/// (what a WAL commit costs at least); p50 and p99 in milliseconds.
fn fsync_floor(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .context("creating the fsync probe")?;
    file.write_all_at(&vec![0u8; 256 * 1024], 0)
        .context("writing the fsync probe")?;
    file.sync_all().context("syncing the fsync probe")?;
    let block = [1u8; 4096];
    let mut times: Vec<f64> = (0..200u64)
        .map(|i| {
            file.write_all_at(&block, (i % 64) * 4096)?;
            let started = Instant::now();
            file.sync_data()?;
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<std::io::Result<_>>()
        .context("timing fdatasync")?;
    drop(file);
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}

/// A loopback address nobody listens on (bind port 0, note it, release it).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    listener.local_addr().context("reading the free port")
}

fn print_table(figures: &Figures, notes: &[String], took: Duration) {
    let show = |value: Option<f64>, decimals: usize| match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "null".to_owned(),
    };
    let rows: [(&str, Option<f64>, usize, &str); 13] = [
        ("single_c1_eps", figures.single_c1_eps, 0, ""),
        ("single_c32_eps", figures.single_c32_eps, 0, ">= 25000"),
        ("single_c128_eps", figures.single_c128_eps, 0, ""),
        ("single_c32_p50_ms", figures.single_c32_p50_ms, 3, ""),
        ("single_c32_p99_ms", figures.single_c32_p99_ms, 3, "<= 5"),
        (
            "single_c32_newconn_eps",
            figures.single_c32_newconn_eps,
            0,
            "",
        ),
        ("batch100_eps", figures.batch100_eps, 0, ""),
        ("sqlite_limit_eps", figures.sqlite_limit_eps, 0, ""),
        (
            "ratio_batch_vs_limit",
            figures.ratio_batch_vs_limit,
            3,
            ">= 0.5",
        ),
        ("drain50_eps", figures.drain50_eps, 0, ">= 20000"),
        ("drain1000_eps", figures.drain1000_eps, 0, ">= 50000"),
        ("rss_peak_mib", figures.rss_peak_mib, 1, "<= 20"),
        ("bytes_per_event", figures.bytes_per_event, 1, "<= 250"),
    ];
    println!();
    println!("| figure | value | target |");
    println!("|---|---:|---|");
    for (name, value, decimals, target) in rows {
        println!("| `{name}` | {} | {target} |", show(value, decimals));
    }
    println!("| `synchronous` | {} | full |", figures.synchronous);
    for note in notes {
        println!("note: {note}");
    }
    println!("({:.1} s in all)", took.as_secs_f64());
}

fn figures_json(figures: &Figures) -> Value {
    let round = |value: Option<f64>, decimals: i32| {
        value.map(|v| {
            let scale = 10f64.powi(decimals);
            (v * scale).round() / scale
        })
    };
    json!({
        "single_c1_eps": round(figures.single_c1_eps, 0),
        "single_c32_eps": round(figures.single_c32_eps, 0),
        "single_c128_eps": round(figures.single_c128_eps, 0),
        "single_c32_p50_ms": round(figures.single_c32_p50_ms, 3),
        "single_c32_p99_ms": round(figures.single_c32_p99_ms, 3),
        "single_c32_newconn_eps": round(figures.single_c32_newconn_eps, 0),
        "batch100_eps": round(figures.batch100_eps, 0),
        "sqlite_limit_eps": round(figures.sqlite_limit_eps, 0),
        "ratio_batch_vs_limit": round(figures.ratio_batch_vs_limit, 3),
        "drain50_eps": round(figures.drain50_eps, 0),
        "drain1000_eps": round(figures.drain1000_eps, 0),
        "rss_peak_mib": round(figures.rss_peak_mib, 1),
        "bytes_per_event": round(figures.bytes_per_event, 1),
        "synchronous": figures.synchronous,
    })
}
