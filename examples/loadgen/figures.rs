//! Every figure of one run, and the two ways it is printed: a table for reading, and one
//! JSON object with exactly its agreed keys for scripts (`tests/it/loadgen.rs` lists
//! them).

use std::time::Duration;

use serde_json::{Value, json};

use crate::phases::fleet::ViewTimes;
use crate::phases::peer::PeerFigures;

/// Every figure of one run; `None` is printed as `null`.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub(crate) single_c1_eps: Option<f64>,
    pub(crate) single_c32_eps: Option<f64>,
    pub(crate) single_c128_eps: Option<f64>,
    pub(crate) single_c32_p50_ms: Option<f64>,
    pub(crate) single_c32_p99_ms: Option<f64>,
    pub(crate) single_c32_newconn_eps: Option<f64>,
    pub(crate) batch100_eps: Option<f64>,
    pub(crate) sqlite_limit_eps: Option<f64>,
    pub(crate) ratio_batch_vs_limit: Option<f64>,
    pub(crate) drain50_eps: Option<f64>,
    pub(crate) drain1000_eps: Option<f64>,
    /// The peer phase: 4 clients recording chunks of 500, then the backlog drained in
    /// batches of 500 to a counting sink in the load generator.
    pub(crate) peer_ingest_eps: Option<f64>,
    pub(crate) peer_drain_eps: Option<f64>,
    /// In the table only: the agent's peak RSS over the phase, and with syslog-ng beside
    /// it, syslog-ng's figures and the agent's against them (medians of three rounds).
    pub(crate) peer_rss_mib: Option<f64>,
    pub(crate) peer_syslog_ng_ingest_eps: Option<f64>,
    pub(crate) peer_syslog_ng_drain_eps: Option<f64>,
    pub(crate) peer_syslog_ng_rss_mib: Option<f64>,
    pub(crate) peer_ingest_ratio: Option<f64>,
    pub(crate) peer_drain_ratio: Option<f64>,
    pub(crate) rss_peak_mib: Option<f64>,
    pub(crate) bytes_per_event: Option<f64>,
    pub(crate) fleet_eps: Option<f64>,
    pub(crate) fleet_ceiling_eps: Option<f64>,
    pub(crate) fleet_ratio: Option<f64>,
    pub(crate) fleet_p99_ms: Option<f64>,
    /// In the table only, as the ones below: the same batches straight into the store,
    /// without HTTP, and that against the ceiling.
    pub(crate) fleet_store_eps: Option<f64>,
    pub(crate) fleet_store_ratio: Option<f64>,
    /// The whole machine's busy CPU µs per event through the nodes, straight into the
    /// store, and by `COPY`.
    pub(crate) fleet_cpu_us_per_event: Option<f64>,
    pub(crate) fleet_store_cpu_us_per_event: Option<f64>,
    pub(crate) fleet_ceiling_cpu_us_per_event: Option<f64>,
    pub(crate) installations_100k_ms: Option<f64>,
    pub(crate) dashboard_100k_ms: Option<f64>,
    /// Beside the two above, in the table only (the JSON line keeps the issues' keys): the
    /// node's first view (it reads every rollup row), and each view again after 1% of the
    /// installs sent a batch.
    pub(crate) installations_100k_first_ms: Option<f64>,
    pub(crate) dashboard_100k_first_ms: Option<f64>,
    pub(crate) installations_100k_changed_ms: Option<f64>,
    pub(crate) dashboard_100k_changed_ms: Option<f64>,
    /// Local quotas at 32 clients while 4 clients record: answers to `GET /v1/quota`, their
    /// p99, holds granted; and recording beside questions asked at its own pace (one per
    /// event) against the same recording alone.
    pub(crate) quota_c32_eps: Option<f64>,
    pub(crate) quota_c32_p99_ms: Option<f64>,
    pub(crate) quota_hold_c32_eps: Option<f64>,
    pub(crate) quota_record_ratio: Option<f64>,
    /// In the table only: the holds' p99; recording whose clients ask before each event,
    /// and recording beside the 32 asking clients (questions, holds), against alone.
    pub(crate) quota_hold_c32_p99_ms: Option<f64>,
    pub(crate) quota_asking_first_record_ratio: Option<f64>,
    pub(crate) quota_beside_record_ratio: Option<f64>,
    pub(crate) quota_hold_beside_record_ratio: Option<f64>,
    pub(crate) synchronous: String,
}

