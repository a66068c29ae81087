//! The sync job: runs [`SyncEngine::run_once`] every `sync.interval_secs`, on demand
//! (`POST /v1/sync`), and one last time, bounded, at shutdown.
//!
//! **Invariant:** never two runs at once. A tokio mutex is held for the whole run; a
//! manual sync that arrives during a scheduled run waits for it and then runs, so it
//! always reports on a run that started after it was asked for.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::api::SharedState;
use crate::config::Config;
use crate::sync::engine::{SyncEngine, SyncReport};

/// Delay before the first scheduled run, so a freshly started daemon ships what a
/// previous life left pending soon, but only once it is fully up.
pub const FIRST_RUN_DELAY: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last sync attempt.
pub const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Why sync is off, or `None` when it can run (SPEC 3 `disabled`).
pub fn disabled_reason(config: &Config) -> Option<&'static str> {
    if !config.tracking_enabled {
        Some(
            "sync is disabled because tracking is off (tracking_enabled = false or USAGE_AGENT_DISABLE_TRACKING)",
        )
    } else if !config.sync.enabled {
        Some("sync is disabled (sync.enabled = false or USAGE_AGENT_DISABLE_SYNC)")
    } else if config.sync.backend_url.is_empty() {
        Some("sync is disabled: no sync.backend_url is configured (events are kept locally)")
    } else {
        None
    }
}

/// The engine behind a mutex, shared by the schedule, the API and shutdown.
pub struct SyncJob {
    engine: SyncEngine,
    running: tokio::sync::Mutex<()>,
    interval: Duration,
}

impl SyncJob {
    pub fn new(engine: SyncEngine, interval: Duration) -> SyncJob {
        SyncJob {
            engine,
            running: tokio::sync::Mutex::new(()),
            interval,
        }
    }

    pub fn engine(&self) -> &SyncEngine {
        &self.engine
    }

    /// Runs a sync now, after any run in progress has finished.
    pub async fn run_now(&self) -> SyncReport {
        let _running = self.running.lock().await;
        self.engine.run_once().await
    }

    /// Starts the schedule: a run shortly after start, then every interval (missed ticks
    /// are skipped, not bunched), until `stop` turns true. Publishes the next run time in
    /// `state.next_sync_ms`.
    pub fn spawn_schedule(
        self: Arc<Self>,
        state: SharedState,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let period = self.interval;
            let mut next = Instant::now() + FIRST_RUN_DELAY.min(period);
            let mut ticker = tokio::time::interval_at(next, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                publish(&state, next);
                let tick = tokio::select! {
                    tick = ticker.tick() => tick,
                    _ = stop.wait_for(|stop| *stop) => break,
                };
                self.run_now().await;
                next = tick + period;
                let now = Instant::now();
                while next <= now {
                    next += period;
                }
            }
            state.next_sync_ms.store(0, Ordering::Relaxed);
        })
    }

    /// At shutdown: lets a scheduled run in progress finish and makes one last attempt to
    /// ship what is pending, all within [`FINAL_SYNC_TIMEOUT`]. What is not sent by then
    /// stays pending for the next start.
    pub async fn finish(&self, schedule: Option<JoinHandle<()>>) {
        let mut schedule = schedule;
        let last = async {
            if let Some(handle) = schedule.as_mut() {
                let _ = handle.await;
            }
            self.run_now().await
        };
        match tokio::time::timeout(FINAL_SYNC_TIMEOUT, last).await {
            Ok(report) => tracing::info!(
                accepted = report.accepted,
                error = report.error.is_some(),
                "final sync done"
            ),
            Err(_) => tracing::warn!(
                timeout_s = FINAL_SYNC_TIMEOUT.as_secs(),
                "final sync did not finish in time; unsent events stay pending"
            ),
        }
        if let Some(handle) = schedule {
            handle.abort();
        }
    }
}

fn publish(state: &SharedState, next: Instant) {
    let wait = next.saturating_duration_since(Instant::now());
    let at =
        Utc::now().timestamp_millis() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
    state.next_sync_ms.store(at, Ordering::Relaxed);
}
