//! The daemon's shared handles: what the API handlers and the jobs both reach. It sits
//! below both, so neither imports the other to get at the store, the config or the metrics.
//!
//! **Invariant:** only handles live here (the config, the writer, a read connection, the
//! quotas, the sync engine, the metrics and the maintenance lock); no behaviour of the API
//! or of a job.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::quota::Quota;
use crate::store::Store;
use crate::store::writer::Writer;
use crate::sync::engine::SyncEngine;

/// What every handler and job can reach.
pub struct AppState {
    pub config: Config,
    pub identity: Option<Identity>,
    /// All writes go through the single writer thread.
    pub writer: Writer,
    /// A second connection for reads, used from blocking tasks.
    pub reader: Mutex<Store>,
    /// The local quotas, answered from memory and advanced by every recorded event.
    pub quota: Quota,
    pub started: Instant,
    /// Unix ms of the next scheduled sync, 0 when none is scheduled.
    pub next_sync_ms: AtomicI64,
    /// The sync engine; `None` when sync is disabled (tracking off, sync off, no backend).
    pub sync: Option<Arc<SyncEngine>>,
    /// Counters and gauges for `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// Rollup, cleanup and erasure, one at a time.
    pub maintenance: MaintenanceLock,
}

pub type SharedState = Arc<AppState>;

/// The lock and stop flag shared by the local-data jobs (rollup, cleanup, erasure),
/// whether the schedule or the API starts them. The jobs themselves are
/// `crate::jobs::maintenance`'s.
#[derive(Debug, Default)]
pub struct MaintenanceLock {
    lock: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
}

impl MaintenanceLock {
    /// Waits until no other local-data job runs.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// The flag a long job checks between its transactions.
    pub fn stopping(&self) -> &AtomicBool {
        &self.stopping
    }

    /// Whether [`MaintenanceLock::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Asks a running job to stop at its next transaction and waits until none runs.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.lock.lock().await;
    }
}
