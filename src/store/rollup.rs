//! Daily summaries (`usage_daily`): rebuilding one day from its raw events, the rollup
//! bookkeeping, and the local analytics query behind `GET /v1/usage`, which is current to
//! the last committed event: a day touched since the last rollup is summed from its raw
//! events instead of its (stale) summary rows.
//!
//! This module knows nothing about time zones: callers turn a local day into the
//! `[start, end)` millisecond range it covers (see `crate::calendar`).

use rusqlite::params;
use serde::Serialize;

use super::{Doing, Store, StoreError};
use usage_protocol::event::Source;

/// `meta` key holding the last event `seq` whose day has been rolled up.
const ROLLUP_SEQ_KEY: &str = "rollup_seq";

/// Event count and token sums of one summary row or total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sums {
    pub events: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Sums {
    /// Reads the seven sums from `row`, starting at column `first`.
    fn from_row(row: &rusqlite::Row, first: usize) -> rusqlite::Result<Sums> {
        let get = |i: usize| -> rusqlite::Result<u64> {
            Ok(row.get::<_, Option<i64>>(first + i)?.unwrap_or(0).max(0) as u64)
        };
        Ok(Sums {
            events: get(0)?,
            prompt_tokens: get(1)?,
            completion_tokens: get(2)?,
            total_tokens: get(3)?,
            cached_tokens: get(4)?,
            cache_write_tokens: get(5)?,
            reasoning_tokens: get(6)?,
        })
    }

    pub fn add(&mut self, other: &Sums) {
        self.events += other.events;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cached_tokens += other.cached_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// One `usage_daily` row, with the model and origin by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyRow {
    /// `YYYY-MM-DD` in the agent's time zone.
    pub day: String,
    pub user_id: u64,
    pub source: Source,
    pub model: String,
    /// `None` for events that named no origin.
    pub origin: Option<String>,
    pub sums: Sums,
}

/// Which keys `GET /v1/usage` groups by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupBy {
    pub day: bool,
    pub user: bool,
    pub source: bool,
    pub model: bool,
    pub origin: bool,
}

impl GroupBy {
    fn any(self) -> bool {
        self.day || self.user || self.source || self.model || self.origin
    }
}

/// One row of a usage query: the grouped keys (others `None`) and the sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub day: Option<String>,
    pub user_id: Option<u64>,
    pub source: Option<Source>,
    pub model: Option<String>,
    /// `Some(None)`: grouped by origin, for events that named none.
    pub origin: Option<Option<String>>,
    pub sums: Sums,
}

/// A local day as the caller's calendar has it: its `YYYY-MM-DD` text and the
/// `[start_ms, end_ms)` it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayRange {
    pub day: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Width of the time buckets in which [`Store::usage`] finds the days touched since the
/// last rollup: every UTC offset in use is a multiple of 15 minutes, and both ends of each
/// bucket are looked up anyway, so no day is missed.
const TOUCHED_BUCKET_MS: i64 = 15 * 60 * 1000;

/// The rows a usage query sums, as a common table `d`: the summary rows of days not
/// touched since the last rollup, and the raw events of the touched days (`?3`, a JSON
/// array of `[day, start_ms, end_ms]`), each event a row of one. `?1` / `?2` bound the
/// days (either `NULL`); the touched days are already within them. `?4`, when not `NULL`,
/// keeps one user's rows. `CROSS JOIN` keeps the
/// few touched days as the outer loop, each one a range of the `created_at` index.
const CURRENT_ROWS: &str = "WITH touched(day, start_ms, end_ms) AS (
         SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?3)),
     d AS (
         SELECT usage_date, user_id, source, model_id, origin_id, events, prompt_tokens,
             completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
             reasoning_tokens
         FROM usage_daily
         WHERE (?1 IS NULL OR usage_date >= ?1) AND (?2 IS NULL OR usage_date <= ?2)
           AND (?4 IS NULL OR user_id = ?4)
           AND usage_date NOT IN (SELECT day FROM touched)
         UNION ALL
         SELECT t.day, e.user_id, e.source, e.model_id, e.origin_id, 1, e.prompt_tokens,
             e.completion_tokens, e.prompt_tokens + e.completion_tokens, e.cached_tokens,
             e.cache_write_tokens, e.reasoning_tokens
         FROM touched t CROSS JOIN events e
         WHERE e.created_at >= t.start_ms AND e.created_at < t.end_ms
           AND (?4 IS NULL OR e.user_id = ?4))";

/// The summed columns of `usage_daily`, in [`Sums`] order.
const SUM_COLUMNS: &str = "sum(d.events), sum(d.prompt_tokens), sum(d.completion_tokens),
     sum(d.total_tokens), sum(d.cached_tokens), sum(d.cache_write_tokens), sum(d.reasoning_tokens)";

