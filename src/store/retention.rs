//! Deleting data: retention (expired raw events and daily summaries) and erasure of one
//! user. Every method here is one small transaction; the jobs call them repeatedly through
//! the writer so that recording interleaves between them and never waits long.

use rusqlite::{Transaction, params};
use uuid::Uuid;

use super::event_ids;
use super::rollup::clamp_rollup_seq;
use super::sync::{clamp_queue, is_covered};
use super::{Doing, Store, StoreError};

/// What one delete transaction removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Rows deleted.
    pub rows: u64,
    /// Of those, events that had not been synced yet (pending or failed).
    pub unsynced: u64,
}

impl Store {
    /// Deletes up to `limit` events with `created_at < before_ms` that are already rolled
    /// up (`seq <= rollup_seq`), oldest first.
    pub fn purge_events_chunk(
        &mut self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Deleted, StoreError> {
        let tx = self.conn.transaction().doing("starting a purge")?;
        let rolled_up: i64 = tx
            .prepare_cached("SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rollup_seq'), 0)")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .doing("reading the rollup mark")?;
        let (deleted, ids) = delete_returning(
            &tx,
            "DELETE FROM events WHERE seq IN (
                 SELECT seq FROM events WHERE created_at < ?1 AND seq <= ?2
                 ORDER BY created_at LIMIT ?3)
             RETURNING seq, event_id",
            params![before_ms, rolled_up, limit as i64],
        )?;
        clamp_rollup_seq(&tx)?;
        clamp_queue(&tx)?;
        tx.commit().doing("committing a purge")?;
        self.forget_known_ids(&ids);
        Ok(deleted)
    }

    /// Deletes up to `limit` summary rows of days before `before_day` (`YYYY-MM-DD`).
    pub fn purge_daily_chunk(&mut self, before_day: &str, limit: usize) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM usage_daily
                 WHERE (usage_date, user_id, source, model_id, origin_id) IN (
                     SELECT usage_date, user_id, source, model_id, origin_id FROM usage_daily
                     WHERE usage_date < ?1 ORDER BY usage_date LIMIT ?2)",
            )
            .and_then(|mut stmt| stmt.execute(params![before_day, limit as i64]))
            .doing("purging daily summaries")
            .map(|n| n as u64)
    }

    /// Deletes the events of `user_id` with `after < seq <= until` (erasure works through
    /// the log in `seq` ranges, so each transaction stays small without a user index).
    pub fn forget_events_range(
        &mut self,
        user_id: u64,
        after: i64,
        until: i64,
    ) -> Result<Deleted, StoreError> {
        let tx = self.conn.transaction().doing("starting an erasure")?;
        let (deleted, ids) = delete_returning(
            &tx,
            "DELETE FROM events WHERE seq > ?1 AND seq <= ?2 AND user_id = ?3
             RETURNING seq, event_id",
            params![after, until, user_id as i64],
        )?;
        clamp_rollup_seq(&tx)?;
        clamp_queue(&tx)?;
        tx.commit().doing("committing an erasure")?;
        self.forget_known_ids(&ids);
        Ok(deleted)
    }

    /// The lowest `seq` stored (0 when there are no events).
    pub fn min_event_seq(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT coalesce(min(seq), 0) FROM events")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .doing("reading the lowest event seq")
    }

    /// Deletes every summary row of `user_id`.
    pub fn forget_daily(&mut self, user_id: u64) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("DELETE FROM usage_daily WHERE user_id = ?1")
            .and_then(|mut stmt| stmt.execute(params![user_id as i64]))
            .doing("erasing a user's summaries")
            .map(|n| n as u64)
    }
}

/// Runs a `DELETE ... RETURNING seq, event_id` and drops what the queue's side tables and
/// the stored ids held about the deleted events (a failure reason, a requeue entry, the
/// id), so nothing of them is left behind; returns what it deleted and the deleted ids.
/// An event no range covered was not synced (see `super::sync`).
fn delete_returning(
    tx: &Transaction,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<(Deleted, Vec<Uuid>), StoreError> {
    let mut seqs = Vec::new();
    let mut ids = Vec::new();
    {
        let mut stmt = tx.prepare_cached(sql).doing("deleting events")?;
        let mut rows = stmt.query(args).doing("deleting events")?;
        while let Some(row) = rows.next().doing("deleting events")? {
            seqs.push(row.get::<_, i64>(0).doing("deleting events")?);
            ids.push(Uuid::from_bytes(
                row.get::<_, [u8; 16]>(1).doing("deleting events")?,
            ));
        }
    }
    event_ids::forget_deleted(tx, &ids)?;
    let mut deleted = Deleted {
        rows: seqs.len() as u64,
        unsynced: 0,
    };
    let mut forget_failure = tx
        .prepare_cached("DELETE FROM sync_failures WHERE seq = ?1")
        .doing("deleting sync failure notes")?;
    let mut forget_requeue = tx
        .prepare_cached("DELETE FROM sync_requeued WHERE seq = ?1")
        .doing("deleting requeue entries")?;
    for seq in seqs {
        if !is_covered(tx, seq)? {
            deleted.unsynced += 1;
            forget_failure
                .execute(params![seq])
                .doing("deleting sync failure notes")?;
            forget_requeue
                .execute(params![seq])
                .doing("deleting requeue entries")?;
        }
    }
    Ok((deleted, ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::events::tests::sample_event;
    use usage_protocol::event::Origin;

    #[test]
    fn a_daily_chunk_deletes_exactly_its_rows_when_origins_share_the_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let events: Vec<_> = [None, Some("core"), Some("theme:acme")]
            .into_iter()
            .map(|origin| {
                let mut event = sample_event(uuid::Uuid::new_v4());
                event.origin = origin.map(|o| Origin::parse(o).unwrap());
                event
            })
            .collect();
        store.record(&events).unwrap();
        let at = events[0].created_at_ms;
        assert_eq!(store.recompute_day("2025-11-27", at, at + 1).unwrap(), 3);
        for left in [2, 1, 0] {
            assert_eq!(store.purge_daily_chunk("2025-11-28", 1).unwrap(), 1);
            assert_eq!(store.daily_page("", None).unwrap().len(), left);
        }
    }
}
