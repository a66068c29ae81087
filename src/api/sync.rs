//! `POST /v1/sync` (run a sync now and answer with its report) and `POST /v1/retry-failed`
//! (put failed events back in the queue).
//!
//! `POST /v1/sync` is the one endpoint that waits on the backend, because that is what it
//! is asked to do; the run happens in its own task, so a client that hangs up does not cut
//! a run short, and other handlers never wait for it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::ApiError;
use crate::state::SharedState;
use crate::sync::engine::SyncReport;

pub async fn sync_now(State(state): State<SharedState>) -> Result<Json<SyncReport>, ApiError> {
    let Some(job) = state.sync.as_ref().map(Arc::clone) else {
        let reason = state
            .config
            .sync_disabled_reason()
            .unwrap_or("sync is disabled");
        return Err(ApiError::new(StatusCode::CONFLICT, "sync_disabled", reason));
    };
    let report = tokio::spawn(async move { job.run_now().await })
        .await
        .map_err(|e| ApiError::internal(format!("the sync run failed: {e}")))?;
    Ok(Json(report))
}

pub async fn retry_failed(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let requeued = state.writer.run(|store| store.requeue_failed()).await?;
    if requeued > 0 {
        tracing::info!(requeued, "failed events put back in the sync queue");
    }
    Ok(Json(json!({"requeued": requeued})))
}
