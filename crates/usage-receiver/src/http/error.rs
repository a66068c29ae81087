//! The receiver's error answers: every failure becomes
//! `{"error": {"code", "message", "details": [...]}}` with the right status and headers.
//!
//! This module only shapes responses; handlers decide which error applies. Messages never
//! contain a secret, a token or a password.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use serde_json::json;
use usage_protocol::wire::{ErrorBody, ErrorDetail};

/// An error answer.
#[derive(Debug, Clone)]
pub struct ReceiverError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ReceiverError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ReceiverError {
        ReceiverError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn with_details(mut self, details: Vec<Value>) -> ReceiverError {
        self.details = details;
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ReceiverError {
        self.headers.push((name, value));
        self
    }

    /// `400`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ReceiverError {
        ReceiverError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `401`; the caller adds the `WWW-Authenticate` challenge of its scheme.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ReceiverError {
        ReceiverError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// `413`.
    pub fn too_large(message: impl Into<String>) -> ReceiverError {
        ReceiverError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// `415`.
    pub fn unsupported_media_type(message: impl Into<String>) -> ReceiverError {
        ReceiverError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// `422`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ReceiverError {
        ReceiverError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// `422` naming the field and its rule: `"{field} {rule}"`, and the pair in `details`.
    pub fn invalid_field(code: &'static str, field: &str, rule: &str) -> ReceiverError {
        ReceiverError::invalid(code, format!("{field} {rule}"))
            .with_details(vec![serde_json::json!({"field": field, "message": rule})])
    }

    /// `503` with `Retry-After`, for storage failures: the client should try again later.
    pub fn unavailable(retry_after_s: u64) -> ReceiverError {
        ReceiverError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the receiver could not reach its database; try again later",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_s))
    }
}

/// The error code of an error answer, kept in the response's extensions so the router's
/// metering layer counts refusals by their code without reading the body.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ReceiverError {
    fn into_response(self) -> Response {
        let code = self.code;
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

/// Answers unknown paths with the error shape.
pub async fn not_found() -> ReceiverError {
    ReceiverError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Answers a known path called with the wrong method.
pub async fn method_not_allowed() -> ReceiverError {
    ReceiverError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not answer that method",
    )
}

/// Whether a `content-type` header names JSON (`application/json` or `application/*+json`,
/// with any parameters).
/// A provider request's body as JSON, or `400 malformed_json`.
pub fn json_body(body: &[u8]) -> Result<Value, ReceiverError> {
    serde_json::from_slice(body).map_err(|error| {
        ReceiverError::bad_request(
            "malformed_json",
            format!("the body is not valid JSON: {error}"),
        )
    })
}

pub fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::ReceiverStoreError> + Send + 'static,
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
pub fn query_rejection(rejection: QueryRejection) -> ReceiverError {
    ReceiverError::bad_request(
        "invalid_query",
        format!("the query string is invalid: {}", rejection.body_text()),
    )
}

pub fn bad_param(name: &str, rule: &str) -> ReceiverError {
    ReceiverError::bad_request("invalid_query", format!("{name} {rule}"))
        .with_details(vec![json!({"field": name, "message": rule})])
}

/// Maps a failure to read the body: too large is `413`, anything else `400`.
pub fn body_rejection(rejection: BytesRejection) -> ReceiverError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ReceiverError::too_large("the request body is larger than the receiver accepts")
    } else {
        ReceiverError::bad_request("unreadable_body", "the request body could not be read")
    }
}

/// Maps a storage failure to `503`, logging the cause (which never holds a secret); an
/// install erased or disabled while its batch was stored is `401`, as if it came a moment
/// later.
pub fn store_unavailable(error: crate::store::ReceiverStoreError) -> ReceiverError {
    if matches!(error, crate::store::ReceiverStoreError::InstallGone) {
        return unauthenticated("unknown_install", "this install is not enrolled");
    }
    tracing::error!(%error, "receiver store failure");
    ReceiverError::unavailable(5)
}

pub fn unknown_install() -> ReceiverError {
    ReceiverError::new(
        StatusCode::NOT_FOUND,
        "unknown_install",
        "no install with this id is enrolled",
    )
}

/// A `401` with the signature challenge.
pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> ReceiverError {
    ReceiverError::unauthorized(code, message).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(SIGNATURE_CHALLENGE),
    )
}

/// The challenge sent with every ingest `401`: batches authenticate by their Standard
/// Webhooks signature, not by an `Authorization` header.
pub const SIGNATURE_CHALLENGE: &str = r#"Signature realm="usage-agent ingest""#;
