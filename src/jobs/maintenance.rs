//! The local-data jobs behind one lock: rollup, cleanup (retention) and erasure, whether
//! the schedule or the API starts them. One at a time: they never overlap themselves or
//! each other, which the rollup's `seq` bookkeeping relies on (no delete runs while a
//! rollup is between its snapshot and its mark). A request that arrives while one runs
//! waits for it and then runs.

use chrono::{NaiveDate, Utc};

use super::retention::{self, ForgetOutcome, PurgeOutcome};
use super::rollup::{self, JobError, RollupOutcome};
use crate::state::AppState;

/// Job names in metrics and logs.
pub const ROLLUP: &str = "rollup";
pub const CLEANUP: &str = "cleanup";

/// Rolls up every day touched since the last rollup, or recomputes `day`.
pub async fn rollup(state: &AppState, day: Option<NaiveDate>) -> Result<RollupOutcome, JobError> {
    let _guard = state.maintenance.lock().await;
    let calendar = state.config.timezone;
    let result = match day {
        None => rollup::run_once(&state.writer, calendar).await,
        Some(day) => {
            let event_days = state.config.retention.event_days;
            rollup::run_for_day(&state.writer, calendar, day, Utc::now(), event_days).await
        }
    };
    finish(state, ROLLUP, result)
}

/// Applies retention now.
pub async fn purge(state: &AppState) -> Result<PurgeOutcome, JobError> {
    let _guard = state.maintenance.lock().await;
    let result = retention::run_once(
        &state.writer,
        state.config.timezone,
        &state.config.retention,
        Utc::now(),
        &state.metrics,
        state.maintenance.stopping(),
    )
    .await;
    finish(state, CLEANUP, result)
}

/// Erases one user's local data, and their usage from the quotas at once.
pub async fn forget(state: &AppState, user_id: u64) -> Result<ForgetOutcome, JobError> {
    let _guard = state.maintenance.lock().await;
    let outcome = retention::forget_user(&state.writer, user_id).await?;
    state.quota.forget_user(user_id);
    tracing::info!(
        user_id,
        events = outcome.events_deleted,
        daily_rows = outcome.daily_rows_deleted,
        "erased a user's local data"
    );
    Ok(outcome)
}

/// Logs and counts a job run.
fn finish<T: std::fmt::Debug>(
    state: &AppState,
    job: &'static str,
    result: Result<T, JobError>,
) -> Result<T, JobError> {
    state.metrics.job_run(job, result.is_ok());
    match &result {
        Ok(outcome) => tracing::info!(job, ?outcome, "job finished"),
        Err(error) => tracing::error!(job, %error, "job failed; it runs again at its next time"),
    }
    result
}
