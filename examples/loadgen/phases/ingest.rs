//! The ingest phases: `clients` concurrent clients POST single events or batches to
//! `/v1/events` until the phase's requests or its time cap run out, and the acknowledgment
//! latency of every request is kept for percentiles.
//! The same machinery fills the drain phases' backlog and loads the HTTP ceiling.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{connect, exchange};
use crate::generator::Generator;

/// One load phase: how many clients, what each request carries, how much in total.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phase {
    pub(crate) clients: usize,
    /// Events per request; 1 posts a single event object, more post `{"events": [...]}`.
    pub(crate) per_request: usize,
    pub(crate) requests: usize,
    pub(crate) new_connection_per_request: bool,
    pub(crate) cap: Duration,
}

impl Phase {
    pub(crate) fn single(clients: usize, events: usize, cap: Duration) -> Phase {
        Phase {
            clients,
            per_request: 1,
            requests: events,
            new_connection_per_request: false,
            cap,
        }
    }

    pub(crate) fn batch(clients: usize, per_request: usize, events: usize, cap: Duration) -> Phase {
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
pub(crate) struct PhaseResult {
    pub(crate) events: usize,
    pub(crate) elapsed: Duration,
    /// Acknowledgment latency of each request, in microseconds, sorted.
    pub(crate) latencies_us: Vec<u32>,
    pub(crate) failures: usize,
    pub(crate) first_failure: String,
}

impl PhaseResult {
    pub(crate) fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        f64::from(self.latencies_us[rank - 1]) / 1000.0
    }

    /// Adds one client's (or run's) events, latencies and failures; the first failure
    /// seen is kept.
    pub(crate) fn absorb(&mut self, part: PhaseResult) {
        self.events += part.events;
        self.latencies_us.extend(part.latencies_us);
        if self.failures == 0 {
            self.first_failure = part.first_failure;
        }
        self.failures += part.failures;
    }

    pub(crate) fn summary(&self) -> String {
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

/// Runs one phase: `clients` tasks share a counter of requests still to send.
pub(crate) async fn run_phase(socket: &Path, phase: Phase) -> anyhow::Result<PhaseResult> {
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
        total.absorb(task.await.context("a client task panicked")?);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    Ok(total)
}
