//! The receiver as a server: its route table ([`routes()`]) and the router built from it,
//! opening a store, the loop that serves within the bounds of the shared bounded server
//! ([`usage_common::server`]), `GET /health`, the metering of every answer for
//! `GET /metrics`, and the background work of a node
//! (retention, warm views, alert delivery).
//!
//! **Invariant:** the routes are the one table [`routes()`] lists; the router is built from
//! it and nothing else, so the reference (docs/reference/openapi/receiver.json) is held
//! against it by a test. Beyond `GET /health` no handler lives here: they are
//! [`crate::ingest`]'s, [`crate::views`]' and [`crate::admin`]'s.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use std::time::Instant;
use usage_common::credentials::presented;
use usage_common::routes::{self, Route};
use usage_common::server::{self, Limits};

use crate::admin;
use crate::budgets::delivery;
use crate::days::day_of_ms;
use crate::http::error;
use crate::http::error::{ErrorCode, ReceiverError, blocking};
use crate::ingest;
use crate::metrics::Answer;
use crate::settings::ReceiverSettings;
use crate::state::ReceiverState;
use crate::store::{EVENT_RETENTION, ReceiverStore, ReceiverStoreError, RetainedDays};
use crate::views;
use axum::Json;
use axum::extract::State;
use serde_json::Value;
use serde_json::json;

/// How often old events are purged (and, on PostgreSQL, partitions made ahead).
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Opens (creating it and its parent directories if needed) the SQLite store at `path`.
pub fn open_sqlite(path: &Path) -> Result<Arc<dyn ReceiverStore>, ReceiverStoreError> {
    Ok(Arc::new(crate::store::sqlite::SqliteStore::open(path)?))
}

/// Connects to the PostgreSQL store at `url`, its connections on `runtime`; any number of
/// nodes may share its database.
pub fn open_postgres(
    url: &str,
    runtime: tokio::runtime::Handle,
) -> Result<Arc<dyn ReceiverStore>, ReceiverStoreError> {
    Ok(Arc::new(crate::store::postgres::PostgresStore::open(
        url, runtime,
    )?))
}

/// Every route of the receiver, in the order the reference lists them.
pub fn routes() -> Vec<Route<Arc<ReceiverState>>> {
    vec![
        Route::new(Method::POST, "/api/installations", ingest::enroll::enroll),
        Route::new(Method::POST, "/api/usage/event", ingest::batch::ingest),
        Route::new(Method::GET, "/api/usage/summary", views::usage::summary),
        Route::new(Method::GET, "/api/usage/events", views::usage::events),
        Route::new(
            Method::GET,
            "/api/usage/installations",
            views::installations::list,
        ),
        Route::new(Method::GET, "/api/prices", views::prices::show),
        Route::new(
            Method::PUT,
            "/api/installations/{install_id}/plan",
            admin::installs::set_plan,
        ),
        Route::new(
            Method::GET,
            "/api/installations/{install_id}/plans",
            admin::installs::plans,
        ),
        Route::new(
            Method::PUT,
            "/api/installations/{install_id}/label",
            admin::installs::set_label,
        ),
        Route::new(
            Method::DELETE,
            "/api/installations/{install_id}",
            admin::installs::erase,
        ),
        Route::new(
            Method::PUT,
            "/api/installations/{install_id}/budget",
            admin::budget::set,
        ),
        Route::new(
            Method::DELETE,
            "/api/installations/{install_id}/budget",
            admin::budget::remove,
        ),
        Route::new(Method::GET, "/api/alerts", views::alerts::list),
        Route::new(Method::GET, "/dashboard", views::dashboard::page),
        Route::new(
            Method::GET,
            "/dashboard/installations/{install_id}",
            views::dashboard::detail,
        ),
        Route::new(Method::GET, "/health", health),
        Route::new(Method::GET, "/metrics", views::metrics::scrape),
    ]
}

/// The receiver's routes ([`routes()`]) over a shared state.
pub fn router(state: Arc<ReceiverState>) -> Router {
    let body_limit = state.settings.max_body_bytes;
    routes::router(routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::map_response(no_sniff))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metered))
        .with_state(state)
}

/// Counts what every answer says and times the batches and the views
/// ([`crate::metrics::Metrics::answered`]).
async fn metered(State(app): State<Arc<ReceiverState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The table's own path, not the request's: a path parameter must not become a series.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|matched| routes_table_path(matched.as_str()));
    let presented = presented(request.headers());
    let response = next.run(request).await;
    app.metrics.answered(Answer {
        route,
        error_code: response.extensions().get::<ErrorCode>().map(|code| code.0),
        refused_credentials: presented && response.status() == StatusCode::UNAUTHORIZED,
        elapsed: started.elapsed(),
    });
    response
}

/// The path of [`routes()`] that `matched` is, as a `'static` string.
fn routes_table_path(matched: &str) -> Option<&'static str> {
    std::iter::once(crate::metrics::INGEST_ROUTE)
        .chain(crate::metrics::VIEWS.iter().map(|(path, _)| *path))
        .find(|path| *path == matched)
}

/// Every answer declares its type authoritatively: browsers must not guess one.
async fn no_sniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// How long a stopping receiver lets open connections finish their request.
pub const RECEIVER_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the receiver on an already-bound listener, within the bounds of
/// [`usage_common::server`] (docs/reference/receiver-api.md, "Limits"), until `shutdown`
/// completes, then finishes the requests in flight. Also purges events older than
/// [`EVENT_RETENTION`] at start and every hour, keeps the provider's first views ready
/// when the store keeps views, and, with `ALERT_WEBHOOK_URL`, delivers budget alerts.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: ReceiverSettings,
    store: Arc<dyn ReceiverStore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits::new(settings.max_connections, RECEIVER_DRAIN_TIMEOUT);
    let state = Arc::new(ReceiverState::new(settings, store.clone()));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "receiver listening");
    }
    let retention = tokio::spawn(retention_loop(state.clone()));
    let views = store
        .keeps_views()
        .then(|| tokio::spawn(views::installations::keep_views_warm(state.clone())));
    let delivery = state
        .settings
        .alert_webhook
        .clone()
        .map(|webhook| tokio::spawn(delivery::deliver_loop(state.clone(), webhook)));
    server::serve(listener, router(state), limits, shutdown).await;
    retention.abort();
    if let Some(views) = views {
        views.abort();
    }
    if let Some(delivery) = delivery {
        delivery.abort();
    }
    tracing::info!("receiver stopped");
    Ok(())
}

async fn retention_loop(app: Arc<ReceiverState>) {
    let store = app.store.clone();
    let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let today = day_of_ms(Utc::now().timestamp_millis());
        let days = RetainedDays {
            first_kept: today - EVENT_RETENTION.num_days(),
            today,
        };
        let task_store = store.clone();
        let purged = tokio::task::spawn_blocking(move || task_store.maintain(days)).await;
        match purged {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => tracing::info!(count, "purged events past retention"),
            Ok(Err(error)) => {
                app.metrics.store_error();
                tracing::error!(%error, "could not purge old events");
            }
            Err(error) => tracing::error!(%error, "the purge task failed"),
        }
    }
}

/// `{"status": "ok", "store"}` while the database answers, `503` while it does not, so a
/// load balancer takes a node that lost its database out of rotation.
pub async fn health(State(app): State<Arc<ReceiverState>>) -> Result<Json<Value>, ReceiverError> {
    let store = app.store.clone();
    let kind = store.kind().as_str();
    blocking(move || store.ping()).await?;
    Ok(Json(json!({"status": "ok", "store": kind})))
}
