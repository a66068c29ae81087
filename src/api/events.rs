//! `POST /v1/events`: record one event or an all-or-nothing batch of up to 1000.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{Duration, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiError;
use crate::state::SharedState;
use crate::store::events::Recorded;
use usage_protocol::event::{self, Event, FieldError, Limits, MAX_BATCH_EVENTS};

pub async fn record(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    if !state.config.tracking_enabled {
        return Ok((StatusCode::OK, Json(json!({"status": "disabled"}))).into_response());
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body must be at most {} bytes", super::MAX_BODY_BYTES),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_body", rejection.body_text())
        }
    })?;
    require_json(&headers)?;
    let limits = Limits {
        now: Utc::now(),
        max_age: Duration::days(state.config.retention.event_days.into()),
    };
    let (events, is_batch) = read_body(&body, limits).map_err(|rejected| {
        if let Some(value) = &rejected.value {
            state.metrics.events_rejected(value);
        }
        rejected.error
    })?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let logged = state.config.debug.then(|| events.clone());
    let sources: Vec<_> = events.iter().map(|e| e.source).collect();
    // Empty (no allocation) when no limit is set and no event carries a hold.
    let mut spent = state.quota.to_follow(&events);
    let outcomes = state.writer.record(events).await?;
    for (spent, outcome) in spent.iter_mut().zip(&outcomes) {
        spent.new = *outcome == Recorded::New;
    }
    if !spent.is_empty() {
        state.quota.spent(&spent, Utc::now());
    }
    state
        .metrics
        .events_recorded(&sources, &outcomes, started.elapsed());

    for (event, outcome) in logged.iter().flatten().zip(&outcomes) {
        log_event(event, *outcome);
    }
    // Written straight from the ids (no `Value` per id): a batch's answer lists them all.
    let answer = if is_batch {
        let recorded = outcomes.iter().filter(|o| **o == Recorded::New).count();
        Answer::Batch {
            recorded,
            duplicates: outcomes.len() - recorded,
            event_ids: &ids,
        }
    } else {
        Answer::One {
            event_id: ids[0],
            status: status_word(outcomes[0]),
        }
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// The answer to a recorded body: one event's outcome, or a batch's counts and ids.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer<'a> {
    One {
        event_id: Uuid,
        status: &'static str,
    },
    Batch {
        recorded: usize,
        duplicates: usize,
        event_ids: &'a [Uuid],
    },
}

pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        ))
    }
}

/// A body refused by [`read_body`]: the answer, and the body as JSON when it was JSON
/// (the metrics count what its events were).
#[derive(Debug)]
pub struct BodyRejection {
    pub error: ApiError,
    pub value: Option<Box<Value>>,
}

/// Reads the body of `POST /v1/events`: one event or `{"events": [...]}`, every event
/// valid or none recorded. The typed reading first ([`event::read_typed_events`]); a body
/// it gives up on is read as `Value`s by [`parse_body`], which names every broken rule.
pub fn read_body(body: &[u8], limits: Limits) -> Result<(Vec<Event>, bool), BodyRejection> {
    if let Some(read) = event::read_typed_events(body, limits) {
        return Ok(read);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| BodyRejection {
        error: ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        ),
        value: None,
    })?;
    parse_body(&value, limits).map_err(|error| BodyRejection {
        error,
        value: Some(Box::new(value)),
    })
}

/// Turns the body, read as JSON, into validated events; any invalid event rejects the
/// whole request. The reference reading of [`read_body`].
pub fn parse_body(value: &Value, limits: Limits) -> Result<(Vec<Event>, bool), ApiError> {
    let Some(batch) = value.as_object().and_then(|o| o.get("events")) else {
        return event::parse_event(value, limits)
            .map(|event| (vec![event], false))
            .map_err(invalid);
    };
    let object = value.as_object().expect("checked above");
    if let Some(unknown) = object.keys().find(|k| *k != "events") {
        return Err(invalid(vec![FieldError::new(unknown, "unknown field")]));
    }
    let Some(items) = batch.as_array() else {
        return Err(invalid(vec![FieldError::new(
            "events",
            "must be an array of events",
        )]));
    };
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!(
                "a batch holds at most {MAX_BATCH_EVENTS} events, this one has {}",
                items.len()
            ),
        ));
    }
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match event::parse_event(item, limits) {
            Ok(event) => events.push(event),
            Err(found) => errors.extend(found.into_iter().map(|e| FieldError {
                index: Some(index),
                ..e
            })),
        }
    }
    if errors.is_empty() {
        Ok((events, true))
    } else {
        Err(invalid(errors))
    }
}

fn invalid(errors: Vec<FieldError>) -> ApiError {
    let message = match errors.as_slice() {
        [one] => format!("invalid event: {one}"),
        many => format!("invalid event: {} (and {} more)", many[0], many.len() - 1),
    };
    let details = errors
        .iter()
        .map(|e| serde_json::to_value(e).expect("FieldError always serializes"))
        .collect();
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_event", message).with_details(details)
}

fn status_word(outcome: Recorded) -> &'static str {
    match outcome {
        Recorded::New => "recorded",
        Recorded::Duplicate => "duplicate",
    }
}

fn log_event(event: &Event, outcome: Recorded) {
    let t = &event.tokens;
    tracing::info!(
        "{} user={} source={} tokens={} (p:{} c:{}) model={}",
        status_word(outcome),
        event.user_id,
        event.source.as_str(),
        t.total(),
        t.prompt,
        t.completion,
        event.model.as_str(),
    );
}
