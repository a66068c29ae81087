//! `POST /api/installations`: enroll an install's secret (docs/reference/wire-protocol.md,
//! "Enrollment").
//!
//! Authorized by the `ENROLLMENT_TOKEN` bearer token, or, with
//! `ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE`, without a token for an install id never seen
//! before (trust on first use). Enrolling the same secret again is idempotent; a different
//! secret for a known install is `409` and never replaces the stored one. With neither a
//! token configured nor trust on first use, enrollment is refused outright (`403`).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;

use crate::http::auth::{peer_of, throttled_enrollment};
use crate::http::clip::clip;
use crate::http::error::{ReceiverError, is_json_content_type};
use crate::http::error::{body_rejection, store_unavailable};
use crate::state::ReceiverState;
use crate::store::{EnrollOutcome, NewInstall};
use usage_common::credentials::{bearer_token, credential_eq};
use usage_protocol::event::FromObject;
use usage_protocol::signing::Secret;
use usage_protocol::wire::{Enrollment, EnrollmentResult, EnrollmentStatus};

/// Longest install id or site hash accepted.
const MAX_ID_LEN: usize = 128;

/// How the request was authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    Token,
    FirstUse,
}

/// The enrollment token (or trust on first use), checked as an extractor listed before
/// the body: a request with a wrong token is answered before its body is read.
pub struct Authorized(Authorization);

impl FromRequestParts<Arc<ReceiverState>> for Authorized {
    type Rejection = ReceiverError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<ReceiverState>,
    ) -> Result<Authorized, ReceiverError> {
        let headers = &parts.headers;
        throttled_enrollment(app, headers, peer_of(parts)?, || authorize(app, headers))
            .map(Authorized)
    }
}

pub async fn enroll(
    State(app): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    Authorized(authorization): Authorized,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ReceiverError> {
    let body = body.map_err(body_rejection)?;
    if !is_json_content_type(&headers) {
        return Err(ReceiverError::unsupported_media_type(
            "content-type must be application/json",
        ));
    }
    // An object only: a derived struct would also read `[install_id, secret, site_hash]`.
    let FromObject(enrollment) = serde_json::from_slice(&body).map_err(|error| {
        if error.classify() == serde_json::error::Category::Data {
            ReceiverError::invalid(
                "invalid_enrollment",
                format!("the enrollment has the wrong shape: {error}"),
            )
        } else {
            ReceiverError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {error}"),
            )
        }
    })?;
    let install = validate(enrollment)?;

    let store = app.store.clone();
    let task_install = install.clone();
    let outcome = tokio::task::spawn_blocking(move || store.enroll(&task_install))
        .await
        .map_err(|error| {
            tracing::error!(%error, "the enrollment task failed");
            ReceiverError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the enrollment could not be processed",
            )
        })?
        .map_err(store_unavailable)?;

    let install_id = install.install_id;
    let (status, result) = match outcome {
        EnrollOutcome::Created => (StatusCode::CREATED, EnrollmentStatus::Enrolled),
        EnrollOutcome::AlreadyEnrolled => (StatusCode::OK, EnrollmentStatus::AlreadyEnrolled),
        EnrollOutcome::Conflict => {
            tracing::warn!(install_id = %clip(&install_id), ?authorization, "enrollment with a different secret refused");
            return Err(ReceiverError::new(
                StatusCode::CONFLICT,
                "install_conflict",
                "this install is already enrolled with a different secret",
            ));
        }
    };
    tracing::info!(install_id = %clip(&install_id), ?authorization, status = ?result, "install enrolled");
    Ok((
        status,
        Json(EnrollmentResult {
            install_id,
            status: result,
        }),
    )
        .into_response())
}

fn authorize(app: &ReceiverState, headers: &HeaderMap) -> Result<Authorization, ReceiverError> {
    let settings = &app.settings;
    let tofu = settings.allow_first_sync_without_signature;
    let unauthorized = |message: &str| {
        ReceiverError::unauthorized("invalid_enrollment_token", message)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    };
    match (settings.enrollment_token(), bearer_token(headers)) {
        (None, _) if !tofu => Err(ReceiverError::new(
            StatusCode::FORBIDDEN,
            "enrollment_disabled",
            "enrollment is disabled on this receiver: set ENROLLMENT_TOKEN",
        )),
        (Some(expected), Some(given)) => {
            if credential_eq(given.as_bytes(), expected.as_bytes()) {
                Ok(Authorization::Token)
            } else {
                Err(unauthorized("the enrollment token is wrong"))
            }
        }
        // A token was sent but none is configured: it cannot be right.
        (None, Some(_)) => Err(unauthorized("the enrollment token is wrong")),
        (_, None) if tofu => Ok(Authorization::FirstUse),
        (_, None) => Err(unauthorized("an enrollment token is required")),
    }
}

fn validate(enrollment: Enrollment) -> Result<NewInstall, ReceiverError> {
    let mut details = Vec::new();
    let id_ok = |text: &str| {
        !text.is_empty()
            && text.len() <= MAX_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    if !id_ok(&enrollment.install_id) {
        details.push(json!({"field": "install_id",
            "message": format!("must be 1 to {MAX_ID_LEN} characters of letters, digits, _ - .")}));
    }
    if !id_ok(&enrollment.site_hash) {
        details.push(json!({"field": "site_hash",
            "message": format!("must be 1 to {MAX_ID_LEN} characters of letters, digits, _ - .")}));
    }
    let secret = match Secret::parse(&enrollment.secret) {
        Ok(secret) => Some(secret),
        Err(error) => {
            details.push(json!({"field": "secret", "message": error.to_string()}));
            None
        }
    };
    match secret {
        Some(secret) if details.is_empty() => Ok(NewInstall {
            install_id: enrollment.install_id,
            secret,
            site_hash: enrollment.site_hash,
            enrolled_at_ms: Utc::now().timestamp_millis(),
        }),
        _ => Err(
            ReceiverError::invalid("invalid_enrollment", "the enrollment is invalid")
                .with_details(details),
        ),
    }
}
