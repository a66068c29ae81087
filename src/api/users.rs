//! `DELETE /v1/users/{user_id}`: erase one user's local events and daily summaries.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::json;

use super::ApiError;
use crate::jobs::maintenance;
use crate::jobs::retention::ForgetOutcome;
use crate::state::SharedState;
use usage_protocol::event::MAX_USER_ID;

pub async fn forget(
    State(state): State<SharedState>,
    Path(user_id): Path<String>,
) -> Result<Json<ForgetOutcome>, ApiError> {
    let user_id = user_id
        .parse::<u64>()
        .ok()
        .filter(|id| *id <= MAX_USER_ID)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("user_id must be an integer from 0 to {MAX_USER_ID}, not {user_id:?}"),
            )
            .with_details(vec![
                json!({"parameter": "user_id", "message": "must be an integer from 0 to 2^53"}),
            ])
        })?;
    Ok(Json(maintenance::forget(&state, user_id).await?))
}
