//! What the status endpoint reads: queue counts and the sync bookkeeping kept in `meta`.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Doing, Store, StoreError};

/// Counts of events by sync state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub pending: u64,
    pub failed: u64,
    pub synced: u64,
    /// `created_at` (ms) of the earliest-arrived pending event.
    pub oldest_pending_ms: Option<i64>,
}

/// The last error of a sync run, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub category: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

/// Sync bookkeeping that survives restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMeta {
    /// Unix ms of the last run that ended without error.
    pub last_success_ms: Option<i64>,
    /// Unix ms of the last run, whatever its result.
    pub last_attempt_ms: Option<i64>,
    /// Runs in a row that ended with an error.
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
    /// Whether the last run ended with an error (its category is in `last_error`).
    pub last_run_failed: bool,
    /// Whether the last run stopped because the backend's rate limit outlasted its time
    /// budget (not a failure: the events go at the next run).
    #[serde(default)]
    pub last_run_rate_limited: bool,
    /// Unix ms of a successful enrollment with the backend.
    pub enrolled_ms: Option<i64>,
}

const SYNC_META_KEY: &str = "sync";

impl Store {
    /// Counts by sync state (see `super::sync` for what each state is), in one snapshot.
    pub fn queue_counts(&self) -> Result<QueueCounts, StoreError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .doing("counting the sync queue")?;
        let cursor = super::sync::cursor(&tx)?;
        let count = |sql: &str| -> Result<u64, StoreError> {
            tx.prepare_cached(sql)
                .and_then(|mut stmt| stmt.query_row(params![cursor], |row| row.get(0)))
                .doing("counting the sync queue")
        };
        let above = count("SELECT count(*) FROM events WHERE seq > ?1")?;
        // Ranges never straddle the cursor, but the bound is clamped all the same.
        let synced_above = count(
            "SELECT coalesce(sum((SELECT count(*) FROM events e
                 WHERE e.seq >= max(r.first_seq, ?1 + 1) AND e.seq <= r.last_seq)), 0)
             FROM synced_ranges r
             WHERE r.first_seq > ?1
                OR r.first_seq = (SELECT max(first_seq) FROM synced_ranges WHERE first_seq <= ?1)",
        )?;
        let failed_above = count("SELECT count(*) FROM sync_failures WHERE seq > ?1")?;
        let (failed, requeued): (u64, u64) = tx
            .prepare_cached(
                "SELECT (SELECT count(*) FROM sync_failures), (SELECT count(*) FROM sync_requeued)",
            )
            .and_then(|mut stmt| stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
            .doing("counting the sync queue")?;
        let mut counts = QueueCounts {
            pending: above.saturating_sub(synced_above + failed_above) + requeued,
            failed,
            ..QueueCounts::default()
        };
        let total = self.event_count()?;
        counts.synced = total.saturating_sub(counts.pending + counts.failed);
        // The earliest-arrived pending event: a requeued one (at or below the cursor) if
        // any, else the first above the cursor neither synced nor failed.
        counts.oldest_pending_ms = tx
            .prepare_cached(concat!(
                "SELECT created_at FROM (
                     SELECT * FROM (SELECT e.seq, e.created_at FROM sync_requeued q
                         JOIN events e ON e.seq = q.seq ORDER BY q.seq LIMIT 1)
                     UNION ALL
                     SELECT * FROM (SELECT e.seq, e.created_at FROM events e
                         WHERE e.seq > ?1 AND ",
                super::sync::covering_last!("e.seq"),
                " < e.seq AND NOT EXISTS (SELECT 1 FROM sync_failures f WHERE f.seq = e.seq)
                         ORDER BY e.seq LIMIT 1))
                 ORDER BY seq LIMIT 1"
            ))
            .and_then(|mut stmt| stmt.query_row(params![cursor], |row| row.get(0)).optional())
            .doing("finding the oldest pending event")?;
        Ok(counts)
    }

    pub fn sync_meta(&self) -> Result<SyncMeta, StoreError> {
        Ok(self
            .meta(SYNC_META_KEY)?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
    }

    pub fn set_sync_meta(&self, meta: &SyncMeta) -> Result<(), StoreError> {
        let text = serde_json::to_string(meta).expect("SyncMeta always serializes");
        self.set_meta(SYNC_META_KEY, &text)
    }

    /// Records one failed sync attempt (a batch) for the 24-hour category counts,
    /// forgetting attempts older than a day.
    pub fn record_sync_error(&self, at_ms: i64, category: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM sync_errors WHERE at < ?1")
            .and_then(|mut stmt| stmt.execute(params![at_ms - DAY_MS]))
            .doing("forgetting old sync errors")?;
        self.conn
            .prepare_cached("INSERT INTO sync_errors (at, category) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute(params![at_ms, category]))
            .doing("recording a sync error")
            .map(drop)
    }

    /// Failed sync attempts by category over the 24 hours before `now_ms`.
    pub fn sync_error_counts(&self, now_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT category, count(*) FROM sync_errors WHERE at >= ?1 GROUP BY category",
            )
            .doing("counting sync errors")?;
        let rows = stmt
            .query_map(params![now_ms - DAY_MS], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .doing("counting sync errors")?;
        rows.collect::<Result<_, _>>().doing("counting sync errors")
    }
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
