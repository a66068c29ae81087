//! The cleanup job (retention) and erasure of one user: deletes in small transactions,
//! each its own writer job, so recording interleaves and never waits long behind them.
//!
//! Retention works on whole days in the agent's time zone: a day's raw events go once the
//! whole day is older than `retention.event_days` (see [`Calendar::first_kept_day`]), and
//! only after their day is rolled up: the job first catches the rollup up, and the store
//! deletes only events at or below the rollup mark. An event purged before it was synced
//! is counted in the metrics and logged as a warning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::rollup::{self, JobError, RollupOutcome};
use crate::calendar::{Calendar, day_text};
use crate::config::RetentionConfig;
use crate::metrics::Metrics;
use crate::store::writer::Writer;

/// Rows deleted per transaction (a few ms of writer time).
pub const CHUNK: usize = 1000;
/// The purge rests after each transaction for as long as the transaction took (at most
/// this): the writer then stays idle at least half of the time, so recording never queues
/// long and the background WAL checkpointer keeps up. Without the rest, a large purge
/// fills the WAL faster than it is checkpointed and the writer stalls on checkpoints.
const MAX_REST: Duration = Duration::from_millis(50);
/// Width of the `seq` range one erasure transaction scans.
const FORGET_RANGE: i64 = 20_000;

/// What a cleanup run did (the `POST /v1/purge` answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PurgeOutcome {
    pub events_deleted: u64,
    /// Of those, events that had not been synced.
    pub unsynced_deleted: u64,
    pub daily_rows_deleted: u64,
    /// The first day whose raw events are kept (`YYYY-MM-DD`).
    pub events_kept_from: String,
    /// The first day whose summaries are kept.
    pub daily_kept_from: String,
    /// The catch-up rollup that ran first.
    pub rollup: RollupOutcome,
}

/// What an erasure deleted (the `DELETE /v1/users/{id}` answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ForgetOutcome {
    pub user_id: u64,
    pub events_deleted: u64,
    pub daily_rows_deleted: u64,
}

/// Applies retention as of `now`. Stops between transactions once `stop` is set.
pub async fn run_once(
    writer: &Writer,
    calendar: Calendar,
    retention: &RetentionConfig,
    now: DateTime<Utc>,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<PurgeOutcome, JobError> {
    let rollup = rollup::run_once(writer, calendar).await?;
    let events_kept_from = calendar.first_kept_day(now, retention.event_days);
    let daily_kept_from = calendar.first_kept_day(now, retention.daily_days);
    let mut outcome = PurgeOutcome {
        events_kept_from: day_text(events_kept_from),
        daily_kept_from: day_text(daily_kept_from),
        rollup,
        ..PurgeOutcome::default()
    };

    let before_ms = calendar.day_start(events_kept_from);
    let result = async {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(JobError::Stopped);
            }
            let started = Instant::now();
            let deleted = writer
                .run(move |store| store.purge_events_chunk(before_ms, CHUNK))
                .await?;
            tokio::time::sleep(started.elapsed().min(MAX_REST)).await;
            metrics.purged(deleted.rows, deleted.unsynced);
            outcome.events_deleted += deleted.rows;
            outcome.unsynced_deleted += deleted.unsynced;
            if deleted.rows < CHUNK as u64 {
                return Ok(());
            }
        }
    }
    .await;
    if outcome.unsynced_deleted > 0 {
        tracing::warn!(
            unsynced = outcome.unsynced_deleted,
            before = %outcome.events_kept_from,
            "retention deleted events that were never synced to the backend"
        );
    }
    result?;

    let before_day = outcome.daily_kept_from.clone();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(JobError::Stopped);
        }
        let day = before_day.clone();
        let deleted = writer
            .run(move |store| store.purge_daily_chunk(&day, CHUNK))
            .await?;
        outcome.daily_rows_deleted += deleted;
        if deleted < CHUNK as u64 {
            break;
        }
    }
    Ok(outcome)
}

