//! Recording events: the group-commit insert with idempotent event ids.

use std::collections::HashSet;

use rusqlite::{Statement, Transaction, params};
use uuid::Uuid;

use super::event_ids::{self, KnownIds};
use super::{Doing, Store, StoreError};
use usage_protocol::event::Event;

/// What happened to one event of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    New,
    /// Its id was already stored (or came earlier in the same write); nothing changed.
    Duplicate,
}

impl Store {
    /// Stores the events of several requests in one transaction, so one fsync acknowledges
    /// them all. Either everything commits or nothing does.
    pub fn record_groups(&mut self, groups: &[&[Event]]) -> Result<Vec<Vec<Recorded>>, StoreError> {
        let result = self.try_record_groups(groups);
        if result.is_err() {
            // A rolled-back transaction may have taken model and origin ids with it, and
            // the ids it noted as stored.
            self.model_ids.clear();
            self.origin_ids.clear();
            self.known_ids.write_rolled_back();
        } else {
            self.known_ids.write_committed();
        }
        result
    }

    fn try_record_groups(&mut self, groups: &[&[Event]]) -> Result<Vec<Vec<Recorded>>, StoreError> {
        let tx = self.conn.transaction().doing("starting a write")?;
        let above_mark = event_ids::stored_above_mark(
            &tx,
            &mut self.known_ids,
            groups
                .iter()
                .flat_map(|events| events.iter().map(|event| &event.event_id)),
        )?;
        // Prepared once for the whole write, not looked up in the cache for each event.
        let mut insert = tx.prepare_cached(INSERT_EVENT).doing("storing an event")?;
        let mut outcomes = Vec::with_capacity(groups.len());
        for events in groups {
            let mut group = Vec::with_capacity(events.len());
            for event in *events {
                let model_id = name_id(
                    &tx,
                    &mut self.model_ids,
                    Names::Models,
                    event.model.as_str(),
                )?;
                let origin_id = match &event.origin {
                    Some(origin) => {
                        name_id(&tx, &mut self.origin_ids, Names::Origins, origin.as_str())?
                    }
                    None => 0,
                };
                group.push(insert_event(
                    &tx,
                    &mut insert,
                    &mut self.known_ids,
                    &above_mark,
                    event,
                    model_id,
                    origin_id,
                )?);
            }
            outcomes.push(group);
        }
        drop(insert);
        tx.commit().doing("committing events")?;
        Ok(outcomes)
    }

    /// Stores the events of one request (and writes the event ids held in memory to their
    /// table when due, as the writer does after a group).
    pub fn record(&mut self, events: &[Event]) -> Result<Vec<Recorded>, StoreError> {
        let outcome = self.record_groups(&[events])?.remove(0);
        while self.merge_event_ids_step(0)? > 0 {}
        Ok(outcome)
    }

    /// Number of stored events.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .doing("counting events")
    }
}

/// The tables of names that events refer to by id.
#[derive(Clone, Copy)]
enum Names {
    Models,
    Origins,
}

/// The id of `name` in its table, stored the first time it is seen.
fn name_id(
    tx: &Transaction,
    cache: &mut std::collections::HashMap<String, i64>,
    names: Names,
    name: &str,
) -> Result<i64, StoreError> {
    if let Some(id) = cache.get(name) {
        return Ok(*id);
    }
    let (insert, select, storing, looking_up) = match names {
        Names::Models => (
            "INSERT INTO models (name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
            "SELECT id FROM models WHERE name = ?1",
            "storing a model name",
            "looking up a model name",
        ),
        Names::Origins => (
            "INSERT INTO origins (name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
            "SELECT id FROM origins WHERE name = ?1",
            "storing an origin",
            "looking up an origin",
        ),
    };
    tx.prepare_cached(insert)
        .and_then(|mut stmt| stmt.execute(params![name]))
        .doing(storing)?;
    let id: i64 = tx
        .prepare_cached(select)
        .and_then(|mut stmt| stmt.query_row(params![name], |row| row.get(0)))
        .doing(looking_up)?;
    cache.insert(name.to_owned(), id);
    Ok(id)
}

const INSERT_EVENT: &str = "INSERT INTO events (event_id, user_id, source, model_id,
         prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
         context, created_at, origin_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// Stores `event` with `insert` ([`INSERT_EVENT`]) unless its id is stored already (or
