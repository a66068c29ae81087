//! Delivering recorded budget alerts to `ALERT_WEBHOOK_URL` (docs/install.md, "Budgets
//! and alerts on the receiver"), and the fields an alert has in both its answers
//! ([`alert_fields`]): the webhook body here, `GET /api/alerts` in
//! [`crate::views::alerts`].
//!
//! The store's alerts table is the outbox: an alert is recorded in the database first
//! ([`crate::budgets::rules`]), then every node's [`deliver_loop`] takes the ones due (a
//! lease in the database, so two nodes never post the same alert at once), POSTs each
//! signed with Standard Webhooks under `ALERT_WEBHOOK_SECRET` with `webhook-id` = its
//! `alert_id`, and marks it delivered on a `2xx`, else schedules its next attempt with
//! exponential backoff. The schedule lives in the database, so a restart or another node
//! carries on where a node stopped: an alert is never lost and never sent under another id.
//! A node dying between a `2xx` and its mark sends the alert once more, under the same id,
//! which is how Standard Webhooks consumers recognise a repeat.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use serde_json::{Map, Value, json};

use crate::billing::money::Micros;
use crate::http::clip::clip;
use crate::settings::AlertWebhook;
use crate::state::ReceiverState;
use crate::store::{Alert, DeliveryOutcome};
use usage_protocol::signing::{self, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};

/// How often a node looks for alerts due (recorded by another node, or due for a retry)
/// when nothing wakes it sooner.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a taken alert is a node's alone; past that another node may take it.
const LEASE: Duration = Duration::from_secs(60);
/// Alerts taken at a time.
const CLAIM_LIMIT: usize = 20;
/// The longest one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's wait; each later one doubles, up to `alert_retry_max`.
const FIRST_RETRY: Duration = Duration::from_secs(1);

fn money(amount: Micros) -> Value {
    amount.to_cents().to_json()
}

/// The fields an alert has in both its answers: `GET /api/alerts` and the webhook body.
pub fn alert_fields(alert: &Alert) -> Map<String, Value> {
    let Value::Object(fields) = json!({
        "alert_id": alert.alert_id,
        "install_id": alert.install_id,
        "label": alert.label,
        "threshold": alert.threshold,
        "month": alert.month,
        "cost": money(alert.cost),
        "budget": money(alert.budget),
        "currency": alert.currency,
    }) else {
        unreachable!("json! of braces is an object")
    };
    fields
}

/// The webhook body of an alert: its type, its fields and one sentence a chat webhook
/// shows.
pub fn webhook_body(alert: &Alert) -> Value {
    let name = alert.label.as_deref().unwrap_or(&alert.install_id);
    let text = format!(
        "Budget alert: {name} has reached {}% of its {} {} budget for {} ({} {} spent).",
        alert.threshold,
        alert.budget.to_cents(),
        alert.currency,
        alert.month,
        alert.cost.to_cents(),
        alert.currency,
    );
    let mut body = Map::new();
    body.insert("type".into(), "budget.threshold".into());
    body.extend(alert_fields(alert));
    body.insert("text".into(), text.into());
    Value::Object(body)
}

/// The wait before attempt `attempts + 1` of an alert whose `attempts` have failed:
/// exponential from [`FIRST_RETRY`], capped at `max`, with jitter so many nodes' retries
/// spread out.
fn retry_delay(attempts: u32, max: Duration) -> Duration {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(FIRST_RETRY.min(max))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build();
    let skip = attempts.saturating_sub(1).min(64) as usize;
    delays.nth(skip).unwrap_or(max).min(max)
}

/// Delivers alerts until the task is aborted: wakes when this node records one
/// (`app.alerts_recorded`) or every `POLL_INTERVAL` (a second).
pub async fn deliver_loop(app: Arc<ReceiverState>, webhook: AlertWebhook) {
    // reqwest is built without a default TLS crypto provider: install rustls' own (an
    // error only means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .user_agent(concat!("usage-agent-receiver/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "could not make the alert webhook client; alerts stay recorded");
            return;
        }
    };
    loop {
        let store = app.store.clone();
        let now_ms = Utc::now().timestamp_millis();
        let lease_ms = LEASE.as_millis() as i64;
        let claimed =
            tokio::task::spawn_blocking(move || store.claim_alerts(now_ms, lease_ms, CLAIM_LIMIT))
                .await;
        let alerts = match claimed {
            Ok(Ok(alerts)) => alerts,
            Ok(Err(error)) => {
                app.metrics.store_error();
                tracing::warn!(%error, "could not read the alerts due; trying again");
                Vec::new()
            }
            Err(error) => {
                tracing::error!(%error, "the alert claim task failed");
                Vec::new()
            }
        };
        let busy = alerts.len() == CLAIM_LIMIT;
        for alert in alerts {
            let outcome = deliver(&client, &webhook, &alert, app.settings.alert_retry_max).await;
            app.metrics
                .alert_delivery(matches!(outcome, DeliveryOutcome::Delivered { .. }));
            finish(&app, &alert, outcome).await;
        }
        if !busy {
            let _ = tokio::time::timeout(POLL_INTERVAL, app.alerts_recorded.notified()).await;
        }
    }
}

