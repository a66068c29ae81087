//! `GET /api/usage/summary` and `GET /api/usage/events`, both behind basic auth: token
//! totals, optionally grouped by day, user, source, model or origin (JSON or CSV), and raw
//! events,
//! paged by an opaque cursor (docs/reference/receiver-api.md).
//!
//! This module parses query parameters and shapes answers; the numbers come from the
//! [`ReceiverStore`](crate::store::ReceiverStore). Dates are `YYYY-MM-DD` in UTC, both
//! ends inclusive. Auth, error answers and CSV writing are [`crate::http`]'s;
//! `GET /health` is [`crate::server`]'s.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::http::error::ReceiverError;
use crate::state::ReceiverState;
use crate::store::{
    EventCursor, EventsQuery, ReceivedEvent, Summary, SummaryGroupBy, SummaryQuery, Totals,
};
use usage_protocol::event::format_millis;

/// Events per page when `limit` is not given.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most events per page; a larger `limit` is lowered to this.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most rows of a summary grouped by user over every install (no `install_id`); a
/// larger one is refused, naming `group_by`, rather than held whole in memory.
pub const MAX_USER_ROWS_OF_ALL_INSTALLS: usize = 50_000;

use crate::days::day_text;
use crate::http::auth::authorize;
use crate::http::csv::csv_answer;
use crate::http::error::{bad_param, blocking, query_rejection};
use crate::views::query::parse_range;

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
    // Users over every install have no bound of their own: the rows are.
    let bounded = query.install_id.is_none() && group_by.user;
    let store = app.store.clone();
    let summary = blocking(move || {
        if bounded {
            store.summary_at_most(&query, MAX_USER_ROWS_OF_ALL_INSTALLS)
        } else {
            store.summary(&query).map(Some)
        }
    })
    .await?
    .ok_or_else(|| {
        let rule = format!(
            "with user and no install_id answers more than {MAX_USER_ROWS_OF_ALL_INSTALLS} rows \
             here: give an install_id, or a shorter from and to"
        );
        ReceiverError::bad_request("too_many_rows", format!("group_by {rule}"))
            .with_details(vec![json!({"field": "group_by", "message": rule})])
    })?;
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
    let limit = parse_limit(&params.limit)?;
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

/// A page's `limit`: [`DEFAULT_PAGE_SIZE`] when not given, at most [`MAX_PAGE_SIZE`].
pub fn parse_limit(value: &Option<String>) -> Result<usize, ReceiverError> {
    match non_empty(value) {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n.min(MAX_PAGE_SIZE)),
            _ => Err(bad_param("limit", "must be a whole number from 1 to 1000")),
        },
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
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
            "origin" => group.origin = true,
            _ => {
                return Err(bad_param(
                    "group_by",
                    "must list some of day, user, source, model, origin",
                ));
            }
        }
    }
    Ok(group)
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
            // Grouped by origin: `null` for the events that named none.
            if let Some(origin) = &row.origin {
                object.insert("origin".into(), origin.clone().into());
            }
            totals_json(&row.totals, &mut object);
            Value::Object(object)
        })
        .collect();
    json!({"totals": totals, "rows": rows})
}

/// The rows as CSV with a header of the grouped keys and the totals.
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
    if group.origin {
        columns.push("origin");
    }
    columns.extend([
        "events",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ]);
    let records = summary.rows.iter().map(|row| {
        let mut cells = Vec::new();
        cells.extend(row.day.map(day_text));
        cells.extend(row.user_hash.clone());
        cells.extend(row.source.map(|source| source.as_str().to_owned()));
        cells.extend(row.model.clone());
        // An empty cell for the events that named no origin.
        cells.extend(row.origin.clone().map(Option::unwrap_or_default));
        let t = &row.totals;
        cells.extend(
            [
                t.events,
                t.prompt_tokens,
                t.completion_tokens,
                t.total_tokens,
            ]
            .map(|n| n.to_string()),
        );
        cells
    });
    csv_answer(&columns, records)
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
        "origin": event.origin,
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
        assert!(parse_group_by(&Some("origin".into())).unwrap().origin);
        assert!(parse_group_by(&Some("week".into())).is_err());
        assert!(!parse_group_by(&None).unwrap().any());
    }
}
