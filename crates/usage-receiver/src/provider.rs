//! The provider's read views: `GET /api/usage/summary`, `GET /api/usage/events` (both
//! behind basic auth) and the unauthenticated `GET /health` (SPEC section 6).
//!
//! This module parses query parameters and shapes answers; the numbers come from the
//! [`ReceiverStore`](super::store::ReceiverStore). Dates are `YYYY-MM-DD` in UTC, both ends inclusive.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{NaiveDate, TimeDelta};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::ReceiverState;
use super::auth::{require_provider, throttled};
use super::error::ReceiverError;
use super::ingest::store_unavailable;
use super::store::{
    EventCursor, EventsQuery, ReceivedEvent, Summary, SummaryGroupBy, SummaryQuery, TimeRange,
    Totals,
};
use usage_protocol::event::format_millis;

/// Events per page when `limit` is not given.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most events per page; a larger `limit` is lowered to this.
pub const MAX_PAGE_SIZE: usize = 1000;

const MS_PER_DAY: i64 = 86_400_000;

/// `{"status": "ok", "store"}` while the database answers, `503` while it does not
/// (SPEC 9), so a load balancer takes a node that lost its database out of rotation.
pub async fn health(State(app): State<Arc<ReceiverState>>) -> Result<Json<Value>, ReceiverError> {
    let store = app.store.clone();
    let kind = store.kind().as_str();
    blocking(move || store.ping()).await?;
    Ok(Json(json!({"status": "ok", "store": kind})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryParams {
    install_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    install_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

pub async fn summary(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<SummaryParams>, QueryRejection>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let csv = match non_empty(&params.format) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(bad_param("format", "must be json or csv")),
    };
    let query = SummaryQuery {
        install_id: non_empty(&params.install_id).map(str::to_owned),
        range: parse_range(&params.from, &params.to)?,
        group_by: parse_group_by(&params.group_by)?,
    };
    let group_by = query.group_by;
    let store = app.store.clone();
    let summary = blocking(move || store.summary(&query)).await?;
    if csv {
        Ok(summary_csv(&summary, group_by))
    } else {
        Ok(Json(summary_json(&summary)).into_response())
    }
}

pub async fn events(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let limit = match non_empty(&params.limit) {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_PAGE_SIZE),
            _ => return Err(bad_param("limit", "must be a whole number from 1 to 1000")),
        },
    };
    let after = match non_empty(&params.after) {
        None => None,
        Some(text) => Some(
            decode_cursor(text)
                .ok_or_else(|| bad_param("after", "must be a `next` value from an earlier page"))?,
        ),
    };
    let query = EventsQuery {
        install_id: non_empty(&params.install_id).map(str::to_owned),
        range: parse_range(&params.from, &params.to)?,
        limit,
        after,
    };
    let store = app.store.clone();
    let page = blocking(move || store.events_page(&query)).await?;
    let events: Vec<Value> = page.events.iter().map(event_json).collect();
    Ok(Json(json!({
        "events": events,
        "next": page.next.map(|cursor| encode_cursor(&cursor)),
    })))
}

/// Checks the provider's basic auth of a request from `peer`, throttled per address.
pub(super) fn authorize(
    app: &ReceiverState,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<(), ReceiverError> {
    let settings = &app.settings;
    throttled(&app.credential_throttle, peer, headers, || {
        require_provider(
            headers,
            settings.provider_username.as_deref(),
            settings.provider_password.as_deref(),
        )
    })
    .inspect_err(|error| tracing::warn!(%peer, code = error.code, "provider request refused"))
}

pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, super::store::ReceiverStoreError> + Send + 'static,
) -> Result<T, ReceiverError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| {
            tracing::error!(%error, "a provider query task failed");
            ReceiverError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the query could not be run",
            )
        })?
        .map_err(store_unavailable)
}

/// A query string that does not parse (an unknown parameter, say), as `400`.
pub(super) fn query_rejection(rejection: QueryRejection) -> ReceiverError {
    ReceiverError::bad_request(
        "invalid_query",
        format!("the query string is invalid: {}", rejection.body_text()),
    )
}

pub(super) fn bad_param(name: &str, rule: &str) -> ReceiverError {
    ReceiverError::bad_request("invalid_query", format!("{name} {rule}"))
        .with_details(vec![json!({"field": name, "message": rule})])
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Turns inclusive `YYYY-MM-DD` dates into a half-open millisecond range.
pub(super) fn parse_range(
    from: &Option<String>,
    to: &Option<String>,
) -> Result<TimeRange, ReceiverError> {
    let day = |name: &str, value: &Option<String>| -> Result<Option<i64>, ReceiverError> {
        let Some(text) = non_empty(value) else {
            return Ok(None);
        };
        let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map_err(|_| bad_param(name, "must be a date such as 2026-11-27"))?;
        let midnight = date
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists every day");
        Ok(Some(midnight.and_utc().timestamp_millis()))
    };
    let from_ms = day("from", from)?;
    let to_ms = day("to", to)?.map(|start| start + MS_PER_DAY);
    if let (Some(from_ms), Some(to_ms)) = (from_ms, to_ms)
        && from_ms >= to_ms
    {
        return Err(bad_param("from", "must not be after to"));
    }
    Ok(TimeRange { from_ms, to_ms })
}

fn parse_group_by(value: &Option<String>) -> Result<SummaryGroupBy, ReceiverError> {
    let mut group = SummaryGroupBy::default();
    let Some(text) = non_empty(value) else {
        return Ok(group);
    };
    for key in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        match key {
            "day" => group.day = true,
            "user" => group.user = true,
            "source" => group.source = true,
            "model" => group.model = true,
            _ => {
                return Err(bad_param(
                    "group_by",
                    "must list some of day, user, source, model",
                ));
            }
        }
    }
    Ok(group)
}

