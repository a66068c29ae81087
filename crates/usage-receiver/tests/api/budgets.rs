//! Budgets and alerts through the receiver's HTTP API: budgets set, shown and removed;
//! thresholds that fire once per install, threshold and month; `GET /api/alerts`; and
//! delivery to a real local webhook sink that is down for a while, signed with Standard
//! Webhooks, kept across a restart. Runs on SQLite here and on PostgreSQL in
//! `tests/postgres` (which adds two nodes on one database).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use chrono::{DateTime, NaiveTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::format_millis;
use usage_protocol::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, verify};
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverSettings;
use usage_receiver::settings::AlertWebhook;

use crate::common::{
    self, TestInstall, TestReceiver, batch_body, provider_request, receiver_settings, signed,
};
use crate::support::poll;

/// 1.00 per 1000 tokens, so 1000 tokens cost 1.00.
pub fn budget_settings() -> ReceiverSettings {
    ReceiverSettings {
        default_cost_per_1k_tokens: Some(1.0),
        alert_retry_max: Duration::from_millis(100),
        ..receiver_settings()
    }
}

pub async fn enroll(rx: &TestReceiver) -> TestInstall {
    let install = TestInstall::new();
    common::enroll(rx, &install).await;
    install
}

/// Events of `tokens` tokens in all, earlier today (UTC).
pub fn events(install: &TestInstall, tokens: u64) -> Vec<Value> {
    let now = Utc::now();
    let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
    let at: DateTime<Utc> = (now - chrono::Duration::seconds(2)).max(midnight);
    vec![json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 7),
        "source": "inline",
        "model": "m",
        "prompt_tokens": tokens / 2,
        "completion_tokens": tokens - tokens / 2,
        "total_tokens": tokens,
        "created_at": format_millis(at.timestamp_millis()),
    })]
}

