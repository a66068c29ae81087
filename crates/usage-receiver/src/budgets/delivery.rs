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
//! exponential backoff. A node takes no more alerts at a time than it can attempt, each
//! to its timeout, within half their lease, and attempts none once its lease could run out
//! first, so no alert is posted by two nodes. The schedule lives in the database, so a
//! restart or another node carries on where a node stopped: an alert is never lost and
//! never sent under another id.
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
/// The longest one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest connecting to the webhook may take, within [`ATTEMPT_TIMEOUT`]: a host
/// that never answers is given up on sooner.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
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

/// The times a node delivers by: [`Pacing::NODE`]; the tests scale them down.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    poll: Duration,
    lease: Duration,
    attempt_timeout: Duration,
    connect_timeout: Duration,
}

impl Pacing {
    const NODE: Pacing = Pacing {
        poll: POLL_INTERVAL,
        lease: LEASE,
        attempt_timeout: ATTEMPT_TIMEOUT,
        connect_timeout: CONNECT_TIMEOUT,
    };

    /// Alerts taken at a time: as many as can be attempted one after another, each
    /// taking its whole timeout, within half the lease (three, at 10 s an attempt under a
    /// 60 s lease), so every alert taken is attempted while it is this node's alone.
    fn claim_limit(self) -> usize {
        let per_attempt = self.attempt_timeout.as_millis().max(1);
        usize::try_from(self.lease.as_millis() / 2 / per_attempt)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Whether an attempt begun `since` the claim could outlast the lease: then the
    /// alerts left are not attempted, and are taken again once their lease is over.
    fn lease_too_short(self, since: Duration) -> bool {
        since + self.attempt_timeout >= self.lease
    }
}

/// The HTTP client of every delivery. It follows no redirect: a redirect would send the
/// signed alert wherever the webhook points, so a `3xx` is a failed delivery, retried.
fn webhook_client(pacing: Pacing) -> reqwest::Result<reqwest::Client> {
    // reqwest is built without a default TLS crypto provider: install rustls' own (an
    // error only means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(pacing.attempt_timeout)
        .connect_timeout(pacing.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("usage-agent-receiver/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Delivers alerts until the task is aborted: wakes when this node records one
/// (`app.alerts_recorded`) or every `POLL_INTERVAL` (a second).
pub async fn deliver_loop(app: Arc<ReceiverState>, webhook: AlertWebhook) {
    deliver_paced(app, webhook, Pacing::NODE).await;
}

async fn deliver_paced(app: Arc<ReceiverState>, webhook: AlertWebhook, pacing: Pacing) {
    let client = match webhook_client(pacing) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "could not make the alert webhook client; alerts stay recorded");
            return;
        }
    };
    loop {
        let store = app.store.clone();
        let claimed_at = std::time::Instant::now();
        let now_ms = Utc::now().timestamp_millis();
        let lease_ms = pacing.lease.as_millis() as i64;
        let limit = pacing.claim_limit();
        let claimed =
            tokio::task::spawn_blocking(move || store.claim_alerts(now_ms, lease_ms, limit)).await;
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
        let busy = alerts.len() == limit;
        for alert in alerts {
            if pacing.lease_too_short(claimed_at.elapsed()) {
                // Slow store calls ate the lease: another node may take these now.
                break;
            }
            let outcome = deliver(&client, &webhook, &alert, app.settings.alert_retry_max).await;
            app.metrics
                .alert_delivery(matches!(outcome, DeliveryOutcome::Delivered { .. }));
            finish(&app, &alert, outcome).await;
        }
        if !busy {
            let _ = tokio::time::timeout(pacing.poll, app.alerts_recorded.notified()).await;
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
    fn a_claim_is_as_many_alerts_as_half_the_lease_can_attempt() {
        assert_eq!(Pacing::NODE.claim_limit(), 3);
        assert!(!Pacing::NODE.lease_too_short(Duration::from_secs(49)));
        assert!(Pacing::NODE.lease_too_short(Duration::from_secs(50)));
        let slow = Pacing {
            attempt_timeout: Duration::from_secs(90),
            ..Pacing::NODE
        };
        assert_eq!(slow.claim_limit(), 1);
    }

    #[test]
    fn retries_wait_longer_each_time_up_to_the_cap() {
        let max = Duration::from_secs(300);
        assert!(retry_delay(1, max) <= Duration::from_secs(2));
        assert!(retry_delay(1, max) >= FIRST_RETRY);
        assert!(retry_delay(6, max) >= Duration::from_secs(32));
        assert_eq!(retry_delay(40, max), max);
        assert!(retry_delay(3, Duration::from_millis(200)) <= Duration::from_millis(200));
    }

    fn test_alert() -> Alert {
        Alert {
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
        }
    }

    #[test]
    fn the_webhook_body_carries_the_fields_and_one_sentence() {
        let alert = test_alert();
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

    /// A webhook host that never completes a connection is given up on well before the
    /// attempt's own timeout: a listener whose accept queue is full drops every further
    /// handshake, so a connection to it hangs.
    #[tokio::test]
    async fn a_webhook_that_never_accepts_is_given_up_on_at_the_connect_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        loop {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(300), connect).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(error)) => panic!("connecting to the listener: {error}"),
                Err(_) => break,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        let webhook = AlertWebhook {
            url: format!("http://{addr}/hook").parse().unwrap(),
            secret: signing::Secret::generate(),
        };
        let client = webhook_client(Pacing::NODE).unwrap();
        let started = std::time::Instant::now();
        let outcome = deliver(&client, &webhook, &test_alert(), Duration::from_secs(1)).await;
        assert!(matches!(outcome, DeliveryOutcome::RetryAt { .. }));
        let took = started.elapsed();
        assert!(
            took < CONNECT_TIMEOUT + Duration::from_secs(2) && CONNECT_TIMEOUT < ATTEMPT_TIMEOUT,
            "gave up after {took:?}"
        );
    }

    /// Two nodes sharing one database, delivering to a webhook that takes two fifths of an
    /// attempt's time to answer, post every alert once: no node takes more alerts than it
    /// can attempt while they are leased to it (twenty at once let the idle node take the
    /// busy one's last alerts again). Every time is scaled down fiftyfold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_and_a_slow_webhook_deliver_each_alert_once() {
        use crate::store::{NewAlert, NewInstall};
        let pacing = Pacing {
            poll: POLL_INTERVAL / 50,
            lease: LEASE / 50,
            attempt_timeout: ATTEMPT_TIMEOUT / 50,
            connect_timeout: CONNECT_TIMEOUT / 50,
        };
        let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = received.clone();
        // Well within an attempt's time, so no attempt times out after reaching the sink.
        let answer_after = pacing.attempt_timeout * 2 / 5;
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let sink = sink.clone();
                async move {
                    tokio::time::sleep(answer_after).await;
                    let id = headers[HEADER_ID].to_str().unwrap().to_owned();
                    sink.lock().unwrap().push(id);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::ReceiverStore> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("receiver.db")).unwrap(),
        );
        store
            .enroll(&NewInstall {
                install_id: "install".into(),
                secret: signing::Secret::generate(),
                site_hash: "site".into(),
                enrolled_at_ms: 0,
            })
            .unwrap();
        let install = store.find_install("install").unwrap().unwrap().key;
        let now_ms = Utc::now().timestamp_millis();
        let alerts: Vec<NewAlert> = (1..=20)
            .map(|threshold| NewAlert {
                alert_id: Uuid::now_v7(),
                install,
                threshold,
                month: "2026-12".into(),
                cost: Micros(1),
                budget: Micros(1),
                currency: "USD".into(),
                at_ms: now_ms,
            })
            .collect();
        assert_eq!(store.record_alerts(&alerts).unwrap().len(), 20);

        let webhook = AlertWebhook {
            url: format!("http://{addr}/hook").parse().unwrap(),
            secret: signing::Secret::generate(),
        };
        let settings = crate::settings::ReceiverSettings {
            alert_retry_max: Duration::from_millis(100),
            ..Default::default()
        };
        let nodes: Vec<_> = (0..2)
            .map(|_| {
                let node = Arc::new(ReceiverState::new(settings.clone(), store.clone()));
                tokio::spawn(deliver_paced(node, webhook.clone(), pacing))
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store
            .alerts(crate::store::TimeRange::default())
            .unwrap()
            .iter()
            .any(|alert| alert.delivered_at_ms.is_none())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "alerts still undelivered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for node in nodes {
            node.abort();
        }
        let received = received.lock().unwrap().clone();
        let distinct: std::collections::BTreeSet<&String> = received.iter().collect();
        assert_eq!(distinct.len(), 20);
        assert_eq!(received.len(), 20, "an alert was posted more than once");
    }
}
