//! The sync queue, kept as a log with a cursor.
//!
//! **The log.** Events are appended in arrival order: `events.seq` (the rowid) is the
//! arrival order and the sync order. An event row never changes after it is recorded, and
//! carries no sync state: recording one writes the row and the indexes queries need
//! (`event_id`, `created_at`), nothing for the queue.
//!
//! **The cursor** (`meta.synced_through`): every event at or below it is *resolved*, synced
//! or failed, except the few requeued ones. It moves forward only in the transaction that
//! records a batch outcome ([`Store::record_verdicts`]), over every event that is synced or
//! failed from the old position up, and stops just below the first event that is neither.
//!
//! **The side tables** hold everything the cursor cannot say, and stay small:
//! - `synced_ranges`: one row per run of consecutive `seq`s acknowledged in one commit (so
//!   about one per batch), with the time it was recorded. Ranges never overlap. Those above
//!   the cursor are the batches parallel lanes got acknowledged out of order; those at or
//!   below it give export its `synced_at`. An event is synced exactly when a range covers it.
//! - `sync_failures`: one row per failed event (rejected by the backend), with the reason.
//! - `sync_requeued`: failed events at or below the cursor that `retry-failed` put back.
//!
//! So an event is **pending** when it is above the cursor and neither covered by a range nor
//! failed, or when it is requeued; **failed** when it has a `sync_failures` row; **synced**
//! otherwise (covered by a range). From that, each reader keeps its meaning:
//! - status counts: `failed` = rows of `sync_failures`; `pending` = events above the cursor,
//!   less those covered by ranges above it and failed above it, plus requeued ones;
//!   `synced` = every stored event less the other two.
//! - export's `synced_at`: the `synced_at` of the range covering the event (`NULL` when none),
//!   the time its acknowledgement was recorded, as when it was a column.
//! - retention and erasure ([`super::retention`]): an event deleted while not covered by a
//!   range is counted unsynced; its failure reason or requeue entry goes with it; and when the
//!   newest events go, the cursor and the ranges are lowered to the newest `seq` left
//!   ([`clamp_queue`]), because SQLite hands out `max(seq) + 1` again and a new event must
//!   never land at or below the cursor or inside a range.
//! - `retry-failed`: failed events above the cursor just lose their reason (they are pending
//!   again); those at or below it also go to `sync_requeued`.
//! - salvage of a damaged database copies the three tables beside the events and then
//!   rebuilds the cursor from them ([`rebuild_cursor`]): the ranges and failures are the
//!   truth, the cursor only saves reading them from the start.
//!
//! Only this file speaks SQL for sync. It knows nothing about HTTP, batches on the wire or
//! retry policy: the engine in `crate::sync` decides *when* an event is synced or failed,
//! this file only makes that durable, each call in one transaction.

use rusqlite::types::Type;
use rusqlite::{OptionalExtension, params};
use uuid::Uuid;

use super::{Doing, Store, StoreError};
use usage_protocol::event::{Event, ModelName, Origin, Source, Tokens};

/// A pending event together with its place in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    /// The arrival order (`events.seq`), which is also the sync order.
    pub seq: i64,
    pub event: Event,
}

/// The runs of consecutive values in `seqs`, as inclusive `(first, last)` pairs covering
/// exactly the distinct values given, in any order.
fn consecutive_runs(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for seq in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs
}

/// Turns a stored value that no longer parses into a rusqlite conversion error, so a
/// damaged row surfaces as a [`StoreError`] naming what was being done.
fn corrupt(column: usize, message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        Type::Text,
        Box::new(std::io::Error::other(message)),
    )
}

/// A pending event as its row holds it, borrowing the row's text: what a sync batch is
/// written from without copying each string. The same checks as a stored event read back.
#[derive(Debug, Clone, Copy)]
pub struct PendingRow<'a> {
    /// The arrival order (`events.seq`), which is also the sync order.
    pub seq: i64,
    pub event_id: Uuid,
    pub user_id: u64,
    pub source: Source,
    pub model: &'a str,
    pub tokens: Tokens,
    pub origin: Option<&'a str>,
    pub context: Option<&'a str>,
    pub created_at_ms: i64,
}

impl PendingRow<'_> {
    /// The event as the store gives it elsewhere (owned).
    pub fn to_pending(&self) -> PendingEvent {
        PendingEvent {
            seq: self.seq,
            event: Event {
                event_id: self.event_id,
                user_id: self.user_id,
                source: self.source,
                model: ModelName::parse(self.model).expect("checked when the row was read"),
                tokens: self.tokens,
                origin: self
                    .origin
                    .map(|name| Origin::parse(name).expect("checked when the row was read")),
                hold_id: None,
                context: self.context.map(str::to_owned),
                created_at_ms: self.created_at_ms,
            },
        }
    }
}

