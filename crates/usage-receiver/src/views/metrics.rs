//! `GET /metrics`: this node's metrics as OpenMetrics text ([`crate::metrics`]), for the
//! provider's basic auth or the bearer `METRICS_TOKEN`; the pool gauges are read from the
//! store at scrape time.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use crate::http::auth::authorize_scrape;
use crate::http::error::ReceiverError;
use crate::metrics::CONTENT_TYPE;
use crate::state::ReceiverState;

pub async fn scrape(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ReceiverError> {
    authorize_scrape(&app, &headers, peer.ip())?;
    // Reading a pool's status takes a lock for a moment, never a connection.
    let text = app.metrics.encode(&app.store.pool_use());
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}
