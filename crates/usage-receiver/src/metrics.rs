//! The node's metrics, served by `GET /metrics` in the Prometheus/OpenMetrics text format
//! (via `prometheus-client`), every family named `usage_receiver_*`.
//!
//! Counters are this node's alone, from its start: a fleet's totals are the sum over its
//! nodes. They are bumped where things happen: the ingest handler counts batches and their
//! events ([`Metrics::batch`]), alert delivery counts its attempts
//! ([`Metrics::alert_delivery`]), the background work counts its store errors
//! ([`Metrics::store_error`]), and the router's metering layer counts what every answer
//! says (rate limited, throttled, refused credentials, store unavailable) and times the
//! batches and the views ([`Metrics::answered`]). The pool gauges are read from the store
//! at each scrape ([`Metrics::encode`]). `contrib/prometheus/receiver-alerts.yml` holds the
//! alert rules written against these names.
//!
//! **Invariant:** no I/O and no HTTP: callers hand in what happened.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::store::PoolUse;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The results a batch request is counted under ([`Metrics::batch`]): answered `200`,
/// refused with a `4xx`, or failed with a `5xx`.
pub const BATCH_RESULTS: [&str; 3] = ["accepted", "refused", "failed"];
/// The results the events of an answered batch are counted under.
pub const EVENT_RESULTS: [&str; 3] = ["accepted", "duplicate", "rejected"];
/// The results of one alert delivery attempt ([`Metrics::alert_delivery`]).
pub const DELIVERY_RESULTS: [&str; 2] = ["delivered", "failed"];
/// The provider views timed under `usage_receiver_view_duration_seconds`, by route.
pub const VIEWS: [(&str, &str); 7] = [
    ("/api/usage/summary", "summary"),
    ("/api/usage/events", "events"),
    ("/api/usage/installations", "installations"),
    ("/api/prices", "prices"),
    ("/api/alerts", "alerts"),
    ("/dashboard", "dashboard"),
    ("/dashboard/installations/{install_id}", "dashboard_detail"),
];
/// The route whose answers are timed under `usage_receiver_ingest_duration_seconds`.
pub const INGEST_ROUTE: &str = "/api/usage/event";

/// Bucket bounds of `usage_receiver_ingest_duration_seconds`, in seconds: a batch of 50
/// should take a few ms, and one past a second is worth a look.
const INGEST_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Bucket bounds of `usage_receiver_view_duration_seconds`, in seconds: a warm view is a
/// few ms, a cold dashboard over many installs may take seconds.
const VIEW_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViewLabels {
    view: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: &'static str,
}

/// What one answer said, as the metering layer saw it ([`Metrics::answered`]).
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The route's path as the route table names it; `None` for an unknown path.
    pub route: Option<&'static str>,
    /// The error code of a refused request (`rate_limited`, …).
    pub error_code: Option<&'static str>,
    /// The answer was `401` to a request that presented credentials (an `Authorization`
    /// header): a failed login, which counts against its address.
    pub refused_credentials: bool,
    /// From the request to the answer.
    pub elapsed: Duration,
}

