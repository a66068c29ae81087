//! The counting sink both shippers drain to, on loopback in this process. It parses every
//! batch whole (the agent's: gunzipped, as the receiver's envelope; syslog-ng's: a JSON
//! array of the lines it was sent), counts the events, answers the agent's all accepted,
//! and stores nothing. It notes when the first batch came and when the last was counted,
//! so a drain that starts on the shipper's own schedule (syslog-ng retrying its
//! destination) is timed from its first batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use serde_json::Value;
use usage_protocol::wire::{self, BatchEnvelope, BatchResult};

/// What the sink has counted so far.
#[derive(Default)]
pub(super) struct Counts {
    events: AtomicU64,
    /// When the first batch arrived, and when the latest was counted.
    first_at: Mutex<Option<Instant>>,
    last_at: Mutex<Option<Instant>>,
}

impl Counts {
    pub(super) fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn arrived(&self) {
        self.first_at
            .lock()
            .expect("the sink's clock")
            .get_or_insert_with(Instant::now);
    }

    fn counted(&self, events: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        *self.last_at.lock().expect("the sink's clock") = Some(Instant::now());
    }

    /// Waits until `n` events are counted (at most `limit`), then the time from the first
    /// batch's arrival to the last one's count.
    pub(super) async fn wait_for(&self, n: u64, limit: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        while self.events() < n {
            if Instant::now() > deadline {
                bail!(
                    "the sink counted {} of {n} events in {limit:?}",
                    self.events()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.events() > n {
            bail!("the sink counted {} events, {n} were sent", self.events());
        }
        let first = self.first_at.lock().expect("the sink's clock");
        let last = self.last_at.lock().expect("the sink's clock");
        match (*first, *last) {
            (Some(first), Some(last)) => Ok(last - first),
            _ => bail!("the sink counted events without a batch"),
        }
    }
}

/// Serves the sink on `listener` until the returned task is aborted.
pub(super) fn serve(
    runtime: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    counts: Arc<Counts>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let sink = axum::Router::new()
        .route("/api/usage/event", post(count_agent_batch))
        .route("/syslog", post(count_syslog_batch))
        .with_state(counts);
    runtime.spawn(async move { axum::serve(listener, sink).await })
}

/// Binds the sink's listener on `addr` (loopback).
pub(super) fn bind(
    runtime: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("binding the counting sink on {addr}"))
}

/// The agent's batch: gunzipped and parsed as the receiver's envelope, answered accepted.
async fn count_agent_batch(
    State(counts): State<Arc<Counts>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<BatchResult>, (StatusCode, String)> {
    counts.arrived();
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
    counts.counted(events);
    Ok(axum::Json(BatchResult {
        batch_id: batch.batch_id,
        accepted: events,
        duplicates: 0,
        rejected: Vec::new(),
    }))
}

/// syslog-ng's batch: its lines joined into one JSON array of events.
async fn count_syslog_batch(
    State(counts): State<Arc<Counts>>,
    body: Bytes,
) -> Result<StatusCode, (StatusCode, String)> {
    counts.arrived();
    let events: Vec<Value> = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("batch: {e}")))?;
    counts.counted(events.len() as u64);
    Ok(StatusCode::OK)
}
