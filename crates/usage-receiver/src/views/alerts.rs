//! `GET /api/alerts` (basic auth): the budget alerts recorded, oldest first, with their
//! delivery state. Reads only: alerts are recorded by [`crate::budgets::rules`] and
//! delivered by [`crate::budgets::delivery`].

use crate::budgets::delivery::alert_fields;
use crate::http::auth::authorize;
use crate::http::error::ReceiverError;
use crate::http::error::{blocking, query_rejection};
use crate::state::ReceiverState;
use crate::store::Alert;
use crate::views::query::parse_range;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use usage_protocol::event::format_millis;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsParams {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /api/alerts?from=&to=` (UTC dates, inclusive): the alerts recorded then, oldest
/// first.
pub async fn list(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<AlertsParams>, QueryRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let range = parse_range(&params.from, &params.to)?;
    let store = app.store.clone();
    let alerts = blocking(move || store.alerts(range)).await?;
    let alerts: Vec<Value> = alerts.iter().map(alert_json).collect();
    Ok(Json(json!({ "alerts": alerts })))
}

/// An alert as `GET /api/alerts` lists it.
fn alert_json(alert: &Alert) -> Value {
    let mut fields = alert_fields(alert);
    fields.insert("at".into(), format_millis(alert.at_ms).into());
    fields.insert(
        "delivered_at".into(),
        alert.delivered_at_ms.map(format_millis).into(),
    );
    Value::Object(fields)
}