/// The error code of a request refused by the per-install rate limit.
pub const RATE_LIMITED_CODE: &str = "rate_limited";
/// The error code of an answer the store could not give.
pub const STORE_UNAVAILABLE_CODE: &str = "store_unavailable";

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of a receiver node, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    batches: Family<ResultLabels, Counter>,
    events: Family<ResultLabels, Counter>,
    ingest_duration: Histogram,
    rate_limited: Counter,
    throttled: Counter,
    credential_failures: Counter,
    store_errors: Counter,
    alert_deliveries: Family<ResultLabels, Counter>,
    view_duration: HistogramFamily<ViewLabels>,
    pool_size: Family<PoolLabels, Gauge>,
    pool_available: Family<PoolLabels, Gauge>,
    pool_waiting: Family<PoolLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The node's metrics, every labelled series it knows at 0.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("usage_receiver");
        let batches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "batches",
            "Batch requests on POST /api/usage/event, by result (accepted: answered 200; refused: 4xx; failed: 5xx)",
            batches.clone(),
        );
        let events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "events",
            "Events of answered batches, by result (accepted, duplicate, rejected)",
            events.clone(),
        );
        let ingest_duration = Histogram::new(INGEST_BUCKETS);
        registry.register_with_unit(
            "ingest_duration",
            "Time from receiving a batch request to its answer, whatever the answer",
            Unit::Seconds,
            ingest_duration.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited_requests",
            "Batch requests answered 429 by their install's rate limit",
            rate_limited.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "throttled_requests",
            "Requests answered 429 without a check because their address sent too many failed credentials",
            throttled.clone(),
        );
        let credential_failures = Counter::default();
        registry.register(
            "credential_failures",
            "Requests that presented credentials (basic or bearer) and were refused 401",
            credential_failures.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Store operations that failed: answers 503 store_unavailable and failed background work",
            store_errors.clone(),
        );
        let alert_deliveries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "alert_deliveries",
            "Budget alert webhook attempts, by result (delivered: answered 2xx; failed: retried later)",
            alert_deliveries.clone(),
        );
        let view_duration: HistogramFamily<ViewLabels> =
            Family::new_with_constructor(|| Histogram::new(VIEW_BUCKETS));
        registry.register_with_unit(
            "view_duration",
            "Time from a provider view request (summary, dashboard, …) to its answer, for answers that are not errors",
            Unit::Seconds,
            view_duration.clone(),
        );
        let pool_size = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_size",
            "Connections open in a PostgreSQL pool of this node (no series on SQLite)",
            pool_size.clone(),
        );
        let pool_available = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_available",
            "Idle connections in a PostgreSQL pool of this node (no series on SQLite)",
            pool_available.clone(),
        );
        let pool_waiting = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_waiting",
            "Tasks waiting for a connection of a PostgreSQL pool of this node (no series on SQLite)",
            pool_waiting.clone(),
        );
        let metrics = Metrics {
            registry,
            batches,
            events,
            ingest_duration,
            rate_limited,
            throttled,
            credential_failures,
            store_errors,
            alert_deliveries,
            view_duration,
            pool_size,
            pool_available,
            pool_waiting,
        };
        metrics.start_at_zero();
        metrics
    }

    /// Starts every labelled series at 0, so a scrape shows each one before its first
    /// increment and `increase()` sees that first one.
    fn start_at_zero(&self) {
        for result in BATCH_RESULTS {
            self.batches
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
        for result in EVENT_RESULTS {
            self.events
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
        for result in DELIVERY_RESULTS {
            self.alert_deliveries
                .get_or_create(&ResultLabels { result })
                .inc_by(0);
        }
        for (_, view) in VIEWS {
            // The series is made by asking for it; the guard handed back is not needed.
            let _ = self.view_duration.get_or_create(&ViewLabels { view });
        }
    }

    /// Counts one batch request: its result from its `status`, and, when it was answered,
    /// its events.
    pub fn batch(&self, status: u16, accepted: u64, duplicates: u64, rejected: u64) {
        let result = match status {
            200..=299 => "accepted",
            400..=499 => "refused",
            _ => "failed",
        };
        self.batches.get_or_create(&ResultLabels { result }).inc();
        for (result, count) in [
            ("accepted", accepted),
            ("duplicate", duplicates),
            ("rejected", rejected),
        ] {
            self.events
                .get_or_create(&ResultLabels { result })
                .inc_by(count);
        }
    }

    /// Counts what one answer says, and times it: every answer of a batch, and a view's
    /// answers that are not errors (a refused view says nothing of how long views take).
    pub fn answered(&self, answer: Answer) {
        match answer.error_code {
            Some(RATE_LIMITED_CODE) => {
                self.rate_limited.inc();
            }
            Some(usage_common::credentials::THROTTLED_CODE) => {
                self.throttled.inc();
            }
            Some(STORE_UNAVAILABLE_CODE) => {
                self.store_errors.inc();
            }
            _ => {}
        }
        if answer.refused_credentials {
            self.credential_failures.inc();
        }
        let seconds = answer.elapsed.as_secs_f64();
        match answer.route {
            Some(INGEST_ROUTE) => self.ingest_duration.observe(seconds),
            Some(route) if answer.error_code.is_none() => {
                if let Some((_, view)) = VIEWS.iter().find(|(path, _)| *path == route) {
                    self.view_duration
                        .get_or_create(&ViewLabels { view })
                        .observe(seconds);
                }
            }
            _ => {}
        }
    }

    /// Counts a store operation of the background work (retention, alert delivery) that
    /// failed; failed answers are counted by [`Metrics::answered`].
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// Counts one alert delivery attempt.
    pub fn alert_delivery(&self, delivered: bool) {
        let result = if delivered { "delivered" } else { "failed" };
        self.alert_deliveries
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The metrics as OpenMetrics text, the pool gauges set from `pools` (empty on SQLite).
    pub fn encode(&self, pools: &[PoolUse]) -> String {
        let gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
        for pool in pools {
            let labels = PoolLabels { pool: pool.pool };
            self.pool_size.get_or_create(&labels).set(gauge(pool.size));
            self.pool_available
                .get_or_create(&labels)
                .set(gauge(pool.available));
            self.pool_waiting
                .get_or_create(&labels)
                .set(gauge(pool.waiting));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_starts_at_zero() {
        let text = Metrics::new().encode(&[]);
        for result in BATCH_RESULTS {
            assert!(
                text.contains(&format!(
                    "usage_receiver_batches_total{{result=\"{result}\"}} 0"
                )),
                "{text}"
            );
        }
        for (_, view) in VIEWS {
            assert!(
                text.contains(&format!(
                    "usage_receiver_view_duration_seconds_count{{view=\"{view}\"}} 0"
                )),
                "{text}"
            );
        }
        assert!(text.contains("usage_receiver_throttled_requests_total 0"));
        assert!(!text.contains("usage_receiver_pool_size{"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn answers_count_by_their_code_and_time_by_their_route() {
        let metrics = Metrics::new();
        let answer = |route, error_code, refused_credentials| Answer {
            route,
            error_code,
            refused_credentials,
            elapsed: Duration::from_millis(3),
        };
        metrics.answered(answer(Some(INGEST_ROUTE), Some(RATE_LIMITED_CODE), false));
        metrics.answered(answer(Some("/api/usage/summary"), None, true));
        metrics.answered(answer(None, Some(STORE_UNAVAILABLE_CODE), false));
        metrics.batch(200, 2, 1, 1);
        let text = metrics.encode(&[PoolUse {
            pool: "main",
            size: 4,
            available: 3,
            waiting: 0,
        }]);
        for line in [
            "usage_receiver_rate_limited_requests_total 1",
            "usage_receiver_credential_failures_total 1",
            "usage_receiver_store_errors_total 1",
            "usage_receiver_ingest_duration_seconds_count 1",
            "usage_receiver_view_duration_seconds_count{view=\"summary\"} 1",
            "usage_receiver_batches_total{result=\"accepted\"} 1",
            "usage_receiver_events_total{result=\"accepted\"} 2",
            "usage_receiver_events_total{result=\"duplicate\"} 1",
            "usage_receiver_pool_size{pool=\"main\"} 4",
            "usage_receiver_pool_available{pool=\"main\"} 3",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
