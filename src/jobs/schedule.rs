//! When the daily jobs run: the `[schedule]` cron expressions (seconds first) in the
//! configured `timezone`, on a tokio-cron-scheduler.
//!
//! Each run is a one-shot job at the next fire time, computed here with croner in the real
//! time zone, and the next one is armed only when the run has finished. This is on purpose:
//! tokio-cron-scheduler's own cron jobs keep the UTC offset of the moment they were
//! created, so after a DST change a "02:00" job would fire at 01:00 or 03:00. Arming after
//! the run also means a job never overlaps itself and missed ticks are skipped. A failed
//! run is logged and counted (see [`super::maintenance`]) and runs again at its next time.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use super::maintenance::{CLEANUP, ROLLUP};
use crate::api::SharedState;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
}

/// The scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid schedule for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("the job scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
}

impl CronSchedule {
    /// Parses a cron expression with seconds first (six or seven fields), the dialect
    /// tokio-cron-scheduler uses.
    pub fn parse(expr: &str, tz: Tz) -> Result<CronSchedule, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map_err(|e| format!("{expr:?} is not a cron expression with seconds first, such as \"0 0 2 * * *\" ({e})"))?;
        Ok(CronSchedule { cron, tz })
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

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
    pub async fn start(state: SharedState) -> Result<Scheduler, ScheduleError> {
        let config = &state.config;
        let tz: Tz = config
            .timezone
            .parse()
            .map_err(|_| ScheduleError::Invalid {
                key: "timezone",
                message: format!("unknown time zone {:?}", config.timezone),
            })?;
        let rollup = CronSchedule::parse(&config.schedule.rollup, tz).map_err(|message| {
            ScheduleError::Invalid {
                key: "schedule.rollup",
                message,
            }
        })?;
        let cleanup = CronSchedule::parse(&config.schedule.cleanup, tz).map_err(|message| {
            ScheduleError::Invalid {
                key: "schedule.cleanup",
                message,
            }
        })?;
        let inner = JobScheduler::new().await?;
        arm(&inner, state.clone(), Daily::Rollup, Arc::new(rollup)).await?;
        arm(&inner, state.clone(), Daily::Cleanup, Arc::new(cleanup)).await?;
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

/// Adds a one-shot job at the schedule's next fire time that runs `job` and arms the next.
fn arm(
    scheduler: &JobScheduler,
    state: SharedState,
    job: Daily,
    schedule: Arc<CronSchedule>,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), JobSchedulerError>> + Send + '_>> {
    Box::pin(async move {
        if state.maintenance.is_stopping() {
            return Ok(());
        }
        let now = Utc::now();
        let Some(next) = schedule.next_after(now) else {
            tracing::warn!(job = job.name(), "its schedule never fires again");
            return Ok(());
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tracing::debug!(job = job.name(), next = %next, "job armed");
        let one_shot = Job::new_one_shot_async(wait, move |_id, scheduler| {
            let state = state.clone();
            let schedule = schedule.clone();
            Box::pin(async move {
                // Errors are logged and counted by the maintenance wrapper.
                let _ = match job {
                    Daily::Rollup => state.maintenance.rollup(&state, None).await.map(drop),
                    Daily::Cleanup => state.maintenance.purge(&state).await.map(drop),
                };
                if let Err(error) = arm(&scheduler, state, job, schedule).await {
                    tracing::error!(job = job.name(), %error, "cannot schedule the next run");
                }
            })
        })?;
        scheduler.add(one_shot).await.map(drop)
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn local(tz: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, m, d, h, min, 0)
            .earliest()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn fires(schedule: &CronSchedule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = from;
        for _ in 0..n {
            at = schedule.next_after(at).unwrap();
            out.push(at);
        }
        out
    }

    #[test]
    fn daily_jobs_fire_at_local_time_across_dst() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let cleanup = CronSchedule::parse("0 0 3 * * *", berlin).unwrap();
        // Spring forward (2026-03-29 02:00 -> 03:00) and fall back (2026-10-25 03:00 -> 02:00).
        let spring = fires(&cleanup, local(berlin, 2026, 3, 27, 12, 0), 4);
        let autumn = fires(&cleanup, local(berlin, 2026, 10, 23, 12, 0), 4);
        for at in spring.iter().chain(&autumn) {
            let local = at.with_timezone(&berlin);
            assert_eq!(local.format("%H:%M:%S").to_string(), "03:00:00", "{local}");
        }
        let days: Vec<u32> = autumn
            .iter()
            .map(|t| {
                t.with_timezone(&berlin)
                    .format("%d")
                    .to_string()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            days,
            vec![24, 25, 26, 27],
            "once a day, the long day included"
        );
        // 03:00 CET is 02:00 UTC, 03:00 CEST is 01:00 UTC.
        assert_eq!(
            spring[0],
            Utc.with_ymd_and_hms(2026, 3, 28, 2, 0, 0).unwrap()
        );
        assert_eq!(
            spring[1],
            Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_time_skipped_by_dst_still_runs_that_day_and_a_repeated_one_runs_once() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let rollup = CronSchedule::parse("0 30 2 * * *", berlin).unwrap();
        let spring = fires(&rollup, local(berlin, 2026, 3, 28, 12, 0), 2);
        assert_eq!(
            spring[0].with_timezone(&berlin).format("%m-%d").to_string(),
            "03-29",
            "{spring:?}"
        );
        assert_eq!(
            spring[1]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "03-30 02:30"
        );
        let autumn = fires(&rollup, local(berlin, 2026, 10, 24, 12, 0), 2);
        assert_eq!(
            autumn[0]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "10-25 02:30"
        );
        assert_eq!(
            autumn[1]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "10-26 02:30"
        );
    }

    #[test]
    fn bad_expressions_are_refused() {
        for bad in ["0 2 * * *", "every day", "0 0 25 * * *", ""] {
            assert!(CronSchedule::parse(bad, Tz::UTC).is_err(), "{bad:?}");
        }
        CronSchedule::parse("*/5 * * * * *", Tz::UTC).unwrap();
    }
}