/// came earlier in this write).
fn insert_event(
    tx: &Transaction,
    insert: &mut Statement,
    known: &mut KnownIds,
    above_mark: &HashSet<Uuid>,
    event: &Event,
    model_id: i64,
    origin_id: i64,
) -> Result<Recorded, StoreError> {
    if !event_ids::note_if_new(tx, known, above_mark, event.event_id)? {
        return Ok(Recorded::Duplicate);
    }
    let tokens = &event.tokens;
    insert
        .execute(params![
            event.event_id.as_bytes(),
            event.user_id as i64,
            event.source.code(),
            model_id,
            tokens.prompt as i64,
            tokens.completion as i64,
            tokens.cached as i64,
            tokens.cache_write as i64,
            tokens.reasoning as i64,
            event.context,
            event.created_at_ms,
            origin_id,
        ])
        .doing("storing an event")?;
    Ok(Recorded::New)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Synchronous;
    use usage_protocol::event::{ModelName, Source, Tokens};
    use uuid::Uuid;

    pub(crate) fn sample_event(id: Uuid) -> Event {
        Event {
            event_id: id,
            user_id: 5,
            source: Source::Bulk,
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            tokens: Tokens {
                prompt: 150,
                completion: 25,
                ..Tokens::default()
            },
            origin: None,
            hold_id: None,
            context: Some(r#"{"attachment_id":42}"#.into()),
            created_at_ms: 1_764_240_000_000,
        }
    }

    #[test]
    fn duplicates_are_detected_across_and_within_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let a = sample_event(Uuid::new_v4());
        let b = sample_event(Uuid::new_v4());
        assert_eq!(
            store.record(std::slice::from_ref(&a)).unwrap(),
            [Recorded::New]
        );
        let outcome = store
            .record_groups(&[&[a.clone(), b.clone()], std::slice::from_ref(&b)])
            .unwrap();
        assert_eq!(
            outcome,
            [
                vec![Recorded::Duplicate, Recorded::New],
                vec![Recorded::Duplicate]
            ]
        );
        assert_eq!(store.event_count().unwrap(), 2);
        assert!(store.contains_event(b.event_id).unwrap());
    }
}

#[cfg(test)]
mod idempotent_ids {
    //! Idempotent ids through their table, its merges and what deletes and failures do to
    //! them (see `super::super::event_ids`).

    use super::super::event_ids::{MERGE_AFTER, MERGE_SLICE, mark};
    use super::tests::sample_event;
    use super::*;
    use crate::config::Synchronous;
    use uuid::Uuid;

    fn events(n: usize) -> Vec<Event> {
        (0..n).map(|_| sample_event(Uuid::new_v4())).collect()
    }

    fn outcomes(store: &mut Store, events: &[Event]) -> Vec<Recorded> {
        store.record(events).unwrap()
    }

    /// Records `good` beside an event a trigger refuses, so the whole write rolls back.
    fn fail_a_write_with(store: &mut Store, good: &Event) {
        store
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON events WHEN NEW.user_id = 666
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let mut bad = sample_event(Uuid::new_v4());
        bad.user_id = 666;
        assert!(store.record(&[good.clone(), bad]).is_err());
    }

