//! The bundled receiver: the backend's ingest side (verify, dedupe, store) and the
//! provider's read views, budgets and alerts (SPEC sections 6, 9 and 11).
//!
//! **Invariant:** from the rest of the crate the receiver uses only the pure event rules
//! ([`usage_protocol::event`]), the wire types ([`usage_protocol::wire`]) and the signing code
//! ([`usage_protocol::signing`]); it shares no state, store or configuration with the agent.
//!
//! Code map: [`serve`] and the router are here; [`settings`] reads the environment;
//! [`store`] is the storage trait, with its SQLite and PostgreSQL implementations (all
//! SQL) beneath it;
//! [`ingest`], [`enroll`], [`provider`] (summary, events), [`installations`] (usage, cost,
//! plans, labels, erasure), [`prices`] (the price book in force) and [`dashboard`] (HTML)
//! are the handlers, [`view`] reads what a view asks (period, sort, page); [`budgets`] sets
//! budgets and checks them after each batch, and [`alerts`] lists the alerts and delivers
//! them to the webhook from the store's outbox; [`price_book`] reads and checks the price
//! book and [`pricing`] is the money arithmetic; [`auth`] checks tokens and basic auth,
//! failed ones throttled per client address by [`usage_common::credentials`]; [`rate_limit`]
//! limits requests per install; [`clip`]
//! bounds request values before they are logged; [`error`] shapes error answers.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use chrono::{DateTime, Utc};

use usage_common::credentials::FailureThrottle;
use usage_common::server::{self, Limits};

pub mod alerts;
pub mod auth;
pub mod budgets;
pub mod cli;
pub mod clip;
pub mod dashboard;
pub mod enroll;
pub mod error;
pub mod ingest;
pub mod installations;
pub mod price_book;
pub mod prices;
pub mod pricing;
pub mod provider;
pub mod rate_limit;
pub mod settings;
pub mod store;
pub mod view;

pub use settings::{ReceiverSettings, SettingsError};
pub use store::{ReceiverStore, ReceiverStoreError};

/// How long raw events are kept: longer than any event the receiver accepts (91 days),
/// so a re-sent event is always recognised as a duplicate.
pub const EVENT_RETENTION: chrono::Duration = chrono::Duration::days(92);
/// How often old events are purged (and, on PostgreSQL, partitions made ahead).
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// What every handler shares.
pub struct ReceiverState {
    pub settings: ReceiverSettings,
    pub store: Arc<dyn ReceiverStore>,
    /// Failed credentials per client address (SPEC 10).
    pub credential_throttle: FailureThrottle,
    /// The settings' prices, converted once to micro-units.
    pub pricing: pricing::Pricing,
    /// One permit per batch whose costly work may run now
    /// ([`ReceiverSettings::max_inflight_batches`], SPEC 10).
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Wakes this node's alert delivery when it records an alert (other nodes' alerts
    /// are found by polling).
    pub alerts_recorded: tokio::sync::Notify,
}

impl ReceiverState {
    pub fn new(settings: ReceiverSettings, store: Arc<dyn ReceiverStore>) -> ReceiverState {
        ReceiverState {
            credential_throttle: FailureThrottle::default(),
            pricing: pricing::Pricing::from_settings(&settings),
            inflight: Arc::new(tokio::sync::Semaphore::new(settings.max_inflight_batches)),
            alerts_recorded: tokio::sync::Notify::new(),
            settings,
            store,
        }
    }

    /// Now, for the provider views: [`ReceiverSettings::provider_now`] or the clock.
    pub fn provider_now(&self) -> DateTime<Utc> {
        self.settings.provider_now.unwrap_or_else(Utc::now)
    }
}

/// Opens (creating it and its parent directories if needed) the SQLite store at `path`.
pub fn open_sqlite(path: &Path) -> Result<Arc<dyn ReceiverStore>, ReceiverStoreError> {
    Ok(Arc::new(store::sqlite::SqliteStore::open(path)?))
}

/// Connects to the PostgreSQL store at `url`, its connections on `runtime` (SPEC 9).
pub fn open_postgres(
    url: &str,
    runtime: tokio::runtime::Handle,
) -> Result<Arc<dyn ReceiverStore>, ReceiverStoreError> {
    Ok(Arc::new(store::postgres::PostgresStore::open(
        url, runtime,
    )?))
}

/// The receiver's routes over a shared state.
pub fn router(state: Arc<ReceiverState>) -> Router {
    let body_limit = state.settings.max_body_bytes;
    Router::new()
        .route("/api/installations", post(enroll::enroll))
        .route("/api/usage/event", post(ingest::ingest))
        .route("/api/usage/summary", get(provider::summary))
        .route("/api/usage/events", get(provider::events))
        .route("/api/usage/installations", get(installations::list))
        .route("/api/prices", get(prices::show))
        .route(
            "/api/installations/{install_id}/plan",
            put(installations::set_plan),
        )
        .route(
            "/api/installations/{install_id}/label",
            put(installations::set_label),
        )
        .route(
            "/api/installations/{install_id}",
            delete(installations::erase),
        )
        .route(
            "/api/installations/{install_id}/budget",
            put(budgets::set).delete(budgets::remove),
        )
        .route("/api/alerts", get(alerts::list))
        .route("/dashboard", get(dashboard::page))
        .route(
            "/dashboard/installations/{install_id}",
            get(dashboard::detail),
        )
        .route("/health", get(provider::health))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::map_response(no_sniff))
        .with_state(state)
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

/// Serves the receiver on an already-bound listener, within the bounds of SPEC 10
/// ([`usage_common::server`]), until `shutdown` completes, then finishes the requests in flight. Also purges events older than [`EVENT_RETENTION`]
/// at start and every hour, keeps the provider's first views ready when the store keeps
/// views, and, with `ALERT_WEBHOOK_URL`, delivers budget alerts.
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
    let retention = tokio::spawn(retention_loop(store.clone()));
    let views = store
        .keeps_views()
        .then(|| tokio::spawn(installations::keep_views_warm(state.clone())));
    let delivery = state
        .settings
        .alert_webhook
        .clone()
        .map(|webhook| tokio::spawn(alerts::deliver_loop(state.clone(), webhook)));
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

async fn retention_loop(store: Arc<dyn ReceiverStore>) {
    let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let today = Utc::now().timestamp_millis().div_euclid(86_400_000);
        let days = store::RetainedDays {
            first_kept: today - EVENT_RETENTION.num_days(),
            today,
        };
        let task_store = store.clone();
        let purged = tokio::task::spawn_blocking(move || task_store.maintain(days)).await;
        match purged {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => tracing::info!(count, "purged events past retention"),
            Ok(Err(error)) => tracing::error!(%error, "could not purge old events"),
            Err(error) => tracing::error!(%error, "the purge task failed"),
        }
    }
}
