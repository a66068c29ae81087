//! `POST /v1/check` (`usage-agent check`): a full `integrity_check` of the
//! database on a connection of its own, so it reads the file rather than a cache.
//! Sound sets the storage state `ok` (clearing a `recovered` kept since a salvage, or a
//! `failing`); damaged sets it `failing`. Both answer `200` with the verdict; a check that
//! could not run at all answers `503` in the error shape.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::ApiError;
use crate::state::SharedState;
use crate::store::Verdict;
use crate::store::health::StorageState;
use crate::store::salvage::integrity_check;

pub async fn check(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let path = state.config.database_path();
    let checked = path.clone();
    let verdict = tokio::task::spawn_blocking(move || integrity_check(&checked))
        .await
        .map_err(|e| ApiError::internal(format!("check task failed: {e}")))??;
    let problems = match &verdict {
        Verdict::Sound => {
            state
                .writer
                .run(|store| store.set_storage_state(&StorageState::Ok))
                .await?;
            state.writer.storage().set(StorageState::Ok);
            tracing::info!(path = %path.display(), "integrity_check: the database is sound");
            Vec::new()
        }
        Verdict::Damaged(problems) => {
            tracing::error!(path = %path.display(), ?problems, "integrity_check: the database is damaged");
            state.writer.storage().fail(format!(
                "integrity_check found the database damaged: {}",
                problems.first().map_or("", String::as_str)
            ));
            problems.clone()
        }
    };
    let sound = verdict == Verdict::Sound;
    Ok(Json(json!({
        "result": if sound { "sound" } else { "damaged" },
        "database": path.display().to_string(),
        "problems": problems,
        "storage": state.writer.storage().get(),
    })))
}
