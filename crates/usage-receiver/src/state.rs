//! What every handler shares: the settings, the store, the prices converted once, the
//! throttles of failed credentials, the permits of batches in flight, the wake-up of alert
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
use crate::store::model_cap::KnownModels;

/// What every handler shares.
pub struct ReceiverState {
    pub settings: ReceiverSettings,
    pub store: Arc<dyn ReceiverStore>,
    /// Failed provider credentials (basic auth, the metrics token) per client address
    /// ([`FailureThrottle`]); this node's count.
    pub provider_throttle: FailureThrottle,
    /// Failed enrollment tokens per client address, apart from the provider's, so guesses
    /// at the provider password never block an agent's enrollment; this node's count.
    pub enrollment_throttle: FailureThrottle,
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
    /// The models this node knows to be stored, per install and day, for the cap on
    /// models per install and day.
    pub known_models: KnownModels,
}

impl ReceiverState {
    pub fn new(settings: ReceiverSettings, store: Arc<dyn ReceiverStore>) -> ReceiverState {
        ReceiverState {
            provider_throttle: FailureThrottle::default(),
            enrollment_throttle: FailureThrottle::default(),
            pricing: Pricing::new(settings.prices()),
            inflight: Arc::new(tokio::sync::Semaphore::new(settings.max_inflight_batches)),
            alerts_recorded: tokio::sync::Notify::new(),
            metrics: Metrics::new(),
            known_models: KnownModels::default(),
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