/// One attempt: POST the alert, signed; a `2xx` delivers it.
async fn deliver(
    client: &reqwest::Client,
    webhook: &AlertWebhook,
    alert: &Alert,
    retry_max: Duration,
) -> DeliveryOutcome {
    let body = serde_json::to_vec(&webhook_body(alert)).expect("JSON values serialize");
    let msg_id = alert.alert_id.to_string();
    let timestamp = Utc::now().timestamp();
    let signature = signing::sign(&webhook.secret, &msg_id, timestamp, &body);
    let sent = client
        .post(webhook.url.expose_secret())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(HEADER_ID, &msg_id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(body)
        .send()
        .await;
    let failure = match sent {
        Ok(answer) if answer.status().is_success() => {
            tracing::info!(alert_id = %msg_id, threshold = alert.threshold, "alert delivered");
            return DeliveryOutcome::Delivered {
                at_ms: Utc::now().timestamp_millis(),
            };
        }
        Ok(answer) => format!("answered {}", answer.status()),
        // A webhook URL often carries its secret in the path (Slack, Discord): name its
        // origin (scheme, host, port), never the URL.
        Err(error) => format!(
            "could not be reached at {}: {}",
            webhook.url.origin(),
            usage_common::logging::error_chain(&error.without_url())
        ),
    };
    let wait = retry_delay(alert.attempts, retry_max);
    tracing::warn!(
        alert_id = %msg_id,
        install_id = %clip(&alert.install_id),
        attempts = alert.attempts,
        retry_in_ms = wait.as_millis() as u64,
        "the alert webhook {}",
        clip(&failure)
    );
    DeliveryOutcome::RetryAt {
        at_ms: Utc::now().timestamp_millis() + wait.as_millis() as i64,
    }
}

async fn finish(app: &ReceiverState, alert: &Alert, outcome: DeliveryOutcome) {
    let store = app.store.clone();
    let alert_id = alert.alert_id;
    let finished = tokio::task::spawn_blocking(move || store.finish_alert(alert_id, outcome)).await;
    // Not marked: the lease runs out and the alert is sent again, under the same id.
    if let Ok(Err(error)) = finished {
        app.metrics.store_error();
        tracing::warn!(%error, %alert_id, "could not record an alert's delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn retries_wait_longer_each_time_up_to_the_cap() {
        let max = Duration::from_secs(300);
        assert!(retry_delay(1, max) <= Duration::from_secs(2));
        assert!(retry_delay(1, max) >= FIRST_RETRY);
        assert!(retry_delay(6, max) >= Duration::from_secs(32));
        assert_eq!(retry_delay(40, max), max);
        assert!(retry_delay(3, Duration::from_millis(200)) <= Duration::from_millis(200));
    }

    #[test]
    fn the_webhook_body_carries_the_fields_and_one_sentence() {
        let alert = Alert {
            alert_id: Uuid::nil(),
            install_id: "install-1".into(),
            label: Some("Example shop".into()),
            threshold: 80,
            month: "2026-11".into(),
            cost: Micros(40_125_000),
            budget: Micros(50_000_000),
            currency: "USD".into(),
            at_ms: 0,
            delivered_at_ms: None,
            attempts: 0,
        };
        let body = webhook_body(&alert);
        assert_eq!(body["type"], "budget.threshold");
        assert_eq!(body["cost"], 40.13);
        assert_eq!(body["budget"], 50.0);
        assert_eq!(
            body["text"],
            "Budget alert: Example shop has reached 80% of its 50.00 USD budget for 2026-11 \
             (40.13 USD spent)."
        );
    }
}