pub(super) fn day_text(day: i64) -> String {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch is a valid date");
    TimeDelta::try_days(day)
        .and_then(|delta| epoch.checked_add_signed(delta))
        .map(|date| date.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn totals_json(totals: &Totals, into: &mut Map<String, Value>) {
    into.insert("events".into(), totals.events.into());
    into.insert("prompt_tokens".into(), totals.prompt_tokens.into());
    into.insert("completion_tokens".into(), totals.completion_tokens.into());
    into.insert("total_tokens".into(), totals.total_tokens.into());
}

fn summary_json(summary: &Summary) -> Value {
    let mut totals = Map::new();
    totals_json(&summary.totals, &mut totals);
    let rows: Vec<Value> = summary
        .rows
        .iter()
        .map(|row| {
            let mut object = Map::new();
            if let Some(day) = row.day {
                object.insert("day".into(), day_text(day).into());
            }
            if let Some(user_hash) = &row.user_hash {
                object.insert("user_hash".into(), user_hash.clone().into());
            }
            if let Some(source) = row.source {
                object.insert("source".into(), source.as_str().into());
            }
            if let Some(model) = &row.model {
                object.insert("model".into(), model.clone().into());
            }
            totals_json(&row.totals, &mut object);
            Value::Object(object)
        })
        .collect();
    json!({"totals": totals, "rows": rows})
}

/// The rows as CSV with a header; values never contain commas or quotes (days, hex,
/// source names and model names are all from safe alphabets).
fn summary_csv(summary: &Summary, group: SummaryGroupBy) -> Response {
    let mut columns = Vec::new();
    if group.day {
        columns.push("day");
    }
    if group.user {
        columns.push("user_hash");
    }
    if group.source {
        columns.push("source");
    }
    if group.model {
        columns.push("model");
    }
    columns.extend([
        "events",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ]);
    let mut text = columns.join(",");
    text.push('\n');
    for row in &summary.rows {
        let mut cells = Vec::new();
        if let Some(day) = row.day {
            cells.push(day_text(day));
        }
        if let Some(user_hash) = &row.user_hash {
            cells.push(user_hash.clone());
        }
        if let Some(source) = row.source {
            cells.push(source.as_str().to_owned());
        }
        if let Some(model) = &row.model {
            cells.push(model.clone());
        }
        let t = &row.totals;
        for n in [
            t.events,
            t.prompt_tokens,
            t.completion_tokens,
            t.total_tokens,
        ] {
            cells.push(n.to_string());
        }
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn event_json(event: &ReceivedEvent) -> Value {
    let context = event
        .context
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .unwrap_or(Value::Null);
    json!({
        "install_id": event.install_id,
        "event_id": event.event_id,
        "user_hash": event.user_hash,
        "source": event.source.as_str(),
        "model": event.model,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "cached_tokens": event.cached_tokens,
        "cache_write_tokens": event.cache_write_tokens,
        "reasoning_tokens": event.reasoning_tokens,
        "context": context,
        "created_at": format_millis(event.created_at_ms),
        "received_at": format_millis(event.received_at_ms),
    })
}

/// A cursor as an opaque URL-safe string: created_at, install key and event id, packed.
fn encode_cursor(cursor: &EventCursor) -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(&cursor.created_at_ms.to_be_bytes());
    bytes.extend_from_slice(&cursor.install.to_be_bytes());
    bytes.extend_from_slice(cursor.event_id.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(text: &str) -> Option<EventCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    if bytes.len() != 32 {
        return None;
    }
    Some(EventCursor {
        created_at_ms: i64::from_be_bytes(bytes[0..8].try_into().ok()?),
        install: i64::from_be_bytes(bytes[8..16].try_into().ok()?),
        event_id: Uuid::from_slice(&bytes[16..32]).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = EventCursor {
            created_at_ms: 1_800_000_000_123,
            install: 42,
            event_id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)), Some(cursor));
        assert_eq!(decode_cursor("abc"), None);
        assert_eq!(decode_cursor("!!!"), None);
    }

    #[test]
    fn date_ranges_are_inclusive_utc_days() {
        let range = parse_range(&Some("2026-11-27".into()), &Some("2026-11-27".into())).unwrap();
        let from = range.from_ms.unwrap();
        assert_eq!(format_millis(from), "2026-11-27T00:00:00.000Z");
        assert_eq!(range.to_ms, Some(from + MS_PER_DAY));
        assert!(parse_range(&Some("2026-11-28".into()), &Some("2026-11-27".into())).is_err());
        assert!(parse_range(&Some("27/11/2026".into()), &None).is_err());
        assert_eq!(
            parse_range(&None, &Some(String::new())).unwrap(),
            TimeRange::default()
        );
    }

    #[test]
    fn group_by_accepts_only_known_keys() {
        let group = parse_group_by(&Some("day, model".into())).unwrap();
        assert_eq!(
            group,
            SummaryGroupBy {
                day: true,
                model: true,
                ..SummaryGroupBy::default()
            }
        );
        assert!(parse_group_by(&Some("week".into())).is_err());
        assert!(!parse_group_by(&None).unwrap().any());
    }

    #[test]
    fn days_print_as_dates() {
        assert_eq!(day_text(0), "1970-01-01");
        assert_eq!(day_text(20_784), "2026-11-27");
    }
}
