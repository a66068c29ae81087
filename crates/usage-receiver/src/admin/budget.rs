//! `PUT` and `DELETE /api/installations/{install_id}/budget`: an install's monthly budget
//! and its alert thresholds, set or removed by the provider. Owns reading a budget body
//! ([`parse_budget`], every refusal naming the field and its rule) and a budget's JSON
//! ([`budget_json`]).
//!
//! It only stores what the provider sent: what a budget means (the default thresholds,
//! the budget in force, the check after each batch) is [`crate::budgets::rules`]'s.

use crate::admin::installs::change_install;
use crate::billing::money::Micros;
use crate::budgets::rules::DEFAULT_THRESHOLDS;
use crate::http::auth::{Provider, authorize};
use crate::http::clip::clip;
use crate::http::error::ReceiverError;
use crate::http::error::body_rejection;
use crate::http::error::json_body;
use crate::state::ReceiverState;
use crate::store::Budget;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;

/// `PUT /api/installations/{install_id}/budget` with `{"monthly": 50.0, "thresholds":
/// [50, 80, 100]}` (thresholds optional).
pub async fn set(
    State(app): State<Arc<ReceiverState>>,
    Path(install_id): Path<String>,
    _provider: Provider,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ReceiverError> {
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

/// Most thresholds one budget may have.
const MAX_THRESHOLDS: usize = 10;

/// Highest threshold, in percent: alerts far past the budget still make sense, a typo
/// such as 8000 does not.
const MAX_THRESHOLD: u32 = 1000;

/// Largest monthly budget, in currency units.
const MAX_MONTHLY: f64 = 1e9;

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
}