impl Figures {
    pub(crate) fn peer(&mut self, peer: &PeerFigures) {
        self.peer_ingest_eps = Some(peer.agent.ingest_eps);
        self.peer_drain_eps = Some(peer.agent.drain_eps);
        self.peer_rss_mib = Some(peer.agent.peak_rss_mib);
        if let Some(syslog_ng) = &peer.syslog_ng {
            self.peer_syslog_ng_ingest_eps = Some(syslog_ng.ingest_eps);
            self.peer_syslog_ng_drain_eps = Some(syslog_ng.drain_eps);
            self.peer_syslog_ng_rss_mib = Some(syslog_ng.peak_rss_mib);
            self.peer_ingest_ratio = Some(peer.agent.ingest_eps / syslog_ng.ingest_eps);
            self.peer_drain_ratio = Some(peer.agent.drain_eps / syslog_ng.drain_eps);
        }
    }

    pub(crate) fn views(&mut self, views: &ViewTimes) {
        self.installations_100k_ms = Some(views.installations_ms);
        self.dashboard_100k_ms = Some(views.dashboard_ms);
        self.installations_100k_first_ms = Some(views.installations_first_ms);
        self.dashboard_100k_first_ms = Some(views.dashboard_first_ms);
        self.installations_100k_changed_ms = Some(views.installations_changed_ms);
        self.dashboard_100k_changed_ms = Some(views.dashboard_changed_ms);
    }
}

pub(crate) fn print_table(figures: &Figures, notes: &[String], took: Duration) {
    let show = |value: Option<f64>, decimals: usize| match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "null".to_owned(),
    };
    let rows: [(&str, Option<f64>, usize, &str); 44] = [
        ("single_c1_eps", figures.single_c1_eps, 0, ""),
        ("single_c32_eps", figures.single_c32_eps, 0, ">= 25000"),
        ("single_c128_eps", figures.single_c128_eps, 0, ""),
        ("single_c32_p50_ms", figures.single_c32_p50_ms, 3, ""),
        ("single_c32_p99_ms", figures.single_c32_p99_ms, 3, "<= 5"),
        (
            "single_c32_newconn_eps",
            figures.single_c32_newconn_eps,
            0,
            "",
        ),
        ("batch100_eps", figures.batch100_eps, 0, ""),
        ("sqlite_limit_eps", figures.sqlite_limit_eps, 0, ""),
        (
            "ratio_batch_vs_limit",
            figures.ratio_batch_vs_limit,
            3,
            ">= 0.5",
        ),
        ("drain50_eps", figures.drain50_eps, 0, ">= 20000"),
        ("drain1000_eps", figures.drain1000_eps, 0, ">= 50000"),
        ("peer_ingest_eps", figures.peer_ingest_eps, 0, ""),
        ("peer_drain_eps", figures.peer_drain_eps, 0, ""),
        ("peer_rss_mib", figures.peer_rss_mib, 1, "<= 20"),
        (
            "peer_syslog_ng_ingest_eps",
            figures.peer_syslog_ng_ingest_eps,
            0,
            "",
        ),
        (
            "peer_syslog_ng_drain_eps",
            figures.peer_syslog_ng_drain_eps,
            0,
            "",
        ),
        (
            "peer_syslog_ng_rss_mib",
            figures.peer_syslog_ng_rss_mib,
            1,
            "",
        ),
        ("peer_ingest_ratio", figures.peer_ingest_ratio, 2, ">= 1.2"),
        ("peer_drain_ratio", figures.peer_drain_ratio, 2, ">= 1.0"),
        ("rss_peak_mib", figures.rss_peak_mib, 1, "<= 20"),
        ("bytes_per_event", figures.bytes_per_event, 1, "<= 250"),
        ("fleet_eps", figures.fleet_eps, 0, ">= 20000"),
        ("fleet_ceiling_eps", figures.fleet_ceiling_eps, 0, ""),
        ("fleet_ratio", figures.fleet_ratio, 3, ">= 0.5"),
        ("fleet_p99_ms", figures.fleet_p99_ms, 1, "<= 50"),
        ("fleet_store_eps", figures.fleet_store_eps, 0, ""),
        ("fleet_store_ratio", figures.fleet_store_ratio, 3, ""),
        (
            "fleet_cpu_us_per_event",
            figures.fleet_cpu_us_per_event,
            1,
            "",
        ),
        (
            "fleet_store_cpu_us_per_event",
            figures.fleet_store_cpu_us_per_event,
            1,
            "",
        ),
        (
            "fleet_ceiling_cpu_us_per_event",
            figures.fleet_ceiling_cpu_us_per_event,
            1,
            "",
        ),
        (
            "installations_100k_ms",
            figures.installations_100k_ms,
            1,
            "<= 300",
        ),
        ("dashboard_100k_ms", figures.dashboard_100k_ms, 1, "<= 300"),
        (
            "installations_100k_first_ms",
            figures.installations_100k_first_ms,
            1,
            "",
        ),
        (
            "dashboard_100k_first_ms",
            figures.dashboard_100k_first_ms,
            1,
            "",
        ),
        (
            "installations_100k_changed_ms",
            figures.installations_100k_changed_ms,
            1,
            "",
        ),
        (
            "dashboard_100k_changed_ms",
            figures.dashboard_100k_changed_ms,
            1,
            "",
        ),
        ("quota_c32_eps", figures.quota_c32_eps, 0, ">= 50000"),
        ("quota_c32_p99_ms", figures.quota_c32_p99_ms, 3, "<= 1"),
        (
            "quota_hold_c32_eps",
            figures.quota_hold_c32_eps,
            0,
            ">= 20000",
        ),
        (
            "quota_hold_c32_p99_ms",
            figures.quota_hold_c32_p99_ms,
            3,
            "",
        ),
        (
            "quota_record_ratio",
            figures.quota_record_ratio,
            3,
            ">= 0.9",
        ),
        (
            "quota_asking_first_record_ratio",
            figures.quota_asking_first_record_ratio,
            3,
            "",
        ),
        (
            "quota_beside_record_ratio",
            figures.quota_beside_record_ratio,
            3,
            "",
        ),
        (
            "quota_hold_beside_record_ratio",
            figures.quota_hold_beside_record_ratio,
            3,
            "",
        ),
    ];
    println!();
    println!("| figure | value | target |");
    println!("|---|---:|---|");
    for (name, value, decimals, target) in rows {
        println!("| `{name}` | {} | {target} |", show(value, decimals));
    }
    println!("| `synchronous` | {} | full |", figures.synchronous);
    for note in notes {
        println!("note: {note}");
    }
    println!("({:.1} s in all)", took.as_secs_f64());
}

