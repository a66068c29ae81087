//! The peer phase: the work a log shipper does, for a side-by-side with one. 4 clients
//! record batches of 500 over the socket into a fresh agent (every answer after an fsync'd
//! commit), then `POST /v1/sync` drains the backlog in batches of 500 to a counting sink in
//! this process: it gunzips and parses each batch as the receiver's envelope, counts its
//! events and answers them accepted, storing nothing. So the drain figure is the agent's
//! side of shipping (reading the queue, signing, gzip, recording the verdicts), not a
//! receiver's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use usage_protocol::wire::{self, BatchEnvelope, BatchResult};

use crate::Options;
use crate::client::socket_client;
use crate::phases::drain::sync_until_drained;
use crate::phases::ingest::{Phase, run_phase};
use crate::roles::Agent;

/// Clients, events per request, and events per batch shipped.
const CLIENTS: usize = 4;
const CHUNK: usize = 500;
const BATCH: usize = 500;

/// Records `n` events in chunks of 500 from 4 clients, then drains them in batches of 500
/// to the counting sink; events per second of each.
pub(crate) fn peer_phase(
    runtime: &tokio::runtime::Runtime,
    root: &std::path::Path,
    options: &Options,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let counted = Arc::new(AtomicU64::new(0));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("binding the counting sink")?;
    let addr = listener
        .local_addr()
        .context("reading the sink's address")?;
    let sink = axum::Router::new()
        .route("/api/usage/event", post(count_batch))
        .with_state(Arc::clone(&counted));
    let server = runtime.spawn(async move { axum::serve(listener, sink).await });

    let backend = format!("http://{addr}");
    let result = (|| {
        let agent = Agent::start(&root.join("peer"), options, Some((&backend, BATCH)))?;
        let ingest = runtime.block_on(run_phase(
            &agent.socket,
            Phase::batch(CLIENTS, CHUNK, n, Duration::from_secs(600)),
        ))?;
        if ingest.failures > 0 {
            bail!("recording failed: {}", ingest.first_failure);
        }
        eprintln!("  {:<24} {}", "peer, ingest", ingest.summary());
        let drain_eps = runtime.block_on(drain(&agent, ingest.events))?;
        let shipped = counted.load(Ordering::Relaxed);
        if shipped != ingest.events as u64 {
            bail!(
                "the sink counted {shipped} events, {} were recorded",
                ingest.events
            );
        }
        agent.stop()?;
        Ok((ingest.eps(), drain_eps))
    })();
    server.abort();
    result
}

/// Syncs until nothing is pending; events per second over the whole drain.
async fn drain(agent: &Agent, events: usize) -> anyhow::Result<f64> {
    let client = socket_client(&agent.socket, true)?;
    let started = Instant::now();
    sync_until_drained(&client).await?;
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "  {:<24} {:>9.0} events/s  ({events} events in {wall:.2} s)",
        "peer, drain",
        events as f64 / wall
    );
    Ok(events as f64 / wall)
}

/// The sink: gunzips and parses one batch, counts its events, answers them all accepted.
async fn count_batch(
    axum::extract::State(counted): axum::extract::State<Arc<AtomicU64>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<BatchResult>, (StatusCode, String)> {
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|value| value == "gzip");
    let json = if gzipped {
        wire::gunzip(&body, 64 << 20)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("gunzip: {e}")))?
    } else {
        body.to_vec()
    };
    let batch: BatchEnvelope = serde_json::from_slice(&json)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("batch: {e}")))?;
    let events = batch.events.len() as u64;
    counted.fetch_add(events, Ordering::Relaxed);
    Ok(axum::Json(BatchResult {
        batch_id: batch.batch_id,
        accepted: events,
        duplicates: 0,
        rejected: Vec::new(),
    }))
}
