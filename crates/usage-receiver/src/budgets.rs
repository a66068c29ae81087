//! Budgets (SPEC 11): `PUT` and `DELETE /api/installations/{install_id}/budget`, and the
//! check after each batch that records an alert when an install's month-to-date cost has
//! crossed a threshold of its budget.
//!
//! An alert fires once per install, threshold and calendar month (UTC) whatever the nodes,
//! retries and restarts: the store's unique key on those three skips a second recording.
//! The check runs after every batch of an install with a budget, duplicates included, so
//! a node that died between storing a batch and recording its alert leaves the alert to
//! the agent's retry of that batch (or the install's next one) to record.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::ReceiverState;
use super::clip::clip;
use super::error::{ReceiverError, json_body};
use super::ingest::body_rejection;
use super::installations::{change_install, usage_window};
use super::pricing::{Cents, Micros};
use super::provider::authorize;
use super::store::{Budget, DayRange, Install, NewAlert, ReceiverStoreError, month_of_day};

/// Thresholds of a budget that names none, in percent.
pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];
/// Most thresholds one budget may have.
const MAX_THRESHOLDS: usize = 10;
/// Highest threshold, in percent: alerts far past the budget still make sense, a typo
/// such as 8000 does not.
const MAX_THRESHOLD: u32 = 1000;
/// Largest monthly budget, in currency units.
const MAX_MONTHLY: f64 = 1e9;

/// The budget that applies to an install: its own, else `DEFAULT_MONTHLY_BUDGET` with the
/// default thresholds.
pub fn budget_in_force(app: &ReceiverState, own: Option<&Budget>) -> Option<Budget> {
    own.cloned().or_else(|| {
        app.settings
            .default_monthly_budget
            .map(|monthly| Budget {
                monthly: Micros::from_units(monthly),
                thresholds: DEFAULT_THRESHOLDS.to_vec(),
            })
            .filter(|budget| budget.monthly.0 > 0)
    })
}

/// How much of `budget` a month-to-date cost of `cost` cents uses, in percent to one
/// decimal, as the installations answer shows it.
pub fn used_pct(cost: Cents, budget: &Budget) -> f64 {
    let budget_cents = budget.monthly.to_cents().0;
    if budget_cents <= 0 {
        return 0.0;
    }
    (cost.0 as f64 * 1000.0 / budget_cents as f64).round() / 10.0
}

/// After a batch of `install` was stored (or found to be all duplicates): records an alert
/// for each threshold of `budget` (the one [`budget_in_force`]) that its month-to-date cost
/// has reached and that has no alert this month yet. Returns the ids of the alerts
/// recorded now.
pub fn check_after_ingest(
    app: &ReceiverState,
    install: &Install,
    budget: &Budget,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, ReceiverStoreError> {
    let window = usage_window(now);
    let month = month_of_day(window.today);
    let days = DayRange {
        first: window.month_start,
        last: window.today,
    };
    let spend = app.store.month_spend(install.key, days, &month)?;
    let pending: Vec<u32> = budget
        .thresholds
        .iter()
        .copied()
        .filter(|threshold| !spend.alerted.contains(threshold))
        .collect();
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let cost = app.pricing.price(&spend.usage).cost;
    let reached = |threshold: u32| {
        i128::from(cost.0) * 100 >= i128::from(threshold) * i128::from(budget.monthly.0)
    };
    let alerts: Vec<NewAlert> = pending
        .into_iter()
        .filter(|&threshold| reached(threshold))
        .map(|threshold| NewAlert {
            alert_id: Uuid::now_v7(),
            install: install.key,
            threshold,
            month: month.clone(),
            cost,
            budget: budget.monthly,
            currency: app.pricing.currency().to_owned(),
            at_ms: now.timestamp_millis(),
        })
        .collect();
    if alerts.is_empty() {
        return Ok(Vec::new());
    }
    let recorded = app.store.record_alerts(&alerts)?;
    for alert in alerts.iter().filter(|a| recorded.contains(&a.alert_id)) {
        tracing::info!(
            install_id = %clip(&install.install_id),
            threshold = alert.threshold,
            month = %alert.month,
            cost = %cost.to_cents(),
            budget = %budget.monthly.to_cents(),
            "budget threshold crossed"
        );
    }
    if !recorded.is_empty() {
        app.alerts_recorded.notify_one();
    }
    Ok(recorded)
}

/// `PUT /api/installations/{install_id}/budget` with `{"monthly": 50.0, "thresholds":
/// [50, 80, 100]}` (thresholds optional).
pub async fn set(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let body = body.map_err(body_rejection)?;
    let budget = parse_budget(&body)?;
    let stored = budget.clone();
    change_install(&app, &install_id, move |store, id| {
        store.set_budget(id, Some(&stored))
    })
    .await?;
    tracing::info!(install_id = %clip(&install_id), monthly = %budget.monthly.to_cents(), "budget set");
    Ok(Json(json!({
        "install_id": install_id,
        "budget": budget_json(&budget),
    })))
}

/// `DELETE /api/installations/{install_id}/budget`: the install falls back to
/// `DEFAULT_MONTHLY_BUDGET`, if set.
pub async fn remove(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    change_install(&app, &install_id, |store, id| store.set_budget(id, None)).await?;
    tracing::info!(install_id = %clip(&install_id), "budget removed");
    Ok(Json(json!({"install_id": install_id, "budget": null})))
}

pub fn budget_json(budget: &Budget) -> Value {
    json!({
        "monthly": budget.monthly.to_cents().to_json(),
        "thresholds": budget.thresholds,
    })
}

/// Reads a budget body, naming the field and the rule of the first mistake.
pub fn parse_budget(body: &[u8]) -> Result<Budget, ReceiverError> {
    let value = json_body(body)?;
    let Some(object) = value.as_object() else {
        return Err(invalid("body", "must be a JSON object"));
    };
    if let Some(unknown) = object
        .keys()
        .find(|key| !matches!(key.as_str(), "monthly" | "thresholds"))
    {
        return Err(invalid(
            unknown,
            "is not a budget field (monthly, thresholds)",
        ));
    }
    let monthly = object
        .get("monthly")
        .and_then(Value::as_f64)
        .filter(|amount| amount.is_finite() && *amount > 0.0 && *amount <= MAX_MONTHLY)
        .ok_or_else(|| {
            invalid(
                "monthly",
                "must be a positive amount in currency units, at most 1e9",
            )
        })?;
    let monthly = Micros::from_units(monthly);
    if monthly.to_cents().0 == 0 {
        return Err(invalid("monthly", "must be at least one cent"));
    }
    let thresholds = match object.get("thresholds") {
        None | Some(Value::Null) => DEFAULT_THRESHOLDS.to_vec(),
        Some(Value::Array(items)) => {
            let rule = "must be 1 to 10 whole percentages from 1 to 1000, such as [50, 80, 100]";
            if items.is_empty() || items.len() > MAX_THRESHOLDS {
                return Err(invalid("thresholds", rule));
            }
            let mut thresholds = Vec::with_capacity(items.len());
            for item in items {
                let threshold = item
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_THRESHOLD).contains(n))
                    .ok_or_else(|| invalid("thresholds", rule))?;
                thresholds.push(threshold);
            }
            thresholds.sort_unstable();
            thresholds.dedup();
            thresholds
        }
        Some(_) => {
            return Err(invalid(
                "thresholds",
                "must be an array of whole percentages, such as [50, 80, 100]",
            ));
        }
    };
    Ok(Budget {
        monthly,
        thresholds,
    })
}