pub(crate) fn figures_json(figures: &Figures) -> Value {
    let round = |value: Option<f64>, decimals: i32| {
        value.map(|v| {
            let scale = 10f64.powi(decimals);
            (v * scale).round() / scale
        })
    };
    json!({
        "single_c1_eps": round(figures.single_c1_eps, 0),
        "single_c32_eps": round(figures.single_c32_eps, 0),
        "single_c128_eps": round(figures.single_c128_eps, 0),
        "single_c32_p50_ms": round(figures.single_c32_p50_ms, 3),
        "single_c32_p99_ms": round(figures.single_c32_p99_ms, 3),
        "single_c32_newconn_eps": round(figures.single_c32_newconn_eps, 0),
        "batch100_eps": round(figures.batch100_eps, 0),
        "sqlite_limit_eps": round(figures.sqlite_limit_eps, 0),
        "ratio_batch_vs_limit": round(figures.ratio_batch_vs_limit, 3),
        "drain50_eps": round(figures.drain50_eps, 0),
        "drain1000_eps": round(figures.drain1000_eps, 0),
        "peer_ingest_eps": round(figures.peer_ingest_eps, 0),
        "peer_drain_eps": round(figures.peer_drain_eps, 0),
        "rss_peak_mib": round(figures.rss_peak_mib, 1),
        "bytes_per_event": round(figures.bytes_per_event, 1),
        "fleet_eps": round(figures.fleet_eps, 0),
        "fleet_ceiling_eps": round(figures.fleet_ceiling_eps, 0),
        "fleet_ratio": round(figures.fleet_ratio, 3),
        "fleet_p99_ms": round(figures.fleet_p99_ms, 1),
        "installations_100k_ms": round(figures.installations_100k_ms, 1),
        "dashboard_100k_ms": round(figures.dashboard_100k_ms, 1),
        "quota_c32_eps": round(figures.quota_c32_eps, 0),
        "quota_c32_p99_ms": round(figures.quota_c32_p99_ms, 3),
        "quota_hold_c32_eps": round(figures.quota_hold_c32_eps, 0),
        "quota_record_ratio": round(figures.quota_record_ratio, 3),
        "synchronous": figures.synchronous,
    })
}