/// Sends `events` as one signed batch; returns the answer's `accepted`.
pub async fn send(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> u64 {
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, events);
    let response = signed(rx, install, batch_id, &body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    answer["accepted"].as_u64().unwrap()
}

pub async fn put_budget(rx: &TestReceiver, install_id: &str, body: &str) -> (StatusCode, Value) {
    let response = provider_request(
        rx,
        Method::PUT,
        &format!("/api/installations/{install_id}/budget"),
    )
    .header("content-type", "application/json")
    .body(body.to_owned())
    .send()
    .await
    .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn put_label(rx: &TestReceiver, install_id: &str, label: &str) {
    let response = provider_request(
        rx,
        Method::PUT,
        &format!("/api/installations/{install_id}/label"),
    )
    .json(&json!({ "label": label }))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

pub async fn alerts(rx: &TestReceiver) -> Vec<Value> {
    let response = provider_request(rx, Method::GET, "/api/alerts")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["alerts"].as_array().unwrap().clone()
}

async fn installation(rx: &TestReceiver, install_id: &str) -> Value {
    let response = provider_request(rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    body["installations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["install_id"] == install_id)
        .unwrap()
        .clone()
}

fn thresholds(alerts: &[Value]) -> Vec<u64> {
    alerts
        .iter()
        .map(|alert| alert["threshold"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_budget_is_set_shown_with_its_use_and_removed() {
    let rx = TestReceiver::start(ReceiverSettings {
        default_monthly_budget: Some(200.0),
        ..budget_settings()
    });
    let install = enroll(&rx).await;
    send(&rx, &install, &events(&install, 6000)).await;

    // Without its own budget, the default applies.
    let row = installation(&rx, &install.id).await;
    assert_eq!(row["budget_monthly"], json!(200.0));
    assert_eq!(row["budget_used_pct"], json!(3.0));

    let (status, answer) = put_budget(&rx, &install.id, r#"{"monthly": 40.0}"#).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["budget"],
        json!({"monthly": 40.0, "thresholds": [50, 80, 100]})
    );
    let row = installation(&rx, &install.id).await;
    assert_eq!(row["cost_mtd"], json!(6.0));
    assert_eq!(row["budget_monthly"], json!(40.0));
    assert_eq!(row["budget_used_pct"], json!(15.0));

    let response = provider_request(
        &rx,
        Method::DELETE,
        &format!("/api/installations/{}/budget", install.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let row = installation(&rx, &install.id).await;
    assert_eq!(row["budget_monthly"], json!(200.0));
}

#[tokio::test]
async fn without_any_budget_the_installations_answer_says_null() {
    let rx = TestReceiver::start(budget_settings());
    let install = enroll(&rx).await;
    let row = installation(&rx, &install.id).await;
    assert_eq!(row["budget_monthly"], Value::Null);
    assert_eq!(row["budget_used_pct"], Value::Null);
    assert!(alerts(&rx).await.is_empty());
}

#[tokio::test]
async fn bad_budgets_name_the_field_and_unknown_installs_are_404() {
    let rx = TestReceiver::start(budget_settings());
    let install = enroll(&rx).await;
    for (body, field) in [
        (r#"{"monthly": 0}"#, "monthly"),
        (r#"{"monthly": "10"}"#, "monthly"),
        (r#"{"monthly": 10, "thresholds": [0, 50]}"#, "thresholds"),
        (r#"{"monthly": 10, "thresholds": "50"}"#, "thresholds"),
        (r#"{"monthly": 10, "weekly": 2}"#, "weekly"),
    ] {
        let (status, answer) = put_budget(&rx, &install.id, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_budget", "{answer}");
        assert_eq!(answer["error"]["details"][0]["field"], field, "{answer}");
    }
    let (status, answer) = put_budget(&rx, &install.id, "{").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    // Nothing was stored by the refused requests.
    assert_eq!(
        installation(&rx, &install.id).await["budget_monthly"],
        Value::Null
    );

    let (status, answer) = put_budget(&rx, "nobody", r#"{"monthly": 10}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_install");
    let response = provider_request(&rx, Method::DELETE, "/api/installations/nobody/budget")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let response = common::client()
        .put(rx.url(&format!("/api/installations/{}/budget", install.id)))
        .body(r#"{"monthly": 10}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = common::client()
        .get(rx.url("/api/alerts"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = provider_request(&rx, Method::GET, "/api/alerts?from=yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// Waits out the last two minutes of a UTC month, if the test starts in them: the receiver
/// takes a batch's budget month from its own clock at ingest, so a test whose batches
/// straddled a month end would see a new month's alerts. Waits at most once a month.
async fn clear_of_a_month_end() {
    let now = Utc::now();
    let first_of_next_month =
        usage_receiver::days::month_of(usage_receiver::days::day_of_ms(now.timestamp_millis())).1
            + 1;
    let month_end_ms = first_of_next_month * usage_receiver::days::MS_PER_DAY;
    if month_end_ms - now.timestamp_millis() < 120_000 {
        poll("the month to turn", Duration::from_secs(150), async || {
            (Utc::now().timestamp_millis() >= month_end_ms).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn each_threshold_fires_once_as_the_month_to_date_cost_crosses_it() {
    clear_of_a_month_end().await;
    let rx = TestReceiver::start(budget_settings());
    let install = enroll(&rx).await;
    let (status, _) = put_budget(&rx, &install.id, r#"{"monthly": 10.0}"#).await;
    assert_eq!(status, StatusCode::OK);

    // 4.99 of 10.00: below every threshold.
    send(&rx, &install, &events(&install, 4990)).await;
    assert!(alerts(&rx).await.is_empty());
    // 6.00: past 50 %.
    let first = events(&install, 1010);
    send(&rx, &install, &first).await;
    let listed = alerts(&rx).await;
    assert_eq!(thresholds(&listed), vec![50]);
    let alert = &listed[0];
    assert_eq!(alert["install_id"], install.id.as_str());
    assert_eq!(alert["label"], Value::Null);
    assert_eq!(alert["cost"], json!(6.0));
    assert_eq!(alert["budget"], json!(10.0));
    assert_eq!(alert["currency"], "USD");
    assert_eq!(alert["month"], Utc::now().format("%Y-%m").to_string());
    assert_eq!(alert["delivered_at"], Value::Null);
    assert!(alert["alert_id"].as_str().unwrap().parse::<Uuid>().is_ok());
    assert!(alert["at"].as_str().unwrap().ends_with('Z'));

    // The same batch again (all duplicates), and more under 80 %: nothing new.
    assert_eq!(send(&rx, &install, &first).await, 0);
    send(&rx, &install, &events(&install, 1000)).await;
    assert_eq!(thresholds(&alerts(&rx).await), vec![50]);
    // 12.00: past 80 % and 100 % in one batch, one alert each; alerts show the label.
    put_label(&rx, &install.id, "Example shop").await;
    send(&rx, &install, &events(&install, 5000)).await;
    let listed = alerts(&rx).await;
    assert_eq!(thresholds(&listed), vec![50, 80, 100]);
    assert!(listed.iter().all(|alert| alert["label"] == "Example shop"));
    assert_eq!(listed[2]["cost"], json!(12.0));
    let row = installation(&rx, &install.id).await;
    assert_eq!(row["budget_used_pct"], json!(120.0));

    // A later, higher threshold fires when the budget gains it; the others never again.
    put_budget(
        &rx,
        &install.id,
        r#"{"monthly": 10.0, "thresholds": [50, 110]}"#,
    )
    .await;
    send(&rx, &install, &events(&install, 10)).await;
    assert_eq!(thresholds(&alerts(&rx).await), vec![50, 80, 100, 110]);

    // Today's alerts by date; none tomorrow.
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let tomorrow = (Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let response = provider_request(&rx, Method::GET, &format!("/api/alerts?from={tomorrow}"))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert!(body["alerts"].as_array().unwrap().is_empty());
    let response = provider_request(
        &rx,
        Method::GET,
        &format!("/api/alerts?from={today}&to={today}"),
    )
    .send()
    .await
    .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["alerts"].as_array().unwrap().len(), 4);
}

/// What a webhook sink received: each request's headers and body.
#[derive(Clone, Default)]
pub struct Sink {
    pub received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    /// Requests to answer `503` before answering `204`.
    pub refuse_first: Arc<Mutex<usize>>,
}

impl Sink {
    pub fn ids(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .map(|(headers, _)| headers[HEADER_ID].to_str().unwrap().to_owned())
            .collect()
    }

    /// Serves on `addr` until the runtime ends.
    pub async fn serve(&self, addr: SocketAddr) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let sink = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let sink = sink.clone();
                async move {
                    sink.received.lock().unwrap().push((headers, body));
                    let mut refuse = sink.refuse_first.lock().unwrap();
                    if *refuse > 0 {
                        *refuse -= 1;
                        AxumStatus::SERVICE_UNAVAILABLE
                    } else {
                        AxumStatus::NO_CONTENT
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
}

/// A loopback address nothing listens on (yet).
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub fn webhook(addr: SocketAddr, secret: &Secret) -> AlertWebhook {
    AlertWebhook {
        url: format!("http://{addr}/hook").parse().unwrap(),
        secret: secret.clone(),
    }
}

/// Checks every request the sink received is signed with `secret` and carries an alert
/// whose id is its `webhook-id`; returns the bodies.
pub fn verified_bodies(sink: &Sink, secret: &Secret) -> Vec<Value> {
    let received = sink.received.lock().unwrap();
    received
        .iter()
        .map(|(headers, body)| {
            let header = |name: &str| headers[name].to_str().unwrap().to_owned();
            verify(
                secret,
                &header(HEADER_ID),
                &header(HEADER_TIMESTAMP),
                &header(HEADER_SIGNATURE),
                body,
                Utc::now().timestamp(),
                300,
            )
            .expect("the alert is signed with the webhook secret");
            let value: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(value["alert_id"], header(HEADER_ID));
            assert_eq!(headers["content-type"], "application/json");
            value
        })
        .collect()
}

#[tokio::test]
async fn alerts_reach_a_webhook_that_was_down_signed_once_each_and_survive_a_restart() {
    clear_of_a_month_end().await;
    let secret = Secret::generate();
    let sink_addr = closed_port();
    let sink = Sink::default();
    *sink.refuse_first.lock().unwrap() = 1;
    let settings = ReceiverSettings {
        alert_webhook: Some(webhook(sink_addr, &secret)),
        ..budget_settings()
    };
    let rx = TestReceiver::start(settings.clone());
    let install = enroll(&rx).await;
    put_budget(
        &rx,
        &install.id,
        r#"{"monthly": 1.0, "thresholds": [50, 100]}"#,
    )
    .await;

    // Crossing 50 % while the sink is down: recorded, not delivered, retried.
    send(&rx, &install, &events(&install, 600)).await;
    let fifty = alerts(&rx).await[0]["alert_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Stop this node with the alert undelivered; a new one on the same data carries on.
    let rx = rx.restart(settings);
    assert_eq!(alerts(&rx).await[0]["delivered_at"], Value::Null);

    sink.serve(sink_addr).await;
    // Stopped between claiming the alert and recording its attempt, the first node leaves
    // its 60 s lease to run out before another node sends the alert again.
    let delivered = poll(
        "the alert to be delivered",
        Duration::from_secs(90),
        async || {
            let listed = alerts(&rx).await;
            (!listed[0]["delivered_at"].is_null()).then_some(listed)
        },
    )
    .await;
    assert_eq!(delivered[0]["alert_id"], fifty.as_str());
    // The sink refused the first request it saw: the same alert came again, same id.
    let ids = sink.ids();
    assert!(ids.len() >= 2, "{ids:?}");
    assert!(ids.iter().all(|id| *id == fifty), "{ids:?}");

    // Crossing 100 % with the sink up: delivered, once, named by its label.
    put_label(&rx, &install.id, "Shop <One>").await;
    send(&rx, &install, &events(&install, 500)).await;
    let hundred = poll(
        "the second alert to be delivered",
        Duration::from_secs(20),
        async || {
            let listed = alerts(&rx).await;
            (listed.len() == 2 && !listed[1]["delivered_at"].is_null()).then(|| listed[1].clone())
        },
    )
    .await;
    // This node delivered both alerts, each once, after the attempt the sink refused.
    let scraped = crate::metrics::scrape(&rx).await;
    let deliveries = |result: &str| {
        scraped[&format!("usage_receiver_alert_deliveries_total{{result=\"{result}\"}}")]
    };
    assert_eq!(deliveries("delivered"), 2.0, "{scraped:#?}");
    assert!(deliveries("failed") >= 1.0, "{scraped:#?}");
    let bodies = verified_bodies(&sink, &secret);
    let last = bodies.last().unwrap();
    assert_eq!(last["type"], "budget.threshold");
    assert_eq!(last["alert_id"], hundred["alert_id"]);
    assert_eq!(last["install_id"], install.id.as_str());
    assert_eq!(last["threshold"], 100);
    assert_eq!(last["cost"], json!(1.1));
    assert_eq!(last["budget"], json!(1.0));
    assert_eq!(last["currency"], "USD");
    assert_eq!(last["month"], hundred["month"]);
    let text = last["text"].as_str().unwrap();
    assert_eq!(last["label"], "Shop <One>");
    assert!(
        text.contains("100%") && text.contains("Shop <One>"),
        "{text}"
    );
    let distinct: std::collections::BTreeSet<String> = sink.ids().into_iter().collect();
    assert_eq!(distinct.len(), 2, "each alert under its one id");
}

/// The receiver as operators run it (its own process, settings from the environment)
/// delivers an alert: nothing the test process set up (a TLS provider, say) helps it.
/// Kills a receiver process however the test ends.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the receiver binary with a 1.00 default budget and alerts to `webhook_url`
/// (its standard error to `stderr`), enrolls an install and sends it 1.50 of usage: all
/// three default thresholds at once.
async fn a_node_past_its_budget(
    webhook_url: String,
    secret: &Secret,
    stderr: std::process::Stdio,
) -> (Node, tempfile::TempDir) {
    use std::process::{Command, Stdio};
    use usage_protocol::signing::{HEADER_INSTALL_ID, sign};

    let dir = tempfile::tempdir().unwrap();
    let mut node = Node(
        Command::new(crate::bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.path().join("receiver.db"))
            .env("ENROLLMENT_TOKEN", common::ENROLL_TOKEN)
            .env("PROVIDER_USERNAME", common::PROVIDER_USER)
            .env("PROVIDER_PASSWORD", common::PROVIDER_PASSWORD)
            .env("DEFAULT_COST_PER_1K_TOKENS", "1")
            .env("DEFAULT_MONTHLY_BUDGET", "1")
            .env("ALERT_WEBHOOK_URL", webhook_url)
            .env("ALERT_WEBHOOK_SECRET", secret.to_whsec())
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let base = crate::support::announced_address(&mut node.0);

    let install = TestInstall::new();
    let enrolled = common::client()
        .post(format!("{base}/api/installations"))
        .bearer_auth(common::ENROLL_TOKEN)
        .json(&json!({
            "install_id": install.id,
            "secret": install.secret.to_whsec(),
            "site_hash": "cd".repeat(32),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(enrolled.status(), StatusCode::CREATED);
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &events(&install, 1500));
    let timestamp = Utc::now().timestamp();
    let sent = common::client()
        .post(format!("{base}/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_ID, batch_id.to_string())
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(
            HEADER_SIGNATURE,
            sign(&install.secret, &batch_id.to_string(), timestamp, &body),
        )
        .header(HEADER_INSTALL_ID, &install.id)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    (node, dir)
}

/// A webhook URL carries its secret in the path (Slack, Discord): a failed delivery logs
/// the webhook's scheme and host, never the path.
#[tokio::test]
async fn a_failed_delivery_logs_the_webhook_without_its_secret_path() {
    let secret = Secret::generate();
    let closed = closed_port();
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("stderr.log");
    let _node = a_node_past_its_budget(
        format!("http://{closed}/services/T000/B000/XXXXtokenXXXX"),
        &secret,
        std::fs::File::create(&log).unwrap().into(),
    )
    .await;
    let text = poll(
        "a failed delivery in the log",
        Duration::from_secs(20),
        async || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("the alert webhook could not be reached at")
                .then_some(text)
        },
    )
    .await;
    assert!(text.contains(&closed.to_string()), "{text}");
    assert!(
        !text.contains("XXXXtokenXXXX"),
        "the webhook's secret path in the log: {text}"
    );
}

#[tokio::test]
async fn the_receiver_binary_delivers_an_alert_set_up_by_environment() {
    let secret = Secret::generate();
    let sink_addr = closed_port();
    let sink = Sink::default();
    sink.serve(sink_addr).await;
    let _node = a_node_past_its_budget(
        format!("http://{sink_addr}/hook"),
        &secret,
        std::process::Stdio::null(),
    )
    .await;
    poll(
        "three alerts at the sink",
        Duration::from_secs(20),
        async || {
            let ids: std::collections::BTreeSet<String> = sink.ids().into_iter().collect();
            (ids.len() == 3).then_some(())
        },
    )
    .await;
    let bodies = verified_bodies(&sink, &secret);
    let mut thresholds: Vec<u64> = bodies
        .iter()
        .map(|body| body["threshold"].as_u64().unwrap())
        .collect();
    thresholds.sort_unstable();
    thresholds.dedup();
    assert_eq!(thresholds, vec![50, 80, 100]);
}

/// A budget alert as the receiver delivers it to `ALERT_WEBHOOK_URL` verifies
/// with the reference Standard Webhooks library, so any Standard Webhooks consumer can check it.
#[tokio::test]
async fn the_reference_library_verifies_a_delivered_budget_alert() {
    use crate::common::TestReceiver;
    use crate::support::standard_webhooks as python;
    use usage_protocol::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
    use usage_receiver::ReceiverSettings;

    let secret = Secret::generate();
    let sink_addr = closed_port();
    let sink = Sink::default();
    sink.serve(sink_addr).await;
    let rx = TestReceiver::start(ReceiverSettings {
        alert_webhook: Some(webhook(sink_addr, &secret)),
        ..budget_settings()
    });
    let install = enroll(&rx).await;
    put_budget(&rx, &install.id, r#"{"monthly": 1.0, "thresholds": [100]}"#).await;
    send(&rx, &install, &events(&install, 1500)).await;
    let (headers, body) = crate::support::poll(
        "the alert to reach the sink",
        std::time::Duration::from_secs(20),
        async || sink.received.lock().unwrap().first().cloned(),
    )
    .await;
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let (id, ts, signature) = (
        header(HEADER_ID),
        header(HEADER_TIMESTAMP),
        header(HEADER_SIGNATURE),
    );
    let args = ["verify", &secret.to_whsec(), &id, &ts, &signature];
    let verified = python(&args, &body);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let other = Secret::generate().to_whsec();
    let refused = python(&["verify", &other, &id, &ts, &signature], &body);
    assert_eq!(refused.status.code(), Some(1), "another secret is refused");
}