fn pending_from_row<'a>(row: &'a rusqlite::Row) -> rusqlite::Result<PendingRow<'a>> {
    let id = row.get_ref(1)?.as_blob()?;
    let event_id = Uuid::from_slice(id).map_err(|e| corrupt(1, format!("event_id: {e}")))?;
    let user_id: i64 = row.get(2)?;
    let source_code: i64 = row.get(3)?;
    let source = Source::from_code(source_code)
        .ok_or_else(|| corrupt(3, format!("source code {source_code} is unknown")))?;
    let model = row.get_ref(4)?.as_str()?;
    ModelName::check(model).map_err(|e| corrupt(4, format!("model: {e}")))?;
    let origin = row.get_ref(12)?.as_str_or_null()?;
    if let Some(name) = origin {
        Origin::check(name).map_err(|e| corrupt(12, format!("origin: {e}")))?;
    }
    let token = |column: usize| -> rusqlite::Result<u64> {
        let value: i64 = row.get(column)?;
        u64::try_from(value).map_err(|_| corrupt(column, format!("negative token count {value}")))
    };
    Ok(PendingRow {
        seq: row.get(0)?,
        event_id,
        user_id: u64::try_from(user_id)
            .map_err(|_| corrupt(2, format!("negative user id {user_id}")))?,
        source,
        model,
        tokens: Tokens {
            prompt: token(5)?,
            completion: token(6)?,
            cached: token(7)?,
            cache_write: token(8)?,
            reasoning: token(9)?,
        },
        origin,
        context: row.get_ref(10)?.as_str_or_null()?,
        created_at_ms: row.get(11)?,
    })
}

/// The `seq` of the range that could cover `seq` (the nearest one starting at or before
/// it); it covers `seq` when its `last_seq` reaches it. Ranges never overlap, so no other
/// range can. `{seq}` is the SQL expression of the event's `seq`.
macro_rules! covering_last {
    ($seq:literal) => {
        concat!(
            "coalesce((SELECT r.last_seq FROM synced_ranges r WHERE r.first_seq <= ",
            $seq,
            " ORDER BY r.first_seq DESC LIMIT 1), 0)"
        )
    };
}
pub(crate) use covering_last;

/// The cursor (0 before anything was resolved).
pub(crate) fn cursor(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'synced_through'), 0)",
    )
    .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
    .doing("reading the sync cursor")
}

fn set_cursor(conn: &rusqlite::Connection, value: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('synced_through', CAST(?1 AS TEXT))
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )
    .and_then(|mut stmt| stmt.execute(params![value]))
    .doing("moving the sync cursor")
    .map(drop)
}

/// Whether a range covers `seq`: the event (if it exists) is synced.
pub(crate) fn is_covered(conn: &rusqlite::Connection, seq: i64) -> Result<bool, StoreError> {
    conn.prepare_cached(concat!("SELECT ", covering_last!("?1"), " >= ?1"))
        .and_then(|mut stmt| stmt.query_row(params![seq], |row| row.get(0)))
        .doing("looking up a synced range")
}

/// Moves the cursor up from where it is over every event that is synced (a whole range at
/// a time) or failed, and stops below the first that is neither. Returns the new cursor.
fn advance_cursor(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    let start = cursor(conn)?;
    let mut at = start;
    let mut next_event = conn
        .prepare_cached("SELECT seq FROM events WHERE seq > ?1 ORDER BY seq LIMIT 1")
        .doing("advancing the sync cursor")?;
    let mut range = conn
        .prepare_cached(
            "SELECT last_seq FROM synced_ranges WHERE first_seq <= ?1
             ORDER BY first_seq DESC LIMIT 1",
        )
        .doing("advancing the sync cursor")?;
    let mut failed = conn
        .prepare_cached("SELECT 1 FROM sync_failures WHERE seq = ?1")
        .doing("advancing the sync cursor")?;
    loop {
        let Some(next) = next_event
            .query_row(params![at], |row| row.get::<_, i64>(0))
            .optional()
            .doing("advancing the sync cursor")?
        else {
            break;
        };
        let covered_to = range
            .query_row(params![next], |row| row.get::<_, i64>(0))
            .optional()
            .doing("advancing the sync cursor")?
            .filter(|last| *last >= next);
        if let Some(last) = covered_to {
            at = last;
        } else if failed
            .exists(params![next])
            .doing("advancing the sync cursor")?
        {
            at = next;
        } else {
            break;
        }
    }
    if at != start {
        set_cursor(conn, at)?;
    }
    Ok(at)
}

/// Recomputes the cursor from the side tables alone (after a salvage, whose copy of the
/// cursor may be lost or older than its ranges): from 0 up over every synced or failed
/// event. Requeued entries above the new cursor are dropped, being pending there anyway.
pub(crate) fn rebuild_cursor(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    set_cursor(conn, 0)?;
    let at = advance_cursor(conn)?;
    conn.prepare_cached("DELETE FROM sync_requeued WHERE seq > ?1")
        .and_then(|mut stmt| stmt.execute(params![at]))
        .doing("dropping requeue entries above the cursor")?;
    Ok(at)
}

