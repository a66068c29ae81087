//! The rollup job: rebuilds the daily summaries of every day touched by an event since the
//! last rollup (late and back-dated events included), each day from its raw events, so a
//! sum is never added twice and running it again changes nothing.
//!
//! It finds the touched days by reading `created_at` of the events with
//! `rollup_seq < seq <= max(seq)`, then recomputes each day in its own writer transaction
//! (recording interleaves between days), and only then moves `rollup_seq`. A crash in
//! between merely recomputes those days again. Callers hold the maintenance lock, so no
//! delete runs meanwhile and new events always get a `seq` above the snapshot.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::calendar::{Calendar, day_text};
use crate::store::StoreError;
use crate::store::writer::Writer;

/// Events read per writer job while finding the touched days.
const SCAN_PAGE: usize = 20_000;

/// Why a maintenance job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the raw events of {day} are past the {days}-day event retention and may have been purged; \
         its summary can no longer be recomputed"
    )]
    Purged { day: NaiveDate, days: u32 },
    #[error("the job was interrupted because the agent is shutting down")]
    Stopped,
}

/// What a rollup did (the `POST /v1/rollup` answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RollupOutcome {
    /// Days recomputed, as `YYYY-MM-DD`.
    pub days: Vec<String>,
    /// Summary rows written.
    pub rows: u64,
    /// Events that arrived since the previous rollup.
    pub new_events: u64,
}

/// Rolls up every day touched since the last rollup.
pub async fn run_once(writer: &Writer, calendar: Calendar) -> Result<RollupOutcome, JobError> {
    let (from, until) = writer
        .run(|store| Ok((store.rollup_seq()?, store.max_event_seq()?)))
        .await?;
    let mut days = BTreeSet::new();
    let mut new_events = 0;
    let mut after = from;
    while after < until {
        let (times, last) = writer
            .run(move |store| store.created_at_page(after, until, SCAN_PAGE))
            .await?;
        let Some(last) = last else { break };
        new_events += times.len() as u64;
        collect_days(calendar, &times, &mut days);
        after = last;
    }
    let mut outcome = recompute_days(writer, calendar, &days).await?;
    outcome.new_events = new_events;
    if until != from {
        writer.run(move |store| store.set_rollup_seq(until)).await?;
    }
    Ok(outcome)
}

/// Catches up, then recomputes `day` from its raw events (`rollup --date`). A day whose
/// raw events may already be purged is refused: recomputing it from what is left would
/// lose the purged events from its summary.
pub async fn run_for_day(
    writer: &Writer,
    calendar: Calendar,
    day: NaiveDate,
    now: DateTime<Utc>,
    event_days: u32,
) -> Result<RollupOutcome, JobError> {
    if day < calendar.first_kept_day(now, event_days) {
        return Err(JobError::Purged {
            day,
            days: event_days,
        });
    }
    let mut outcome = run_once(writer, calendar).await?;
    let again = recompute_days(writer, calendar, &BTreeSet::from([day])).await?;
    outcome.rows += again.rows;
    if !outcome.days.contains(&again.days[0]) {
        outcome.days.extend(again.days);
        outcome.days.sort();
    }
    Ok(outcome)
}

/// Adds the local day of each instant to `days`, converting only when the day changes.
fn collect_days(calendar: Calendar, times: &[i64], days: &mut BTreeSet<NaiveDate>) {
    let mut known: Option<(i64, i64)> = None;
    for &ms in times {
        if known.is_some_and(|(start, end)| (start..end).contains(&ms)) {
            continue;
        }
        let day = calendar.date_of(ms);
        days.insert(day);
        known = Some(calendar.day_range(day));
    }
}