    fn stored_in_table(store: &Store) -> i64 {
        store
            .conn
            .query_row("SELECT count(*) FROM event_ids", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn an_id_stays_a_duplicate_before_its_merge_after_it_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let merged = events(3);
        assert_eq!(outcomes(&mut store, &merged), [Recorded::New; 3]);
        assert_eq!(outcomes(&mut store, &merged[..1]), [Recorded::Duplicate]);
        assert_eq!(store.merge_event_ids().unwrap(), 3);
        assert_eq!(stored_in_table(&store), 3);
        let recent = events(2);
        assert_eq!(outcomes(&mut store, &recent), [Recorded::New; 2]);
        for id in merged.iter().chain(&recent).map(|e| e.event_id) {
            assert!(store.contains_event(id).unwrap());
        }
        assert!(!store.contains_event(Uuid::new_v4()).unwrap());
        drop(store);

        // After a restart the ids above the mark come back from the log.
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let again = [
            merged[1].clone(),
            recent[0].clone(),
            sample_event(Uuid::new_v4()),
        ];
        assert_eq!(
            outcomes(&mut store, &again),
            [Recorded::Duplicate, Recorded::Duplicate, Recorded::New]
        );
        assert_eq!(store.event_count().unwrap(), 6);
    }

    #[test]
    fn the_writer_merges_on_its_own_once_enough_ids_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let batch = events(1000);
        for _ in 0..MERGE_AFTER / 1000 {
            store.record(&events(1000)).unwrap();
        }
        assert_eq!(stored_in_table(&store), 0, "not due yet");
        assert_eq!(outcomes(&mut store, &batch), [Recorded::New; 1000]);
        let held = (MERGE_AFTER / 1000 + 1) * 1000;
        assert_eq!(stored_in_table(&store), held as i64);
        // Merged in slices; every id of them is still found.
        assert_eq!(outcomes(&mut store, &batch[..5]), [Recorded::Duplicate; 5]);
    }

