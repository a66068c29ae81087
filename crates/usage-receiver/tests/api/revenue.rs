//! What an install earns, through the HTTP API: from the month it enrolled in and nothing
//! before, each plan for the days it was in force, nothing once erased; and its plan
//! history (`GET /api/installations/{install_id}/plans`). Enrollments are dated through the
//! store (the enrollment endpoint stamps the real clock), plan changes are made through
//! the API on the provider's clock of each receiver start, and every figure is worked out
//! by hand in the comments.

use chrono::{DateTime, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::Source;
use usage_receiver::ReceiverSettings;
use usage_receiver::store::NewEvent;

use crate::common::{
    self, PROVIDER_USER, TestInstall, TestReceiver, client, provider_request, receiver_settings,
};
use crate::support::assert_error_shape;

/// Free 3.10, pro 31.00, agency 62.00 a month: in a 31-day month 0.10, 1.00 and 2.00 a
/// day. Every token costs 0.002 per 1K: a million tokens cost 2.00. The provider's clock
/// stands at noon on `date`.
fn settings_on(date: (i32, u32, u32)) -> ReceiverSettings {
    ReceiverSettings {
        default_cost_per_1k_tokens: Some(0.002),
        plan_free_monthly: Some(3.10),
        plan_pro_monthly: Some(31.0),
        plan_agency_monthly: Some(62.0),
        provider_now: Some(noon(date)),
        ..receiver_settings()
    }
}

fn noon((year, month, day): (i32, u32, u32)) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 12, 0, 0).unwrap()
}

async fn enroll_on(rx: &TestReceiver, date: (i32, u32, u32)) -> TestInstall {
    let install = TestInstall::new();
    common::enroll_at(rx, &install, noon(date).timestamp_millis()).await;
    install
}

/// Stores `tokens` of usage of `install` at noon on `date` (through the store: the ingest
/// endpoint refuses events older than its window, and these are dated on a fixed clock).
async fn use_tokens(rx: &TestReceiver, install: &TestInstall, date: (i32, u32, u32), tokens: u64) {
    let store = rx.store.clone();
    let id = install.id.clone();
    let at = noon(date).timestamp_millis();
    tokio::task::spawn_blocking(move || {
        let key = store.find_install(&id).unwrap().unwrap().key;
        let event = NewEvent {
            event_id: Uuid::new_v4(),
            user_hash: [7; 32],
            source: Source::Inline,
            model: "any-model".into(),
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            origin: None,
            context: None,
            created_at_ms: at,
        };
        store.ingest(key, vec![event], at).unwrap();
    })
    .await
    .unwrap();
}