async fn recompute_days(
    writer: &Writer,
    calendar: Calendar,
    days: &BTreeSet<NaiveDate>,
) -> Result<RollupOutcome, JobError> {
    let mut outcome = RollupOutcome::default();
    for &day in days {
        let (start, end) = calendar.day_range(day);
        let text = day_text(day);
        let key = text.clone();
        outcome.rows += writer
            .run(move |store| store.recompute_day(&key, start, end))
            .await?;
        outcome.days.push(text);
    }
    Ok(outcome)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::config::Synchronous;
    use crate::store::Store;
    use crate::store::rollup::{DailyRow, DayRange, GroupBy, Sums};
    use usage_protocol::event::{Event, ModelName, Origin, Source, Tokens};

    pub(crate) fn event(
        user_id: u64,
        source: Source,
        model: &str,
        created_at_ms: i64,
        prompt: u64,
        completion: u64,
    ) -> Event {
        Event {
            event_id: Uuid::new_v4(),
            user_id,
            source,
            model: ModelName::parse(model).unwrap(),
            tokens: Tokens {
                prompt,
                completion,
                cached: prompt / 3,
                cache_write: prompt / 5,
                reasoning: completion / 2,
            },
            origin: None,
            hold_id: None,
            context: None,
            created_at_ms,
        }
    }

    pub(crate) fn writer() -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let (writer, _thread) = Writer::spawn(store);
        (dir, writer)
    }

    pub(crate) async fn all_daily(writer: &Writer) -> Vec<DailyRow> {
        writer
            .run(|store| {
                let mut all = Vec::new();
                let mut after = String::new();
                loop {
                    let page = store.daily_page(&after, None)?;
                    let Some(last) = page.last() else {
                        return Ok(all);
                    };
                    after = last.day.clone();
                    all.extend(page);
                }
            })
            .await
            .unwrap()
    }

    type Key = (String, u64, Source, String, Option<String>);

    /// The summaries as a brute-force sum over the given events.
    fn brute_force(calendar: Calendar, events: &[Event]) -> HashMap<Key, Sums> {
        let mut sums: HashMap<Key, Sums> = HashMap::new();
        for e in events {
            let key = (
                day_text(calendar.date_of(e.created_at_ms)),
                e.user_id,
                e.source,
                e.model.as_str().to_owned(),
                e.origin.as_ref().map(|o| o.as_str().to_owned()),
            );
            let t = &e.tokens;
            sums.entry(key).or_default().add(&Sums {
                events: 1,
                prompt_tokens: t.prompt,
                completion_tokens: t.completion,
                total_tokens: t.total(),
                cached_tokens: t.cached,
                cache_write_tokens: t.cache_write,
                reasoning_tokens: t.reasoning,
            });
        }
        sums
    }

    fn as_map(rows: Vec<DailyRow>) -> HashMap<Key, Sums> {
        rows.into_iter()
            .map(|r| ((r.day, r.user_id, r.source, r.model, r.origin), r.sums))
            .collect()
    }

    /// What `GET /v1/usage` answers grouped by every key, read through the writer's
    /// connection.
    async fn current_usage(writer: &Writer, calendar: Calendar) -> HashMap<Key, Sums> {
        let every_key = GroupBy {
            day: true,
            user: true,
            source: true,
            model: true,
            origin: true,
        };
        let day_of = move |ms: i64| {
            let day = calendar.date_of(ms);
            let (start_ms, end_ms) = calendar.day_range(day);
            DayRange {
                day: day_text(day),
                start_ms,
                end_ms,
            }
        };
        let (rows, totals) = writer
            .run(move |store| store.usage(None, None, None, every_key, &day_of))
            .await
            .unwrap();
        let mut sum = Sums::default();
        rows.iter().for_each(|r| sum.add(&r.sums));
        assert_eq!(sum, totals);
        rows.into_iter()
            .map(|r| {
                let key = (
                    r.day.unwrap(),
                    r.user_id.unwrap(),
                    r.source.unwrap(),
                    r.model.unwrap(),
                    r.origin.unwrap(),
                );
                (key, r.sums)
            })
            .collect()
    }

    async fn record(writer: &Writer, events: &[Event]) {
        writer.record(events.to_vec()).await.unwrap();
    }

    const ZONES: [&str; 8] = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "America/Sao_Paulo",
    ];
    /// 2026-03-27T00:00:00Z: the generated events span the March DST changes.
    const BASE_MS: i64 = 1_774_569_600_000;

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            0u64..4,
            0usize..4,
            0usize..3,
            0i64..(6 * 86_400_000),
            0u64..5000,
            0u64..5000,
            0usize..3,
        )
            .prop_map(
                |(user, source, model, offset, prompt, completion, origin)| {
                    let model = ["gpt-4o-mini", "claude-3.5", "llama/3@8b"][model];
                    let mut event = event(
                        user,
                        Source::ALL[source],
                        model,
                        BASE_MS + offset,
                        prompt,
                        completion,
                    );
                    event.origin = [None, Some("core"), Some("plugin:ai-alt-text")][origin]
                        .map(|o| Origin::parse(o).unwrap());
                    event
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random events across days and zones, recorded in random waves with rollups in
        /// between (so later waves are late and back-dated for days already rolled up).
        #[test]
        fn rollup_matches_a_brute_force_sum(
            zone in 0..ZONES.len(),
            waves in proptest::collection::vec(proptest::collection::vec(arb_event(), 0..40), 1..4),
        ) {
            let calendar = Calendar::parse(ZONES[zone]).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let (_dir, writer) = writer();
                let mut all = Vec::new();
                for wave in waves {
                    record(&writer, &wave).await;
                    all.extend(wave);
                    // Local usage counts every event at once, rolled up or not, once each.
                    prop_assert_eq!(current_usage(&writer, calendar).await, brute_force(calendar, &all));
                    run_once(&writer, calendar).await.unwrap();
                    prop_assert_eq!(as_map(all_daily(&writer).await), brute_force(calendar, &all));
                    prop_assert_eq!(current_usage(&writer, calendar).await, brute_force(calendar, &all));
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn rollup_is_idempotent_and_only_recomputes_touched_days() {
        let calendar = Calendar::parse("Europe/Berlin").unwrap();
        let (_dir, writer) = writer();
        let day_ms = 86_400_000;
        let events: Vec<Event> = (0..30)
            .map(|i| {
                event(
                    i % 3,
                    Source::Bulk,
                    "gpt-4o-mini",
                    BASE_MS + (i as i64) * day_ms / 5,
                    100,
                    10,
                )
            })
            .collect();
        record(&writer, &events).await;
        let first = run_once(&writer, calendar).await.unwrap();
        assert_eq!(first.new_events, 30);
        assert_eq!(first.days.len(), 6, "2026-03-27 ..= 2026-04-01: {first:?}");
        let rows = all_daily(&writer).await;

        let again = run_once(&writer, calendar).await.unwrap();
        assert_eq!(
            again,
            RollupOutcome::default(),
            "nothing new: nothing recomputed"
        );
        assert_eq!(all_daily(&writer).await, rows);

        // A late, back-dated event touches only its own day, which is rebuilt, not added to.
        let late = event(0, Source::Bulk, "gpt-4o-mini", BASE_MS + 10, 7, 3);
        record(&writer, std::slice::from_ref(&late)).await;
        let third = run_once(&writer, calendar).await.unwrap();
        assert_eq!(
            third.days,
            vec![day_text(calendar.date_of(late.created_at_ms))]
        );
        assert_eq!(third.new_events, 1);
        let mut all = events.clone();
        all.push(late);
        assert_eq!(
            as_map(all_daily(&writer).await),
            brute_force(calendar, &all)
        );

        // An explicit recompute of a day changes nothing either.
        let now = DateTime::<Utc>::from_timestamp_millis(BASE_MS + 10 * day_ms).unwrap();
        let day = calendar.date_of(BASE_MS + day_ms);
        let explicit = run_for_day(&writer, calendar, day, now, 90).await.unwrap();
        assert_eq!(explicit.days, vec![day_text(day)]);
        assert_eq!(
            as_map(all_daily(&writer).await),
            brute_force(calendar, &all)
        );
        let old = calendar.date_of(BASE_MS - 91 * day_ms + 10 * day_ms);
        assert!(matches!(
            run_for_day(&writer, calendar, old, now, 90).await,
            Err(JobError::Purged { .. })
        ));
    }
}
