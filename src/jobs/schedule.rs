//! When the daily jobs run: the `[schedule]` cron expressions (seconds first) in the
//! configured `timezone`, on a tokio-cron-scheduler.
//!
//! Each run is a one-shot job at the next fire time, computed with croner in the real
//! time zone ([`crate::calendar::Cron`]), and the next one is armed only when the run has
//! finished. This is on purpose: tokio-cron-scheduler's own cron jobs keep the UTC offset
//! of the moment they were created, so after a DST change a "02:00" job would fire at
//! 01:00 or 03:00. Arming after the run also means a job never overlaps itself; fire
//! times that passed while it ran (or while the machine slept) are skipped and counted in
//! `usage_agent_job_missed_total`. A failed run is logged and counted (see
//! [`super::maintenance`]) and runs again at its next time.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use super::maintenance::{self, CLEANUP, ROLLUP};
use crate::calendar::Cron;
use crate::state::SharedState;

/// Which daily job a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daily {
    Rollup,
    Cleanup,
}

impl Daily {
    fn name(self) -> &'static str {
        match self {
            Daily::Rollup => ROLLUP,
            Daily::Cleanup => CLEANUP,
        }
    }
}

/// The running schedule of the daily jobs.
pub struct Scheduler {
    inner: JobScheduler,
    state: SharedState,
}

impl Scheduler {
    /// Arms the rollup and cleanup schedules and starts the scheduler.
    pub async fn start(state: SharedState) -> Result<Scheduler, JobSchedulerError> {
        let schedule = &state.config.schedule;
        let rollup = Arc::new(schedule.rollup.clone());
        let cleanup = Arc::new(schedule.cleanup.clone());
        let inner = JobScheduler::new().await?;
        arm(&inner, state.clone(), Daily::Rollup, rollup, Utc::now()).await?;
        arm(&inner, state.clone(), Daily::Cleanup, cleanup, Utc::now()).await?;
        inner.start().await?;
        Ok(Scheduler { inner, state })
    }

    /// Stops arming new runs, lets a running job stop at its next transaction, and shuts
    /// the scheduler down.
    pub async fn stop(mut self) {
        self.state.maintenance.stop().await;
        if let Err(error) = self.inner.shutdown().await {
            tracing::warn!(%error, "the job scheduler did not shut down cleanly");
        }
    }
}

/// Adds a one-shot job at the schedule's first fire time after `after` that runs `job`
/// and arms the next.
fn arm(
    scheduler: &JobScheduler,
    state: SharedState,
    job: Daily,
    schedule: Arc<Cron>,
    after: DateTime<Utc>,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), JobSchedulerError>> + Send + '_>> {
    Box::pin(async move {
        if state.maintenance.is_stopping() {
            return Ok(());
        }
        let calendar = state.config.timezone;
        let Some(due) = schedule.next_after(calendar, after) else {
            tracing::warn!(job = job.name(), "its schedule never fires again");
            return Ok(());
        };
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        tracing::debug!(job = job.name(), next = %due, "job armed");
        let one_shot = Job::new_one_shot_async(wait, move |_id, scheduler| {
            let state = state.clone();
            let schedule = schedule.clone();
            Box::pin(async move {
                // Errors are logged and counted by the maintenance wrapper.
                let _ = match job {
                    Daily::Rollup => maintenance::rollup(&state, None).await.map(drop),
                    Daily::Cleanup => maintenance::purge(&state).await.map(drop),
                };
                // The fire times that passed while this run waited or ran are missed.
                let now = Utc::now();
                let missed = schedule.fires_between(calendar, due, now);
                if missed > 0 {
                    tracing::warn!(job = job.name(), missed, "scheduled runs were missed");
                    state.metrics.job_missed(job.name(), missed);
                }
                if let Err(error) = arm(&scheduler, state, job, schedule, now).await {
                    tracing::error!(job = job.name(), %error, "cannot schedule the next run");
                }
            })
        })?;
        scheduler.add(one_shot).await.map(drop)
    })
}
