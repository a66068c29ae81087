//! The local HTTP API (docs/reference/local-api.md), served on the Unix socket and optionally on a
//! loopback TCP port with a bearer token. One file per resource; this file holds the
//! router and the error shape. The state handlers share with the jobs is
//! [`crate::state`]'s.
//!
//! **Invariant:** handlers never wait on the backend; they only touch the local store.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::Method;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use usage_common::routes::{self, Route};

use crate::state::SharedState;
use crate::store::{Store, StoreError};
use usage_common::credentials::{
    FailureThrottle, THROTTLED_CODE, bearer_token, credential_eq, presented,
};

pub mod check;
pub mod events;
pub mod export;
pub mod jobs;
pub mod metrics;
pub mod quota;
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
    let reading = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let store = reading.reader.lock().unwrap_or_else(|p| p.into_inner());
        work(&store)
    })
    .await
    .map_err(|e| ApiError::internal(format!("read task failed: {e}")))?
    .map_err(|error| {
        state.writer.storage().observe(&error);
        ApiError::from(error)
    })
}

/// Every route of the local API, in the order the reference lists them.
pub fn routes() -> Vec<Route<SharedState>> {
    vec![
        Route::new(Method::POST, "/v1/events", events::record),
        Route::new(Method::GET, "/v1/status", status::status),
        Route::new(Method::POST, "/v1/check", check::check),
        Route::new(Method::POST, "/v1/sync", sync::sync_now),
        Route::new(Method::POST, "/v1/retry-failed", sync::retry_failed),
        Route::new(Method::POST, "/v1/rollup", jobs::rollup),
        Route::new(Method::POST, "/v1/purge", jobs::purge),
        Route::new(Method::GET, "/v1/usage", usage::usage),
        Route::new(Method::GET, "/v1/export", export::export),
        Route::new(Method::DELETE, "/v1/users/{user_id}", users::forget),
        Route::new(Method::GET, "/v1/quota", quota::quota),
        Route::new(Method::POST, "/v1/quota/holds", quota::hold),
        Route::new(Method::DELETE, "/v1/quota/holds/{hold_id}", quota::release),
        Route::new(Method::GET, "/metrics", metrics::metrics),
        Route::new(Method::GET, "/healthz", status::healthz),
    ]
}

/// The routes of the local API ([`routes()`]).
pub fn router(state: SharedState) -> Router {
    routes::router(routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The same routes, requiring `Authorization: Bearer <api_token>` (for `tcp_listen`), with
/// failed tokens throttled per client address. The server must put the peer's
/// `ConnectInfo<SocketAddr>` in each request (the daemon's does), or all clients share
/// one count.
pub fn tcp_router(state: SharedState) -> Router {
    let guard = Arc::new(TokenGuard {
        state: Arc::clone(&state),
        throttle: FailureThrottle::default(),
    });
    router(state).layer(middleware::from_fn_with_state(guard, require_token))
}

/// What the bearer check needs: the configured token and the failures seen so far.
struct TokenGuard {
    state: SharedState,
    throttle: FailureThrottle,
}

/// Order of checks: a throttled address is refused before its token is looked at, so
/// even the right token waits out the window; then the token; a refused token that was
/// presented is counted (the receiver's rule, [`usage_common::credentials::presented`]).
async fn require_token(
    State(guard): State<Arc<TokenGuard>>,
    request: Request,
    next: Next,
) -> Response {
    // Without connection info (a router served without it) every client shares one count.
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    if let Err(wait) = guard.throttle.check(client, Instant::now()) {
        return ApiError {
            retry_after_s: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                THROTTLED_CODE,
                format!(
                    "{} failed bearer tokens from {client} within {} s: try again later",
                    usage_common::credentials::throttle::MAX_FAILURES,
                    usage_common::credentials::throttle::WINDOW.as_secs()
                ),
            )
        }
        .into_response();
    }
    let expected = &guard.state.config.api_token;
    let accepted = bearer_token(request.headers()).is_some_and(|given| {
        !expected.is_empty() && credential_eq(given.as_bytes(), expected.as_bytes())
    });
    if accepted {
        return next.run(request).await;
    }
    if presented(request.headers()) {
        guard.throttle.record_failure(client, Instant::now());
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this listener requires Authorization: Bearer <api_token>",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// A known path called with a method it does not answer; axum adds the `Allow` header.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not answer that method",
    )
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
    /// A database that cannot take the request is a temporary condition for the site,
    /// whatever the cause; damage or I/O gets its own code, so an admin reading the
    /// answer knows to run `usage-agent check` (status then says `failing`).
    fn from(error: StoreError) -> ApiError {
        tracing::error!(%error, "database unavailable");
        let code = if error.is_damage() {
            "storage_failing"
        } else {
            "unavailable"
        };
        ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code,
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
