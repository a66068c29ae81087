//! Benchmark (not a test): how long recording waits while retention purges a large backlog.
//!
//! Stores N expired events (default 1,000,000, spread over ten days 120 days ago), rolls
//! them up, then records single events at a steady rate (default 1,000/s) twice: for a
//! baseline period without a purge, and while the cleanup job deletes all N events in its
//! small transactions. Prints the record latency percentiles of both and the purge time.
//!
//! ```sh
//! cargo run --release --example purge_bench
//! PURGE_BENCH_EVENTS=200000 PURGE_BENCH_SYNCHRONOUS=normal cargo run --release --example purge_bench
//! # only time the purge transactions themselves (no recording), with a chosen chunk size:
//! PURGE_BENCH_PROFILE=1 PURGE_BENCH_CHUNK=1000 cargo run --release --example purge_bench
//! ```

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use chrono::Utc;
use usage_agent::calendar::Calendar;
use usage_agent::config::{RetentionConfig, Synchronous};
use usage_agent::jobs::{retention, rollup};
use usage_agent::metrics::Metrics;
use usage_agent::store::Store;
use usage_agent::store::writer::Writer;
use usage_protocol::event::{Event, ModelName, Source, Tokens};

const DAY_MS: i64 = 86_400_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(user_id: u64, created_at_ms: i64) -> Event {
    Event {
        event_id: uuid::Uuid::now_v7(),
        user_id,
        source: Source::Bulk,
        model: ModelName::parse("gpt-4o-mini").expect("a valid model name"),
        tokens: Tokens {
            prompt: 150,
            completion: 25,
            ..Tokens::default()
        },
        origin: None,
        hold_id: None,
        context: Some(r#"{"attachment_id":42,"width":1024,"height":768}"#.into()),
        created_at_ms,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(label: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    println!(
        "{label}: {} records in {:.1} s ({:.0}/s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// Records one event per tick at `rate` per second until `done` says stop, each as its own
/// request (as sites do), and returns every acknowledgment latency.
async fn record_at_rate(
    writer: &Writer,
    rate: u64,
    mut done: impl FnMut() -> bool,
) -> Vec<Duration> {
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = Vec::new();
    while !done() {
        ticks.tick().await;
        let writer = writer.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = writer
                .record(vec![event(7, Utc::now().timestamp_millis())])
                .await;
            (started.elapsed(), result.is_ok())
        }));
    }
    let mut latencies = Vec::with_capacity(calls.len());
    for call in calls {
        let (latency, ok) = call.await.expect("a record task panicked");
        assert!(ok, "a record call failed");
        latencies.push(latency);
    }
    latencies
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: i64 = env_or("PURGE_BENCH_EVENTS", 1_000_000);
    let rate: u64 = env_or("PURGE_BENCH_RATE", 1000);
    let baseline_secs: u64 = env_or("PURGE_BENCH_BASELINE_SECS", 10);
    let synchronous = match std::env::var("PURGE_BENCH_SYNCHRONOUS").as_deref() {
        Ok("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("usage.db");
    println!(
        "purge_bench: {total} expired events, recording at {rate}/s, synchronous = {synchronous:?}, db {}",
        path.display()
    );

    let now = Utc::now();
    let first = now.timestamp_millis() - 120 * DAY_MS;
    let spacing = (10 * DAY_MS / total.max(1)).max(1);
    let started = Instant::now();
    let mut store = Store::open(&path, synchronous)?;
    for chunk in (0..total).collect::<Vec<_>>().chunks(20_000) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|&i| event((i % 500) as u64, first + i * spacing))
            .collect();
        store.record(&events)?;
    }
    println!(
        "stored {total} expired events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (writer, _thread) = Writer::spawn(store);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let calendar = Calendar::parse("UTC")?;
        let started = Instant::now();
        let rolled = rollup::run_once(&writer, calendar).await?;
        println!(
            "rolled up {} days ({} rows) in {:.1} s",
            rolled.days.len(),
            rolled.rows,
            started.elapsed().as_secs_f64()
        );

        if std::env::var("PURGE_BENCH_PROFILE").is_ok() {
            let before = calendar.day_start(calendar.first_kept_day(now, 90));
            let mut times = Vec::new();
            loop {
                let t = Instant::now();
                let chunk: usize = env_or("PURGE_BENCH_CHUNK", retention::CHUNK);
                let d = writer
                    .run(move |s| s.purge_events_chunk(before, chunk))
                    .await?;
                times.push(t.elapsed());
                if d.rows < chunk as u64 {
                    break;
                }
            }
            report("chunk times", times, started.elapsed());
            return Ok(());
        }
        let started = Instant::now();
        let until = started + Duration::from_secs(baseline_secs);
        let baseline = record_at_rate(&writer, rate, || Instant::now() >= until).await;
        report("baseline (no purge)", baseline, started.elapsed());

        let purge = {
            let writer = writer.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = retention::run_once(
                    &writer,
                    calendar,
                    &RetentionConfig::default(),
                    now,
                    &Metrics::new(),
                    &AtomicBool::new(false),
                )
                .await;
                (outcome, started.elapsed())
            })
        };
        let started = Instant::now();
        let during = record_at_rate(&writer, rate, || purge.is_finished()).await;
        let elapsed = started.elapsed();
        let (outcome, purge_time) = purge.await?;
        let outcome = outcome?;
        report("during the purge", during, elapsed);
        println!(
            "purged {} events ({} never synced) in {:.1} s ({:.0} events/s)",
            outcome.events_deleted,
            outcome.unsynced_deleted,
            purge_time.as_secs_f64(),
            outcome.events_deleted as f64 / purge_time.as_secs_f64(),
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
