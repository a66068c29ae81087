//! `GET /metrics`: the Prometheus/OpenMetrics text, with the queue gauges and the last
//! sync time read from the store at scrape time.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::metrics::{CONTENT_TYPE, Snapshot};
use crate::state::SharedState;

pub async fn metrics(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let snapshot = super::read(&state, |store| {
        let counts = store.queue_counts()?;
        Ok(Snapshot {
            pending_events: counts.pending,
            failed_events: counts.failed,
            last_success_ms: store.sync_meta()?.last_success_ms,
            quota_holds: 0,
        })
    })
    .await?;
    let snapshot = Snapshot {
        quota_holds: state.quota.open_holds(chrono::Utc::now()) as u64,
        ..snapshot
    };
    let text = state.metrics.encode(snapshot);
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}
