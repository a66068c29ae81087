//! One round of the agent: a fresh agent records the events from 4 clients over its socket
//! (every answer after an fsync'd commit), then `POST /v1/sync` drains them in signed,
//! gzipped batches of 500 to the counting sink, timed from the request until nothing is
//! pending.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{BATCH, CHUNK, CLIENTS, Round, sink};
use crate::Options;
use crate::client::socket_client;
use crate::phases::drain::sync_until_drained;
use crate::phases::ingest::{Phase, run_phase};
use crate::phases::sqlite_limit::database_bytes;
use crate::roles::{Agent, cpu_seconds};

pub(super) fn round(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    options: &Options,
    n: usize,
) -> anyhow::Result<Round> {
    let counts = Arc::new(sink::Counts::default());
    let listener = sink::bind(runtime, "127.0.0.1:0".parse()?)?;
    let backend = format!("http://{}", listener.local_addr()?);
    let server = sink::serve(runtime, listener, Arc::clone(&counts));
    let result = (|| {
        let agent = Agent::start(dir, options, Some((&backend, BATCH)))?;
        let pid = agent.child.id();
        let cpu_before = cpu_seconds(pid);
        let ingest = runtime.block_on(run_phase(
            &agent.socket,
            Phase::batch(CLIENTS, CHUNK, n, Duration::from_secs(600)),
        ))?;
        if ingest.failures > 0 {
            bail!("recording failed: {}", ingest.first_failure);
        }
        let events = ingest.events;
        let cpu_recorded = cpu_seconds(pid);
        eprintln!(
            "  {:<24} {}  (peak RSS so far {:.1} MiB)",
            "peer, agent ingest",
            ingest.summary(),
            agent.peak_rss_mib().unwrap_or(f64::NAN)
        );
        let bytes_at_rest = database_bytes(&agent.database);

        let client = socket_client(&agent.socket, true)?;
        let started = Instant::now();
        runtime.block_on(sync_until_drained(&client))?;
        let wall = started.elapsed().as_secs_f64();
        let cpu_drained = cpu_seconds(pid);
        let shipped = counts.events();
        if shipped != events as u64 {
            bail!("the sink counted {shipped} events, {events} were recorded");
        }
        let drain_eps = events as f64 / wall;
        eprintln!(
            "  {:<24} {drain_eps:>9.0} events/s  ({events} events in {wall:.2} s)",
            "peer, agent drain"
        );
        let round = Round {
            ingest_eps: ingest.eps(),
            drain_eps,
            peak_rss_mib: agent.peak_rss_mib().unwrap_or(f64::NAN),
            bytes_per_event: bytes_at_rest as f64 / events as f64,
            ingest_cpu_us: (cpu_recorded - cpu_before) * 1e6 / events as f64,
            drain_cpu_us: (cpu_drained - cpu_recorded) * 1e6 / events as f64,
        };
        agent.stop()?;
        Ok(round)
    })();
    server.abort();
    result
}
