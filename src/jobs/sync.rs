//! The sync job: runs [`SyncEngine::run_now`] every `sync.interval_secs` and one last
//! time, bounded, at shutdown. (`POST /v1/sync` calls the same `run_now`; the engine
//! makes sure two runs never overlap.)

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::state::SharedState;
use crate::sync::engine::{SYNC_JOB, SyncEngine};

/// Delay before the first scheduled run, so a freshly started daemon ships what a
/// previous life left pending soon, but only once it is fully up.
pub const FIRST_RUN_DELAY: Duration = Duration::from_secs(5);
/// The longest shutdown waits for the last sync attempt, however much of
/// `shutdown_timeout_secs` is left.
pub const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the schedule: a run shortly after start, then every interval, until `stop`
/// turns true. A tick that falls while a run is still going is skipped, not bunched, and
/// counted in `usage_agent_job_missed_total{job="sync"}`. Publishes the next run time in
/// `state.next_sync_ms`.
pub fn spawn_schedule(
    state: SharedState,
    engine: Arc<SyncEngine>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let period = Duration::from_secs(state.config.sync.interval_secs);
        let mut next = Instant::now() + FIRST_RUN_DELAY.min(period);
        let mut ticker = tokio::time::interval_at(next, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            publish(&state, next);
            let tick = tokio::select! {
                tick = ticker.tick() => tick,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            engine.run_now().await;
            next = tick + period;
            let now = Instant::now();
            let mut missed = 0;
            while next <= now {
                next += period;
                missed += 1;
            }
            if missed > 0 {
                tracing::warn!(
                    missed,
                    "sync runs were missed: a run took longer than sync.interval_secs"
                );
                state.metrics.job_missed(SYNC_JOB, missed);
            }
        }
        state.next_sync_ms.store(0, Ordering::Relaxed);
    })
}

/// At shutdown: lets a scheduled run in progress finish and makes one last attempt to
/// ship what is pending, all within `left` (at most [`FINAL_SYNC_TIMEOUT`]). What is not
/// sent by then stays pending for the next start.
pub async fn finish(engine: &SyncEngine, schedule: Option<JoinHandle<()>>, left: Duration) {
    let limit = left.min(FINAL_SYNC_TIMEOUT);
    let mut schedule = schedule;
    let last = async {
        if let Some(handle) = schedule.as_mut() {
            let _ = handle.await;
        }
        engine.run_now().await
    };
    match tokio::time::timeout(limit, last).await {
        Ok(report) => tracing::info!(
            accepted = report.accepted,
            error = report.error.is_some(),
            "final sync done"
        ),
        Err(_) => tracing::warn!(
            timeout_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            "final sync did not finish in time; unsent events stay pending"
        ),
    }
    if let Some(handle) = schedule {
        handle.abort();
    }
}

fn publish(state: &SharedState, next: Instant) {
    let wait = next.saturating_duration_since(Instant::now());
    let at =
        Utc::now().timestamp_millis() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
    state.next_sync_ms.store(at, Ordering::Relaxed);
}
