//! What the local quotas are rebuilt from at start: the tokens of each user since a given
//! instant, from the raw events, and per day from the daily summaries for days whose raw
//! events retention has already deleted.

use rusqlite::params;

use super::{Doing, Store, StoreError};

/// One user's tokens on one day of the daily summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyTokens {
    /// `YYYY-MM-DD` in the agent's time zone.
    pub day: String,
    pub user_id: u64,
    pub total_tokens: u64,
}

impl Store {
    /// Calls `each(user_id, created_at_ms, total_tokens)` for every raw event created at or
    /// after `since_ms`.
    pub fn each_event_since(
        &self,
        since_ms: i64,
        mut each: impl FnMut(u64, i64, u64),
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT user_id, created_at, prompt_tokens + completion_tokens
                 FROM events WHERE created_at >= ?1",
            )
            .doing("reading events for the quotas")?;
        let mut rows = stmt
            .query(params![since_ms])
            .doing("reading events for the quotas")?;
        while let Some(row) = rows.next().doing("reading events for the quotas")? {
            let user_id: i64 = row.get(0).doing("reading events for the quotas")?;
            let created_at: i64 = row.get(1).doing("reading events for the quotas")?;
            let tokens: i64 = row.get(2).doing("reading events for the quotas")?;
            each(user_id.max(0) as u64, created_at, tokens.max(0) as u64);
        }
        Ok(())
    }

    /// Each user's total tokens per day of the daily summaries, for days `from` (a
    /// `YYYY-MM-DD`) onwards.
    pub fn daily_tokens_since(&self, from: &str) -> Result<Vec<DailyTokens>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT usage_date, user_id, sum(total_tokens) FROM usage_daily
                 WHERE usage_date >= ?1 GROUP BY usage_date, user_id",
            )
            .doing("reading daily summaries for the quotas")?;
        stmt.query_map(params![from], |row| {
            Ok(DailyTokens {
                day: row.get(0)?,
                user_id: row.get::<_, i64>(1)?.max(0) as u64,
                total_tokens: row.get::<_, i64>(2)?.max(0) as u64,
            })
        })
        .and_then(|rows| rows.collect())
        .doing("reading daily summaries for the quotas")
    }
}
