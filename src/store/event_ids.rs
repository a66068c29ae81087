//! Idempotent event ids without a random index write per event.
//!
//! Clients send random ids (UUIDv4), so a unique index on them put each new event on an
//! index leaf of its own: a commit of a few hundred events rewrote most of the index's
//! pages, the largest part of what recording an event cost (BENCHMARKS.md, "The dedupe
//! index"). Instead an id is stored in one of two places:
//!
//! - the `event_ids` table, keyed by id, holds the ids of every event at or below the mark
//!   `meta.event_ids_through`. It is filled in batches sorted by id, so a batch passes
//!   over the table's leaves once instead of touching a leaf per event;
//! - the ids of the events above the mark are durable in the log itself. The writing
//!   `Store` keeps a keyed 64-bit hash of each in memory ([`KnownIds`], at most about
//!   [`MERGE_AFTER`] of them), read back from the log after a restart, so a crash loses
//!   none. A hash is half the memory of an id, which lets merges be twice as large; two
//!   ids may share one, so a hit is checked against the log before it counts.
//!
//! A merge's commits leave their sync to the next recording commit (whose sync covers
//! the whole WAL): the table only repeats what the log holds, and a merge that a crash
//! undoes is done again from the log.
//!
//! An id is stored when it is in either. Deleting events deletes their ids from the table
//! and lowers the mark to the newest event left, because SQLite hands a deleted newest
//! event's `seq` out again and the events above the mark must be exactly those read back.
//! The hashes are never taken out one by one (another id may share one): the whole set is
//! read again from the log when ids leave it, so every id above the mark always has its
//! hash there; a hash left over from a deleted event only costs a check.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

use fastbloom::BloomFilter;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::{Doing, Store, StoreError};

/// Key in `meta` of the mark: the ids of all events with `seq` at or below it are in
/// `event_ids`.
const THROUGH_KEY: &str = "event_ids_through";

/// Ids held above the mark before they are written to `event_ids` in one sorted batch (a
/// merge): a batch large enough that most leaves it touches take several of its ids, in
/// memory the agent's budget has room for.
pub const MERGE_AFTER: usize = 8192;

/// Hashes the set of those above the mark has room for from the start: a merge's worth
/// and the groups recorded while it is written (the most a 16,384-slot table holds),
/// about 150 KiB.
const RECENT_CAPACITY: usize = 14_336;

/// Ids written to `event_ids` per transaction of a merge, and per step of the writer
/// between two group commits. A slice of sorted ids touches at most this many of the
/// table's leaves, so a transaction's changed pages stay within the writer's page cache
/// (1 KiB pages, 512 KiB) instead of spilling to the WAL before its commit.
pub(super) const MERGE_SLICE: usize = 512;

/// The filter over `event_ids` is sized for a quarter more ids than the table held when it
/// was built, and for at least this many: about 50 KiB at the false-positive rate below,
/// and about 1 byte per stored id above it (1 MB at a million events).
const MIN_FILTER_IDS: usize = 65_536;
/// Share of ids not stored that the filter still sends to the table to be looked up: a
/// lookup of a few microseconds for one new event in twenty, against memory that grows
/// with the database.
const FILTER_FALSE_POSITIVES: f64 = 0.05;

/// What the writing connection knows of the stored ids, read from the database on first
/// use: the ids above the mark, and a filter that answers "not in `event_ids`" for nearly
/// every id that is not, so a new event costs no lookup in the table.
#[derive(Default)]
pub(crate) struct KnownIds {
    known: Option<Known>,
    /// Ids noted by the write in progress: checked when one of their hashes is hit again
    /// in the same write, and their hashes read again should it roll back.
    noted: Vec<Uuid>,
    /// Tests only: every id gets the same hash, so every check against the log runs.
    #[cfg(test)]
    one_hash: bool,
}

struct Known {
    /// Keyed hashes of the ids of the events above the mark (and of some deleted since).
    recent: HashSet<u64>,
    /// Set when ids left the events above the mark: `recent` is read again at next use.
    recent_stale: bool,
    keys: RandomState,
    #[cfg(test)]
    one_hash: bool,
    /// Holds every id of `event_ids` (and some deleted since, which only cost a lookup).
    merged: BloomFilter,
    /// Ids the filter was sized for, and ids put in it: once they pass its size, it is
    /// built again from the table.
    merged_capacity: usize,
    merged_added: usize,
    /// The merge under way, if any.
    merging: Option<Merge>,
}

/// A merge under way: the ids of the events up to `through` above the mark, sorted, and
/// how many of them are written.
struct Merge {
    ids: Vec<Uuid>,
    through: i64,
    written: usize,
}

