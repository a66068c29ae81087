//! `POST /v1/rollup` and `POST /v1/purge`: run a local-data job now and answer with its
//! counts when it is done (after any run in progress).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;

use super::ApiError;
use super::usage::{Params, parse_date};
use crate::jobs::maintenance;
use crate::jobs::retention::PurgeOutcome;
use crate::jobs::rollup::{JobError, RollupOutcome};
use crate::state::SharedState;

impl From<JobError> for ApiError {
    fn from(error: JobError) -> ApiError {
        match error {
            JobError::Store(error) => ApiError::from(error),
            JobError::Purged { .. } => {
                ApiError::new(StatusCode::CONFLICT, "purged", error.to_string())
            }
            JobError::Stopped => ApiError {
                retry_after_s: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stopping",
                    error.to_string(),
                )
            },
        }
    }
}

/// `POST /v1/rollup[?date=YYYY-MM-DD]`.
pub async fn rollup(
    State(state): State<SharedState>,
    query: Result<axum::extract::Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<RollupOutcome>, ApiError> {
    let params = Params::parse(query, &["date"])?;
    let day = params
        .get("date")
        .map(|text| parse_date("date", text))
        .transpose()?;
    Ok(Json(maintenance::rollup(&state, day).await?))
}

/// `POST /v1/purge`.
pub async fn purge(State(state): State<SharedState>) -> Result<Json<PurgeOutcome>, ApiError> {
    Ok(Json(maintenance::purge(&state).await?))
}
