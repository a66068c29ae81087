//! The provider's installation views (SPEC section 6), all behind basic auth:
//! `GET /api/usage/installations` (usage, cost, revenue and profit per install),
//! `PUT /api/installations/{install_id}/plan` and `DELETE /api/installations/{install_id}`;
//! budgets are set in [`super::budgets`].
//!
//! The numbers come from the store's daily rollups and the money from [`super::pricing`];
//! this module only picks the days, parses requests and shapes answers. "Now" is
//! [`ReceiverState::provider_now`], so tests can stand on a month boundary.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike, Utc};
use serde_json::{Value, json};

use super::ReceiverState;
use super::budgets::{budget_in_force, used_pct};
use super::clip::clip;
use super::error::ReceiverError;
use super::ingest::body_rejection;
use super::pricing::{Bill, Plan};
use super::provider::{authorize, blocking};
use super::store::{Budget, DailyTokens, InstallUsage, UsageWindow};
use crate::event::format_millis;

const MS_PER_DAY: i64 = 86_400_000;

/// One installation with its month's bill: a row of the API answer and of the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRow {
    pub install_id: String,
    pub plan: Plan,
    pub last_seen_ms: Option<i64>,
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// `bill.tokens` is the month-to-date token count.
    pub bill: Bill,
    /// The budget in force: its own, else `DEFAULT_MONTHLY_BUDGET`.
    pub budget: Option<Budget>,
    /// Thresholds alerted this month, ascending.
    pub alerted_mtd: Vec<u32>,
}

/// The UTC days of the last 30 days (today included) and of the current month.
pub fn usage_window(now: DateTime<Utc>) -> UsageWindow {
    let today = now.timestamp_millis().div_euclid(MS_PER_DAY);
    let day_of_month = i64::from(now.day0());
    UsageWindow {
        today,
        from_30d: today - 29,
        month_start: today - day_of_month,
    }
}

/// Prices every install's month, and gives each the budget in force.
pub fn install_rows(app: &ReceiverState, usages: Vec<InstallUsage>) -> Vec<InstallRow> {
    usages
        .into_iter()
        .map(|usage| InstallRow {
            bill: app.pricing.bill(usage.plan, &usage.usage_mtd),
            budget: budget_in_force(app, usage.budget.as_ref()),
            alerted_mtd: usage.alerted_mtd,
            install_id: usage.install_id,
            plan: usage.plan,
            last_seen_ms: usage.last_seen_ms,
            events_30d: usage.events_30d,
            tokens_30d: usage.tokens_30d,
        })
        .collect()
}

/// Every install (or only `install_id`) priced as of `now`, and the tokens per day of the
/// last 30 days summed over them.
pub async fn load_rows(
    app: &Arc<ReceiverState>,
    install_id: Option<String>,
    now: DateTime<Utc>,
) -> Result<(Vec<InstallRow>, Vec<DailyTokens>), ReceiverError> {
    let window = usage_window(now);
    let store = app.store.clone();
    let report = blocking(move || store.installations(install_id.as_deref(), window)).await?;
    Ok((install_rows(app, report.installs), report.daily))
}

fn row_json(row: &InstallRow) -> Value {
    json!({
        "install_id": row.install_id,
        "plan": row.plan.as_str(),
        "last_seen": row.last_seen_ms.map(format_millis),
        "events_30d": row.events_30d,
        "tokens_30d": row.tokens_30d,
        "tokens_mtd": row.bill.tokens,
        "cost_mtd": row.bill.cost.to_json(),
        "revenue_mtd": row.bill.revenue.to_json(),
        "profit_mtd": row.bill.profit.to_json(),
        "unpriced_models": row.bill.unpriced_models,
        "budget_monthly": row.budget.as_ref().map(|budget| budget.monthly.to_cents().to_json()),
        "budget_used_pct": row.budget.as_ref().map(|budget| used_pct(row.bill.cost, budget)),
    })
}

/// `GET /api/usage/installations`.
pub async fn list(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let (rows, _) = load_rows(&app, None, app.provider_now()).await?;
    let installations: Vec<Value> = rows.iter().map(row_json).collect();
    Ok(Json(json!({ "installations": installations })))
}

/// `PUT /api/installations/{install_id}/plan` with `{"plan": "free" | "pro" | "agency"}`.
pub async fn set_plan(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let body = body.map_err(body_rejection)?;
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        ReceiverError::bad_request(
            "malformed_json",
            format!("the body is not valid JSON: {error}"),
        )
    })?;
    let plan = value
        .get("plan")
        .and_then(Value::as_str)
        .and_then(|text| text.parse::<Plan>().ok())
        .ok_or_else(|| {
            let rule = "must be one of free, pro, agency";
            ReceiverError::invalid("invalid_plan", format!("plan {rule}"))
                .with_details(vec![json!({"field": "plan", "message": rule})])
        })?;
    let store = app.store.clone();
    let id = install_id.clone();
    if !blocking(move || store.set_plan(&id, plan)).await? {
        return Err(unknown_install());
    }
    tracing::info!(install_id = %clip(&install_id), plan = plan.as_str(), "plan changed");
    Ok(Json(
        json!({"install_id": install_id, "plan": plan.as_str()}),
    ))
}

/// `DELETE /api/installations/{install_id}`: erases the install's events, rollups and
/// enrollment. The agent would have to enroll again to send anything more.
pub async fn erase(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let store = app.store.clone();
    let id = install_id.clone();
    let Some(events) = blocking(move || store.erase_install(&id)).await? else {
        return Err(unknown_install());
    };
    tracing::info!(install_id = %clip(&install_id), events, "install erased");
    Ok(Json(
        json!({"install_id": install_id, "erased": true, "events_deleted": events}),
    ))
}

pub(super) fn unknown_install() -> ReceiverError {
    ReceiverError::new(
        StatusCode::NOT_FOUND,
        "unknown_install",
        "no install with this id is enrolled",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::provider::day_text;
    use chrono::TimeZone;

    #[test]
    fn windows_are_utc_days() {
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 30, 0).unwrap();
        let window = usage_window(now);
        assert_eq!(window.month_start, window.today);
        assert_eq!(window.from_30d, window.today - 29);
        assert_eq!(day_text(window.today), "2026-11-01");

        let late = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let window = usage_window(late);
        assert_eq!(day_text(window.month_start), "2026-12-01");
        assert_eq!(day_text(window.from_30d), "2026-12-02");
    }
}