/// After events were deleted: SQLite gives the next event `max(seq) + 1`, which may be a
/// `seq` a deleted event had. So nothing of the queue may reach above the newest `seq` left:
/// the cursor is lowered to it, ranges are cut at it, and entries above it go. Ranges
/// wholly below the oldest `seq` left cover nothing any more and go too. Runs in the
/// deleting transaction.
pub(crate) fn clamp_queue(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let (oldest, newest): (i64, i64) = conn
        .prepare_cached("SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM events")
        .and_then(|mut stmt| stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
        .doing("reading the bounds of the log")?;
    for sql in [
        "DELETE FROM synced_ranges WHERE first_seq > ?1",
        "UPDATE synced_ranges SET last_seq = ?1
         WHERE first_seq = (SELECT max(first_seq) FROM synced_ranges WHERE first_seq <= ?1)
           AND last_seq > ?1",
        "DELETE FROM sync_failures WHERE seq > ?1",
        "DELETE FROM sync_requeued WHERE seq > ?1",
        "UPDATE meta SET value = CAST(?1 AS TEXT)
         WHERE key = 'synced_through' AND CAST(value AS INTEGER) > ?1",
    ] {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(params![newest]))
            .doing("lowering the sync cursor")?;
    }
    conn.prepare_cached("DELETE FROM synced_ranges WHERE first_seq < ?1 AND last_seq < ?1")
        .and_then(|mut stmt| stmt.execute(params![oldest]))
        .doing("forgetting ranges of deleted events")?;
    Ok(())
}

/// The `seq`s among `first..=last` of one side table (`sync_failures` or `sync_requeued`),
/// in order.
fn side_seqs_in(
    conn: &rusqlite::Connection,
    table: &str,
    first: i64,
    last: i64,
) -> Result<Vec<i64>, StoreError> {
    let sql = format!("SELECT seq FROM {table} WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq");
    let mut stmt = conn.prepare_cached(&sql).doing("reading the sync queue")?;
    let rows = stmt
        .query_map(params![first, last], |row| row.get(0))
        .doing("reading the sync queue")?;
    rows.collect::<Result<_, _>>()
        .doing("reading the sync queue")
}

/// The synced ranges that cover part of `first..=last`, in order: the nearest one starting
/// at or before `first`, and those starting inside the span (ranges never overlap).
fn ranges_in(
    conn: &rusqlite::Connection,
    first: i64,
    last: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut ranges: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT first_seq, last_seq FROM synced_ranges WHERE first_seq <= ?1
             ORDER BY first_seq DESC LIMIT 1",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![first], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .doing("reading the sync queue")?
        .filter(|(_, range_last)| *range_last >= first)
        .into_iter()
        .collect();
    let mut stmt = conn
        .prepare_cached(
            "SELECT first_seq, last_seq FROM synced_ranges WHERE first_seq > ?1 AND first_seq <= ?2
             ORDER BY first_seq",
        )
        .doing("reading the sync queue")?;
    let rows = stmt
        .query_map(params![first, last], |row| Ok((row.get(0)?, row.get(1)?)))
        .doing("reading the sync queue")?;
    for range in rows {
        ranges.push(range.doing("reading the sync queue")?);
    }
    Ok(ranges)
}

/// Calls `visit` with the `seq` and id of each event among `first..=last` that is pending
/// (recorded, and not synced or failed, or requeued), in order. The span's events are read
/// once, and the side tables' entries in the span beside them, instead of asking each side
/// table once per event: recording a batch's verdicts reads its 500 rows, not 1,500 lookups.
fn pending_in(
    conn: &rusqlite::Connection,
    first: i64,
    last: i64,
    cursor: i64,
    mut visit: impl FnMut(i64, &[u8]),
) -> Result<(), StoreError> {
    let ranges = ranges_in(conn, first, last)?;
    let failed = side_seqs_in(conn, "sync_failures", first, last)?;
    let requeued = side_seqs_in(conn, "sync_requeued", first, last)?;
    let (mut range, mut fail, mut requeue) = (0, 0, 0);
    let mut stmt = conn
        .prepare_cached("SELECT seq, event_id FROM events WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq")
        .doing("reading the sync queue")?;
    let mut rows = stmt
        .query(params![first, last])
        .doing("reading the sync queue")?;
    while let Some(row) = rows.next().doing("reading the sync queue")? {
        let seq: i64 = row.get(0).doing("reading the sync queue")?;
        // The side lists are in order, as the events are: each cursor only moves forward.
        while ranges.get(range).is_some_and(|(_, last)| *last < seq) {
            range += 1;
        }
        while failed.get(fail).is_some_and(|failed| *failed < seq) {
            fail += 1;
        }
        while requeued
            .get(requeue)
            .is_some_and(|requeued| *requeued < seq)
        {
            requeue += 1;
        }
        let covered = ranges.get(range).is_some_and(|(first, _)| *first <= seq);
        let is_failed = failed.get(fail) == Some(&seq);
        let is_requeued = requeued.get(requeue) == Some(&seq);
        if (seq > cursor && !covered && !is_failed) || is_requeued {
            let id = row
                .get_ref(1)
                .and_then(|value| value.as_blob().map_err(rusqlite::Error::from))
                .doing("reading the sync queue")?;
            visit(seq, id);
        }
    }
    Ok(())
}