    #[test]
    fn events_recorded_while_a_merge_is_under_way_stay_known_above_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let first = events(MERGE_AFTER);
        // Recorded as the writer records: no merge inside the write.
        store.record_groups(&[&first]).unwrap();
        assert_eq!(store.merge_event_ids_step(0).unwrap(), MERGE_SLICE);
        assert!(store.merge_under_way());
        let during = events(3);
        assert_eq!(
            store.record_groups(&[&during]).unwrap(),
            [[Recorded::New; 3]]
        );
        let mut steps = 1;
        while store.merge_under_way() {
            store.merge_event_ids_step(0).unwrap();
            steps += 1;
        }
        assert_eq!(steps, MERGE_AFTER / MERGE_SLICE);
        assert_eq!(stored_in_table(&store), MERGE_AFTER as i64);
        assert_eq!(mark(&store.conn).unwrap(), MERGE_AFTER as i64);
        let sample = [
            first[0].clone(),
            first[MERGE_AFTER - 1].clone(),
            during[2].clone(),
        ];
        assert_eq!(outcomes(&mut store, &sample), [Recorded::Duplicate; 3]);
        drop(store);
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(outcomes(&mut store, &sample), [Recorded::Duplicate; 3]);
    }

    #[test]
    fn an_erasure_during_a_merge_leaves_no_erased_id_in_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let mut all = events(MERGE_AFTER);
        for event in all.iter_mut().step_by(2) {
            event.user_id = 9;
        }
        store.record_groups(&[&all]).unwrap();
        store.merge_event_ids_step(0).unwrap();
        let erased = store.forget_events_range(9, 0, i64::MAX).unwrap();
        assert_eq!(erased.rows, MERGE_AFTER as u64 / 2);
        assert!(!store.merge_under_way(), "the merge starts over");
        store.merge_event_ids().unwrap();
        assert_eq!(stored_in_table(&store), MERGE_AFTER as i64 / 2);
        let mut again = vec![all[0].clone(), all[1].clone()];
        again[0].user_id = 9;
        assert_eq!(
            outcomes(&mut store, &again),
            [Recorded::New, Recorded::Duplicate]
        );
    }

    #[test]
    fn ids_past_what_the_filter_was_sized_for_are_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let first = events(1000);
        store.record(&first).unwrap();
        // Past the smallest filter's size: it is built again, larger, from the table.
        for _ in 0..80 {
            store.record(&events(1000)).unwrap();
        }
        assert!(stored_in_table(&store) > 65_536);
        let last = events(1);
        assert_eq!(outcomes(&mut store, &last), [Recorded::New]);
        let again = [first[0].clone(), first[999].clone(), last[0].clone()];
        assert_eq!(outcomes(&mut store, &again), [Recorded::Duplicate; 3]);
    }

    #[test]
    fn a_rolled_back_write_leaves_none_of_its_ids_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let good = sample_event(Uuid::new_v4());
        fail_a_write_with(&mut store, &good);
        assert!(!store.contains_event(good.event_id).unwrap());
        assert_eq!(outcomes(&mut store, &[good]), [Recorded::New]);
    }

    #[test]
    fn a_merge_cut_short_loses_no_id_and_the_next_one_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let all = events(MERGE_SLICE * 2 + 10);
        store.record(&all).unwrap();
        // The last slice moves the mark; make it fail after the first slices committed.
        store
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON meta
                 WHEN NEW.key = 'event_ids_through'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert!(store.merge_event_ids().is_err());
        assert_eq!(stored_in_table(&store), MERGE_SLICE as i64 * 2);
        assert_eq!(mark(&store.conn).unwrap(), 0);
        let sample = [all[0].clone(), all[MERGE_SLICE * 2 + 5].clone()];
        assert_eq!(outcomes(&mut store, &sample), [Recorded::Duplicate; 2]);
        store.conn.execute_batch("DROP TRIGGER refuse").unwrap();
        drop(store);

        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(outcomes(&mut store, &sample), [Recorded::Duplicate; 2]);
        assert_eq!(store.merge_event_ids().unwrap(), all.len());
        assert_eq!(stored_in_table(&store), all.len() as i64);
        assert_eq!(mark(&store.conn).unwrap(), all.len() as i64);
    }

    /// The database as a crash of the machine would leave it: the file, and its WAL cut
    /// to `wal_len` bytes (the frames past the last sync lost), copied to `to`.
    fn crashed_copy(path: &std::path::Path, wal_len: u64, to: &std::path::Path) {
        std::fs::copy(path, to).unwrap();
        let wal = std::fs::read(format!("{}-wal", path.display())).unwrap();
        std::fs::write(format!("{}-wal", to.display()), &wal[..wal_len as usize]).unwrap();
    }

    #[test]
    fn a_crash_that_loses_a_merges_unsynced_commits_loses_no_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let wal_len = || {
            std::fs::metadata(dir.path().join("u.db-wal"))
                .unwrap()
                .len()
        };
        // Synced as the agent syncs (the gathering VFS, which defers a merge's sync), and
        // never checkpointed, so the WAL only grows and a cut at a length is a crash.
        let mut store = Store::open(&path, Synchronous::Full).unwrap();
        store
            .conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .unwrap();
        let merged = events(MERGE_SLICE + 10);
        store.record_groups(&[&merged]).unwrap();
        store.merge_event_ids().unwrap();
        // This recording commit's sync covers the merge before it.
        let recent = events(MERGE_SLICE * 3 + 10);
        store.record_groups(&[&recent]).unwrap();
        let synced = wal_len();
        store.merge_event_ids().unwrap();
        let all = merged.len() + recent.len();
        assert_eq!(mark(&store.conn).unwrap(), all as i64);
        let frame = 24 + crate::store::PAGE_SIZE as u64;
        let unsynced_frames = (wal_len() - synced) / frame;
        assert!(
            unsynced_frames > 2,
            "the merge wrote {unsynced_frames} frames"
        );

        // Lost whole, or only its last commits (the mark's move among them).
        for (cut, whole_merge_lost) in [
            (synced, true),
            (synced + unsynced_frames / 2 * frame, false),
        ] {
            let copy = dir.path().join(format!("crashed-{cut}.db"));
            crashed_copy(&path, cut, &copy);
            let mut crashed = Store::open(&copy, Synchronous::Full).unwrap();
            let check: String = crashed
                .conn
                .query_row("PRAGMA quick_check", [], |row| row.get(0))
                .unwrap();
            assert_eq!(check, "ok", "cut at {cut}");
            assert_eq!(crashed.event_count().unwrap(), all as u64, "cut at {cut}");
            let (mark_left, in_table) = (mark(&crashed.conn).unwrap(), stored_in_table(&crashed));
            if whole_merge_lost {
                assert_eq!(
                    (mark_left, in_table),
                    (merged.len() as i64, merged.len() as i64)
                );
            } else {
                assert!(
                    in_table > merged.len() as i64 && in_table < all as i64,
                    "cut at {cut}: {in_table} ids in the table"
                );
                assert!([merged.len() as i64, all as i64].contains(&mark_left));
            }
            let sample = [
                merged[0].clone(),
                merged[merged.len() - 1].clone(),
                recent[0].clone(),
                recent[recent.len() - 1].clone(),
            ];
            assert_eq!(
                outcomes(&mut crashed, &sample),
                [Recorded::Duplicate; 4],
                "cut at {cut}"
            );
            // The next merge writes what the crash undid.
            crashed.merge_event_ids().unwrap();
            assert_eq!(stored_in_table(&crashed), all as i64, "cut at {cut}");
            assert_eq!(mark(&crashed.conn).unwrap(), all as i64, "cut at {cut}");
            assert_eq!(
                outcomes(&mut crashed, &recent),
                vec![Recorded::Duplicate; recent.len()],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn erased_ids_can_be_recorded_again_whether_merged_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let mut erased = events(5);
        for event in &mut erased {
            event.user_id = 9;
        }
        let kept = events(2);
        // Seqs 1 and 2 erased, 3 and 4 kept, 5 and 6 erased, all merged; 7 erased, not
        // merged. The newest are erased too, so their seqs are handed out again.
        store.record(&erased[..2]).unwrap();
        store.record(&kept).unwrap();
        store.record(&erased[2..4]).unwrap();
        store.merge_event_ids().unwrap();
        store.record(&erased[4..]).unwrap();
        let deleted = store.forget_events_range(9, 0, i64::MAX).unwrap();
        assert_eq!(deleted.rows, 5);
        assert_eq!(stored_in_table(&store), 2);
        assert_eq!(
            mark(&store.conn).unwrap(),
            4,
            "lowered to the newest event left"
        );
        assert_eq!(outcomes(&mut store, &erased), [Recorded::New; 5]);
        assert_eq!(outcomes(&mut store, &kept), [Recorded::Duplicate; 2]);
        drop(store);

        // The events that took the erased seqs are read back after a restart.
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(outcomes(&mut store, &erased), [Recorded::Duplicate; 5]);
    }

    #[test]
    fn ids_sharing_one_hash_are_told_apart_by_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        store.known_ids.use_one_hash();
        let first = events(5);
        assert_eq!(outcomes(&mut store, &first), [Recorded::New; 5]);
        let (a, b) = (sample_event(Uuid::new_v4()), sample_event(Uuid::new_v4()));
        assert_eq!(
            outcomes(&mut store, &[a.clone(), a.clone(), first[0].clone(), b]),
            [
                Recorded::New,
                Recorded::Duplicate,
                Recorded::Duplicate,
                Recorded::New
            ]
        );
        assert_eq!(outcomes(&mut store, &first), [Recorded::Duplicate; 5]);
        // Merged into the table; then one of them erased, and the rest still duplicates.
        store.merge_event_ids().unwrap();
        let mut erased = sample_event(Uuid::new_v4());
        erased.user_id = 9;
        assert_eq!(outcomes(&mut store, &[erased.clone()]), [Recorded::New]);
        store.forget_events_range(9, 0, i64::MAX).unwrap();
        assert_eq!(outcomes(&mut store, &[erased.clone()]), [Recorded::New]);
        assert_eq!(outcomes(&mut store, &first), [Recorded::Duplicate; 5]);
        assert_eq!(store.event_count().unwrap(), 8);
        drop(store);

        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        store.known_ids.use_one_hash();
        assert_eq!(
            outcomes(&mut store, &[a, erased, sample_event(Uuid::new_v4())]),
            [Recorded::Duplicate, Recorded::Duplicate, Recorded::New]
        );
    }

    #[test]
    fn a_rolled_back_write_sharing_hashes_leaves_the_others_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        store.known_ids.use_one_hash();
        let kept = events(3);
        store.record(&kept).unwrap();
        let good = sample_event(Uuid::new_v4());
        fail_a_write_with(&mut store, &good);
        assert_eq!(
            outcomes(&mut store, &[good, kept[0].clone()]),
            [Recorded::New, Recorded::Duplicate]
        );
    }

    #[test]
    fn purged_ids_leave_the_table_and_can_be_recorded_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let old = events(3);
        store.record(&old).unwrap();
        store.merge_event_ids().unwrap();
        let at = old[0].created_at_ms;
        store.recompute_day("2025-11-27", at, at + 1).unwrap();
        store.set_meta("rollup_seq", "3").unwrap();
        assert_eq!(store.purge_events_chunk(at + 1, 100).unwrap().rows, 3);
        assert_eq!(stored_in_table(&store), 0);
        assert_eq!(outcomes(&mut store, &old), [Recorded::New; 3]);
    }
}
