//! The benchmark harness (`examples/loadgen/`) runs end to end and prints the documented
//! JSON line. These tests run it on a few hundred events and check the shape of what it
//! reports, never how fast anything was.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The keys of the JSON line: every one of them, and no other.
const KEYS: [&str; 26] = [
    "single_c1_eps",
    "single_c32_eps",
    "single_c128_eps",
    "single_c32_p50_ms",
    "single_c32_p99_ms",
    "single_c32_newconn_eps",
    "batch100_eps",
    "sqlite_limit_eps",
    "ratio_batch_vs_limit",
    "drain50_eps",
    "drain1000_eps",
    "peer_ingest_eps",
    "peer_drain_eps",
    "rss_peak_mib",
    "bytes_per_event",
    "fleet_eps",
    "fleet_ceiling_eps",
    "fleet_ratio",
    "fleet_p99_ms",
    "installations_100k_ms",
    "dashboard_100k_ms",
    "quota_c32_eps",
    "quota_c32_p99_ms",
    "quota_hold_c32_eps",
    "quota_record_ratio",
    "synchronous",
];

/// The figures of the fleet phase, which runs only when asked for.
const FLEET_KEYS: [&str; 6] = [
    "fleet_eps",
    "fleet_ceiling_eps",
    "fleet_ratio",
    "fleet_p99_ms",
    "installations_100k_ms",
    "dashboard_100k_ms",
];

/// The figures of the peer phase, which runs only when asked for.
const PEER_KEYS: [&str; 2] = ["peer_ingest_eps", "peer_drain_eps"];

/// The example binary: `cargo test` builds every example (next to this test binary's
/// `deps` directory) before it runs any test.
fn loadgen() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in <target>/<profile>/deps");
    let loadgen = profile_dir.join("examples").join("loadgen");
    assert!(
        loadgen.exists(),
        "{} is missing: run the tests with `cargo test`, which builds the examples",
        loadgen.display()
    );
    loadgen
}

fn run(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    Command::new(loadgen())
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("running loadgen")
}

/// The JSON object on the last line of a successful run.
fn json_line(output: &Output) -> serde_json::Map<String, Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    match serde_json::from_str(last) {
        Ok(Value::Object(object)) => object,
        _ => panic!("the last line is not a JSON object: {last}"),
    }
}

fn positive(figures: &serde_json::Map<String, Value>, key: &str) -> f64 {
    let value = figures[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {}", figures[key]));
    assert!(value > 0.0, "{key} = {value}");
    value
}

#[test]
fn every_phase_reports_every_key_of_the_json_line() {
    let figures = json_line(&run(&["--events", "400", "--json"]));
    let mut keys: Vec<&str> = figures.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = KEYS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    for key in KEYS
        .iter()
        .filter(|k| **k != "synchronous" && !FLEET_KEYS.contains(k) && !PEER_KEYS.contains(k))
    {
        positive(&figures, key);
    }
    for key in FLEET_KEYS {
        assert!(figures[key].is_null(), "{key} without the fleet phase");
    }
    for key in PEER_KEYS {
        assert!(figures[key].is_null(), "{key} without the peer phase");
    }
    assert_eq!(figures["synchronous"], "full");
    let ratio = positive(&figures, "batch100_eps") / positive(&figures, "sqlite_limit_eps");
    let reported = positive(&figures, "ratio_batch_vs_limit");
    assert!(
        (ratio - reported).abs() < 0.001,
        "ratio_batch_vs_limit {reported} is not batch100_eps / sqlite_limit_eps ({ratio})"
    );
    assert!(positive(&figures, "single_c32_p50_ms") <= positive(&figures, "single_c32_p99_ms"));
}

#[test]
fn skipped_phases_are_null_and_the_durability_mode_is_reported() {
    let figures = json_line(&run(&[
        "--events",
        "200",
        "--phases",
        "c1",
        "--synchronous",
        "normal",
        "--json",
    ]));
    positive(&figures, "single_c1_eps");
    positive(&figures, "rss_peak_mib");
    for key in [
        "single_c32_eps",
        "batch100_eps",
        "drain1000_eps",
        "quota_c32_eps",
    ] {
        assert!(figures[key].is_null(), "{key} = {}", figures[key]);
    }
    assert_eq!(figures["synchronous"], "normal");
}

#[test]
fn the_peer_phase_records_and_drains_everything_to_its_counting_sink() {
    // The phase fails (its figures null, with a note) unless the sink counted exactly the
    // events recorded.
    let figures = json_line(&run(&["--events", "1200", "--phases", "peer", "--json"]));
    for key in PEER_KEYS {
        positive(&figures, key);
    }
    for key in ["batch100_eps", "drain50_eps", "drain1000_eps"] {
        assert!(figures[key].is_null(), "{key} = {}", figures[key]);
    }
}

/// Where `.ci/syslog-ng` (run by `.ci/setup`) unpacks syslog-ng: `target/syslog-ng/root`.
fn unpacked_syslog_ng() -> PathBuf {
    let target = loadgen()
        .ancestors()
        .nth(3)
        .expect("loadgen lives in <target>/<profile>/examples")
        .to_path_buf();
    let root = target.join("syslog-ng").join("root");
    assert!(
        root.join("usr/sbin/syslog-ng").exists(),
        "no syslog-ng under {}: run .ci/setup (the README's test command does)",
        root.display()
    );
    root
}

#[test]
fn the_peer_phase_sets_syslog_ng_beside_the_agent() {
    let root = unpacked_syslog_ng();
    let output = run(&[
        "--events",
        "2000",
        "--phases",
        "peer",
        "--syslog-ng",
        root.to_str().expect("a UTF-8 path"),
        "--json",
    ]);
    let figures = json_line(&output);
    for key in PEER_KEYS {
        positive(&figures, key);
    }
    // Both shippers delivered every event (a round fails otherwise), three rounds each.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("peer, syslog-ng drain").count(),
        3,
        "{stderr}"
    );
    assert_eq!(stderr.matches("peer, agent drain").count(), 3, "{stderr}");
    assert!(stderr.contains("peer side by side"), "{stderr}");
    let syslog_ng_ingest = table_figure(&output, "peer_syslog_ng_ingest_eps");
    let syslog_ng_drain = table_figure(&output, "peer_syslog_ng_drain_eps");
    assert!(syslog_ng_ingest > 0.0 && syslog_ng_drain > 0.0);
    assert!(table_figure(&output, "peer_syslog_ng_rss_mib") > 0.0);
    assert!(table_figure(&output, "peer_rss_mib") > 0.0);
    // The ratios are the agent's medians against syslog-ng's, as the table prints them.
    let ingest_ratio = figures["peer_ingest_eps"].as_f64().unwrap() / syslog_ng_ingest;
    assert!((table_figure(&output, "peer_ingest_ratio") - ingest_ratio).abs() < 0.01);
    let drain_ratio = figures["peer_drain_eps"].as_f64().unwrap() / syslog_ng_drain;
    assert!((table_figure(&output, "peer_drain_ratio") - drain_ratio).abs() < 0.01);
}