impl Merge {
    /// Reads the ids to merge from the log, which is the truth, rather than from memory;
    /// `expected` of them (the ids held), so the list is allocated once.
    fn read(conn: &Connection, expected: usize) -> Result<Merge, StoreError> {
        let mark = mark(conn)?;
        let through: i64 = conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM events")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .doing("reading the newest event")?;
        let mut ids = Vec::with_capacity(expected);
        conn.prepare_cached("SELECT event_id FROM events WHERE seq > ?1 AND seq <= ?2")
            .and_then(|mut stmt| {
                for id in stmt.query_map(params![mark, through], |row| row.get::<_, [u8; 16]>(0))? {
                    ids.push(Uuid::from_bytes(id?));
                }
                Ok(())
            })
            .doing("reading the event ids to merge")?;
        // Byte order, which is SQLite's order of blobs.
        ids.sort_unstable();
        Ok(Merge {
            ids,
            through,
            written: 0,
        })
    }
}

impl KnownIds {
    /// Forgets what it holds, so the next use reads the ids from the database again.
    pub(crate) fn reset(&mut self) {
        self.known = None;
        self.noted.clear();
    }

    /// The write in progress committed: its ids stay known.
    pub(crate) fn write_committed(&mut self) {
        self.noted.clear();
    }

    /// The write in progress rolled back: its ids are not stored after all, and their
    /// hashes are read again from the log.
    pub(crate) fn write_rolled_back(&mut self) {
        if let Some(known) = self.known.as_mut() {
            known.recent_stale |= !self.noted.is_empty();
        }
        self.noted.clear();
    }

    /// What is known, read from the database if not held yet.
    fn loaded(&mut self, conn: &Connection) -> Result<&mut Known, StoreError> {
        if self.known.is_none() {
            let mut known = Known::read(conn)?;
            #[cfg(test)]
            {
                known.one_hash = self.one_hash;
            }
            known.read_recent(conn)?;
            self.known = Some(known);
        }
        let known = self.known.as_mut().expect("loaded just above");
        if known.recent_stale {
            known.read_recent(conn)?;
        }
        Ok(known)
    }

    /// Tests only: from now on every id gets the same hash.
    #[cfg(test)]
    pub(crate) fn use_one_hash(&mut self) {
        self.one_hash = true;
        self.known = None;
    }
}

impl Known {
    /// The filter over the table; `recent` is left to [`Known::read_recent`].
    fn read(conn: &Connection) -> Result<Known, StoreError> {
        let (merged, merged_capacity, merged_added) = filter_of_table(conn)?;
        Ok(Known {
            // Room for a merge's worth and large groups from the start, so the set does
            // not grow (and hold its old and new table at once) under load.
            recent: HashSet::with_capacity(RECENT_CAPACITY),
            recent_stale: true,
            keys: RandomState::new(),
            #[cfg(test)]
            one_hash: false,
            merged,
            merged_capacity,
            merged_added,
            merging: None,
        })
    }

    /// The hash of `id` in `recent`.
    fn hash(&self, id: &Uuid) -> u64 {
        #[cfg(test)]
        if self.one_hash {
            return 0;
        }
        self.keys.hash_one(id.as_bytes())
    }

    /// Reads the hashes of the ids above the mark from the log.
    fn read_recent(&mut self, conn: &Connection) -> Result<(), StoreError> {
        // Taken out while it is filled (keeping its room), as hashing borrows `self`.
        let mut hashes = std::mem::take(&mut self.recent);
        hashes.clear();
        each_id_above_mark(conn, |id| {
            hashes.insert(self.hash(&id));
        })?;
        self.recent = hashes;
        self.recent_stale = false;
        Ok(())
    }
}

/// Calls `each` with the id of every event above the mark, read from the log.
fn each_id_above_mark(conn: &Connection, mut each: impl FnMut(Uuid)) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT event_id FROM events WHERE seq > ?1")
        .doing("reading the newest event ids")?;
    let mut rows = stmt
        .query(params![mark(conn)?])
        .doing("reading the newest event ids")?;
    while let Some(row) = rows.next().doing("reading the newest event ids")? {
        each(Uuid::from_bytes(
            row.get(0).doing("reading the newest event ids")?,
        ));
    }
    Ok(())
}

/// A filter holding every id of `event_ids`, the ids it was sized for, and the ids put in.
fn filter_of_table(conn: &Connection) -> Result<(BloomFilter, usize, usize), StoreError> {
    let stored: i64 = conn
        .prepare_cached("SELECT count(*) FROM event_ids")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .doing("counting the stored event ids")?;
    let capacity = (stored as usize)
        .saturating_add(stored as usize / 4)
        .max(MIN_FILTER_IDS);
    let mut filter = BloomFilter::with_false_pos(FILTER_FALSE_POSITIVES).expected_items(capacity);
    let mut stmt = conn
        .prepare_cached("SELECT event_id FROM event_ids")
        .doing("reading the stored event ids")?;
    let mut rows = stmt.query([]).doing("reading the stored event ids")?;
    let mut added = 0;
    while let Some(row) = rows.next().doing("reading the stored event ids")? {
        let id: [u8; 16] = row.get(0).doing("reading the stored event ids")?;
        filter.insert(&id);
        added += 1;
    }
    Ok((filter, capacity, added))
}

