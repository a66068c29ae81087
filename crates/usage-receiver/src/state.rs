//! What every handler shares: the settings, the store, the prices converted once, the
//! throttle of failed credentials, the permits of batches in flight, the wake-up of alert
//! delivery and the node's metrics.
//!
//! **Invariant:** handles only; no handler, no HTTP and no SQL.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use usage_common::credentials::FailureThrottle;

use crate::billing::pricing::Pricing;
use crate::metrics::Metrics;
use crate::settings::ReceiverSettings;
use crate::store::ReceiverStore;

/// What every handler shares.
pub struct ReceiverState {
    pub settings: ReceiverSettings,
    pub store: Arc<dyn ReceiverStore>,
    /// Failed credentials per client address ([`FailureThrottle`]).
    pub credential_throttle: FailureThrottle,
    /// The settings' prices, converted once to micro-units.
    pub pricing: Pricing,
    /// One permit per batch whose costly work may run now
    /// ([`ReceiverSettings::max_inflight_batches`]).
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Wakes this node's alert delivery when it records an alert (other nodes' alerts
    /// are found by polling).
    pub alerts_recorded: tokio::sync::Notify,
    /// This node's metrics, served by `GET /metrics`.
    pub metrics: Metrics,
}

impl ReceiverState {
    pub fn new(settings: ReceiverSettings, store: Arc<dyn ReceiverStore>) -> ReceiverState {
        ReceiverState {
            credential_throttle: FailureThrottle::default(),
            pricing: Pricing::new(settings.prices()),
            inflight: Arc::new(tokio::sync::Semaphore::new(settings.max_inflight_batches)),
            alerts_recorded: tokio::sync::Notify::new(),
            metrics: Metrics::new(),
            settings,
            store,
        }
    }

    /// Now, for the provider views and plan changes: [`ReceiverSettings::provider_now`] or
    /// the clock.
    pub fn provider_now(&self) -> DateTime<Utc> {
        self.settings.provider_now.unwrap_or_else(Utc::now)
    }
}