/// After events were deleted: if the newest rows went, SQLite hands their `seq`s out again,
/// so the rollup mark is lowered to the highest remaining `seq` (every remaining row is at or
/// below it and already rolled up); otherwise new events would hide under the mark. Runs in
/// the deleting transaction.
pub(crate) fn clamp_rollup_seq(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    super::lower_to_newest_event(conn, ROLLUP_SEQ_KEY)
}

fn source_of(code: i64) -> rusqlite::Result<Source> {
    Source::from_code(code).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            format!("unknown source code {code}").into(),
        )
    })
}

impl Store {
    /// The last event `seq` rolled up (0 before the first rollup).
    pub fn rollup_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .meta(ROLLUP_SEQ_KEY)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    pub fn set_rollup_seq(&self, seq: i64) -> Result<(), StoreError> {
        self.set_meta(ROLLUP_SEQ_KEY, &seq.to_string())
    }

    /// The highest `seq` stored (0 when there are no events).
    pub fn max_event_seq(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM events")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .doing("reading the highest event seq")
    }

    /// `created_at` of up to `limit` events with `after < seq <= until`, in `seq` order,
    /// with the last `seq` read (the rollup finds the days new events touched this way).
    pub fn created_at_page(
        &self,
        after: i64,
        until: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Option<i64>), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, created_at FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3")
            .doing("reading new events")?;
        let mut last = None;
        let mut times = Vec::new();
        let mut rows = stmt
            .query(params![after, until, limit as i64])
            .doing("reading new events")?;
        while let Some(row) = rows.next().doing("reading new events")? {
            last = Some(row.get(0).doing("reading new events")?);
            times.push(row.get(1).doing("reading new events")?);
        }
        Ok((times, last))
    }

    /// Rebuilds the summary rows of day `day` (`YYYY-MM-DD`) from the raw events with
    /// `start_ms <= created_at < end_ms`, in one transaction. Returns the rows written.
    pub fn recompute_day(
        &mut self,
        day: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction().doing("starting a rollup")?;
        tx.prepare_cached("DELETE FROM usage_daily WHERE usage_date = ?1")
            .and_then(|mut stmt| stmt.execute(params![day]))
            .doing("clearing a day's summaries")?;
        let rows = tx
            .prepare_cached(
                "INSERT INTO usage_daily (usage_date, user_id, source, model_id, origin_id,
                     events, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
                     cache_write_tokens, reasoning_tokens)
                 SELECT ?1, user_id, source, model_id, origin_id, count(*), sum(prompt_tokens),
                     sum(completion_tokens), sum(prompt_tokens + completion_tokens),
                     sum(cached_tokens), sum(cache_write_tokens), sum(reasoning_tokens)
                 FROM events WHERE created_at >= ?2 AND created_at < ?3
                 GROUP BY user_id, source, model_id, origin_id",
            )
            .and_then(|mut stmt| stmt.execute(params![day, start_ms, end_ms]))
            .doing("summing a day's events")?;
        tx.commit().doing("committing a rollup")?;
        Ok(rows as u64)
    }

    /// Up to `limit` summary rows of the first day with rows after `after` (exclusive)
    /// and up to `to` (inclusive), ordered; an empty page means no more days. A page is
    /// one whole day, so paging never splits or repeats a day.
    pub fn daily_page(&self, after: &str, to: Option<&str>) -> Result<Vec<DailyRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT d.usage_date, d.user_id, d.source, m.name, o.name, d.events,
                     d.prompt_tokens, d.completion_tokens, d.total_tokens, d.cached_tokens,
                     d.cache_write_tokens, d.reasoning_tokens
                 FROM usage_daily d JOIN models m ON m.id = d.model_id
                      LEFT JOIN origins o ON o.id = d.origin_id
                 WHERE d.usage_date = (SELECT min(usage_date) FROM usage_daily
                                       WHERE usage_date > ?1 AND (?2 IS NULL OR usage_date <= ?2))
                 ORDER BY d.user_id, d.source, m.name, o.name",
            )
            .doing("reading daily summaries")?;
        let rows = stmt
            .query_map(params![after, to], |row| {
                Ok(DailyRow {
                    day: row.get(0)?,
                    user_id: row.get::<_, i64>(1)? as u64,
                    source: source_of(row.get(2)?)?,
                    model: row.get(3)?,
                    origin: row.get(4)?,
                    sums: Sums::from_row(row, 5)?,
                })
            })
            .doing("reading daily summaries")?;
        rows.collect::<Result<_, _>>()
            .doing("reading daily summaries")
    }

    /// Sums over the days `from <= day <= to` (either open), of one user if `user_id` is
    /// given, grouped by the chosen keys
    /// (with no key, no rows), current to the last committed event: every day an event
    /// has touched since the last rollup (`day_of` names the local day of an instant) is
    /// summed from its raw events, every other day from its summary rows. All of it is
    /// read in one snapshot. Returns the rows and the totals.
    pub fn usage(
        &self,
        from: Option<&str>,
        to: Option<&str>,
        user_id: Option<u64>,
        group: GroupBy,
        day_of: &dyn Fn(i64) -> DayRange,
    ) -> Result<(Vec<UsageRow>, Sums), StoreError> {
        // Only reads; dropping it ends the snapshot.
        let snapshot = self
            .conn
            .unchecked_transaction()
            .doing("starting a usage read")?;
        let touched = self.touched_days(day_of)?;
        let touched: Vec<(String, i64, i64)> = touched
            .into_iter()
            .filter(|d| from.is_none_or(|f| d.day.as_str() >= f))
            .filter(|d| to.is_none_or(|t| d.day.as_str() <= t))
            .map(|d| (d.day, d.start_ms, d.end_ms))
            .collect();
        let touched = serde_json::to_string(&touched).expect("day ranges always serialize");
        let user_id = user_id.map(|id| id as i64);
        if !group.any() {
            let totals = self
                .conn
                .prepare_cached(&format!("{CURRENT_ROWS} SELECT {SUM_COLUMNS} FROM d"))
                .and_then(|mut stmt| {
                    stmt.query_row(params![from, to, touched, user_id], |row| {
                        Sums::from_row(row, 0)
                    })
                })
                .doing("summing usage")?;
            return Ok((Vec::new(), totals));
        }
        // The key columns come from this fixed list, never from the request's text.
        let keys: Vec<&str> = [
            (group.day, "d.usage_date"),
            (group.user, "d.user_id"),
            (group.source, "d.source"),
            (group.model, "m.name"),
            (group.origin, "o.name"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, column)| *column)
        .collect();
        let key_list = keys.join(", ");
        let sql = format!(
            "{CURRENT_ROWS}
             SELECT {key_list}, {SUM_COLUMNS} FROM d JOIN models m ON m.id = d.model_id
                 LEFT JOIN origins o ON o.id = d.origin_id
             GROUP BY {key_list} ORDER BY {key_list}"
        );
        let mut stmt = self.conn.prepare_cached(&sql).doing("grouping usage")?;
        let rows = stmt
            .query_map(params![from, to, touched, user_id], |row| {
                let mut column = 0;
                let mut next = || {
                    column += 1;
                    column - 1
                };
                Ok(UsageRow {
                    day: if group.day {
                        Some(row.get(next())?)
                    } else {
                        None
                    },
                    user_id: if group.user {
                        Some(row.get::<_, i64>(next())? as u64)
                    } else {
                        None
                    },
                    source: if group.source {
                        Some(source_of(row.get(next())?)?)
                    } else {
                        None
                    },
                    model: if group.model {
                        Some(row.get(next())?)
                    } else {
                        None
                    },
                    origin: if group.origin {
                        Some(row.get(next())?)
                    } else {
                        None
                    },
                    sums: Sums::from_row(row, keys.len())?,
                })
            })
            .doing("grouping usage")?;
        let rows: Vec<UsageRow> = rows.collect::<Result<_, _>>().doing("grouping usage")?;
        drop(stmt);
        snapshot.finish().doing("ending a usage read")?;
        // The groups partition the rows summed, so their sums are the totals: one pass.
        let mut totals = Sums::default();
        rows.iter().for_each(|row| totals.add(&row.sums));
        Ok((rows, totals))
    }

    /// The local days of the events stored since the last rollup, read by 15-minute
    /// buckets so a busy day costs a few lookups, not one per event.
    fn touched_days(&self, day_of: &dyn Fn(i64) -> DayRange) -> Result<Vec<DayRange>, StoreError> {
        let rollup_seq = self.rollup_seq()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT created_at / ?2 FROM events WHERE seq > ?1")
            .doing("finding the days touched since the rollup")?;
        let buckets = stmt
            .query_map(params![rollup_seq, TOUCHED_BUCKET_MS], |row| {
                row.get::<_, i64>(0)
            })
            .doing("finding the days touched since the rollup")?;
        let mut days: Vec<DayRange> = Vec::new();
        for bucket in buckets {
            let start =
                bucket.doing("finding the days touched since the rollup")? * TOUCHED_BUCKET_MS;
            for ms in [start, start + TOUCHED_BUCKET_MS - 1] {
                if !days.iter().any(|d| (d.start_ms..d.end_ms).contains(&ms)) {
                    days.push(day_of(ms));
                }
            }
        }
        Ok(days)
    }
}
