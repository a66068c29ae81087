//! `GET /api/alerts` (basic auth): the budget alerts recorded, oldest first, with their
//! delivery state, a page at a time. Reads only: alerts are recorded by [`crate::budgets::rules`] and
//! delivered by [`crate::budgets::delivery`].

use crate::budgets::delivery::alert_fields;
use crate::http::auth::authorize;
use crate::http::error::ReceiverError;
use crate::http::error::{bad_param, blocking, query_rejection};
use crate::state::ReceiverState;
use crate::store::{Alert, AlertCursor};
use crate::views::query::parse_range;
use crate::views::usage::parse_limit;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use usage_protocol::event::format_millis;
use uuid::Uuid;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /api/alerts?from=&to=&limit=&after=` (UTC dates, inclusive): the alerts recorded
/// then, oldest first, a page at a time (`limit` as for raw events), with the `next`
/// cursor to pass back as `after` while there are more.
pub async fn list(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<AlertsParams>, QueryRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let range = parse_range(&params.from, &params.to)?;
    let limit = parse_limit(&params.limit)?;
    let after = match params
        .after
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        None => None,
        Some(text) => Some(
            decode_cursor(text)
                .ok_or_else(|| bad_param("after", "must be a `next` value from an earlier page"))?,
        ),
    };
    let store = app.store.clone();
    // One more than the page tells whether there is a next one.
    let mut alerts = blocking(move || store.alerts_page(range, after, limit + 1)).await?;
    let next = (alerts.len() > limit).then(|| {
        alerts.truncate(limit);
        alerts.last().map(|last| {
            encode_cursor(&AlertCursor {
                at_ms: last.at_ms,
                alert_id: last.alert_id,
            })
        })
    });
    let alerts: Vec<Value> = alerts.iter().map(alert_json).collect();
    Ok(Json(json!({ "alerts": alerts, "next": next.flatten() })))
}

fn encode_cursor(cursor: &AlertCursor) -> String {
    let mut bytes = Vec::with_capacity(24);
    bytes.extend_from_slice(&cursor.at_ms.to_be_bytes());
    bytes.extend_from_slice(cursor.alert_id.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(text: &str) -> Option<AlertCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    if bytes.len() != 24 {
        return None;
    }
    Some(AlertCursor {
        at_ms: i64::from_be_bytes(bytes[0..8].try_into().ok()?),
        alert_id: Uuid::from_slice(&bytes[8..24]).ok()?,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = AlertCursor {
            at_ms: 1_800_000_000_123,
            alert_id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)), Some(cursor));
        assert_eq!(decode_cursor("not a cursor"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode([0u8; 23])), None);
    }
}
