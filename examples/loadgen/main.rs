//! Load generator: measures the agent against its physical limits (the figures are in
//! BENCHMARKS.md).
//!
//! ```text
//! cargo run --release --example loadgen -- [--events N] [--quick] [--json] [--synchronous full|normal]
//! ```
//!
//! It starts its own agent as a separate process (this same binary, re-executed with the
//! hidden first argument `__agent CONFIG`, so the agent's peak RSS can be read from
//! `/proc/<pid>/status`), drives it over the real Unix socket with hyper's HTTP/1.1 client, and prints a
//! table; with `--json`, one JSON object on the last line with exactly its agreed keys.
//! The drain phases re-execute it once more as the bundled receiver (`__receiver ADDR DB`).
//! The `http` phase re-executes it as an HTTP-only ceiling (`__http_ceiling SOCKET`): the
//! agent's own request reading and validation behind the same axum server and socket,
//! answering without storing anything, so `single_c32_eps` can be read against it.
//!
//! Phases, in order: the local quotas (an agent of their own with every limit set: 4 clients
//! record alone, then beside 32 clients asking `GET /v1/quota`, then beside 32 clients
//! taking holds), then single-event POSTs at 1, 32 and 128 keep-alive clients, 32 clients that
//! open a new connection per request (a PHP site without a persistent client), batches of 100
//! at 8 clients, then the agent is stopped with SIGTERM (it checkpoints) to measure bytes per
//! event, and the same rows are inserted straight into the same schema in-process, 1000 per
//! transaction, as the ceiling. Last, the drain phases fill a backlog in a fresh agent and time
//! `POST /v1/sync` against the bundled receiver until nothing is pending. Only when named,
//! `peer` mirrors a log shipper's work for a side-by-side with one: 4 clients record chunks
//! of 500, then the backlog is drained in batches of 500 to a counting sink in this process;
//! with `--syslog-ng ROOT`, syslog-ng does the same work beside it, round after round.
//!
//! This example measures; it asserts nothing. Targets are checked by reading its output.
//!
//! This file parses the options, dispatches to a child role, and runs the phases in order
//! (`bench`). The rest of the folder, in reading order:
//!
//! - `roles.rs`: the child roles this binary re-executes itself as, and how the parent
//!   starts, waits for and stops them (the `Agent` under test among them).
//! - `phases/`: one module per kind of measurement: the fsync floor, the HTTP ceiling, the
//!   ingest phases, the in-process SQLite ceiling and bytes per event, the local quotas,
//!   the drain phases, the peer phase.
//! - `client.rs`: the HTTP clients that speak to the agent over its Unix socket.
//! - `generator.rs`: the realistic events every phase sends or inserts.
//! - `figures.rs`: every figure of one run, printed as a table and as the JSON line.

mod client;
mod figures;
mod generator;
mod phases;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use usage_agent::config::Synchronous;

use crate::figures::{Figures, figures_json, print_table};
use crate::phases::drain::drain_phases;
use crate::phases::fleet::{fleet_phase, view_phase};
use crate::phases::fsync_floor::fsync_floor;
use crate::phases::http_ceiling::http_ceiling_phase;
use crate::phases::ingest::{Phase, PhaseResult, run_phase};
use crate::phases::peer::peer_phase;
use crate::phases::quota::quota_phase;
use crate::phases::sqlite_limit::{database_size, sqlite_limit};
use crate::roles::{AGENT_ROLE, Agent, HTTP_CEILING_ROLE, RECEIVER_ROLE};

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
    /// Run only these phases (for profiling); figures of skipped phases are null. `fleet`
    /// (the receiver on PostgreSQL) and `peer` (a log shipper's work) run only when named;
    /// `view` is only its provider views (`installations_100k_ms`, `dashboard_100k_ms`),
    /// without its ingest.
    #[arg(long, value_delimiter = ',', default_value = "http,c1,c32,c128,newconn,batch100,limit,quota,drain",
          value_parser = ["http", "c1", "c32", "c128", "newconn", "batch100", "limit", "quota", "drain", "fleet", "view", "peer"])]
    phases: Vec<String>,
    /// For `fleet`: a PostgreSQL server where loadgen may create (and then drops) its
    /// databases, e.g. postgres://user@localhost/postgres; default: a throwaway cluster of
    /// its own, fsync on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// For `fleet`: installs that enroll and send one batch of 50 each (default 10,000;
    /// 1,000 with --quick).
    #[arg(long)]
    fleet_installs: Option<usize>,
    /// For `fleet`: batches in flight at once over the two nodes.
    #[arg(long, default_value_t = crate::phases::fleet::DEFAULT_IN_FLIGHT)]
    fleet_in_flight: usize,
    /// For `fleet`: installs in the installations view that is timed.
    #[arg(long, default_value_t = 100_000)]
    view_installs: u32,
    /// For `peer`: where syslog-ng is (`/` when installed, or a tree unpacked from
    /// Debian's syslog-ng-core and syslog-ng-mod-http); it then runs beside the agent,
    /// three rounds each in turn, and the table sets the medians side by side.
    #[arg(long, value_name = "ROOT")]
    syslog_ng: Option<PathBuf>,
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
        Some(AGENT_ROLE) => roles::run_agent(&args[2..]),
        Some(RECEIVER_ROLE) => roles::run_receiver(&args[2..]),
        Some(HTTP_CEILING_ROLE) => roles::run_http_ceiling(&args[2..]),
        _ => bench(Options::parse()).map(|()| ExitCode::SUCCESS),
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("loadgen: {error:#}");
        ExitCode::FAILURE
    })
}