impl Store {
    /// The highest `seq` stored so far (0 when empty): a sync run drains up to here, so a
    /// steady stream of new events cannot keep one run going forever.
    pub fn last_seq(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM events")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .doing("finding the newest event")
    }

    /// The cursor: every event at or below it is synced or failed, except requeued ones.
    pub fn synced_through(&self) -> Result<i64, StoreError> {
        cursor(&self.conn)
    }

    /// Up to `limit` pending events with `after < seq <= until`, in arrival order, with
    /// their model names: the requeued ones, then from the cursor up, in one snapshot.
    pub fn pending_batch(
        &self,
        after: i64,
        until: i64,
        limit: usize,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let mut pending = Vec::new();
        self.pending_each(after, until, limit, |row| pending.push(row.to_pending()))?;
        Ok(pending)
    }

    /// [`Store::pending_batch`] handing each event to `visit` as its row holds it, without
    /// copying it: a sync run writes each batch's wire JSON straight from the rows.
    pub fn pending_each(
        &self,
        after: i64,
        until: i64,
        limit: usize,
        mut visit: impl FnMut(PendingRow<'_>),
    ) -> Result<(), StoreError> {
        let mut left = i64::try_from(limit).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .unchecked_transaction()
            .doing("reading the sync queue")?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT e.seq, e.event_id, e.user_id, e.source, m.name, e.prompt_tokens,
                            e.completion_tokens, e.cached_tokens, e.cache_write_tokens,
                            e.reasoning_tokens, e.context, e.created_at, o.name
                     FROM sync_requeued q JOIN events e ON e.seq = q.seq
                          JOIN models m ON m.id = e.model_id
                          LEFT JOIN origins o ON o.id = e.origin_id
                     WHERE q.seq > ?1 AND q.seq <= ?2
                     ORDER BY q.seq
                     LIMIT ?3",
                )
                .doing("reading the sync queue")?;
            let mut rows = stmt
                .query(params![after, until, left])
                .doing("reading the sync queue")?;
            while let Some(row) = rows.next().doing("reading the sync queue")? {
                visit(pending_from_row(row).doing("reading the sync queue")?);
                left -= 1;
            }
        }
        // Requeued events sit at or below the cursor, so before every other one.
        if left <= 0 {
            return Ok(());
        }
        let from = after.max(cursor(&tx)?);
        // The events above the cursor in order, less those a range covers or that failed:
        // the few ranges and failures above the cursor are walked beside the events, rather
        // than looked up once per event.
        let mut covering = tx
            .prepare_cached(
                "SELECT first_seq, last_seq FROM synced_ranges WHERE first_seq <= ?1
                 ORDER BY first_seq DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![from], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .doing("reading the sync queue")?
            .filter(|(_, last): &(i64, i64)| *last > from);
        let mut later_ranges = tx
            .prepare_cached(
                "SELECT first_seq, last_seq FROM synced_ranges WHERE first_seq > ?1 AND first_seq <= ?2
                 ORDER BY first_seq",
            )
            .doing("reading the sync queue")?;
        let mut later_ranges = later_ranges
            .query(params![from, until])
            .doing("reading the sync queue")?;
        let mut next_range = || -> Result<Option<(i64, i64)>, StoreError> {
            later_ranges
                .next()
                .and_then(|row| row.map(|row| Ok((row.get(0)?, row.get(1)?))).transpose())
                .doing("reading the sync queue")
        };
        if covering.is_none() {
            covering = next_range()?;
        }
        let mut failures = tx
            .prepare_cached(
                "SELECT seq FROM sync_failures WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
            )
            .doing("reading the sync queue")?;
        let mut failures = failures
            .query(params![from, until])
            .doing("reading the sync queue")?;
        let mut next_failure = || -> Result<Option<i64>, StoreError> {
            failures
                .next()
                .and_then(|row| row.map(|row| row.get(0)).transpose())
                .doing("reading the sync queue")
        };
        let mut failed = next_failure()?;
        let mut stmt = tx
            .prepare_cached(
                "SELECT e.seq, e.event_id, e.user_id, e.source, m.name, e.prompt_tokens,
                        e.completion_tokens, e.cached_tokens, e.cache_write_tokens,
                        e.reasoning_tokens, e.context, e.created_at, o.name
                 FROM events e JOIN models m ON m.id = e.model_id
                      LEFT JOIN origins o ON o.id = e.origin_id
                 WHERE e.seq > ?1 AND e.seq <= ?2
                 ORDER BY e.seq",
            )
            .doing("reading the sync queue")?;
        let mut rows = stmt
            .query(params![from, until])
            .doing("reading the sync queue")?;
        while left > 0 {
            let Some(row) = rows.next().doing("reading the sync queue")? else {
                break;
            };
            let seq: i64 = row.get(0).doing("reading the sync queue")?;
            while covering.is_some_and(|(_, last)| last < seq) {
                covering = next_range()?;
            }
            if covering.is_some_and(|(first, _)| first <= seq) {
                continue;
            }
            while failed.is_some_and(|failed| failed < seq) {
                failed = next_failure()?;
            }
            if failed == Some(seq) {
                continue;
            }
            visit(pending_from_row(row).doing("reading the sync queue")?);
            left -= 1;
        }
        Ok(())
    }

