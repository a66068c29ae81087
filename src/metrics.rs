//! The agent's metrics, served by `GET /metrics` in the Prometheus/OpenMetrics text format
//! (via `prometheus-client`). Counters are bumped where things happen (the events handler,
//! the sync engine, the jobs); queue gauges and the last sync time are read from the store
//! at each scrape, so they are right even after a restart.
//!
//! The sync engine calls [`Metrics::sync_batch`], [`Metrics::sync_events`],
//! [`Metrics::sync_error`] and [`Metrics::sync_round_trip`] as it ships, and
//! [`Metrics::job_run`] once per run; the schedules call [`Metrics::job_missed`] when a
//! run's time passed while the previous run was still going. `contrib/prometheus/alerts.yml`
//! holds the alert rules written against these names. This module does no I/O.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;

use crate::quota::Scope;
use crate::store::events::Recorded;
use usage_protocol::event::Source;

/// Bucket bounds of `usage_agent_sync_batch_duration_seconds`, in seconds.
const SYNC_BATCH_BUCKETS: [f64; 11] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// The results a sent batch is counted under ([`Metrics::sync_batch`]).
const BATCH_RESULTS: [&str; 3] = ["ok", "refused", "error"];
/// The results a batch's events are counted under ([`Metrics::sync_events`]).
const EVENT_RESULTS: [&str; 3] = ["accepted", "duplicate", "rejected"];
/// The outcomes of an event received on `POST /v1/events`.
const EVENT_OUTCOMES: [&str; 3] = ["recorded", "duplicate", "rejected"];

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: &'static str,
}

/// Every metric of the agent, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    ingest_latency: Histogram,
    sync_batches: Family<ResultLabels, Counter>,
    sync_events: Family<ResultLabels, Counter>,
    sync_errors: Family<CategoryLabels, Counter>,
    sync_batch_duration: Histogram,
    job_runs: Family<JobLabels, Counter>,
    job_failures: Family<JobLabels, Counter>,
    job_missed: Family<JobLabels, Counter>,
    purged_events: Counter,
    purged_unsynced: Counter,
    quota_denials: Family<ScopeLabels, Counter>,
    quota_holds: Gauge,
    pending: Gauge,
    failed: Gauge,
    last_sync: Gauge,
}