async fn set_plan(rx: &TestReceiver, install: &TestInstall, plan: &str) {
    let response = provider_request(
        rx,
        Method::PUT,
        &format!("/api/installations/{}/plan", install.id),
    )
    .json(&json!({ "plan": plan }))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn get(rx: &TestReceiver, path: &str) -> (StatusCode, Value) {
    let response = provider_request(rx, Method::GET, path)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn plans(rx: &TestReceiver, install: &TestInstall) -> Value {
    let (status, body) = get(rx, &format!("/api/installations/{}/plans", install.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// `(revenue, cost, profit)` of `install` in the view at `query`, and the view's rows.
async fn money(rx: &TestReceiver, query: &str, install: &TestInstall) -> (Value, Value, Value) {
    let (status, body) = get(rx, &format!("/api/usage/installations{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let row = body["installations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["install_id"] == install.id.as_str())
        .unwrap_or_else(|| panic!("{} in {body}", install.id))
        .clone();
    let suffix = if query.is_empty() { "_mtd" } else { "" };
    (
        row[format!("revenue{suffix}")].clone(),
        row[format!("cost{suffix}")].clone(),
        row[format!("profit{suffix}")].clone(),
    )
}

#[tokio::test]
async fn revenue_counts_from_the_enrollment_month_each_plan_for_its_days_and_none_once_erased() {
    // 10 March 2026: `late` enrolls that day and goes pro the same day, so it is on pro
    // from its enrollment day; `changer` and `gone` enrolled on 5 January, on free.
    let rx = TestReceiver::start(settings_on((2026, 3, 10)));
    let late = enroll_on(&rx, (2026, 3, 10)).await;
    let changer = enroll_on(&rx, (2026, 1, 5)).await;
    let gone = enroll_on(&rx, (2026, 1, 5)).await;
    set_plan(&rx, &late, "pro").await;
    // 11 March: `changer` goes pro; 21 March: agency, and `gone` goes pro.
    let rx = rx.restart(settings_on((2026, 3, 11)));
    set_plan(&rx, &changer, "pro").await;
    let rx = rx.restart(settings_on((2026, 3, 21)));
    set_plan(&rx, &changer, "agency").await;
    set_plan(&rx, &gone, "pro").await;
    // Usage: `late` 1M tokens on 5 March, before it enrolled (the agent buffers events
    // until it can send them), and 500K on 15 March; `changer` 1M and `gone` 1M on 12 March.
    use_tokens(&rx, &late, (2026, 3, 5), 1_000_000).await;
    use_tokens(&rx, &late, (2026, 3, 15), 500_000).await;
    use_tokens(&rx, &changer, (2026, 3, 12), 1_000_000).await;
    use_tokens(&rx, &gone, (2026, 3, 12), 1_000_000).await;
    // Every view from here stands on 25 March 2026.
    let rx = rx.restart(settings_on((2026, 3, 25)));

    // Each history starts at the enrollment day; a change the same day replaces the plan.
    assert_eq!(
        plans(&rx, &changer).await,
        json!([
            {"plan": "free", "from": "2026-01-05"},
            {"plan": "pro", "from": "2026-03-11"},
            {"plan": "agency", "from": "2026-03-21"},
        ])
    );
    assert_eq!(
        plans(&rx, &late).await,
        json!([{"plan": "pro", "from": "2026-03-10"}])
    );

    // Month to date, and the view without a period, count March whole.
    // late: enrolled mid-month, the whole month on pro, 31.00; cost 1.5M tokens = 3.00.
    // changer: free 1 to 10 March (10 × 0.10 = 1.00), pro 11 to 20 (10 × 1.00 = 10.00),
    // agency 21 to 31, today's plan for the rest of the month (11 × 2.00 = 22.00): 33.00;
    // cost 2.00. gone: free 1 to 20 (2.00), pro 21 to 31 (11.00): 13.00; cost 2.00.
    for query in ["", "?period=mtd"] {
        assert_eq!(
            money(&rx, query, &late).await,
            (json!(31.0), json!(3.0), json!(28.0))
        );
        assert_eq!(
            money(&rx, query, &changer).await,
            (json!(33.0), json!(2.0), json!(31.0))
        );
        assert_eq!(
            money(&rx, query, &gone).await,
            (json!(13.0), json!(2.0), json!(11.0))
        );
    }
    // Last month (February 2026): late had not enrolled, 0; changer was on free all month,
    // 3.10.
    let last_month = "?period=last_month";
    assert_eq!(
        money(&rx, last_month, &late).await,
        (json!(0.0), json!(0.0), json!(0.0))
    );
    assert_eq!(
        money(&rx, last_month, &changer).await,
        (json!(3.1), json!(0.0), json!(3.1))
    );
    // A period entirely before late's enrollment day (1 to 9 March): no revenue, and its
    // 1M tokens of 5 March cost 2.00, so profit is -2.00. changer: 9 free days, 0.90.
    let before = "?from=2026-03-01&to=2026-03-09";
    assert_eq!(
        money(&rx, before, &late).await,
        (json!(0.0), json!(2.0), json!(-2.0))
    );
    assert_eq!(
        money(&rx, before, &changer).await,
        (json!(0.9), json!(0.0), json!(0.9))
    );
    // A period across late's enrollment day (5 to 15 March): only 10 to 15 March count,
    // 6 × 1.00 = 6.00; cost 3.00. changer: free 5 to 10 (6 × 0.10 = 0.60), pro 11 to 15
    // (5 × 1.00 = 5.00): 5.60; cost 2.00, profit 3.60.
    let across = "?from=2026-03-05&to=2026-03-15";
    assert_eq!(
        money(&rx, across, &late).await,
        (json!(6.0), json!(3.0), json!(3.0))
    );
    assert_eq!(
        money(&rx, across, &changer).await,
        (json!(5.6), json!(2.0), json!(3.6))
    );
    // The last 30 days, 24 February to 25 March. late: 10 to 25 March, 16 × 1.00 = 16.00.
    // changer: 24 to 28 February on free, 3.10 × 5 / 28 = 0.553571; March 1 to 10 free
    // (1.00), 11 to 20 pro (10.00), 21 to 25 agency (5 × 2.00 = 10.00): 21.553571 → 21.55.
    assert_eq!(
        money(&rx, "?period=30d", &late).await,
        (json!(16.0), json!(3.0), json!(13.0))
    );
    assert_eq!(
        money(&rx, "?period=30d", &changer).await,
        (json!(21.55), json!(2.0), json!(19.55))
    );

    // Erased: gone's data, plan history included, is gone, and it earns nothing more; the
    // fleet's revenue is the other two's (31.00 + 33.00).
    let response = provider_request(
        &rx,
        Method::DELETE,
        &format!("/api/installations/{}", gone.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, body) = get(&rx, &format!("/api/installations/{}/plans", gone.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body, "unknown_install");
    for query in ["?period=mtd", "?period=last_month", "?period=30d"] {
        let (_, view) = get(&rx, &format!("/api/usage/installations{query}")).await;
        let ids: Vec<&str> = view["installations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["install_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&gone.id.as_str()), "{query}: {view}");
        assert_eq!(ids.len(), 2, "{query}: {view}");
    }
    let (_, view) = get(&rx, "/api/usage/installations?period=mtd").await;
    let fleet: f64 = view["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["revenue"].as_f64().unwrap())
        .sum();
    assert_eq!(fleet, 64.0);
    // Enrolled again under the same id on 25 March, it starts afresh: free from that day,
    // nothing in February, and March (its enrollment month) whole on free, 3.10.
    common::enroll_at(&rx, &gone, noon((2026, 3, 25)).timestamp_millis()).await;
    assert_eq!(
        plans(&rx, &gone).await,
        json!([{"plan": "free", "from": "2026-03-25"}])
    );
    assert_eq!(
        money(&rx, "?period=mtd", &gone).await,
        (json!(3.1), json!(0.0), json!(3.1))
    );
    assert_eq!(
        money(&rx, last_month, &gone).await,
        (json!(0.0), json!(0.0), json!(0.0))
    );
}

#[tokio::test]
async fn the_plan_history_needs_the_provider_and_a_known_install() {
    let rx = TestReceiver::start(settings_on((2026, 3, 10)));
    let install = enroll_on(&rx, (2026, 3, 1)).await;
    let path = format!("/api/installations/{}/plans", install.id);
    assert_eq!(
        plans(&rx, &install).await,
        json!([{"plan": "free", "from": "2026-03-01"}])
    );
    // Setting the plan in force records nothing.
    set_plan(&rx, &install, "free").await;
    assert_eq!(
        plans(&rx, &install).await,
        json!([{"plan": "free", "from": "2026-03-01"}])
    );

    let (status, body) = get(&rx, "/api/installations/unknown-install/plans").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body, "unknown_install");

    let anonymous = client().get(rx.url(&path)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = client()
        .get(rx.url(&path))
        .basic_auth(PROVIDER_USER, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_error_shape(&wrong.json().await.unwrap(), "unauthorized");
}
