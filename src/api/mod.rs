//! The local HTTP API (SPEC section 3), served on the Unix socket and optionally on a
//! loopback TCP port with a bearer token. One file per resource; this file holds the
//! router and the error shape. The state handlers share with the jobs is
//! [`crate::state`]'s.
//!
//! **Invariant:** handlers never wait on the backend; they only touch the local store.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::state::SharedState;
use crate::store::{Store, StoreError};

pub mod events;
pub mod export;
pub mod jobs;
pub mod metrics;
pub mod status;
pub mod sync;
pub mod usage;
pub mod users;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Runs a read on the reader connection without blocking the async runtime.
pub async fn read<R, F>(state: &SharedState, work: F) -> Result<R, ApiError>
where
    R: Send + 'static,
    F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
{
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let store = state.reader.lock().unwrap_or_else(|p| p.into_inner());
        work(&store)
    })
    .await
    .map_err(|e| ApiError::internal(format!("read task failed: {e}")))?
    .map_err(ApiError::from)
}

/// The routes of the local API.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/v1/events", post(events::record))
        .route("/v1/status", get(status::status))
        .route("/v1/sync", post(sync::sync_now))
        .route("/v1/retry-failed", post(sync::retry_failed))
        .route("/v1/rollup", post(jobs::rollup))
        .route("/v1/purge", post(jobs::purge))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/export", get(export::export))
        .route("/v1/users/{user_id}", delete(users::forget))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(status::healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The same routes, requiring `Authorization: Bearer <api_token>` (for `tcp_listen`).
pub fn tcp_router(state: SharedState) -> Router {
    router(Arc::clone(&state)).layer(middleware::from_fn_with_state(state, require_token))
}

async fn require_token(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", state.config.api_token);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !state.config.api_token.is_empty() && bool::from(given.ct_eq(expected.as_bytes())) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this listener requires Authorization: Bearer <api_token>",
        )
        .into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// An error answer: `{"error": {"code", "message", "details"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<Value>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after_s: None,
        }
    }

    pub fn with_details(mut self, details: Vec<Value>) -> ApiError {
        self.details = details;
        self
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<StoreError> for ApiError {
    /// A database that cannot take the request is a temporary condition for the site.
    fn from(error: StoreError) -> ApiError {
        tracing::error!(%error, "database unavailable");
        ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the agent cannot store data right now: {error}"),
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