/// Erases `user_id`'s events and summaries (right to erasure). Events recorded for the
/// user after the erasure started are kept: they are new data.
pub async fn forget_user(writer: &Writer, user_id: u64) -> Result<ForgetOutcome, JobError> {
    let (first, until) = writer
        .run(|store| Ok((store.min_event_seq()?, store.max_event_seq()?)))
        .await?;
    let mut outcome = ForgetOutcome {
        user_id,
        ..ForgetOutcome::default()
    };
    let mut after = first - 1;
    while after < until {
        let upto = (after + FORGET_RANGE).min(until);
        let deleted = writer
            .run(move |store| store.forget_events_range(user_id, after, upto))
            .await?;
        outcome.events_deleted += deleted.rows;
        after = upto;
    }
    outcome.daily_rows_deleted = writer.run(move |store| store.forget_daily(user_id)).await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};
    use chrono_tz::Tz;

    use super::*;
    use crate::calendar::parse_day;
    use crate::jobs::rollup::tests::{all_daily, event, writer};
    use usage_protocol::event::{Event, Source};

    const DAY_MS: i64 = 86_400_000;

    fn at(tz: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, m, d, h, min, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    async fn remaining(writer: &Writer) -> Vec<i64> {
        writer
            .run(|store| {
                let page = store.events_page(i64::MIN, i64::MAX, None, 1_000_000)?;
                Ok(page.into_iter().map(|e| e.created_at_ms).collect())
            })
            .await
            .unwrap()
    }

    async fn purge(writer: &Writer, calendar: Calendar, now: DateTime<Utc>) -> PurgeOutcome {
        let retention = RetentionConfig::default();
        run_once(
            writer,
            calendar,
            &retention,
            now,
            &Metrics::new(),
            &AtomicBool::new(false),
        )
        .await
        .unwrap()
    }

    /// Events 89, 90 and 91 days old (and either side of the cut-off instant): the 91-day
    /// day goes, the 90-day day stays.
    #[tokio::test]
    async fn event_retention_edges_in_utc() {
        let calendar = Calendar::parse("UTC").unwrap();
        let (_dir, writer) = writer();
        let now = at(Tz::UTC, 2026, 6, 15, 3, 0);
        let now_ms = now.timestamp_millis();
        let kept_from = calendar.day_start(parse_day("2026-03-17").unwrap());
        let times = [
            now_ms - 89 * DAY_MS,
            now_ms - 90 * DAY_MS,
            kept_from,
            kept_from - 1,
            now_ms - 91 * DAY_MS,
        ];
        let events: Vec<Event> = times
            .iter()
            .map(|&t| event(1, Source::Bulk, "m", t, 10, 1))
            .collect();
        writer.record(events).await.unwrap();
        let outcome = purge(&writer, calendar, now).await;
        assert_eq!(outcome.events_kept_from, "2026-03-17");
        assert_eq!(outcome.events_deleted, 2);
        assert_eq!(outcome.unsynced_deleted, 2, "nothing was synced");
        assert_eq!(outcome.rollup.new_events, 5, "the purge rolled up first");
        let mut left = remaining(&writer).await;
        left.sort();
        assert_eq!(
            left,
            vec![kept_from, now_ms - 90 * DAY_MS, now_ms - 89 * DAY_MS]
        );
        // The purged days keep their summaries.
        let days: Vec<String> = all_daily(&writer)
            .await
            .into_iter()
            .map(|r| r.day)
            .collect();
        assert!(days.contains(&"2026-03-16".to_owned()), "{days:?}");
    }

    /// In Berlin the 90 x 24 h before a summer night reach back into winter time, so the
    /// cut-off day moves at 01:00 local, not at midnight.
    #[tokio::test]
    async fn event_retention_across_dst_in_berlin() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let calendar = Calendar::new(berlin);
        let (_dir, writer) = writer();
        let late_on_16th = at(berlin, 2026, 3, 16, 23, 59).timestamp_millis();
        let early_on_17th = at(berlin, 2026, 3, 17, 0, 1).timestamp_millis();
        let events = vec![
            event(1, Source::Bulk, "m", late_on_16th, 10, 1),
            event(1, Source::Bulk, "m", early_on_17th, 10, 1),
        ];
        writer.record(events).await.unwrap();

        let outcome = purge(&writer, calendar, at(berlin, 2026, 6, 15, 0, 30)).await;
        assert_eq!(outcome.events_kept_from, "2026-03-16");
        assert_eq!(outcome.events_deleted, 0);

        let outcome = purge(&writer, calendar, at(berlin, 2026, 6, 15, 1, 30)).await;
        assert_eq!(outcome.events_kept_from, "2026-03-17");
        assert_eq!(outcome.events_deleted, 1);
        assert_eq!(remaining(&writer).await, vec![early_on_17th]);
    }

    /// Daily rows 729, 730 and 731 days old: only the 731-day row goes.
    #[tokio::test]
    async fn daily_retention_edges() {
        let calendar = Calendar::parse("Europe/Berlin").unwrap();
        let (_dir, writer) = writer();
        let now = at(calendar.tz(), 2026, 6, 15, 3, 0);
        let today = NaiveDate::from_ymd_opt(2026, 6, 15).unwrap();
        for age in [729, 730, 731] {
            let day = today - chrono::Days::new(age);
            let (start, _) = calendar.day_range(day);
            writer
                .record(vec![event(2, Source::Queue, "m", start + 1000, 5, 5)])
                .await
                .unwrap();
        }
        // Roll the days up, then let the raw events go as if 90-day retention had run.
        rollup::run_once(&writer, calendar).await.unwrap();
        let outcome = purge(&writer, calendar, now).await;
        assert_eq!(outcome.events_deleted, 3);
        assert_eq!(outcome.daily_kept_from, "2024-06-15");
        assert_eq!(outcome.daily_rows_deleted, 1);
        let days: Vec<String> = all_daily(&writer)
            .await
            .into_iter()
            .map(|r| r.day)
            .collect();
        assert_eq!(days, vec!["2024-06-15", "2024-06-16"]);
    }

    /// Events not yet rolled up are never purged, and after the newest rows were
    /// deleted, new events (which reuse their `seq`s) are still rolled up.
    #[tokio::test]
    async fn purged_seqs_do_not_hide_new_events_from_the_rollup() {
        let calendar = Calendar::parse("UTC").unwrap();
        let (_dir, writer) = writer();
        let now = at(Tz::UTC, 2026, 6, 15, 3, 0);
        let old = now.timestamp_millis() - 200 * DAY_MS;
        let events = vec![
            event(1, Source::Bulk, "m", old, 10, 1),
            event(1, Source::Bulk, "m", old + 1, 10, 1),
        ];
        writer.record(events).await.unwrap();
        let outcome = purge(&writer, calendar, now).await;
        assert_eq!(
            outcome.events_deleted, 2,
            "every event was old: the table is now empty"
        );
        let fresh = event(3, Source::Manual, "m", now.timestamp_millis(), 1, 1);
        writer.record(vec![fresh]).await.unwrap();
        let rolled = rollup::run_once(&writer, calendar).await.unwrap();
        assert_eq!(rolled.new_events, 1);
        assert!(all_daily(&writer).await.iter().any(|r| r.user_id == 3));
    }

    /// Recording keeps working, and fast, while 200,000 old rows are purged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recording_succeeds_while_purging_200k_rows() {
        let calendar = Calendar::parse("UTC").unwrap();
        let (_dir, writer) = writer();
        let now = Utc::now();
        let old = now.timestamp_millis() - 120 * DAY_MS;
        for batch in 0..50 {
            let events: Vec<Event> = (0..4000)
                .map(|i| {
                    event(
                        i % 7,
                        Source::Bulk,
                        "m",
                        old + (batch * 4000 + i as i64) * 10,
                        10,
                        1,
                    )
                })
                .collect();
            writer.record(events).await.unwrap();
        }
        rollup::run_once(&writer, calendar).await.unwrap();

        let purging = {
            let writer = writer.clone();
            tokio::spawn(async move { purge(&writer, calendar, now).await })
        };
        let mut recorded = 0;
        let mut slowest = Duration::ZERO;
        while !purging.is_finished() {
            let started = Instant::now();
            let result = writer
                .record(vec![event(
                    9,
                    Source::Inline,
                    "m",
                    now.timestamp_millis(),
                    1,
                    1,
                )])
                .await;
            assert!(
                result.is_ok(),
                "a record call failed during the purge: {result:?}"
            );
            slowest = slowest.max(started.elapsed());
            recorded += 1;
        }
        let outcome = purging.await.unwrap();
        assert_eq!(outcome.events_deleted, 200_000);
        assert!(
            recorded > 10,
            "recording interleaved with the purge ({recorded} calls)"
        );
        // Generous: one 2,000-row delete plus a commit, on a slow CI disk.
        assert!(
            slowest < Duration::from_secs(2),
            "slowest record call took {slowest:?}"
        );
        assert_eq!(remaining(&writer).await.len(), recorded);
    }

    #[tokio::test]
    async fn forgetting_a_user_removes_events_and_summaries() {
        let calendar = Calendar::parse("UTC").unwrap();
        let (_dir, writer) = writer();
        let now = Utc::now().timestamp_millis();
        let events: Vec<Event> = (0..45)
            .map(|i| {
                event(
                    i % 3,
                    Source::Bulk,
                    "m",
                    now - (i as i64) * DAY_MS / 4,
                    10,
                    1,
                )
            })
            .collect();
        writer.record(events).await.unwrap();
        rollup::run_once(&writer, calendar).await.unwrap();
        let before = all_daily(&writer).await;
        let user_rows = before.iter().filter(|r| r.user_id == 1).count() as u64;

        let outcome = forget_user(&writer, 1).await.unwrap();
        assert_eq!(
            outcome,
            ForgetOutcome {
                user_id: 1,
                events_deleted: 15,
                daily_rows_deleted: user_rows
            }
        );
        let after = all_daily(&writer).await;
        assert!(after.iter().all(|r| r.user_id != 1));
        assert_eq!(after.len(), before.len() - user_rows as usize);
        assert_eq!(remaining(&writer).await.len(), 30);
        // A later rollup does not bring the user back.
        writer
            .record(vec![event(2, Source::Bulk, "m", now - 3 * DAY_MS, 1, 1)])
            .await
            .unwrap();
        rollup::run_once(&writer, calendar).await.unwrap();
        assert!(all_daily(&writer).await.iter().all(|r| r.user_id != 1));
        assert_eq!(forget_user(&writer, 1).await.unwrap().events_deleted, 0);
    }
}