    /// Records the backend's verdicts on a batch (or several) and moves the cursor, all in
    /// one transaction: the `synced` events become ranges (one per run of consecutive
    /// `seq`s), the `failed` ones get their reason. Each verdict names the event by `seq`
    /// and id, and changes it only if it is still pending and still that event: after an
    /// erasure of the newest events their `seq`s go to new events, which the backend has
    /// not seen. Returns how many became synced and how many failed.
    pub fn record_verdicts(
        &mut self,
        synced: &[(i64, Uuid)],
        failed: &[(i64, Uuid, String)],
        at_ms: i64,
    ) -> Result<(u64, u64), StoreError> {
        let tx = self
            .conn
            .transaction()
            .doing("starting to record sync verdicts")?;
        let start = cursor(&tx)?;
        let expected: std::collections::HashMap<i64, Uuid> = synced.iter().copied().collect();
        let seqs: Vec<i64> = synced.iter().map(|(seq, _)| *seq).collect();
        let mut acked = Vec::with_capacity(synced.len());
        // Batches are cut in arrival order, so their seqs are mostly consecutive: one
        // statement per run of consecutive seqs instead of one per event.
        for (first, last) in consecutive_runs(&seqs) {
            pending_in(&tx, first, last, start, |seq, id| {
                if expected
                    .get(&seq)
                    .is_some_and(|want| want.as_bytes()[..] == id[..])
                {
                    acked.push(seq);
                }
            })?;
        }
        {
            let mut unrequeue = tx
                .prepare_cached("DELETE FROM sync_requeued WHERE seq = ?1")
                .doing("marking events synced")?;
            for seq in acked.iter().filter(|seq| **seq <= start) {
                unrequeue
                    .execute(params![seq])
                    .doing("marking events synced")?;
            }
            let mut range = tx
                .prepare_cached(
                    "INSERT INTO synced_ranges (first_seq, last_seq, synced_at) VALUES (?1, ?2, ?3)",
                )
                .doing("marking events synced")?;
            for (first, last) in consecutive_runs(&acked) {
                range
                    .execute(params![first, last, at_ms])
                    .doing("marking events synced")?;
            }
        }
        let mut failed_now = 0;
        {
            let mut reason = tx
                .prepare_cached(
                    "INSERT INTO sync_failures (seq, reason, failed_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(seq) DO UPDATE SET reason = excluded.reason, failed_at = excluded.failed_at",
                )
                .doing("recording why an event failed")?;
            let mut unrequeue = tx
                .prepare_cached("DELETE FROM sync_requeued WHERE seq = ?1")
                .doing("marking events failed")?;
            for (seq, event_id, why) in failed {
                let mut still_pending = false;
                pending_in(&tx, *seq, *seq, start, |_, id| {
                    still_pending = event_id.as_bytes()[..] == id[..];
                })?;
                if !still_pending {
                    continue;
                }
                reason
                    .execute(params![seq, why, at_ms])
                    .doing("recording why an event failed")?;
                unrequeue
                    .execute(params![seq])
                    .doing("marking events failed")?;
                failed_now += 1;
            }
        }
        advance_cursor(&tx)?;
        tx.commit().doing("committing sync verdicts")?;
        Ok((acked.len() as u64, failed_now))
    }