#[test]
fn a_missing_syslog_ng_is_named_and_its_figures_are_null() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = run(&[
        "--events",
        "500",
        "--phases",
        "peer",
        "--syslog-ng",
        dir.path().to_str().expect("a UTF-8 path"),
        "--json",
    ]);
    let figures = json_line(&output);
    for key in PEER_KEYS {
        assert!(figures[key].is_null(), "{key} = {}", figures[key]);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("--syslog-ng: no syslog-ng binary at"),
        "{stdout}"
    );
}

#[test]
fn bad_options_are_refused_with_the_option_and_its_rule() {
    for (args, named) in [
        (&["--events", "5"][..], "--events"),
        (&["--synchronous", "off"][..], "--synchronous"),
        (&["--phases", "c32,bogus"][..], "--phases"),
    ] {
        let output = run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} measured something");
    }
}

/// A figure of the table (`| `name` | value | target |`), which holds some the JSON line
/// does not.
fn table_figure(output: &Output, name: &str) -> f64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = format!("| `{name}` | ");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&row))
        .unwrap_or_else(|| panic!("no row {name} in the table:\n{stdout}"));
    let value = line[row.len()..].split(" |").next().unwrap_or_default();
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {line}"))
}

#[test]
fn the_fleet_phase_reports_its_figures_on_a_throwaway_postgresql() {
    let output = run(&[
        "--phases",
        "fleet",
        "--fleet-installs",
        "40",
        "--view-installs",
        "300",
        "--json",
    ]);
    let figures = json_line(&output);
    for key in FLEET_KEYS {
        positive(&figures, key);
    }
    let ratio = positive(&figures, "fleet_eps") / positive(&figures, "fleet_ceiling_eps");
    assert!((ratio - positive(&figures, "fleet_ratio")).abs() < 0.001);
    assert!(figures["single_c32_eps"].is_null());
    // Beside them, in the table only: the store path without HTTP, and where the CPU went.
    let store = table_figure(&output, "fleet_store_eps");
    let store_ratio = store / positive(&figures, "fleet_ceiling_eps");
    assert!((store_ratio - table_figure(&output, "fleet_store_ratio")).abs() < 0.001);
    for name in [
        "fleet_cpu_us_per_event",
        "fleet_store_cpu_us_per_event",
        "fleet_ceiling_cpu_us_per_event",
    ] {
        assert!(table_figure(&output, name) > 0.0, "{name}");
    }
}

#[test]
fn the_view_phase_times_only_the_provider_views() {
    let figures = json_line(&run(&[
        "--phases",
        "view",
        "--view-installs",
        "150",
        "--json",
    ]));
    positive(&figures, "installations_100k_ms");
    positive(&figures, "dashboard_100k_ms");
    for key in ["fleet_eps", "fleet_ratio", "single_c32_eps"] {
        assert!(figures[key].is_null(), "{key} = {}", figures[key]);
    }
}
