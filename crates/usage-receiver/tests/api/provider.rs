//! Provider views of the receiver: installations with cost, revenue and profit, plans, the
//! dashboard, the CSV summary and erasure. A real receiver on a loopback port, fed real
//! signed batches; money is checked against hand-computed amounts.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::format_millis;
use usage_protocol::signing::Secret;
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverSettings;
use usage_receiver::billing::pricing::Plan;

use crate::common::{
    self, PROVIDER_PASSWORD, PROVIDER_USER, TestInstall, TestReceiver, batch_body, client,
    provider_request, receiver_settings, signed,
};

/// Enrolls a new install with the test token.
pub(crate) async fn enroll(rx: &TestReceiver) -> TestInstall {
    let install = TestInstall::new();
    common::enroll(rx, &install).await;
    install
}

pub(crate) fn event(install: &TestInstall, model: &str, tokens: u64, at: DateTime<Utc>) -> Value {
    // Split the tokens between prompt and completion: the total is what is billed.
    let prompt = tokens / 3;
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 7),
        "source": "inline",
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": tokens - prompt,
        "total_tokens": tokens,
        "created_at": format_millis(at.timestamp_millis()),
    })
}

/// Sends `events` as one signed batch; when it is answered `200`, checks they were all
/// accepted.
pub(crate) async fn send(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> StatusCode {
    let (status, answer) = post_batch(rx, install, events).await;
    if status == StatusCode::OK {
        assert_eq!(answer["accepted"], events.len(), "{answer}");
    }
    status
}

/// Sends `events` again as a new batch; returns how many were counted as duplicates.
async fn resend_duplicates(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> u64 {
    let (status, answer) = post_batch(rx, install, events).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["accepted"], 0, "{answer}");
    answer["duplicates"].as_u64().unwrap()
}

async fn post_batch(
    rx: &TestReceiver,
    install: &TestInstall,
    events: &[Value],
) -> (StatusCode, Value) {
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, events);
    let response = signed(rx, install, batch_id, &body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub(crate) fn provider(rx: &TestReceiver, method: Method, path: &str) -> RequestBuilder {
    provider_request(rx, method, path)
}

async fn installations(rx: &TestReceiver) -> BTreeMap<String, Value> {
    let response = provider(rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["install_id"].as_str().unwrap().to_owned(), row.clone()))
        .collect()
}

pub(crate) async fn set_plan(rx: &TestReceiver, install_id: &str, body: &str) -> reqwest::Response {
    provider(
        rx,
        Method::PUT,
        &format!("/api/installations/{install_id}/plan"),
    )
    .header("content-type", "application/json")
    .body(body.to_owned())
    .send()
    .await
    .unwrap()
}

fn priced_settings(now: DateTime<Utc>) -> ReceiverSettings {
    ReceiverSettings {
        default_cost_per_1k_tokens: Some(0.002),
        model_cost_overrides: [("gpt-4o".to_owned(), 0.005), ("claude-3".to_owned(), 0.015)]
            .into_iter()
            .collect(),
        plan_pro_monthly: Some(19.0),
        plan_agency_monthly: Some(99.99),
        provider_now: Some(now),
        ..receiver_settings()
    }
}

/// An instant just before now but on today's UTC date, so the month is today's.
pub(crate) fn earlier_today(now: DateTime<Utc>) -> DateTime<Utc> {
    let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
    (now - Duration::seconds(2)).max(midnight)
}

#[tokio::test]
async fn installations_show_hand_computed_cost_revenue_and_profit() {
    let now = Utc::now();
    let rx = TestReceiver::start(priced_settings(now));
    let at = earlier_today(now);
    let a = enroll(&rx).await;
    let b = enroll(&rx).await;
    let idle = enroll(&rx).await;
    // a: 120K gpt-4o tokens at 0.005 = 0.60, plus 50K of a model with no override at the
    // default 0.002 = 0.10; cost 0.70.
    let a_events = [
        event(&a, "gpt-4o", 100_000, at),
        event(&a, "gpt-4o", 20_000, at),
        event(&a, "llama-3", 50_000, at),
    ];
    assert_eq!(send(&rx, &a, &a_events).await, StatusCode::OK);
    // Sent again: duplicates must not be billed twice.
    assert_eq!(resend_duplicates(&rx, &a, &a_events).await, 3);
    // b: 333,333 claude-3 tokens at 0.015 = 4.999995, shown as 5.00.
    assert_eq!(
        send(&rx, &b, &[event(&b, "claude-3", 333_333, at)]).await,
        StatusCode::OK
    );

    let response = set_plan(&rx, &a.id, r#"{"plan": "pro"}"#).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"install_id": a.id, "plan": "pro"})
    );

    let rows = installations(&rx).await;
    assert_eq!(rows.len(), 3);
    let row_a = &rows[&a.id];
    assert_eq!(row_a["plan"], "pro");
    assert_eq!(row_a["events_30d"], 3);
    assert_eq!(row_a["tokens_30d"], 170_000);
    assert_eq!(row_a["tokens_mtd"], 170_000);
    assert_eq!(row_a["cost_mtd"], json!(0.7));
    assert_eq!(row_a["revenue_mtd"], json!(19.0));
    assert_eq!(row_a["profit_mtd"], json!(18.3));
    // The default price is a price: only a model with none is unpriced.
    assert_eq!(row_a["unpriced_models"], json!([]));
    assert!(
        row_a["last_seen"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );

    let row_b = &rows[&b.id];
    assert_eq!(row_b["plan"], "free");
    assert_eq!(row_b["cost_mtd"], json!(5.0));
    // PLAN_FREE_MONTHLY is unset: a free install brings in nothing.
    assert_eq!(row_b["revenue_mtd"], json!(0.0));
    assert_eq!(row_b["profit_mtd"], json!(-5.0));
    assert_eq!(row_b["unpriced_models"], json!([]));

    let row_idle = &rows[&idle.id];
    assert_eq!(row_idle["last_seen"], Value::Null);
    assert_eq!(row_idle["events_30d"], 0);
    assert_eq!(row_idle["cost_mtd"], json!(0.0));

    // Moving b to agency: revenue 99.99, profit 94.99.
    assert_eq!(
        set_plan(&rx, &b.id, r#"{"plan":"agency"}"#).await.status(),
        StatusCode::OK
    );
    let row_b = &installations(&rx).await[&b.id];
    assert_eq!(row_b["revenue_mtd"], json!(99.99));
    assert_eq!(row_b["profit_mtd"], json!(94.99));
}

#[tokio::test]
async fn the_month_boundary_separates_month_to_date_from_30_days() {
    // The first of a month at least two hours in the past, so every event below is
    // already past (and at most ~61 days old, well inside what the receiver accepts).
    let real_now = Utc::now();
    let mut first = Utc
        .with_ymd_and_hms(real_now.year(), real_now.month(), 1, 0, 0, 0)
        .unwrap();
    if real_now - first < Duration::hours(2) {
        first = (first - Duration::days(1))
            .with_day(1)
            .expect("the first of a month exists");
    }
    let rx = TestReceiver::start(priced_settings(first + Duration::hours(1)));
    let install = enroll(&rx).await;
    let minute = Duration::minutes(1);
    let events = [
        // The day before the 30-day window.
        event(&install, "gpt-4o", 1, first - Duration::days(30) + minute),
        // The first day of the window, last month.
        event(&install, "gpt-4o", 10, first - Duration::days(29) + minute),
        // The last minute of last month.
        event(&install, "gpt-4o", 100, first - minute),
        // The first minute of this month: 1000 tokens at 0.005 = 0.005, rounded up to 0.01.
        event(&install, "gpt-4o", 1000, first + minute),
    ];
    assert_eq!(send(&rx, &install, &events).await, StatusCode::OK);
    let row = &installations(&rx).await[&install.id];
    assert_eq!(row["events_30d"], 3, "{row}");
    assert_eq!(row["tokens_30d"], 1110, "{row}");
    assert_eq!(row["tokens_mtd"], 1000, "{row}");
    assert_eq!(row["cost_mtd"], json!(0.01), "{row}");
    assert_eq!(row["profit_mtd"], json!(-0.01), "{row}");
}

#[tokio::test]
async fn plan_changes_are_checked() {
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    for body in [
        r#"{"plan": "gold"}"#,
        r#"{"plan": "Pro"}"#,
        r#"{}"#,
        r#"{"plan": 1}"#,
    ] {
        let response = set_plan(&rx, &install.id, body).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_plan");
        assert_eq!(error["error"]["details"][0]["field"], "plan");
    }
    let response = set_plan(&rx, &install.id, "not json").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = set_plan(&rx, "unknown-install", r#"{"plan": "pro"}"#).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(installations(&rx).await[&install.id]["plan"], "free");
}

pub(crate) async fn set_label(
    rx: &TestReceiver,
    install_id: &str,
    body: &str,
) -> reqwest::Response {
    provider(
        rx,
        Method::PUT,
        &format!("/api/installations/{install_id}/label"),
    )
    .header("content-type", "application/json")
    .body(body.to_owned())
    .send()
    .await
    .unwrap()
}

pub(crate) async fn get_text(rx: &TestReceiver, path: &str) -> String {
    let response = provider(rx, Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.text().await.unwrap()
}

async fn get_json(rx: &TestReceiver, path: &str) -> Value {
    let response = provider(rx, Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn labels_are_checked_and_shown_in_every_view() {
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    let other = enroll(&rx).await;
    assert_eq!(installations(&rx).await[&install.id]["label"], Value::Null);

    let label = "Acme, \"the\" shop <3";
    let body = json!({ "label": label }).to_string();
    let response = set_label(&rx, &install.id, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"install_id": install.id, "label": label})
    );
    // 100 characters, not bytes, is the limit.
    let longest = "é".repeat(100);
    let response = set_label(&rx, &other.id, &json!({ "label": longest }).to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);

    let rows = installations(&rx).await;
    assert_eq!(rows[&install.id]["label"], label);
    assert_eq!(rows[&other.id]["label"], longest.as_str());

    for bad in [
        json!({"label": ""}),
        json!({"label": "x".repeat(101)}),
        json!({"label": null}),
        json!({"label": 7}),
        json!({"label": "line\nbreak"}),
        json!({}),
    ] {
        let response = set_label(&rx, &install.id, &bad.to_string()).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_label", "{bad}");
        assert_eq!(error["error"]["details"][0]["field"], "label");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1 to 100 characters")
        );
    }
    let response = set_label(&rx, &install.id, "not json").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = set_label(&rx, "unknown-install", r#"{"label": "x"}"#).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_install");
    assert_eq!(installations(&rx).await[&install.id]["label"], label);

    // The dashboard shows the label (escaped), with the full id as its title.
    let page = get_text(&rx, "/dashboard").await;
    assert!(
        page.contains(&format!(
            "<span title=\"{}\">Acme, &quot;the&quot; shop &lt;3</span>",
            install.id
        )),
        "{page}"
    );
    let detail = get_text(&rx, &format!("/dashboard/installations/{}", install.id)).await;
    assert!(detail.contains("Acme, &quot;the&quot; shop &lt;3"));
    // The CSV quotes it.
    let csv = get_text(&rx, "/api/usage/installations?format=csv&sort=label").await;
    assert!(csv.contains("\"Acme, \"\"the\"\" shop <3\""), "{csv}");

    // Erased, then enrolled again under the same id: no label left.
    let erased = provider(
        &rx,
        Method::DELETE,
        &format!("/api/installations/{}", install.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(erased.status(), StatusCode::OK);
    common::enroll(&rx, &install).await;
    assert_eq!(installations(&rx).await[&install.id]["label"], Value::Null);
}

/// A receiver whose "now" is the 15th of this month at noon, or of last month early in a
/// month, so last month, this month and the last 30 days all hold past days.
fn mid_month() -> DateTime<Utc> {
    let real_now = Utc::now();
    let this_15th = Utc
        .with_ymd_and_hms(real_now.year(), real_now.month(), 15, 12, 0, 0)
        .unwrap();
    if this_15th < real_now - Duration::hours(1) {
        this_15th
    } else {
        (this_15th - Duration::days(30))
            .with_day(15)
            .expect("every month has a 15th")
    }
}

#[tokio::test]
async fn a_period_picks_the_days_of_every_figure_and_the_csv_matches_the_json() {
    let now = mid_month();
    let rx = TestReceiver::start(priced_settings(now));
    let this_month = now - Duration::days(2);
    let last_month = now - Duration::days(20);
    // The month before last (now is the 15th).
    let older = now - Duration::days(50);
    // Both enrolled the day before the oldest usage, a on pro from then on.
    let enrolled = older - Duration::days(1);
    let (a, b) = (TestInstall::new(), TestInstall::new());
    for install in [&a, &b] {
        common::enroll_at(&rx, install, enrolled.timestamp_millis()).await;
    }
    let store = rx.store.clone();
    let (id, day) = (
        a.id.clone(),
        enrolled.timestamp_millis().div_euclid(86_400_000),
    );
    tokio::task::spawn_blocking(move || store.set_plan(&id, Plan::Pro, day))
        .await
        .unwrap()
        .unwrap();
    let sent = [
        // a: 100K gpt-4o this month (0.50), 200K last month (1.00), 1M before (5.00).
        (&a, "gpt-4o", 100_000, this_month),
        (&a, "gpt-4o", 200_000, last_month),
        (&a, "gpt-4o", 1_000_000, older),
        // b: 1M claude-3 last month (15.00).
        (&b, "claude-3", 1_000_000, last_month),
    ];
    for (install, model, tokens, at) in sent {
        let events = [event(install, model, tokens, at)];
        assert_eq!(send(&rx, install, &events).await, StatusCode::OK);
    }

    // Without a period: the original answer (30 days, month to date), unchanged.
    let plain = get_json(&rx, "/api/usage/installations").await;
    assert!(plain.get("period").is_none());
    let keys: Vec<&str> = plain["installations"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "install_id",
            "label",
            "plan",
            "last_seen",
            "events_30d",
            "tokens_30d",
            "tokens_mtd",
            "cost_mtd",
            "revenue_mtd",
            "profit_mtd",
            "unpriced_models",
            "budget_monthly",
            "budget_used_pct"
        ]
    );

    let view = get_json(&rx, "/api/usage/installations?period=last_month&sort=-cost").await;
    assert_eq!(view["period"]["name"], "last_month");
    let first_of_month = now.with_day(1).unwrap();
    let last_day = first_of_month - Duration::days(1);
    assert_eq!(
        view["period"]["to"],
        last_day.format("%Y-%m-%d").to_string()
    );
    assert_eq!(
        view["period"]["from"],
        last_day.with_day(1).unwrap().format("%Y-%m-%d").to_string()
    );
    let rows = view["installations"].as_array().unwrap();
    // Highest cost first: b (15.00), then a (1.00).
    assert_eq!(rows[0]["install_id"], b.id.as_str());
    assert_eq!(rows[0]["cost"], json!(15.0));
    assert_eq!(rows[0]["tokens"], 1_000_000);
    assert_eq!(rows[1]["install_id"], a.id.as_str());
    assert_eq!(rows[1]["events"], 1);
    assert_eq!(rows[1]["cost"], json!(1.0));
    // Last month is a whole month: the whole monthly price.
    assert_eq!(rows[1]["revenue"], json!(19.0));
    assert_eq!(rows[1]["profit"], json!(18.0));

    // The CSV of the same view: the same rows, the same order, the same columns, then
    // the currency and the days; money with two decimals; a file name naming the period.
    let response = provider(
        &rx,
        Method::GET,
        "/api/usage/installations?format=csv&period=last_month&sort=-cost",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (from, to) = (
        view["period"]["from"].as_str().unwrap().to_owned(),
        view["period"]["to"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"installations-last_month-{from}-to-{to}.csv\"").as_str()
    );
    let csv = response.text().await.unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut expected_header: Vec<&str> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    expected_header.extend(["currency", "from", "to"]);
    assert_eq!(header, expected_header);
    let money = ["cost", "revenue", "profit", "budget_monthly"];
    let csv_rows: Vec<Vec<&str>> = lines.map(|line| line.split(',').collect()).collect();
    assert_eq!(csv_rows.len(), rows.len());
    for (cells, row) in csv_rows.iter().zip(rows) {
        for (key, cell) in header.iter().zip(cells) {
            let expected = match (*key, &row[*key]) {
                ("currency", _) => "USD".to_owned(),
                ("from", _) => from.clone(),
                ("to", _) => to.clone(),
                (_, Value::Null) => String::new(),
                (key, Value::Number(n)) if money.contains(&key) => {
                    format!("{:.2}", n.as_f64().unwrap())
                }
                (_, Value::String(text)) => text.clone(),
                (_, Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(";"),
                (_, other) => other.to_string(),
            };
            assert_eq!(*cell, expected, "{key}");
        }
    }
    assert_eq!(
        csv_rows[0][header.iter().position(|k| *k == "cost").unwrap()],
        "15.00"
    );

    // 30 days: a's this-month and last-month usage, revenue prorated by day.
    let view = get_json(&rx, "/api/usage/installations?period=30d").await;
    let row_a = view["installations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["install_id"] == a.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row_a["tokens"], 300_000);
    assert_eq!(row_a["cost"], json!(1.5));
    let revenue = row_a["revenue"].as_f64().unwrap();
    assert!(revenue > 17.0 && revenue < 21.0, "{row_a}");

    // Any dates: the older usage only.
    let day = older.format("%Y-%m-%d").to_string();
    let view = get_json(
        &rx,
        &format!("/api/usage/installations?from={day}&to={day}"),
    )
    .await;
    assert_eq!(view["period"]["name"], "range");
    let row_a = &view["installations"][0];
    let row_a = if row_a["install_id"] == a.id.as_str() {
        row_a.clone()
    } else {
        view["installations"][1].clone()
    };
    assert_eq!(row_a["cost"], json!(5.0));

    // The dashboard of last month: both installs, b first by cost, and a CSV link for it.
    let page = get_text(&rx, "/dashboard?period=last_month&sort=-cost").await;
    assert!(page.find(&b.id[..8]) < page.find(&a.id[..8]));
    assert!(page.contains("<td class=\"n cost\">15.00</td>"));
    assert!(page.contains(
        "href=\"/api/usage/installations?format=csv&amp;period=last_month&amp;sort=-cost\""
    ));
    // The install page of a period: only that period's model usage.
    let detail = get_text(
        &rx,
        &format!("/dashboard/installations/{}?period=last_month", a.id),
    )
    .await;
    assert!(detail.contains("200,000"), "{detail}");
    assert!(!detail.contains("1,300,000"));
    assert!(detail.contains("<td class=\"n cost\">1.00</td>"));
}

#[tokio::test]
async fn a_label_change_needs_the_provider_credentials() {
    // Its own receiver: the routes of the test above use up one address's allowance of
    // failed credentials.
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    let url = rx.url(&format!("/api/installations/{}/label", install.id));
    let attempts = [
        client().put(&url),
        client().put(&url).basic_auth(PROVIDER_USER, Some("wrong")),
    ];
    for attempt in attempts {
        let response = attempt
            .header("content-type", "application/json")
            .body(r#"{"label": "stolen"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(installations(&rx).await[&install.id]["label"], Value::Null);
}

#[tokio::test]
async fn bad_views_are_refused_naming_the_parameter_and_its_rule() {
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    let detail = format!("/dashboard/installations/{}", install.id);
    let cases = [
        ("period=week", "period"),
        ("period=mtd&from=2026-01-01&to=2026-01-02", "period"),
        ("from=2026-01-01", "to"),
        ("to=2026-01-01", "from"),
        ("from=2026-02-30&to=2026-03-01", "from"),
        ("from=2026-01-01&to=tomorrow", "to"),
        ("from=2026-01-05&to=2026-01-04", "from"),
        ("from=2020-01-01&to=2026-01-04", "to"),
        ("sort=cost_asc", "sort"),
        ("sort=--cost", "sort"),
    ];
    for (query, field) in cases {
        for base in ["/dashboard", "/api/usage/installations", detail.as_str()] {
            if base == detail && field == "sort" {
                continue;
            }
            let path = format!("{base}?{query}");
            let response = provider(&rx, Method::GET, &path).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
            if base == "/api/usage/installations" {
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "invalid_query", "{path}");
                assert_eq!(error["error"]["details"][0]["field"], field, "{path}");
                assert!(
                    error["error"]["message"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{field} must")),
                    "{path}: {error}"
                );
            } else {
                // A browser page: an HTML page naming the parameter, with a way back.
                let page = html_error(response, &path).await;
                assert!(
                    page.contains(&format!("<p id=\"error-message\">{field} must")),
                    "{path}: {page}"
                );
            }
        }
    }
    for query in [
        "page=0",
        "page=-1",
        "page=two",
        "page=1.5",
        "plan=gold",
        "sort=budget",
    ] {
        let response = provider(&rx, Method::GET, &format!("/dashboard?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        let field = query.split('=').next().unwrap();
        let page = html_error(response, query).await;
        assert!(page.contains(&format!(">{field} must")), "{query}: {page}");
    }
    let response = provider(&rx, Method::GET, "/api/usage/installations?format=xml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["details"][0]["field"], "format");
    let response = provider(&rx, Method::GET, "/api/usage/installations?plan=gold")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["details"][0]["field"], "plan");
    // An unknown parameter is refused, not ignored.
    for path in ["/dashboard?pages=2", "/api/usage/installations?page=2"] {
        let response = provider(&rx, Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    let response = provider(&rx, Method::GET, "/dashboard/installations/nope?period=30d")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let page = html_error(response, "unknown install").await;
    assert!(
        page.contains("no install with this id is enrolled"),
        "{page}"
    );
    // Without credentials the browser still gets its challenge, and a page.
    let response = client()
        .get(rx.url("/dashboard?period=week"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Basic realm="usage-agent""#
    );
    html_error(response, "no credentials").await;
}

/// A browser page's error: HTML under the dashboard's policy, with a link back.
async fn html_error(response: reqwest::Response, what: &str) -> String {
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{what}"
    );
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'"),
        "{what}"
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("<meta name=\"viewport\""), "{what}");
    assert!(
        page.contains("<a href=\"/dashboard\">Back to the dashboard</a>"),
        "{what}: {page}"
    );
    page
}

#[tokio::test]
async fn the_csv_summary_parses_and_matches_the_json() {
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    let at = earlier_today(Utc::now());
    let events = [
        event(&install, "gpt-4o", 30, at),
        event(&install, "gpt-4o", 60, at),
        event(&install, "o1", 9, at),
    ];
    assert_eq!(send(&rx, &install, &events).await, StatusCode::OK);
    let query = format!(
        "/api/usage/summary?install_id={}&group_by=day,model",
        install.id
    );
    let response = provider(&rx, Method::GET, &format!("{query}&format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = response.text().await.unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(
        header,
        [
            "day",
            "model",
            "events",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens"
        ]
    );
    let rows: Vec<BTreeMap<&str, &str>> = lines
        .map(|line| header.iter().copied().zip(line.split(',')).collect())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["model"], "gpt-4o");
    assert_eq!(rows[0]["events"], "2");
    assert_eq!(rows[0]["total_tokens"], "90");
    assert_eq!(rows[1]["model"], "o1");
    assert_eq!(rows[1]["total_tokens"], "9");
    assert_eq!(rows[0]["day"], at.format("%Y-%m-%d").to_string());

    let json: Value = provider(&rx, Method::GET, &query)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (csv_row, json_row) in rows.iter().zip(json["rows"].as_array().unwrap()) {
        for (name, value) in csv_row {
            assert_eq!(json_row[*name].to_string().trim_matches('"'), *value);
        }
    }
}

#[tokio::test]
async fn deleting_an_install_erases_all_of_its_data() {
    let rx = TestReceiver::start(receiver_settings());
    let gone = enroll(&rx).await;
    let kept = enroll(&rx).await;
    let at = earlier_today(Utc::now());
    assert_eq!(
        send(
            &rx,
            &gone,
            &[event(&gone, "m", 5, at), event(&gone, "m", 6, at)]
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        send(&rx, &kept, &[event(&kept, "m", 7, at)]).await,
        StatusCode::OK
    );

    let path = format!("/api/installations/{}", gone.id);
    let response = provider(&rx, Method::DELETE, &path).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["events_deleted"], 2);

    let rows = installations(&rx).await;
    assert!(!rows.contains_key(&gone.id));
    assert_eq!(rows[&kept.id]["tokens_30d"], 7);
    let summary: Value = provider(
        &rx,
        Method::GET,
        &format!("/api/usage/summary?install_id={}", gone.id),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(summary["totals"]["events"], 0);
    let all: Value = provider(&rx, Method::GET, "/api/usage/summary")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["totals"]["events"], 1);
    // The enrollment is gone too: its batches are refused until it enrolls again.
    assert_eq!(
        send(&rx, &gone, &[event(&gone, "m", 5, at)]).await,
        StatusCode::UNAUTHORIZED
    );
    let again = provider(&rx, Method::DELETE, &path).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let detail = provider(
        &rx,
        Method::GET,
        &format!("/dashboard/installations/{}", gone.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(detail.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_dashboard_is_locked_down_html_with_every_install() {
    let now = Utc::now();
    let rx = TestReceiver::start(priced_settings(now));
    let at = earlier_today(now);
    let cheap = enroll(&rx).await;
    let dear = enroll(&rx).await;
    assert_eq!(
        send(&rx, &cheap, &[event(&cheap, "gpt-4o", 1000, at)]).await,
        StatusCode::OK
    );
    assert_eq!(
        send(&rx, &dear, &[event(&dear, "claude-3", 1_000_000, at)]).await,
        StatusCode::OK
    );

    let response = provider(&rx, Method::GET, "/dashboard?sort=-profit")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("script-src"), "{csp}");
    let page = response.text().await.unwrap();
    assert!(!page.contains("<script"));
    assert!(page.contains("<svg"));
    // Highest profit first: cheap (-0.01) before dear (-15.00).
    let cheap_at = page.find(&cheap.id).expect("cheap install listed");
    let dear_at = page.find(&dear.id).expect("dear install listed");
    assert!(cheap_at < dear_at);
    assert!(page.contains("-15.00"));
    assert!(page.contains("-15.01 USD"), "the totals strip");

    let page = provider(&rx, Method::GET, "/dashboard?sort=profit")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.find(&dear.id) < page.find(&cheap.id));

    let detail = provider(
        &rx,
        Method::GET,
        &format!("/dashboard/installations/{}", dear.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(detail.status(), StatusCode::OK);
    assert!(
        detail.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    let detail = detail.text().await.unwrap();
    assert!(detail.contains("claude-3"));
    assert!(detail.contains("inline"));
    assert!(detail.contains(&user_hash(&dear.id, 7)));
    // 1M claude-3 tokens at 0.015 per 1K: 15.00, by model and by source.
    assert_eq!(
        detail.matches("<td class=\"n cost\">15.00</td>").count(),
        3,
        "by model, by source and by user: {detail}"
    );
    assert!(detail.contains("<section id=\"alerts\">"));
}

#[tokio::test]
async fn every_provider_route_refuses_missing_or_wrong_credentials() {
    let rx = TestReceiver::start(receiver_settings());
    let install = enroll(&rx).await;
    let plan = format!("/api/installations/{}/plan", install.id);
    let erase = format!("/api/installations/{}", install.id);
    let detail = format!("/dashboard/installations/{}", install.id);
    let routes = [
        (Method::GET, "/api/usage/installations"),
        (Method::GET, "/api/prices"),
        (Method::GET, "/api/usage/summary"),
        (Method::GET, "/api/usage/summary?format=csv"),
        (Method::GET, "/api/usage/events"),
        (Method::PUT, plan.as_str()),
        (Method::DELETE, erase.as_str()),
        (Method::GET, "/dashboard"),
        (Method::GET, detail.as_str()),
    ];
    for (method, path) in routes {
        let attempts = [
            client().request(method.clone(), rx.url(path)),
            client()
                .request(method.clone(), rx.url(path))
                .basic_auth(PROVIDER_USER, Some("wrong")),
            client()
                .request(method.clone(), rx.url(path))
                .basic_auth("someone", Some(PROVIDER_PASSWORD)),
        ];
        for attempt in attempts {
            let response = attempt
                .header("content-type", "application/json")
                .body(r#"{"plan": "agency"}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path}"
            );
            assert_eq!(
                response.headers()["www-authenticate"],
                r#"Basic realm="usage-agent""#,
                "{method} {path}"
            );
        }
    }
    // Nothing the refused requests asked for happened.
    let rows = installations(&rx).await;
    assert_eq!(rows[&install.id]["plan"], "free");
}

#[tokio::test]
async fn the_dashboard_lists_a_thousand_installs() {
    use usage_protocol::event::Source;
    use usage_receiver::store::{NewEvent, NewInstall};

    // A fixed clock on the last day of a 31-day month, so the month to date holds all 30
    // days of every install's events whatever day the suite runs.
    let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
    let rx = TestReceiver::start(priced_settings(now));
    let store = rx.store.clone();
    let at = now.timestamp_millis();
    tokio::task::spawn_blocking(move || {
        for n in 0..1000u32 {
            let install_id = format!("install-{n:04}");
            store
                .enroll(&NewInstall {
                    install_id: install_id.clone(),
                    secret: Secret::generate(),
                    site_hash: "cd".repeat(32),
                    enrolled_at_ms: at,
                })
                .unwrap();
            let key = store.find_install(&install_id).unwrap().unwrap().key;
            // 30 days × 2 models: 60 rollup rows per install, 60,000 in all.
            let events: Vec<NewEvent> = (0..60)
                .map(|i| NewEvent {
                    event_id: Uuid::new_v4(),
                    user_hash: [1; 32],
                    source: Source::Bulk,
                    model: if i % 2 == 0 { "gpt-4o" } else { "llama-3" }.into(),
                    // 1,000 prompt tokens more per install: 21 cents more a month, so
                    // no two installs tie on cost once rounded to cents.
                    prompt_tokens: 1_000 * (1 + u64::from(n)),
                    completion_tokens: 50,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    origin: None,
                    context: None,
                    created_at_ms: at - i64::from(i / 2) * 86_400_000,
                })
                .collect();
            store.ingest(key, events, at).unwrap();
        }
    })
    .await
    .unwrap();

    let mut fastest = std::time::Duration::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let response = provider(&rx, Method::GET, "/dashboard?sort=-profit")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let page = response.text().await.unwrap();
        fastest = fastest.min(started.elapsed());
        // One page of 100, and the count of all.
        assert_eq!(page.matches(r#"<tr class="install">"#).count(), 100);
        assert!(page.contains("1,000 installs"));
    }
    // Reported, not asserted: speed is a benchmark's business, not a test's (shared,
    // noisy machines). The 100 ms target was read off this line.
    println!("dashboard with 1000 installs: {fastest:?}");
    // Sorted by cost, highest first, over every install: the last ones enrolled used the
    // most prompt tokens. Page 10 ends with the cheapest, page 1 starts with the dearest.
    let first = provider(&rx, Method::GET, "/dashboard?sort=-cost")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dearest = first
        .find("install-0999")
        .expect("the dearest install on page 1");
    let next = first
        .find("install-0998")
        .expect("the next dearest on page 1");
    assert!(dearest < next, "the dearest install comes first");
    let page = provider(&rx, Method::GET, "/dashboard?sort=-cost&page=10")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page.matches(r#"<tr class="install">"#).count(), 100);
    assert!(page.contains("install-0000") && !page.contains("install-0999"));
    assert!(page.contains("Page 10 of 10"));
    let past = provider(&rx, Method::GET, "/dashboard?page=11")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::OK);
    assert_eq!(
        past.text()
            .await
            .unwrap()
            .matches(r#"<tr class="install">"#)
            .count(),
        0
    );
    let rows = installations(&rx).await;
    assert_eq!(rows.len(), 1000);
    assert_eq!(rows["install-0000"]["events_30d"], 60);
}

/// Per million tokens: gpt-4o-mini 0.15 in, 0.075 cached, 0.1875 cache write, 0.60 out;
/// "o-*" 2.00 in, 8.00 out, 10.00 reasoning, and a dearer "o-*" only from tomorrow.
fn price_book(tomorrow: &str) -> String {
    format!(
        r#"currency = "USD"
[[model]]
match = "gpt-4o-mini"
effective_from = "2000-01-01"
input_per_mtok = 0.15
cached_input_per_mtok = 0.075
cache_write_per_mtok = 0.1875
output_per_mtok = 0.60
[[model]]
match = "o-*"
effective_from = "2000-01-01"
input_per_mtok = 2.00
output_per_mtok = 8.00
reasoning_per_mtok = 10.00
[[model]]
match = "o-*"
effective_from = "{tomorrow}"
input_per_mtok = 100
output_per_mtok = 100
"#
    )
}

/// An event with every token kind: `[prompt, completion, cached, cache_write, reasoning]`.
fn kinds_event(install: &TestInstall, model: &str, kinds: [u64; 5], at: DateTime<Utc>) -> Value {
    let [prompt, completion, cached, cache_write, reasoning] = kinds;
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 7),
        "source": "inline",
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
        "total_tokens": prompt + completion,
        "created_at": format_millis(at.timestamp_millis()),
    })
}

#[tokio::test]
async fn a_price_book_prices_each_token_kind_and_is_answered_at_api_prices() {
    let now = Utc::now();
    let tomorrow = (now + Duration::days(1)).format("%Y-%m-%d").to_string();
    let book = usage_receiver::billing::price_book::PriceBook::parse(&price_book(&tomorrow));
    let rx = TestReceiver::start(ReceiverSettings {
        price_book: Some(book.unwrap()),
        model_cost_overrides: [("flat".to_owned(), 0.005)].into_iter().collect(),
        provider_now: Some(now),
        ..receiver_settings()
    });
    let at = earlier_today(now);
    let install = enroll(&rx).await;
    let events = [
        // 500K × 0.15 + 400K × 0.075 + 100K × 0.1875 + 200K × 0.60 per million
        // = 0.075 + 0.03 + 0.01875 + 0.12 = 0.24375.
        kinds_event(
            &install,
            "gpt-4o-mini",
            [1_000_000, 200_000, 400_000, 100_000, 0],
            at,
        ),
        // The prefix, today's entry: 10K × 2 + 10K × 8 + 20K × 10 per million = 0.30.
        kinds_event(&install, "o-large", [10_000, 30_000, 0, 0, 20_000], at),
        // Not in the book: the override, 0.005 per 1K of every token = 0.005.
        kinds_event(&install, "flat", [600, 400, 600, 0, 400], at),
        // No price anywhere: adds 0.
        kinds_event(&install, "mystery", [5_000, 0, 0, 0, 0], at),
    ];
    assert_eq!(send(&rx, &install, &events).await, StatusCode::OK);
    let row = &installations(&rx).await[&install.id];
    // 0.24375 + 0.30 + 0.005 = 0.54875, shown as 0.55.
    assert_eq!(row["cost_mtd"], json!(0.55), "{row}");
    assert_eq!(row["tokens_mtd"], 1_246_000, "{row}");
    assert_eq!(row["unpriced_models"], json!(["mystery"]), "{row}");

    let response = provider(&rx, Method::GET, "/api/prices")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let prices: Value = response.json().await.unwrap();
    assert_eq!(prices["currency"], "USD");
    let models = prices["model"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(
        models[0],
        json!({
            "match": "gpt-4o-mini",
            "effective_from": "2000-01-01",
            "input_per_mtok": 0.15,
            "cached_input_per_mtok": 0.075,
            "cache_write_per_mtok": 0.1875,
            "output_per_mtok": 0.6,
            "reasoning_per_mtok": 0.6,
        })
    );
    // Defaults filled in: cached and cache write as input, reasoning as given.
    assert_eq!(models[1]["cached_input_per_mtok"], json!(2.0));
    assert_eq!(models[1]["reasoning_per_mtok"], json!(10.0));
    assert_eq!(models[2]["effective_from"], json!(tomorrow));
    assert_eq!(
        prices["fallback"]["model_cost_overrides"],
        json!({"flat": 0.005})
    );
    assert_eq!(
        prices["fallback"]["default_cost_per_1k_tokens"],
        Value::Null
    );

    let anonymous = client().get(rx.url("/api/prices")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn prices_check_accepts_the_example_and_names_the_line_and_key_of_a_mistake() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/prices.example.toml"
    );
    let output = std::process::Command::new(crate::bin())
        .args(["prices", "check", example])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("prices.toml");
    std::fs::write(
        &bad,
        "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2025-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\ncache_read_per_mtok = 1\n",
    )
    .unwrap();
    let output = std::process::Command::new(crate::bin())
        .args(["prices", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 7, key `model.cache_read_per_mtok`"),
        "{stderr}"
    );
}