fn invalid(field: &str, rule: &str) -> ReceiverError {
    ReceiverError::invalid_field("invalid_budget", field, rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_field(body: &str) -> String {
        let error = parse_budget(body.as_bytes()).unwrap_err();
        assert_eq!(error.status.as_u16(), 422, "{body}: {}", error.message);
        error.message.split(' ').next().unwrap().to_owned()
    }

    #[test]
    fn a_budget_body_is_read_with_default_thresholds_sorted_and_distinct() {
        let budget = parse_budget(br#"{"monthly": 50.0}"#).unwrap();
        assert_eq!(budget.monthly, Micros(50_000_000));
        assert_eq!(budget.thresholds, vec![50, 80, 100]);
        let budget = parse_budget(br#"{"monthly": 0.5, "thresholds": [100, 25, 25]}"#).unwrap();
        assert_eq!(budget.monthly, Micros(500_000));
        assert_eq!(budget.thresholds, vec![25, 100]);
    }

    #[test]
    fn a_bad_budget_body_names_the_field_and_the_rule() {
        assert_eq!(refused_field(r#"{"monthly": 0}"#), "monthly");
        assert_eq!(refused_field(r#"{"monthly": -5}"#), "monthly");
        assert_eq!(refused_field(r#"{"monthly": "50"}"#), "monthly");
        assert_eq!(refused_field(r#"{"monthly": 0.001}"#), "monthly");
        assert_eq!(refused_field(r#"{"thresholds": [50]}"#), "monthly");
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": []}"#),
            "thresholds"
        );
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": [0]}"#),
            "thresholds"
        );
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": [1001]}"#),
            "thresholds"
        );
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": [50.5]}"#),
            "thresholds"
        );
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": 50}"#),
            "thresholds"
        );
        assert_eq!(
            refused_field(r#"{"monthly": 5, "thresholds": [1,2,3,4,5,6,7,8,9,10,11]}"#),
            "thresholds"
        );
        assert_eq!(refused_field(r#"{"monthly": 5, "daily": 1}"#), "daily");
        assert_eq!(refused_field(r#"[50]"#), "body");
        let error = parse_budget(b"{").unwrap_err();
        assert_eq!(error.status.as_u16(), 400);
    }

    #[test]
    fn used_percent_is_of_the_shown_amounts_to_one_decimal() {
        let budget = Budget {
            monthly: Micros(30_000_000),
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
        };
        assert_eq!(used_pct(Cents(1000), &budget), 33.3);
        assert_eq!(used_pct(Cents(4500), &budget), 150.0);
        assert_eq!(used_pct(Cents(0), &budget), 0.0);
    }
}
