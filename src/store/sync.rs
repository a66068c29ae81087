//! The sync queue: reading pending events in arrival order and recording what the backend
//! said about them (synced, failed with a reason, or put back in the queue).
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

fn pending_from_row(row: &rusqlite::Row) -> rusqlite::Result<PendingEvent> {
    let id: Vec<u8> = row.get(1)?;
    let event_id = Uuid::from_slice(&id).map_err(|e| corrupt(1, format!("event_id: {e}")))?;
    let user_id: i64 = row.get(2)?;
    let source_code: i64 = row.get(3)?;
    let source = Source::from_code(source_code)
        .ok_or_else(|| corrupt(3, format!("source code {source_code} is unknown")))?;
    let model_name: String = row.get(4)?;
    let model = ModelName::parse(&model_name).map_err(|e| corrupt(4, format!("model: {e}")))?;
    let origin = row
        .get::<_, Option<String>>(12)?
        .map(|name| Origin::parse(&name).map_err(|e| corrupt(12, format!("origin: {e}"))))
        .transpose()?;
    let token = |column: usize| -> rusqlite::Result<u64> {
        let value: i64 = row.get(column)?;
        u64::try_from(value).map_err(|_| corrupt(column, format!("negative token count {value}")))
    };
    Ok(PendingEvent {
        seq: row.get(0)?,
        event: Event {
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
            hold_id: None,
            context: row.get(10)?,
            created_at_ms: row.get(11)?,
        },
    })
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

    /// Up to `limit` pending events with `after < seq <= until`, in arrival order, with
    /// their model names. Served by the partial index on unsynced rows.
    pub fn pending_batch(
        &self,
        after: i64,
        until: i64,
        limit: usize,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT e.seq, e.event_id, e.user_id, e.source, m.name, e.prompt_tokens,
                        e.completion_tokens, e.cached_tokens, e.cache_write_tokens,
                        e.reasoning_tokens, e.context, e.created_at, o.name
                 FROM events e JOIN models m ON m.id = e.model_id
                      LEFT JOIN origins o ON o.id = e.origin_id
                 WHERE e.sync_state = 0 AND e.seq > ?1 AND e.seq <= ?2
                 ORDER BY e.seq
                 LIMIT ?3",
            )
            .doing("reading the sync queue")?;
        let rows = stmt
            .query_map(params![after, until, limit], pending_from_row)
            .doing("reading the sync queue")?;
        rows.collect::<Result<_, _>>()
            .doing("reading the sync queue")
    }

    /// Marks events synced at `at_ms`, all in one transaction. Events that are no longer
    /// pending (erased meanwhile, or already marked) are left alone. Returns how many changed.
    pub fn mark_synced(&mut self, seqs: &[i64], at_ms: i64) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction()
            .doing("starting to mark events synced")?;
        let mut changed = 0;
        {
            // Batches are cut in arrival order, so their seqs are mostly consecutive: one
            // statement per run of consecutive seqs instead of one per event.
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE events SET sync_state = 1, synced_at = ?3
                     WHERE seq BETWEEN ?1 AND ?2 AND sync_state = 0",
                )
                .doing("marking events synced")?;
            for (first, last) in consecutive_runs(seqs) {
                changed += stmt
                    .execute(params![first, last, at_ms])
                    .doing("marking events synced")? as u64;
            }
        }
        tx.commit().doing("committing synced events")?;
        Ok(changed)
    }

    /// Marks events failed with the backend's reason, in one transaction. Only pending
    /// events change; the reason stays until [`Store::requeue_failed`].
    pub fn mark_failed(
        &mut self,
        failures: &[(i64, String)],
        at_ms: i64,
    ) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction()
            .doing("starting to mark events failed")?;
        let mut changed = 0;
        {
            let mut update = tx
                .prepare_cached(
                    "UPDATE events SET sync_state = 2 WHERE seq = ?1 AND sync_state = 0",
                )
                .doing("marking events failed")?;
            let mut reason = tx
                .prepare_cached(
                    "INSERT INTO sync_failures (seq, reason, failed_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(seq) DO UPDATE SET reason = excluded.reason, failed_at = excluded.failed_at",
                )
                .doing("recording why an event failed")?;
            for (seq, why) in failures {
                if update
                    .execute(params![seq])
                    .doing("marking events failed")?
                    == 1
                {
                    reason
                        .execute(params![seq, why, at_ms])
                        .doing("recording why an event failed")?;
                    changed += 1;
                }
            }
        }
        tx.commit().doing("committing failed events")?;
        Ok(changed)
    }

    /// Puts every failed event back in the queue and forgets the reasons. Returns how many.
    pub fn requeue_failed(&mut self) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction()
            .doing("starting to requeue failed events")?;
        let requeued = tx
            .execute("UPDATE events SET sync_state = 0 WHERE sync_state = 2", [])
            .doing("requeueing failed events")?;
        tx.execute("DELETE FROM sync_failures", [])
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
}