    /// Puts every failed event back in the queue and forgets the reasons. Returns how many.
    pub fn requeue_failed(&mut self) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction()
            .doing("starting to requeue failed events")?;
        let at = cursor(&tx)?;
        tx.execute(
            "INSERT OR IGNORE INTO sync_requeued (seq) SELECT seq FROM sync_failures WHERE seq <= ?1",
            params![at],
        )
        .doing("requeueing failed events")?;
        let requeued = tx
            .execute("DELETE FROM sync_failures", [])
            .doing("forgetting failure reasons")?;
        tx.commit().doing("committing requeued events")?;
        Ok(requeued as u64)
    }

    /// Why a failed event failed, if it did.
    pub fn failure_reason(&self, seq: i64) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT reason FROM sync_failures WHERE seq = ?1")
            .and_then(|mut stmt| stmt.query_row(params![seq], |row| row.get(0)).optional())
            .doing("reading why an event failed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    /// The `(seq, event_id)` of each stored `seq` given, as the engine would name them.
    fn named(store: &Store, seqs: &[i64]) -> Vec<(i64, Uuid)> {
        seqs.iter()
            .filter_map(|seq| {
                store
                    .conn
                    .query_row("SELECT event_id FROM events WHERE seq = ?1", [seq], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .optional()
                    .unwrap()
                    .map(|id| (*seq, Uuid::from_slice(&id).unwrap()))
            })
            .collect()
    }

    impl Store {
        /// Marks the events stored at `seqs` synced (the verdict of a 2xx answer).
        pub(crate) fn mark_synced(&mut self, seqs: &[i64], at_ms: i64) -> Result<u64, StoreError> {
            let synced = named(self, seqs);
            Ok(self.record_verdicts(&synced, &[], at_ms)?.0)
        }

        /// Marks the events stored at these `seq`s failed with a reason.
        pub(crate) fn mark_failed(
            &mut self,
            failures: &[(i64, String)],
            at_ms: i64,
        ) -> Result<u64, StoreError> {
            let failed: Vec<(i64, Uuid, String)> = failures
                .iter()
                .flat_map(|(seq, why)| {
                    named(self, &[*seq])
                        .into_iter()
                        .map(|(seq, id)| (seq, id, why.clone()))
                })
                .collect();
            Ok(self.record_verdicts(&[], &failed, at_ms)?.1)
        }
    }

    fn event(n: u64) -> Event {
        Event {
            event_id: Uuid::new_v4(),
            user_id: n,
            source: Source::Queue,
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            tokens: Tokens {
                prompt: 100 + n,
                completion: 10,
                cached: 5,
                ..Tokens::default()
            },
            // Some with an origin, some without: both must round trip.
            origin: (n % 3 == 1).then(|| Origin::parse("plugin:ai-alt-text").unwrap()),
            hold_id: None,
            context: n
                .is_multiple_of(2)
                .then(|| r#"{"attachment_id":42}"#.to_owned()),
            created_at_ms: 1_764_240_000_000 + n as i64,
        }
    }

    fn store_with(n: u64) -> (tempfile::TempDir, Store, Vec<Event>) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let events: Vec<Event> = (0..n).map(event).collect();
        store.record(&events).unwrap();
        (dir, store, events)
    }

    #[test]
    fn pending_batches_come_in_arrival_order_and_round_trip() {
        let (_dir, store, events) = store_with(5);
        let until = store.last_seq().unwrap();
        let first = store.pending_batch(0, until, 3).unwrap();
        assert_eq!(
            first.iter().map(|p| &p.event).collect::<Vec<_>>(),
            events.iter().take(3).collect::<Vec<_>>()
        );
        let rest = store.pending_batch(first[2].seq, until, 3).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[1].event, events[4]);
        assert!(
            store
                .pending_batch(rest[1].seq, until, 3)
                .unwrap()
                .is_empty()
        );
        // Events beyond `until` wait for the next run.
        assert_eq!(store.pending_batch(0, first[0].seq, 10).unwrap().len(), 1);
    }

    #[test]
    fn synced_failed_and_requeued_events_move_through_the_queue() {
        let (_dir, mut store, _) = store_with(4);
        let until = store.last_seq().unwrap();
        let all = store.pending_batch(0, until, 10).unwrap();
        let seqs: Vec<i64> = all.iter().map(|p| p.seq).collect();
        assert_eq!(store.mark_synced(&seqs[..2], 7).unwrap(), 2);
        assert_eq!(
            store.mark_synced(&seqs[..2], 8).unwrap(),
            0,
            "already synced"
        );
        assert_eq!(
            store
                .mark_failed(&[(seqs[2], "model: bad".into())], 9)
                .unwrap(),
            1
        );
        assert_eq!(
            store.failure_reason(seqs[2]).unwrap().as_deref(),
            Some("model: bad")
        );
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (1, 1, 2));
        assert_eq!(store.pending_batch(0, until, 10).unwrap().len(), 1);

        assert_eq!(store.requeue_failed().unwrap(), 1);
        assert_eq!(store.failure_reason(seqs[2]).unwrap(), None);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (2, 0, 2));
        assert_eq!(store.requeue_failed().unwrap(), 0);
    }

    #[test]
    fn consecutive_runs_cover_exactly_the_given_seqs() {
        assert_eq!(consecutive_runs(&[]), []);
        assert_eq!(
            consecutive_runs(&[7, 3, 4, 5, 9, 8, 4, 12]),
            [(3, 5), (7, 9), (12, 12)]
        );
    }

    fn pending_seqs(store: &Store) -> Vec<i64> {
        let until = store.last_seq().unwrap();
        let pending = store.pending_batch(0, until, 100).unwrap();
        pending.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn marking_scattered_seqs_synced_leaves_the_gaps_pending() {
        let (_dir, mut store, _) = store_with(8);
        let seqs = pending_seqs(&store);
        // seqs[3] failed before the marks land, so the run over it must skip it.
        store.mark_failed(&[(seqs[3], "bad".into())], 5).unwrap();
        let marked = [seqs[6], seqs[0], seqs[1], seqs[3], seqs[4]];
        assert_eq!(store.mark_synced(&marked, 7).unwrap(), 4);
        let pending = pending_seqs(&store);
        assert_eq!(pending, [seqs[2], seqs[5], seqs[7]]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (3, 1, 4));
    }

    #[test]
    fn acknowledgements_out_of_order_wait_above_the_cursor_until_the_gap_is_filled() {
        let (_dir, mut store, _) = store_with(9);
        let seqs = pending_seqs(&store);
        // Lanes answered the second and third batches before the first.
        assert_eq!(store.mark_synced(&seqs[6..9], 20).unwrap(), 3);
        assert_eq!(store.mark_synced(&seqs[3..6], 30).unwrap(), 3);
        assert_eq!(store.synced_through().unwrap(), 0);
        assert_eq!(pending_seqs(&store), seqs[..3]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (3, 0, 6));
        // The first batch: one event rejected, the others synced; the cursor passes all.
        let (synced, failed) = store
            .record_verdicts(
                &named(&store, &seqs[..2]),
                &[(
                    seqs[2],
                    named(&store, &seqs[2..3])[0].1,
                    "model: bad".into(),
                )],
                40,
            )
            .unwrap();
        assert_eq!((synced, failed), (2, 1));
        assert_eq!(store.synced_through().unwrap(), seqs[8]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (0, 1, 8));
        assert_eq!(counts.oldest_pending_ms, None);
        // Each keeps the time its acknowledgement was recorded.
        let synced_at: Vec<Option<i64>> = store
            .events_page(0, i64::MAX, None, 100)
            .unwrap()
            .iter()
            .map(|e| e.synced_at_ms)
            .collect();
        assert_eq!(
            synced_at,
            [
                Some(40),
                Some(40),
                None,
                Some(30),
                Some(30),
                Some(30),
                Some(20),
                Some(20),
                Some(20)
            ]
        );
    }

    #[test]
    fn a_failed_event_below_the_cursor_is_requeued_and_then_synced_exactly_once() {
        let (_dir, mut store, _) = store_with(5);
        let seqs = pending_seqs(&store);
        store
            .record_verdicts(
                &named(&store, &[seqs[0], seqs[2], seqs[4]]),
                &[(seqs[1], named(&store, &seqs[1..2])[0].1, "bad".into())],
                5,
            )
            .unwrap();
        store.mark_failed(&[(seqs[3], "worse".into())], 6).unwrap();
        assert_eq!(store.synced_through().unwrap(), seqs[4]);
        assert_eq!(store.requeue_failed().unwrap(), 2);
        assert_eq!(pending_seqs(&store), [seqs[1], seqs[3]]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (2, 0, 3));
        assert_eq!(
            counts.oldest_pending_ms,
            Some(store.events_page(0, i64::MAX, None, 10).unwrap()[1].created_at_ms)
        );
        // A batch read after the first requeued one still finds the second.
        let until = store.last_seq().unwrap();
        assert_eq!(
            store.pending_batch(seqs[1], until, 10).unwrap()[0].seq,
            seqs[3]
        );
        assert_eq!(store.mark_synced(&[seqs[1], seqs[3]], 7).unwrap(), 2);
        assert_eq!(store.mark_synced(&[seqs[1], seqs[3]], 8).unwrap(), 0);
        assert!(pending_seqs(&store).is_empty());
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (0, 0, 5));
        assert_eq!(store.requeue_failed().unwrap(), 0);
    }

    #[test]
    fn a_new_event_that_reuses_the_seq_of_an_erased_one_is_pending() {
        let (_dir, mut store, events) = store_with(6);
        let seqs = pending_seqs(&store);
        store.mark_synced(&seqs, 9).unwrap();
        assert_eq!(store.synced_through().unwrap(), seqs[5]);
        // The newest two events go (their users are erased); SQLite hands their seqs out
        // again, which must not count as synced.
        for event in &events[4..] {
            let deleted = store
                .forget_events_range(event.user_id, 0, i64::MAX)
                .unwrap();
            assert_eq!((deleted.rows, deleted.unsynced), (1, 0));
        }
        assert_eq!(store.synced_through().unwrap(), seqs[3]);
        let fresh = event(100);
        store.record(std::slice::from_ref(&fresh)).unwrap();
        let pending = store.pending_batch(0, i64::MAX, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, fresh);
        assert_eq!(pending[0].seq, seqs[4], "the seq was handed out again");
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (1, 0, 4));
        let last = store.events_page(0, i64::MAX, None, 10).unwrap();
        assert_eq!(last.last().unwrap().synced_at_ms, None);
    }

    #[test]
    fn erasing_unsynced_and_failed_events_counts_them_and_leaves_nothing_behind() {
        let (_dir, mut store, events) = store_with(4);
        let seqs = pending_seqs(&store);
        store.mark_synced(&seqs[..1], 9).unwrap();
        store.mark_failed(&[(seqs[1], "bad".into())], 9).unwrap();
        let mut unsynced = 0;
        for event in &events {
            unsynced += store
                .forget_events_range(event.user_id, 0, i64::MAX)
                .unwrap()
                .unsynced;
        }
        assert_eq!(unsynced, 3, "one pending, one failed, one pending");
        assert_eq!(store.event_count().unwrap(), 0);
        assert_eq!(store.failure_reason(seqs[1]).unwrap(), None);
        assert_eq!(store.synced_through().unwrap(), 0);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (0, 0, 0));
        let ranges: i64 = store
            .conn
            .query_row("SELECT count(*) FROM synced_ranges", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ranges, 0);
    }

    /// A database of the schema before the cursor, with events in every sync state written
    /// the way that schema's code wrote them, upgraded through every migration since.
    #[test]
    fn a_database_of_per_event_sync_state_moves_to_the_cursor_without_losing_or_resending_any() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        // state by seq 1..=12: 1 synced, 2 failed, 0 pending, with synced_at per commit.
        let states: [(i64, Option<i64>); 12] = [
            (1, Some(100)),
            (1, Some(100)),
            (2, None),
            (1, Some(100)),
            (0, None),
            (1, Some(200)),
            (1, Some(300)),
            (1, Some(300)),
            (2, None),
            (0, None),
            (1, Some(300)),
            (0, None),
        ];
        let ids: Vec<Uuid> = (0..states.len()).map(|_| Uuid::new_v4()).collect();
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let migrations = super::super::migrations();
            // Every block before migration 4, which brought the cursor.
            let previous = migrations
                .iter()
                .position(|b| b.starts_with("4\n"))
                .unwrap();
            for block in &migrations[..previous] {
                conn.execute_batch(block.split_once('\n').unwrap().1)
                    .unwrap();
            }
            conn.pragma_update(None, "user_version", previous).unwrap();
            conn.execute("INSERT INTO models (id, name) VALUES (1, 'gpt-4o')", [])
                .unwrap();
            for (i, (state, synced_at)) in states.iter().enumerate() {
                let seq = i as i64 + 1;
                conn.execute(
                    "INSERT INTO events (seq, event_id, user_id, source, model_id, prompt_tokens,
                         completion_tokens, created_at, sync_state, synced_at)
                     VALUES (?1, ?2, 5, 0, 1, 100, 7, 1764240000000 + ?1, ?3, ?4)",
                    params![seq, ids[i].as_bytes(), state, synced_at],
                )
                .unwrap();
                if *state == 2 {
                    conn.execute(
                        "INSERT INTO sync_failures (seq, reason, failed_at) VALUES (?1, ?2, 1)",
                        params![seq, format!("reason {seq}")],
                    )
                    .unwrap();
                }
            }
        }
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (3, 2, 7));
        assert_eq!(counts.oldest_pending_ms, Some(1_764_240_000_005));
        assert_eq!(store.synced_through().unwrap(), 4);
        let exported: Vec<Option<i64>> = store
            .events_page(0, i64::MAX, None, 100)
            .unwrap()
            .iter()
            .map(|e| e.synced_at_ms)
            .collect();
        let expected: Vec<Option<i64>> = states.iter().map(|(_, at)| *at).collect();
        assert_eq!(exported, expected);
        assert_eq!(
            store.failure_reason(9).unwrap().as_deref(),
            Some("reason 9")
        );
        assert_eq!(pending_seqs(&store), [5, 10, 12]);
        // Every stored id is still stored: sent again, whatever its state, it is a duplicate
        // and nothing joins the queue.
        let again: Vec<Event> = ids
            .iter()
            .map(|id| Event {
                event_id: *id,
                ..event(1)
            })
            .collect();
        assert!(
            store
                .record(&again)
                .unwrap()
                .iter()
                .all(|r| *r == super::super::events::Recorded::Duplicate)
        );
        assert_eq!(pending_seqs(&store), [5, 10, 12]);
        // A sync sends exactly those; retry-failed then requeues exactly the failed ones.
        assert_eq!(store.mark_synced(&[5, 10, 12], 400).unwrap(), 3);
        assert_eq!(store.synced_through().unwrap(), 12);
        assert_eq!(store.requeue_failed().unwrap(), 2);
        assert_eq!(pending_seqs(&store), [3, 9]);
        let counts = store.queue_counts().unwrap();
        assert_eq!((counts.pending, counts.failed, counts.synced), (2, 0, 10));
    }

    #[test]
    fn a_verdict_on_an_erased_event_leaves_the_new_event_at_its_seq_pending() {
        let (_dir, mut store, events) = store_with(3);
        let seqs = pending_seqs(&store);
        // The newest event is on the wire when its user is erased; a new event takes its seq.
        let on_the_wire = named(&store, &seqs);
        store
            .forget_events_range(events[2].user_id, 0, i64::MAX)
            .unwrap();
        let fresh = event(100);
        store.record(std::slice::from_ref(&fresh)).unwrap();
        assert_eq!(pending_seqs(&store), seqs, "the seq was handed out again");
        // The backend's answers name the erased event: the new one is neither synced nor failed.
        let rejected = [(seqs[2], on_the_wire[2].1, "bad".to_owned())];
        assert_eq!(store.record_verdicts(&[], &rejected, 5).unwrap(), (0, 0));
        assert_eq!(store.record_verdicts(&on_the_wire, &[], 6).unwrap(), (2, 0));
        let pending = store.pending_batch(0, i64::MAX, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, fresh);
        assert_eq!(store.synced_through().unwrap(), seqs[1]);
    }
}