/// The mark (0 when no id was ever merged).
pub(super) fn mark(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "SELECT coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1), 0)",
    )
    .and_then(|mut stmt| stmt.query_row(params![THROUGH_KEY], |row| row.get(0)))
    .doing("reading the event id mark")
}

/// Of the ids a write is about to store, those already above the mark: the ids whose hash
/// is held, checked against the log in one pass. Empty (and no read) when no hash is hit,
/// the usual case.
pub(crate) fn stored_above_mark<'a>(
    conn: &Connection,
    known: &mut KnownIds,
    ids: impl Iterator<Item = &'a Uuid>,
) -> Result<HashSet<Uuid>, StoreError> {
    let known = known.loaded(conn)?;
    let hit: HashSet<Uuid> = ids
        .filter(|id| known.recent.contains(&known.hash(id)))
        .copied()
        .collect();
    if hit.is_empty() {
        return Ok(hit);
    }
    let mut found = HashSet::new();
    each_id_above_mark(conn, |id| {
        if hit.contains(&id) {
            found.insert(id);
        }
    })?;
    Ok(found)
}

/// For a write in progress on `conn` (the connection `known` belongs to), given what
/// [`stored_above_mark`] found before it began: whether `event_id` is new, and if so notes
/// it as stored by this write (which the write then stores, or rolls back).
pub(crate) fn note_if_new(
    conn: &Connection,
    known: &mut KnownIds,
    above_mark: &HashSet<Uuid>,
    event_id: Uuid,
) -> Result<bool, StoreError> {
    known.loaded(conn)?;
    let held = known.known.as_mut().expect("loaded just above");
    let hash = held.hash(&event_id);
    // A held hash counts once the log confirmed the id, or this write stored it already.
    if held.recent.contains(&hash)
        && (above_mark.contains(&event_id) || known.noted.contains(&event_id))
    {
        return Ok(false);
    }
    if held.merged.contains(event_id.as_bytes()) {
        let in_table = conn
            .prepare_cached("SELECT 1 FROM event_ids WHERE event_id = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![event_id.as_bytes()], |_| Ok(()))
                    .optional()
            })
            .doing("looking up an event id")?;
        if in_table.is_some() {
            return Ok(false);
        }
    }
    held.recent.insert(hash);
    known.noted.push(event_id);
    Ok(true)
}

/// In a deleting transaction: deletes the ids of the deleted events from `event_ids` and
/// lowers the mark to the newest event left. The caller drops them from its
/// [`KnownIds`] once the transaction commits.
pub(crate) fn forget_deleted(conn: &Connection, deleted: &[Uuid]) -> Result<(), StoreError> {
    let mut delete = conn
        .prepare_cached("DELETE FROM event_ids WHERE event_id = ?1")
        .doing("deleting event ids")?;
    for id in deleted {
        delete
            .execute(params![id.as_bytes()])
            .doing("deleting event ids")?;
    }
    super::lower_to_newest_event(conn, THROUGH_KEY)
}

/// Fills `event_ids` again from the events stored, after a salvage copied them: the table
/// is not copied, because the events are the truth and a damaged file may have lost either.
pub(crate) fn rebuild(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "DELETE FROM event_ids;
         INSERT OR IGNORE INTO event_ids (event_id) SELECT event_id FROM events ORDER BY event_id;
         INSERT INTO meta (key, value)
         VALUES ('event_ids_through', CAST((SELECT coalesce(max(seq), 0) FROM events) AS TEXT))
         ON CONFLICT(key) DO UPDATE SET value = excluded.value;",
    )
    .doing("rebuilding the event ids")
}

impl Store {
    /// Takes the next step of writing the ids held in memory to `event_ids`: starts a merge
    /// once [`MERGE_AFTER`] ids are held, then writes slices of it until twice `recorded`
    /// ids (those of the group just committed) are written, at least one slice. The writer
    /// calls this after each group commit: a merge holds up the next group by a few
    /// slices at most, and outpaces recording, so the ids in memory do not pile up while it
    /// runs. How many ids it wrote.
    pub fn merge_event_ids_step(&mut self, recorded: usize) -> Result<usize, StoreError> {
        let due = self
            .known_ids
            .known
            .as_ref()
            .is_some_and(|known| known.merging.is_some() || known.recent.len() >= MERGE_AFTER);
        if !due {
            return Ok(0);
        }
        self.guarded_merge(|store| {
            let mut written = 0;
            loop {
                written += store.merge_slice()?;
                if written >= 2 * recorded || !store.merge_under_way() {
                    return Ok(written);
                }
            }
        })
    }

