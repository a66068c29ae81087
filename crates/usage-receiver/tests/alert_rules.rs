//! The receiver's shipped alert rules (contrib/prometheus/receiver-alerts.yml): valid, firing
//! when their unit tests say they should, and naming only series a node serves.

use std::process::Command;

use usage_receiver::metrics::Metrics;
use usage_receiver::store::PoolUse;

const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/prometheus");

/// Runs `promtool` with `args` from `contrib/prometheus/` and asserts it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(RULES_DIR)
        .output()
        .expect("promtool must be installed (.ci/setup installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_shipped_receiver_alert_rules_are_valid_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "receiver-alerts.yml"]);
    assert!(checked.contains("6 rules found"), "{checked}");
    // The unit tests feed each rule series that must and must not alert.
    promtool(&["test", "rules", "receiver-alerts.test.yml"]);
}

#[test]
fn the_receiver_alert_rules_only_name_series_a_node_serves() {
    let rules = std::fs::read_to_string(format!("{RULES_DIR}/receiver-alerts.yml")).unwrap();
    // A fresh node serves every series at 0 but the pool gauges, which a PostgreSQL node
    // sets at each scrape.
    let served = Metrics::new().encode(&[PoolUse {
        pool: "main",
        size: 4,
        available: 4,
        waiting: 0,
    }]);
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("usage_receiver_") {
            named += 1;
            assert!(
                served.contains(&format!("\n{word}{{")) || served.contains(&format!("\n{word} ")),
                "receiver-alerts.yml names {word}, which GET /metrics does not serve:\n{served}"
            );
        }
    }
    assert!(named >= 6, "the rules name the receiver's metrics");
}
