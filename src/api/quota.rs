//! `GET /v1/quota`, `POST /v1/quota/holds`, `DELETE /v1/quota/holds/{hold_id}`: the local
//! quotas ([`crate::quota`]), answered from memory.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiError;
use super::events::require_json;
use super::usage::{Params, bad_parameter};
use crate::quota::{Answer, HoldOutcome, LimitState};
use crate::state::SharedState;
use usage_protocol::event::{MAX_TOKENS, MAX_USER_ID};

/// Most tokens one hold may ask for: what one event can carry (prompt and completion).
pub const MAX_HOLD_TOKENS: u64 = 2 * MAX_TOKENS;

/// `GET /v1/quota?user_id=N[&tokens=T]`.
pub async fn quota(
    State(state): State<SharedState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = Params::parse(query, &["user_id", "tokens"])?;
    let user_id = match params.get("user_id") {
        Some(text) => integer_parameter("user_id", text, MAX_USER_ID)?,
        None => return Err(bad_parameter("user_id", "is required")),
    };
    let tokens = params
        .get("tokens")
        .map(|text| integer_parameter("tokens", text, MAX_USER_ID))
        .transpose()?
        .unwrap_or(0);
    let answer = state.quota.check(user_id, tokens, Utc::now());
    state.metrics.quota_denied(&answer.denied);
    Ok(Json(AnswerBody::of(&answer)).into_response())
}

/// `POST /v1/quota/holds` `{"user_id", "tokens"}`.
pub async fn hold(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body =
        body.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "bad_body", r.body_text()))?;
    require_json(&headers)?;
    let (user_id, tokens) = read_hold(&body)?;
    match state.quota.hold(user_id, tokens, Utc::now()) {
        HoldOutcome::Granted {
            hold_id,
            expires_at,
            answer,
        } => {
            let body = AnswerBody {
                hold_id: Some(hold_id),
                expires_at: Some(expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)),
                ..AnswerBody::of(&answer)
            };
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        HoldOutcome::Refused(answer) => {
            state.metrics.quota_denied(&answer.denied);
            Ok((StatusCode::OK, Json(AnswerBody::of(&answer))).into_response())
        }
        HoldOutcome::Full => Err(ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_holds",
                format!(
                    "{} holds are open: settle or release some first",
                    crate::quota::holds::MAX_OPEN_HOLDS
                ),
            )
        }),
    }
}

/// `DELETE /v1/quota/holds/{hold_id}`.
pub async fn release(
    State(state): State<SharedState>,
    Path(hold_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&hold_id)
        .map_err(|_| bad_parameter("hold_id", format!("{hold_id:?} is not a hold id (a UUID)")))?;
    if state.quota.release(id, Utc::now()) {
        Ok(Json(json!({"hold_id": id, "released": true})))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_hold",
            format!("hold {id} is not open: it was settled, released or it expired"),
        ))
    }
}

/// `{"user_id", "allowed", "limits": [...]}`, and a granted hold's id and expiry.
#[derive(Serialize)]
struct AnswerBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    hold_id: Option<Uuid>,
    user_id: u64,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    limits: &'a [LimitState],
}

impl AnswerBody<'_> {
    fn of(answer: &Answer) -> AnswerBody<'_> {
        AnswerBody {
            hold_id: None,
            user_id: answer.user_id,
            allowed: answer.allowed,
            expires_at: None,
            limits: &answer.limits,
        }
    }
}

fn integer_parameter(name: &str, text: &str, max: u64) -> Result<u64, ApiError> {
    text.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| {
            bad_parameter(
                name,
                format!("must be an integer from 0 to {max}, not {text:?}"),
            )
        })
}

/// Reads a hold request, naming every bad field.
fn read_hold(body: &[u8]) -> Result<(u64, u64), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(invalid_hold(vec![(
            "body",
            "must be an object {\"user_id\", \"tokens\"}".to_owned(),
        )]));
    };
    let mut errors: Vec<(&str, String)> = object
        .keys()
        .filter(|k| !["user_id", "tokens"].contains(&k.as_str()))
        .map(|unknown| (unknown.as_str(), "unknown field".to_owned()))
        .collect();
    let mut field = |name: &'static str, min: u64, max: u64| -> u64 {
        let found = object.get(name);
        if let Some(n) = found
            .and_then(Value::as_u64)
            .filter(|n| (min..=max).contains(n))
        {
            return n;
        }
        let rule = format!("must be an integer from {min} to {max}");
        let message = if found.is_none() {
            format!("is required and {rule}")
        } else {
            rule
        };
        errors.push((name, message));
        0
    };
    let user_id = field("user_id", 0, MAX_USER_ID);
    let tokens = field("tokens", 1, MAX_HOLD_TOKENS);
    if errors.is_empty() {
        Ok((user_id, tokens))
    } else {
        Err(invalid_hold(errors))
    }
}

/// A `422` naming each bad field of a hold request.
fn invalid_hold(errors: Vec<(&str, String)>) -> ApiError {
    let message = errors
        .iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect::<Vec<_>>()
        .join("; ");
    let details = errors
        .iter()
        .map(|(field, message)| json!({"field": field, "message": message}))
        .collect();
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_hold",
        format!("invalid hold: {message}"),
    )
    .with_details(details)
}