    /// Writes the ids of every event above the mark to `event_ids`, sorted, and moves the
    /// mark to the newest event; how many it wrote.
    pub fn merge_event_ids(&mut self) -> Result<usize, StoreError> {
        self.guarded_merge(|store| {
            let mut written = 0;
            loop {
                written += store.merge_slice()?;
                if !store.merge_under_way() {
                    return Ok(written);
                }
            }
        })
    }

    /// Whether a merge has slices left to write.
    pub fn merge_under_way(&self) -> bool {
        self.known_ids
            .known
            .as_ref()
            .is_some_and(|known| known.merging.is_some())
    }

    /// Runs a merge; should it fail, everything is read again from the database at the
    /// next use (the ids above the mark, some perhaps in the table already, which the next
    /// merge skips).
    fn guarded_merge(
        &mut self,
        merge: impl FnOnce(&mut Store) -> Result<usize, StoreError>,
    ) -> Result<usize, StoreError> {
        let result = merge(self);
        if result.is_err() {
            self.known_ids.reset();
        }
        result
    }

    /// Writes the next slice of the merge under way, starting one if none is; the last
    /// slice moves the mark and ends the merge.
    fn merge_slice(&mut self) -> Result<usize, StoreError> {
        self.known_ids.loaded(&self.conn)?;
        let known = self.known_ids.known.as_mut().expect("loaded just above");
        if known.merging.is_none() {
            known.merging = Some(Merge::read(&self.conn, known.recent.len())?);
        }
        let merge = known.merging.as_ref().expect("started just above");
        let slice = &merge.ids[merge.written..(merge.written + MERGE_SLICE).min(merge.ids.len())];
        let last = merge.written + slice.len() == merge.ids.len();
        let tx = self
            .conn
            .transaction()
            .doing("starting an event id merge")?;
        {
            // OR IGNORE: after a merge cut short, some ids are in the table already.
            let mut insert = tx
                .prepare_cached("INSERT OR IGNORE INTO event_ids (event_id) VALUES (?1)")
                .doing("merging event ids")?;
            for id in slice {
                insert
                    .execute(params![id.as_bytes()])
                    .doing("merging event ids")?;
            }
        }
        if last {
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT))
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![THROUGH_KEY, merge.through]))
            .doing("moving the event id mark")?;
        }
        // Unsynced: the ids are in the log, which every recording commit syncs (along
        // with this one's frames); should a crash of the machine undo it, the ids are
        // above the mark again and the next merge writes them.
        usage_common::gather_vfs::with_wal_sync_deferred(|| tx.commit())
            .doing("committing an event id merge")?;
        let written = slice.len();
        let known = self.known_ids.known.as_mut().expect("loaded above");
        let merge = known.merging.as_mut().expect("under way");
        // The slice's ids are in the table now, found through the filter. Until the mark
        // moves they are also above it (and read back after a restart; the next merge then
        // skips them), so their hashes stay.
        for id in &merge.ids[merge.written..merge.written + written] {
            known.merged.insert(id.as_bytes());
        }
        known.merged_added += written;
        merge.written += written;
        if last {
            // Only the events recorded during the merge are above the mark now.
            known.merging = None;
            known.read_recent(&self.conn)?;
            if known.merged_added > known.merged_capacity {
                // Sized again for what the table holds now (dropping the full one first).
                known.merged = BloomFilter::with_num_bits(64).expected_items(1);
                (known.merged, known.merged_capacity, known.merged_added) =
                    filter_of_table(&self.conn)?;
            }
        }
        Ok(written)
    }

    /// After a committed transaction deleted events: the hashes above the mark are read
    /// again at next use, and the merge under way, which may hold some of the ids, is
    /// given up (the next one starts over from the mark).
    pub(crate) fn forget_known_ids(&mut self, deleted: &[Uuid]) {
        if let Some(known) = self.known_ids.known.as_mut() {
            known.recent_stale |= !deleted.is_empty();
            known.merging = None;
        }
    }

    /// Reads what the writer needs to know of the stored ids, so the first write after a
    /// start does not wait for it.
    pub fn read_known_ids(&mut self) -> Result<(), StoreError> {
        self.known_ids.loaded(&self.conn).map(drop)
    }

    /// Whether an event id is stored (on any connection: the ids above the mark are read
    /// from the log).
    pub fn contains_event(&self, event_id: Uuid) -> Result<bool, StoreError> {
        let through = mark(&self.conn)?;
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM event_ids WHERE event_id = ?1)
                     OR EXISTS (SELECT 1 FROM events
                                WHERE seq > ?2 AND event_id = ?1)",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![event_id.as_bytes(), through], |row| row.get(0))
            })
            .doing("looking up an event")
    }
}