/// Runs the phases in order and prints the figures they make.
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
        http_ceiling = Some(http_ceiling_phase(&runtime, root.path(), n, cap)?);
    }

    // The receiver for a fleet, alone: it needs the machine to itself.
    if options.wants("fleet") {
        let installs = options
            .fleet_installs
            .unwrap_or(if options.quick { 1_000 } else { 10_000 });
        let fleet = fleet_phase(
            &runtime,
            root.path(),
            options.database_url.as_deref(),
            installs,
            options.fleet_in_flight,
            options.view_installs,
        )?;
        eprintln!(
            "  fleet     {:>9.0} events/s through two nodes, p99 {:.1} ms; COPY ceiling {:.0} events/s; installations view of {} installs {:.0} ms",
            fleet.eps,
            fleet.p99_ms,
            fleet.ceiling_eps,
            options.view_installs,
            fleet.views.installations_ms
        );
        notes.push(format!(
            "fleet: {} installs each sent one gzipped, signed batch of 50 ({} events) through two \
             receiver nodes on one PostgreSQL, {} requests in flight",
            fleet.installs, fleet.events, options.fleet_in_flight
        ));
        figures.fleet_eps = Some(fleet.eps);
        figures.fleet_ceiling_eps = Some(fleet.ceiling_eps);
        figures.fleet_ratio = Some(fleet.eps / fleet.ceiling_eps);
        figures.fleet_p99_ms = Some(fleet.p99_ms);
        figures.fleet_store_eps = Some(fleet.store_eps);
        figures.fleet_store_ratio = Some(fleet.store_eps / fleet.ceiling_eps);
        figures.fleet_cpu_us_per_event = fleet.cpu_us;
        figures.fleet_store_cpu_us_per_event = fleet.store_cpu_us;
        figures.fleet_ceiling_cpu_us_per_event = fleet.ceiling_cpu_us;
        figures.views(&fleet.views);
    } else if options.wants("view") {
        let views = view_phase(
            &runtime,
            root.path(),
            options.database_url.as_deref(),
            options.view_installs,
        )?;
        eprintln!(
            "  view      installations view of {} installs {:.0} ms, a dashboard page {:.0} ms",
            options.view_installs, views.installations_ms, views.dashboard_ms
        );
        figures.views(&views);
    }
    // Local quotas: questions and holds at 32 clients beside recording, in an agent of
    // their own.
    if options.wants("quota") {
        let quota = quota_phase(&runtime, root.path(), &options, n, cap)?;
        eprintln!(
            "  quota     {:>9.0} answers/s (p99 {:.2} ms), {:.0} holds/s (p99 {:.2} ms) at 32 clients; \
             recording at 4 clients: {:.0} events/s alone, {:.0} beside {:.0} questions/s, \
             {:.0} asking first, {:.0} beside the 32 asking, {:.0} beside the 32 holding",
            quota.get.eps(),
            quota.get.percentile_ms(0.99),
            quota.hold.eps(),
            quota.hold.percentile_ms(0.99),
            quota.record_alone.eps(),
            quota.record_paced.eps(),
            quota.paced_questions.eps(),
            quota.record_asking.eps(),
            quota.record_with_get.eps(),
            quota.record_with_hold.eps(),
        );
        figures.quota_c32_eps = Some(quota.get.eps());
        figures.quota_c32_p99_ms = Some(quota.get.percentile_ms(0.99));
        figures.quota_hold_c32_eps = Some(quota.hold.eps());
        figures.quota_hold_c32_p99_ms = Some(quota.hold.percentile_ms(0.99));
        figures.quota_record_ratio = Some(quota.record_paced.eps() / quota.record_alone.eps());
        figures.quota_asking_first_record_ratio =
            Some(quota.record_asking.eps() / quota.record_alone.eps());
        figures.quota_beside_record_ratio =
            Some(quota.record_with_get.eps() / quota.record_alone.eps());
        figures.quota_hold_beside_record_ratio =
            Some(quota.record_with_hold.eps() / quota.record_alone.eps());
    }

    let agent_phases = ["c1", "c32", "c128", "newconn", "batch100", "limit"];
    if !agent_phases.iter().any(|phase| options.wants(phase)) {
        return finish(figures, notes, started, &options, &runtime, root.path());
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

    finish(figures, notes, started, &options, &runtime, root.path())
}

/// The drain phases (they start agents of their own), then the figures printed.
fn finish(
    mut figures: Figures,
    mut notes: Vec<String>,
    started: Instant,
    options: &Options,
    runtime: &tokio::runtime::Runtime,
    root: &std::path::Path,
) -> anyhow::Result<()> {
    // Draining a backlog to the bundled receiver.
    if options.wants("drain") {
        match drain_phases(runtime, root, options, options.phase_events()) {
            Ok((drain50, drain1000)) => {
                figures.drain50_eps = Some(drain50);
                figures.drain1000_eps = Some(drain1000);
            }
            Err(why) => notes.push(format!("drain50_eps and drain1000_eps are null: {why:#}")),
        }
    }
    // The work a log shipper does, to set beside one (only when named).
    if options.wants("peer") {
        match peer_phase(runtime, root, options, options.phase_events()) {
            Ok(peer) => figures.peer(&peer),
            Err(why) => notes.push(format!(
                "peer_ingest_eps and peer_drain_eps are null: {why:#}"
            )),
        }
    }
    print_table(&figures, &notes, started.elapsed());
    if options.json {
        println!("{}", figures_json(&figures));
    }
    Ok(())
}