/// Values read from the store at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub pending_events: u64,
    pub failed_events: u64,
    /// Unix ms of the last successful sync run.
    pub last_success_ms: Option<i64>,
    /// Quota holds open now.
    pub quota_holds: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("usage_agent");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Events received on POST /v1/events by source and outcome (recorded, duplicate, rejected)",
            events.clone(),
        );
        // 0.25 ms .. ~4 s: group commit with `synchronous = full` is a few ms on a good disk.
        let ingest_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        registry.register_with_unit(
            "ingest_latency",
            "Time from receiving POST /v1/events to the answer after commit",
            Unit::Seconds,
            ingest_latency.clone(),
        );
        let sync_batches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "sync_batches",
            "Sync batches sent, by result",
            sync_batches.clone(),
        );
        let sync_events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "sync_events",
            "Events sent to the backend, by result (accepted, duplicate, rejected)",
            sync_events.clone(),
        );
        let sync_errors = Family::<CategoryLabels, Counter>::default();
        registry.register(
            "sync_errors",
            "Failed sync attempts, by error category",
            sync_errors.clone(),
        );
        // Bounds at the operators' marks: a batch should take under 500 ms, and one past
        // 2 s is worth an alert.
        let sync_batch_duration = Histogram::new(SYNC_BATCH_BUCKETS);
        registry.register_with_unit(
            "sync_batch_duration",
            "Round-trip time of one signed batch request to the backend, answer included",
            Unit::Seconds,
            sync_batch_duration.clone(),
        );
        let job_runs = Family::<JobLabels, Counter>::default();
        registry.register(
            "job_runs",
            "Runs of background jobs (rollup, cleanup, sync)",
            job_runs.clone(),
        );
        let job_failures = Family::<JobLabels, Counter>::default();
        registry.register(
            "job_failures",
            "Runs of background jobs that failed",
            job_failures.clone(),
        );
        let job_missed = Family::<JobLabels, Counter>::default();
        registry.register(
            "job_missed",
            "Scheduled runs of background jobs skipped because the previous run was still going (or the machine slept)",
            job_missed.clone(),
        );
        let purged_events = Counter::default();
        registry.register(
            "purged_events",
            "Raw events deleted by retention",
            purged_events.clone(),
        );
        let purged_unsynced = Counter::default();
        registry.register(
            "purged_unsynced_events",
            "Raw events deleted by retention before they were synced",
            purged_unsynced.clone(),
        );
        let quota_denials = Family::<ScopeLabels, Counter>::default();
        registry.register(
            "quota_denials",
            "Quota questions and holds answered not allowed, by the limit's scope (a question past two limits counts in both)",
            quota_denials.clone(),
        );
        let quota_holds = Gauge::default();
        registry.register(
            "quota_holds",
            "Quota holds open (not yet settled, released or expired)",
            quota_holds.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "pending_events",
            "Events waiting to be synced",
            pending.clone(),
        );
        let failed = Gauge::default();
        registry.register(
            "failed_events",
            "Events the backend rejected (kept until retry-failed)",
            failed.clone(),
        );
        let last_sync = Gauge::default();
        registry.register_with_unit(
            "last_successful_sync_timestamp",
            "Unix time of the last sync run that ended without error (0: never)",
            Unit::Seconds,
            last_sync.clone(),
        );
        Metrics {
            registry,
            events,
            ingest_latency,
            sync_batches,
            sync_events,
            sync_errors,
            sync_batch_duration,
            job_runs,
            job_failures,
            job_missed,
            purged_events,
            purged_unsynced,
            quota_denials,
            quota_holds,
            pending,
            failed,
            last_sync,
        }
    }

    /// Starts every labelled series the agent knows at 0, so a scrape shows each one before
    /// its first increment and `increase()` sees that first one: events by source and
    /// outcome, sync results, the sync error `categories`, quota denials by scope, and the
    /// runs, failures and missed runs of `jobs`.
    pub fn start_at_zero(&self, jobs: &[&'static str], categories: &[&'static str]) {
        for source in Source::ALL.map(Source::as_str) {
            for outcome in EVENT_OUTCOMES {
                self.events
                    .get_or_create(&EventLabels { source, outcome })
                    .inc_by(0);
            }
        }
        self.events
            .get_or_create(&EventLabels {
                source: "unknown",
                outcome: "rejected",
            })
            .inc_by(0);
        for result in BATCH_RESULTS {
            self.sync_batches
                .get_or_create(&ResultLabels {
                    result: result.to_owned(),
                })
                .inc_by(0);
        }
        for result in EVENT_RESULTS {
            self.sync_events
                .get_or_create(&ResultLabels {
                    result: result.to_owned(),
                })
                .inc_by(0);
        }
        for category in categories {
            self.sync_errors
                .get_or_create(&CategoryLabels {
                    category: (*category).to_owned(),
                })
                .inc_by(0);
        }
        for scope in Scope::ALL.map(Scope::as_str) {
            self.quota_denials
                .get_or_create(&ScopeLabels { scope })
                .inc_by(0);
        }
        for &job in jobs {
            self.job_runs.get_or_create(&JobLabels { job }).inc_by(0);
            self.job_failures
                .get_or_create(&JobLabels { job })
                .inc_by(0);
            self.job_missed.get_or_create(&JobLabels { job }).inc_by(0);
        }
    }

    /// Counts the outcome of a stored request: one entry per event, by its source.
    pub fn events_recorded(&self, sources: &[Source], outcomes: &[Recorded], latency: Duration) {
        // Tallied first, so a batch takes each counter (its labels hashed, a lock) once,
        // not once per event.
        let mut tally = [[0u64; 2]; Source::ALL.len()];
        for (source, outcome) in sources.iter().zip(outcomes) {
            tally[usize::from(source.code())][usize::from(*outcome == Recorded::Duplicate)] += 1;
        }
        for (source, counts) in Source::ALL.into_iter().zip(tally) {
            for (outcome, count) in ["recorded", "duplicate"].into_iter().zip(counts) {
                if count > 0 {
                    self.events
                        .get_or_create(&EventLabels {
                            source: source.as_str(),
                            outcome,
                        })
                        .inc_by(count);
                }
            }
        }
        self.ingest_latency.observe(latency.as_secs_f64());
    }

    /// Counts the events of a refused request body (one event or a batch) as rejected, by
    /// the source each one names (`unknown` when it names none we know).
    pub fn events_rejected(&self, body: &Value) {
        let source_of = |event: &Value| {
            event
                .get("source")
                .and_then(Value::as_str)
                .and_then(Source::parse)
                .map_or("unknown", Source::as_str)
        };
        let reject = |source| {
            self.events
                .get_or_create(&EventLabels {
                    source,
                    outcome: "rejected",
                })
                .inc();
        };
        match body.get("events").and_then(Value::as_array) {
            Some(batch) => batch.iter().for_each(|e| reject(source_of(e))),
            None => reject(source_of(body)),
        }
    }

    /// One batch sent to the backend ended with `result` (e.g. `ok`, `error`).
    pub fn sync_batch(&self, result: &str) {
        self.sync_batches
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// `count` events of a batch ended with `result` (`accepted`, `duplicate`, `rejected`).
    pub fn sync_events(&self, result: &str, count: u64) {
        self.sync_events
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc_by(count);
    }

    /// One sync attempt failed with this error category (`network`, `server`, ...).
    pub fn sync_error(&self, category: &str) {
        self.sync_errors
            .get_or_create(&CategoryLabels {
                category: category.to_owned(),
            })
            .inc();
    }

    /// One batch request to the backend took `elapsed`, from sending to the whole answer.
    pub fn sync_round_trip(&self, elapsed: Duration) {
        self.sync_batch_duration.observe(elapsed.as_secs_f64());
    }

    /// `count` scheduled runs of `job` were skipped.
    pub fn job_missed(&self, job: &'static str, count: u64) {
        self.job_missed
            .get_or_create(&JobLabels { job })
            .inc_by(count);
    }

    /// A background job ran; `ok` is false when it failed.
    pub fn job_run(&self, job: &'static str, ok: bool) {
        self.job_runs.get_or_create(&JobLabels { job }).inc();
        if !ok {
            self.job_failures.get_or_create(&JobLabels { job }).inc();
        }
    }

    /// Counts a quota answer that was not allowed, once per limit it would pass.
    pub fn quota_denied(&self, scopes: &[Scope]) {
        for scope in scopes {
            self.quota_denials
                .get_or_create(&ScopeLabels {
                    scope: scope.as_str(),
                })
                .inc();
        }
    }

    /// Retention deleted `events` raw events, `unsynced` of them never synced.
    pub fn purged(&self, events: u64, unsynced: u64) {
        self.purged_events.inc_by(events);
        self.purged_unsynced.inc_by(unsynced);
    }

    /// The metrics as text, with the store-derived gauges set from `snapshot`.
    pub fn encode(&self, snapshot: Snapshot) -> String {
        self.pending
            .set(snapshot.pending_events.try_into().unwrap_or(i64::MAX));
        self.failed
            .set(snapshot.failed_events.try_into().unwrap_or(i64::MAX));
        self.last_sync
            .set(snapshot.last_success_ms.map_or(0, |ms| ms / 1000));
        self.quota_holds
            .set(snapshot.quota_holds.try_into().unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A strict reader of the OpenMetrics text format: every line must be a known comment or
    /// a well-formed sample of a declared family, and the text ends with `# EOF`. Returns
    /// each sample (`name{labels}` with labels sorted) with its value.
    pub(crate) fn parse_exposition(text: &str) -> Result<HashMap<String, f64>, String> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        let mut saw_eof = false;
        for line in text.lines() {
            if saw_eof {
                return Err(format!("text after # EOF: {line:?}"));
            }
            if line == "# EOF" {
                saw_eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if !valid_name(name) {
                    return Err(format!("bad metric name in {line:?}"));
                }
                match kind {
                    "HELP" | "UNIT" => {}
                    "TYPE" => {
                        let t = parts.next().unwrap_or("");
                        if ![
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "unknown",
                        ]
                        .contains(&t)
                        {
                            return Err(format!("bad type in {line:?}"));
                        }
                        types.insert(name.to_owned(), t.to_owned());
                    }
                    _ => return Err(format!("unknown comment {line:?}")),
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("no value in {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .ok_or_else(|| format!("unclosed labels in {line:?}"))?;
                    (
                        name,
                        parse_labels(body).ok_or_else(|| format!("bad labels in {line:?}"))?,
                    )
                }
                None => (series, Vec::new()),
            };
            let family = ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| types.contains_key(*base))
                })
                .unwrap_or(name);
            let Some(kind) = types.get(family) else {
                return Err(format!("sample of an undeclared family: {line:?}"));
            };
            let suffix = &name[family.len()..];
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_count", "_sum", "_created"],
                _ => &[""],
            };
            if !allowed.contains(&suffix) {
                return Err(format!("sample {name} does not fit its {kind} family"));
            }
            let mut labels = labels;
            labels.sort();
            let key = if labels.is_empty() {
                name.to_owned()
            } else {
                let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{name}{{{}}}", inner.join(","))
            };
            samples.insert(key, value);
        }
        if !saw_eof {
            return Err("missing # EOF".into());
        }
        Ok(samples)
    }

    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
        let mut labels = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"")?;
            if !valid_name(key) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        _ => return None,
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        Some(labels)
    }

    #[test]
    fn the_exposition_parses_and_counts() {
        let metrics = Metrics::new();
        metrics.events_recorded(
            &[Source::Bulk, Source::Bulk, Source::Inline],
            &[Recorded::New, Recorded::Duplicate, Recorded::New],
            Duration::from_millis(3),
        );
        metrics.events_rejected(
            &serde_json::json!({"events": [{"source": "queue"}, {"source": "cron"}]}),
        );
        metrics.sync_batch("ok");
        metrics.sync_events("accepted", 48);
        metrics.sync_error("network");
        metrics.job_run("rollup", true);
        metrics.job_run("cleanup", false);
        metrics.purged(10, 2);
        metrics.quota_denied(&[Scope::UserDaily, Scope::SiteMonthly]);
        metrics.quota_denied(&[Scope::UserDaily]);
        let text = metrics.encode(Snapshot {
            pending_events: 7,
            failed_events: 1,
            last_success_ms: Some(1_700_000_000_123),
            quota_holds: 3,
        });
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let expect = [
            (
                "usage_agent_events_total{outcome=recorded,source=bulk}",
                1.0,
            ),
            (
                "usage_agent_events_total{outcome=duplicate,source=bulk}",
                1.0,
            ),
            (
                "usage_agent_events_total{outcome=recorded,source=inline}",
                1.0,
            ),
            (
                "usage_agent_events_total{outcome=rejected,source=queue}",
                1.0,
            ),
            (
                "usage_agent_events_total{outcome=rejected,source=unknown}",
                1.0,
            ),
            ("usage_agent_ingest_latency_seconds_count", 1.0),
            ("usage_agent_sync_batches_total{result=ok}", 1.0),
            ("usage_agent_sync_events_total{result=accepted}", 48.0),
            ("usage_agent_sync_errors_total{category=network}", 1.0),
            ("usage_agent_job_runs_total{job=cleanup}", 1.0),
            ("usage_agent_job_failures_total{job=cleanup}", 1.0),
            ("usage_agent_purged_events_total", 10.0),
            ("usage_agent_purged_unsynced_events_total", 2.0),
            ("usage_agent_quota_denials_total{scope=user_daily}", 2.0),
            ("usage_agent_quota_denials_total{scope=site_monthly}", 1.0),
            ("usage_agent_quota_holds", 3.0),
            ("usage_agent_pending_events", 7.0),
            ("usage_agent_failed_events", 1.0),
            (
                "usage_agent_last_successful_sync_timestamp_seconds",
                1_700_000_000.0,
            ),
        ];
        for (key, value) in expect {
            assert_eq!(samples.get(key), Some(&value), "{key} in\n{text}");
        }
    }

    #[test]
    fn the_parser_refuses_malformed_text() {
        for bad in [
            "x 1\n# EOF\n",
            "# TYPE x gauge\nx one\n# EOF\n",
            "# TYPE x gauge\nx{a=\"1} 1\n# EOF\n",
            "# TYPE x counter\nx_bucket 1\n# EOF\n",
            "# TYPE x gauge\nx 1\n",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad:?}");
        }
    }
}
