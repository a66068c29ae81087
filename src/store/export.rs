//! Reading raw events out for export (data portability), one page at a time.

use rusqlite::params;
use uuid::Uuid;

use super::{Doing, Store, StoreError};
use usage_protocol::event::{Source, Tokens};

/// One stored event as export shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_id: Uuid,
    pub user_id: u64,
    pub source: Source,
    pub model: String,
    /// `None` when the event named no origin.
    pub origin: Option<String>,
    pub tokens: Tokens,
    /// The `context` object as compact JSON text.
    pub context: Option<String>,
    pub created_at_ms: i64,
    pub synced_at_ms: Option<i64>,
}

/// Where the next page of an export starts: after this `(created_at, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCursor {
    pub created_at_ms: i64,
    pub seq: i64,
}

impl Store {
    /// Up to `limit` events with `start_ms <= created_at < end_ms` after `cursor`, ordered
    /// by `(created_at, seq)`: the order of the `created_at` index, so a page never sorts.
    pub fn events_page(
        &self,
        start_ms: i64,
        end_ms: i64,
        cursor: Option<ExportCursor>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (after_time, after_seq) =
            cursor.map_or((start_ms, i64::MIN), |c| (c.created_at_ms, c.seq));
        let mut stmt = self
            .conn
            // `synced_at` is the time of the range that covers the event (the nearest one
            // starting at or before it, when it reaches the event), as `super::sync` says.
            .prepare_cached(
                "SELECT e.seq, e.event_id, e.user_id, e.source, m.name, e.prompt_tokens,
                     e.completion_tokens, e.cached_tokens, e.cache_write_tokens,
                     e.reasoning_tokens, e.context, e.created_at,
                     (SELECT CASE WHEN r.last_seq >= e.seq THEN r.synced_at END
                      FROM synced_ranges r WHERE r.first_seq <= e.seq
                      ORDER BY r.first_seq DESC LIMIT 1),
                     o.name
                 FROM events e JOIN models m ON m.id = e.model_id
                      LEFT JOIN origins o ON o.id = e.origin_id
                 WHERE e.created_at >= ?1 AND e.created_at < ?3
                   AND (e.created_at > ?1 OR e.seq > ?2)
                 ORDER BY e.created_at, e.seq
                 LIMIT ?4",
            )
            .doing("reading events for export")?;
        let rows = stmt
            .query_map(
                params![after_time, after_seq, end_ms, limit as i64],
                |row| {
                    let id: Vec<u8> = row.get(1)?;
                    let code: i64 = row.get(3)?;
                    let bad = |what: String| {
                        rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Blob,
                            what.into(),
                        )
                    };
                    let tokens = |i: usize| -> rusqlite::Result<u64> {
                        Ok(row.get::<_, i64>(i)?.max(0) as u64)
                    };
                    Ok(StoredEvent {
                        seq: row.get(0)?,
                        event_id: Uuid::from_slice(&id)
                            .map_err(|e| bad(format!("bad event id: {e}")))?,
                        user_id: row.get::<_, i64>(2)? as u64,
                        source: Source::from_code(code)
                            .ok_or_else(|| bad(format!("unknown source code {code}")))?,
                        model: row.get(4)?,
                        origin: row.get(13)?,
                        tokens: Tokens {
                            prompt: tokens(5)?,
                            completion: tokens(6)?,
                            cached: tokens(7)?,
                            cache_write: tokens(8)?,
                            reasoning: tokens(9)?,
                        },
                        context: row.get(10)?,
                        created_at_ms: row.get(11)?,
                        synced_at_ms: row.get(12)?,
                    })
                },
            )
            .doing("reading events for export")?;
        rows.collect::<Result<_, _>>()
            .doing("reading events for export")
    }
}
