//! `GET /metrics`: who may scrape it, the series a fresh node shows, and counters that
//! count exactly what happened on this node.

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use usage_protocol::event::format_millis;
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverSettings;
use usage_receiver::store::StoreKind;
use uuid::Uuid;

use crate::common::{
    PROVIDER_USER, TestInstall, TestReceiver, batch_body, client, enroll, provider_request,
    receiver_settings, signed,
};

const METRICS_TOKEN: &str = "test-metrics-token";

fn settings() -> ReceiverSettings {
    ReceiverSettings {
        metrics_token: Some(METRICS_TOKEN.into()),
        ..receiver_settings()
    }
}

/// Each sample of an OpenMetrics text (`name{labels}` as written) with its value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The samples of one scrape with the provider's credentials.
pub async fn scrape(rx: &TestReceiver) -> BTreeMap<String, f64> {
    let response = provider_request(rx, Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    samples(&text)
}

/// The counters a test drives, with their values on a fresh node.
fn counters_at_zero() -> BTreeMap<&'static str, f64> {
    [
        "usage_receiver_batches_total{result=\"accepted\"}",
        "usage_receiver_batches_total{result=\"refused\"}",
        "usage_receiver_batches_total{result=\"failed\"}",
        "usage_receiver_events_total{result=\"accepted\"}",
        "usage_receiver_events_total{result=\"duplicate\"}",
        "usage_receiver_events_total{result=\"rejected\"}",
        "usage_receiver_ingest_duration_seconds_count",
        "usage_receiver_rate_limited_requests_total",
        "usage_receiver_throttled_requests_total",
        "usage_receiver_credential_failures_total",
        "usage_receiver_store_errors_total",
        "usage_receiver_alert_deliveries_total{result=\"delivered\"}",
        "usage_receiver_alert_deliveries_total{result=\"failed\"}",
    ]
    .into_iter()
    .map(|series| (series, 0.0))
    .collect()
}

fn driven(scraped: &BTreeMap<String, f64>) -> BTreeMap<&'static str, f64> {
    counters_at_zero()
        .into_keys()
        .map(|series| (series, scraped.get(series).copied().unwrap_or(f64::NAN)))
        .collect()
}

#[tokio::test]
async fn a_scrape_needs_the_providers_basic_auth_or_the_metrics_token() {
    let rx = TestReceiver::start(settings());
    let url = rx.url("/metrics");
    let anonymous = client().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let wrong_password = client()
        .get(&url)
        .basic_auth(PROVIDER_USER, Some("guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_password.status(), StatusCode::UNAUTHORIZED);
    let wrong_token = client()
        .get(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_token.status(), StatusCode::UNAUTHORIZED);

    let basic = provider_request(&rx, Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::OK);
    let bearer = client()
        .get(&url)
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    assert!(
        bearer
            .text()
            .await
            .unwrap()
            .contains("usage_receiver_batches_total")
    );

    // Without METRICS_TOKEN no bearer token opens it.
    let untokened = TestReceiver::start(receiver_settings());
    let bearer = client()
        .get(untokened.url("/metrics"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_fresh_node_shows_every_series_it_knows_at_zero() {
    let rx = TestReceiver::start(settings());
    let scraped = scrape(&rx).await;
    assert_eq!(driven(&scraped), counters_at_zero(), "{scraped:#?}");
    for view in [
        "summary",
        "events",
        "installations",
        "prices",
        "alerts",
        "dashboard",
        "dashboard_detail",
    ] {
        let series = format!("usage_receiver_view_duration_seconds_count{{view=\"{view}\"}}");
        assert_eq!(scraped.get(&series), Some(&0.0), "{series}");
    }
    let pools: Vec<_> = scraped
        .keys()
        .filter(|series| series.starts_with("usage_receiver_pool_"))
        .collect();
    match crate::RECEIVER_STORE {
        // SQLite has no pool: no pool series at all.
        StoreKind::Sqlite => assert!(pools.is_empty(), "{pools:?}"),
        StoreKind::Postgres => {
            for gauge in ["size", "available", "waiting"] {
                for pool in ["main", "relaxed"] {
                    let series = format!("usage_receiver_pool_{gauge}{{pool=\"{pool}\"}}");
                    assert!(scraped.contains_key(&series), "no {series} in {pools:?}");
                }
            }
            assert!(scraped["usage_receiver_pool_size{pool=\"main\"}"] >= 1.0);
        }
    }
}

fn event(install: &TestInstall) -> Value {
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 1),
        "source": "bulk",
        "model": "gpt-4o-mini",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "created_at": format_millis(Utc::now().timestamp_millis() - 1000),
    })
}

async fn send(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> StatusCode {
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, events);
    let response = signed(rx, install, batch_id, &body).send().await.unwrap();
    response.status()
}

#[tokio::test]
async fn the_counters_show_exactly_what_happened_on_the_node() {
    let rx = TestReceiver::start(ReceiverSettings {
        rate_limit_per_min: 2,
        ..settings()
    });
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let first = event(&install);
    let mut bad = event(&install);
    bad["model"] = json!("gpt 4o");
    // One accepted and one rejected event, then the same event again: a duplicate.
    assert_eq!(
        send(&rx, &install, &[first.clone(), bad]).await,
        StatusCode::OK
    );
    assert_eq!(send(&rx, &install, &[first]).await, StatusCode::OK);
    // The third batch of the minute is over the install's limit.
    assert_eq!(
        send(&rx, &install, &[event(&install)]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A failed login.
    let login = client()
        .get(rx.url("/api/usage/summary"))
        .basic_auth(PROVIDER_USER, Some("guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);
    let summary = provider_request(&rx, Method::GET, "/api/usage/summary")
        .send()
        .await
        .unwrap();
    assert_eq!(summary.status(), StatusCode::OK);

    let mut expected = counters_at_zero();
    for (series, value) in [
        ("usage_receiver_batches_total{result=\"accepted\"}", 2.0),
        ("usage_receiver_batches_total{result=\"refused\"}", 1.0),
        ("usage_receiver_events_total{result=\"accepted\"}", 1.0),
        ("usage_receiver_events_total{result=\"duplicate\"}", 1.0),
        ("usage_receiver_events_total{result=\"rejected\"}", 1.0),
        ("usage_receiver_ingest_duration_seconds_count", 3.0),
        ("usage_receiver_rate_limited_requests_total", 1.0),
        ("usage_receiver_credential_failures_total", 1.0),
    ] {
        expected.insert(series, value);
    }
    // Every count is made before its answer is sent, so one scrape sees them all.
    let scraped = scrape(&rx).await;
    assert_eq!(driven(&scraped), expected, "{scraped:#?}");
    assert_eq!(
        scraped.get("usage_receiver_view_duration_seconds_count{view=\"summary\"}"),
        Some(&1.0),
        "only the answered summary is timed, not the refused one"
    );
}
