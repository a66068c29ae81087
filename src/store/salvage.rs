//! Damaged storage at start: a `quick_check` of the database; on damage every
//! row that can still be read is copied into a fresh database, with its `seq`, its sync
//! state and its `synced_at` (so an event synced before the damage is never sent again,
//! and the arrival order stays the sync order); then the damaged file (with its `-wal`
//! and `-shm`) is moved aside as `usage.db.damaged-<unix seconds>` and the fresh one takes
//! its place. The damaged file is only ever read (it is evidence); it is also what
//! `usage-agent check` runs its `integrity_check` with ([`integrity_check`]).
//!
//! Reading goes by rowid ranges, not one `SELECT *`: a scan stops at the first bad page,
//! so after a failure the copier probes further keys at doubling distances until reading
//! works again, then looks up every rowid it jumped over one by one. Rows on good pages
//! between two bad ones are kept; only rows on pages SQLite cannot read are lost.
//! `WITHOUT ROWID` tables (`meta`, `usage_daily`) are read in key order; past a bad page
//! the daily summaries (the only record of days whose raw events were purged) are read
//! again one day at a time.

use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, Transaction, params_from_iter};

use super::health::StorageState;
use super::{Doing, Store, StoreError};
use crate::config::Synchronous;
use usage_common::sqlite_check::{self, Depth, Verdict};
use usage_protocol::event::format_millis;

/// Rows read per range scan.
const CHUNK: i64 = 512;
/// Most single-rowid lookups over the span a probe jumped to get past a bad region
/// (twice the region's width at most); beyond it the rest is given up.
const MAX_LOOKUPS_PER_GAP: i64 = 1 << 20;
/// Most single-rowid lookups when no probe got past the bad region (everything to the
/// right is unreadable, or SQLite fails on every read): good pages there would have
/// answered a probe, so this is only a last look, kept short.
const MAX_LOOKUPS_AT_END: i64 = 1 << 14;

/// Days back from today whose daily summaries a salvage reads one day at a time past a
/// bad page: ten years, beyond any sensible `retention.daily_days` (730 by default).
const SUMMARY_DAYS_LOOKED_AT: u64 = 3660;

/// Tables with rowids, parents first (events refer to models and origins).
const ROWID_TABLES: [&str; 7] = [
    "models",
    "origins",
    "events",
    "sync_failures",
    "synced_ranges",
    "sync_requeued",
    "sync_errors",
];
/// `WITHOUT ROWID` tables.
const KEYED_TABLES: [&str; 2] = ["meta", "usage_daily"];

/// What a recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged file now is.
    pub damaged_file: PathBuf,
    pub events_recovered: u64,
    /// What `quick_check` reported (empty when an interrupted recovery was finished).
    pub problems: Vec<String>,
}

/// Checks the database at `path` and, if it is damaged, salvages it into a fresh one and
/// moves it aside (see the module header). `None` when the database is sound or new.
///
/// Crash-safe: the fresh database is built beside it as `<path>.salvaging`, made
/// self-contained (no WAL) and renamed `<path>.salvaged` once complete; only then is the
/// damaged file moved aside and the salvaged one renamed into its place. A start that
/// finds `<path>.salvaged` finishes those renames; one that finds `<path>.salvaging`
/// (a salvage cut short, say by systemd's start timeout) starts the salvage over. So an
/// interrupted recovery never leaves an empty database where the events were.
pub fn recover_if_damaged(
    path: &Path,
    synchronous: Synchronous,
) -> Result<Option<Recovery>, StoreError> {
    let salvaged = with_suffix(path, ".salvaged");
    if std::fs::symlink_metadata(&salvaged).is_ok() {
        tracing::warn!(salvaged = %salvaged.display(), "finishing a recovery that was interrupted after its salvage");
        return finish(path, &salvaged, Vec::new()).map(Some);
    }
    let verdict =
        sqlite_check::check_file(path, Depth::Quick).map_err(|source| StoreError::Check {
            path: path.to_path_buf(),
            source,
        })?;
    let salvaging = with_suffix(path, ".salvaging");
    remove_database(&salvaging)?;
    let Verdict::Damaged(problems) = verdict else {
        return Ok(None);
    };
    tracing::error!(path = %path.display(), ?problems, "the database is damaged (quick_check); salvaging what can be read, then moving it aside");
    let _ = sd_notify_extend();
    let now = chrono::Utc::now();
    let damaged_file = free_damaged_name(path, now.timestamp());
    // The fresh database starts at the damaged file's schema version, so every row is
    // copied whole (an older file's per-event sync state included); the migrations then
    // bring it to the current schema the way they would have brought the file itself.
    let version = damaged_schema_version(path);
    let mut store = Store::open_at_version(&salvaging, synchronous, version)?;
    store.salvage_from(path, &damaged_file, now.timestamp_millis())?;
    store.migrate(&salvaging, None)?;
    store.self_contained()?;
    drop(store);
    rename(&salvaging, &salvaged)?;
    finish(path, &salvaged, problems).map(Some)
}

/// Moves the damaged database aside under the name its salvage recorded, then puts the
/// salvaged one in its place.
fn finish(path: &Path, salvaged: &Path, problems: Vec<String>) -> Result<Recovery, StoreError> {
    let (damaged_file, events_recovered) = {
        let store = Store::open(salvaged, Synchronous::Full)?;
        let recorded = store.storage_state()?;
        store.self_contained()?;
        match recorded {
            StorageState::Recovered {
                damaged_file,
                events_recovered,
                ..
            } => (PathBuf::from(damaged_file), events_recovered),
            // Never written without the record; a file without it is not ours to use.
            _ => {
                return Err(StoreError::MoveAside {
                    from: salvaged.to_path_buf(),
                    to: path.to_path_buf(),
                    source: std::io::Error::other("it does not record the recovery it belongs to"),
                });
            }
        }
    };
    move_aside(path, &damaged_file)?;
    rename(salvaged, path)?;
    tracing::warn!(
        damaged_file = %damaged_file.display(),
        events_recovered,
        "salvaged the damaged database into a fresh one; status stays degraded until `usage-agent check` finds the database sound"
    );
    Ok(Recovery {
        damaged_file,
        events_recovered,
        problems,
    })
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `<path>.damaged-<unix seconds>`, the next free second if that name is taken, so no
/// earlier evidence is overwritten.
fn free_damaged_name(path: &Path, unix_seconds: i64) -> PathBuf {
    let mut seconds = unix_seconds;
    loop {
        let candidate = with_suffix(path, &format!(".damaged-{seconds}"));
        let taken = ["", "-wal", "-shm"]
            .iter()
            .any(|suffix| std::fs::symlink_metadata(with_suffix(&candidate, suffix)).is_ok());
        if !taken {
            return candidate;
        }
        seconds += 1;
    }
}

/// Renames `path` and its `-wal` and `-shm` to `target` (and its `-wal`, `-shm`). The
/// WAL goes first: left beside a fresh file, SQLite would replay its old pages into it.
fn move_aside(path: &Path, target: &Path) -> Result<(), StoreError> {
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        if std::fs::symlink_metadata(&from).is_ok() {
            rename(&from, &with_suffix(target, suffix))?;
        }
    }
    Ok(())
}

/// Renames a file and syncs its directory, so the order of renames survives a power cut.
fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    let failed = |source| StoreError::MoveAside {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    std::fs::rename(from, to).map_err(failed)?;
    let dir = to.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|dir| dir.sync_all())
        .map_err(failed)
}

/// Removes what is left of an interrupted salvage.
fn remove_database(path: &Path) -> Result<(), StoreError> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = with_suffix(path, suffix);
        match std::fs::remove_file(&file) {
            Ok(()) => {
                tracing::warn!(file = %file.display(), "removed what an interrupted salvage left")
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::CreateFile { path: file, source });
            }
        }
    }
    Ok(())
}

/// Under systemd (`Type=notify`), asks for more start time than the default 90 s: a
/// salvage reads and rewrites the whole database (500,000 events, 95 MB: 6 s on the
/// 2-core VM, 16 s while it also compiled). Ten minutes; a salvage cut short by systemd
/// starts over, whole.
fn sd_notify_extend() -> std::io::Result<()> {
    sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(600_000_000)])
}

/// Rows copied by a salvage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub events: u64,
    pub rows: u64,
    pub unreadable_ranges: u64,
}

impl Store {
    /// Copies every row it can read from the damaged database at `damaged` into this
    /// one (fresh, with the current schema), and records the recovery (`at_ms`, the
    /// damaged file's name once `moved_to`) as the storage state, all in one
    /// transaction. Nothing in `damaged` is changed.
    pub fn salvage_from(
        &mut self,
        damaged: &Path,
        moved_to: &Path,
        at_ms: i64,
    ) -> Result<Copied, StoreError> {
        let mut copied = Copied::default();
        let tx = self.conn.transaction().doing("starting the salvage")?;
        // A model row may be lost while its events are not; the missing names are filled
        // in below, before the commit checks the references.
        tx.pragma_update(None, "defer_foreign_keys", true)
            .doing("deferring foreign keys for the salvage")?;
        match open_damaged(damaged) {
            Ok(from) => {
                for table in ROWID_TABLES {
                    let table_copy = copy_rowid_table(&from, &tx, table)?;
                    if table == "events" {
                        copied.events = table_copy.rows;
                    }
                    copied.rows += table_copy.rows;
                    copied.unreadable_ranges += table_copy.unreadable_ranges;
                }
                for table in KEYED_TABLES {
                    let table_copy = copy_keyed_table(&from, &tx, table)?;
                    copied.rows += table_copy.rows;
                    copied.unreadable_ranges += table_copy.unreadable_ranges;
                }
            }
            Err(error) => {
                tracing::error!(%error, file = %damaged.display(), "nothing can be read from the damaged database");
                copied.unreadable_ranges = 1;
            }
        }
        let has_origins = !columns(&tx, "origins")?.is_empty();
        for table in ["events", "usage_daily"] {
            // Billing needs the tokens more than the model's name; a name that could
            // not be read is marked as such rather than its events dropped.
            tx.execute(
                &format!(
                    "INSERT INTO models (id, name)
                     SELECT DISTINCT model_id, 'unreadable-model-' || model_id FROM {table}
                     WHERE model_id NOT IN (SELECT id FROM models)"
                ),
                [],
            )
            .doing("naming models whose row was lost")?;
            if !has_origins {
                // A schema from before origins: its migration adds them, all 0.
                continue;
            }
            // Likewise for origins (0 is no origin, never a row).
            tx.execute(
                &format!(
                    "INSERT INTO origins (id, name)
                     SELECT DISTINCT origin_id, 'unreadable-origin-' || origin_id FROM {table}
                     WHERE origin_id <> 0 AND origin_id NOT IN (SELECT id FROM origins)"
                ),
                [],
            )
            .doing("naming origins whose row was lost")?;
        }
        // Lost newest rows hand their `seq`s out again; new events must not hide under
        // the rollup mark.
        super::rollup::clamp_rollup_seq(&tx)?;
        // The queue's side tables are the truth, the copied cursor may be lost or behind
        // them: cut them at the newest event left and compute the cursor again. (A file of
        // a schema from before the cursor has its per-event state instead, which the
        // migration turns into these tables.)
        if !columns(&tx, "synced_ranges")?.is_empty() {
            super::sync::clamp_queue(&tx)?;
            super::sync::rebuild_cursor(&tx)?;
        }
        // Likewise the stored ids come from the events copied, not from the damaged file.
        // (A schema from before `event_ids` gets it from its migration.)
        if !columns(&tx, "event_ids")?.is_empty() {
            super::event_ids::rebuild(&tx)?;
        }
        let state = StorageState::Recovered {
            at: format_millis(at_ms),
            damaged_file: moved_to.display().to_string(),
            events_recovered: copied.events,
        };
        let text = serde_json::to_string(&state).expect("StorageState always serializes");
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('storage', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [text],
        )
        .doing("recording the recovery")?;
        tx.commit().doing("committing the salvage")?;
        self.model_ids.clear();
        self.origin_ids.clear();
        self.known_ids.reset();
        tracing::warn!(
            events = copied.events,
            rows = copied.rows,
            unreadable_ranges = copied.unreadable_ranges,
            damaged = %damaged.display(),
            "copied what could be read of the damaged database"
        );
        Ok(copied)
    }

    /// Leaves the file whole on its own, with no WAL beside it, so it can be renamed;
    /// the next open puts it back in WAL mode.
    fn self_contained(&self) -> Result<(), StoreError> {
        self.conn
            .pragma_update_and_check(None, "journal_mode", "DELETE", |_| Ok(()))
            .doing("leaving WAL mode before a rename")
    }
}

/// The schema version of the damaged file, when its header can be read.
fn damaged_schema_version(path: &Path) -> Option<i64> {
    let conn = open_damaged(path).ok()?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .ok()?;
    (version >= 1).then_some(version)
}

fn open_damaged(path: &Path) -> rusqlite::Result<Connection> {
    let conn = sqlite_check::open_read_only(path)?;
    // Reads the header and the schema now, so an unreadable file fails here, once.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
    Ok(conn)
}

/// Rows copied from one table, and places where reading failed.
#[derive(Debug, Clone, Copy, Default)]
struct TableCopy {
    rows: u64,
    unreadable_ranges: u64,
}

/// The column list of `table` in the fresh schema, which the salvage reads by name.
fn columns(tx: &Transaction, table: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = tx
        .prepare(&format!("PRAGMA main.table_info({table})"))
        .doing("reading the schema for the salvage")?;
    let names = stmt
        .query_map([], |row| row.get::<_, String>(1))
        .doing("reading the schema for the salvage")?;
    names
        .collect::<Result<_, _>>()
        .doing("reading the schema for the salvage")
}

/// The columns of the fresh `table` that the damaged file has too: a file of an older
/// schema (damaged before its upgrade could run) lacks the newer columns, which then
/// take their defaults. `None` when that schema has no such table at all. When the
/// damaged schema cannot be read, every fresh column, and the reading fails later.
fn shared_columns(
    from: &Connection,
    to: &Transaction,
    table: &str,
) -> Result<Option<Vec<String>>, StoreError> {
    let fresh = columns(to, table)?;
    let damaged: rusqlite::Result<Vec<String>> = from
        .prepare(&format!("PRAGMA main.table_info({table})"))
        .and_then(|mut stmt| stmt.query_map([], |row| row.get::<_, String>(1))?.collect());
    match damaged {
        Ok(names) if names.is_empty() => Ok(None),
        Ok(names) => Ok(Some(
            fresh.into_iter().filter(|c| names.contains(c)).collect(),
        )),
        Err(_) => Ok(Some(fresh)),
    }
}

/// `OR IGNORE`: a row that breaks a rule of the fresh schema (a second row with one
/// `event_id`, left by a broken index) is dropped, the first one kept, rather than
/// failing the whole salvage.
fn insert_sql(table: &str, columns: &[String]) -> String {
    let holes: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT OR IGNORE INTO {table} ({}) VALUES ({})",
        columns.join(", "),
        holes.join(", ")
    )
}

/// Reads rows of `width` values until the end or the first error; what was read before
/// an error is good and kept.
fn read_rows(
    from: &Connection,
    sql: &str,
    args: &[Value],
    width: usize,
) -> (Vec<Vec<Value>>, Option<rusqlite::Error>) {
    let mut rows = Vec::new();
    let outcome = from.prepare_cached(sql).and_then(|mut stmt| {
        let mut cursor = stmt.query(params_from_iter(args))?;
        while let Some(row) = cursor.next()? {
            rows.push(
                (0..width)
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()?,
            );
        }
        Ok(())
    });
    (rows, outcome.err())
}

/// Copies a rowid table by ranges (see the module header). Any failure to read the
/// damaged file is a lost range, never an error of the salvage; a failure to write the
/// fresh one is.
fn copy_rowid_table(
    from: &Connection,
    to: &Transaction,
    table: &str,
) -> Result<TableCopy, StoreError> {
    let Some(columns) = shared_columns(from, to, table)? else {
        tracing::info!(
            table,
            "the damaged database predates this table: nothing to copy"
        );
        return Ok(TableCopy::default());
    };
    let list = columns.join(", ");
    let scan =
        format!("SELECT rowid, {list} FROM {table} WHERE rowid >= ?1 ORDER BY rowid LIMIT {CHUNK}");
    let one = format!("SELECT rowid, {list} FROM {table} WHERE rowid = ?1");
    let probe = format!("SELECT rowid FROM {table} WHERE rowid >= ?1 ORDER BY rowid LIMIT 1");
    let mut insert = to
        .prepare(&insert_sql(table, &columns))
        .doing("preparing the salvage")?;
    let mut copy = TableCopy::default();
    if let Err(error) = from.prepare_cached(&scan) {
        // No such table or column in the damaged file (an older schema, or a schema
        // SQLite could not read): nothing of it to copy.
        tracing::warn!(%error, table, "cannot read this table from the damaged database");
        copy.unreadable_ranges += 1;
        return Ok(copy);
    }
    let mut store = |rows: Vec<Vec<Value>>, copy: &mut TableCopy| -> Result<i64, StoreError> {
        let mut last = None;
        for row in rows {
            last = row.first().and_then(|v| match v {
                Value::Integer(rowid) => Some(*rowid),
                _ => None,
            });
            copy.rows += insert
                .execute(params_from_iter(&row[1..]))
                .doing("copying a salvaged row")? as u64;
        }
        Ok(last.unwrap_or(i64::MIN))
    };
    // SQLite gives these tables' rowids from 1 up; nothing is stored below 1.
    let mut next = 1_i64;
    loop {
        let (rows, failure) = read_rows(from, &scan, &[Value::Integer(next)], columns.len() + 1);
        let read = rows.len() as i64;
        let last = store(rows, &mut copy)?;
        if last != i64::MIN {
            next = last.saturating_add(1);
        }
        let Some(error) = failure else {
            if read < CHUNK || last == i64::MAX {
                return Ok(copy);
            }
            continue;
        };
        tracing::warn!(%error, table, after = next, "an unreadable range in the damaged database");
        copy.unreadable_ranges += 1;
        // Where reading works again: probe at doubling distances past the failure.
        let mut step = 1_i64;
        let resume = loop {
            let key = next.saturating_add(step);
            match from
                .prepare_cached(&probe)
                .and_then(|mut stmt| stmt.query_row([key], |row| row.get::<_, i64>(0)))
            {
                Ok(found) => break Some((key, Some(found))),
                Err(rusqlite::Error::QueryReturnedNoRows) => break Some((key, None)),
                Err(_) if key == i64::MAX => break None,
                Err(_) => step = step.saturating_mul(2),
            }
        };
        // The rowids jumped over may sit on good pages between bad ones: one by one.
        let last_lookup = match resume {
            Some((key, _)) => key.min(next.saturating_add(MAX_LOOKUPS_PER_GAP)),
            None => next.saturating_add(MAX_LOOKUPS_AT_END),
        };
        for rowid in next..last_lookup {
            let (rows, _) = read_rows(from, &one, &[Value::Integer(rowid)], columns.len() + 1);
            store(rows, &mut copy)?;
        }
        match resume {
            Some((_, Some(found))) => next = found,
            _ => return Ok(copy),
        }
    }
}

/// Copies a `WITHOUT ROWID` table in key order, up to its first unreadable page.
fn copy_keyed_table(
    from: &Connection,
    to: &Transaction,
    table: &str,
) -> Result<TableCopy, StoreError> {
    let Some(columns) = shared_columns(from, to, table)? else {
        tracing::info!(
            table,
            "the damaged database predates this table: nothing to copy"
        );
        return Ok(TableCopy::default());
    };
    let list = columns.join(", ");
    let mut insert = to
        .prepare(&insert_sql(table, &columns))
        .doing("preparing the salvage")?;
    let mut copy = TableCopy::default();
    let mut store = |rows: Vec<Vec<Value>>, copy: &mut TableCopy| -> Result<(), StoreError> {
        for row in rows {
            // Rows read twice (the whole scan, then by day) are kept once.
            copy.rows += insert
                .execute(params_from_iter(&row))
                .doing("copying a salvaged row")? as u64;
        }
        Ok(())
    };
    let (rows, failure) = read_rows(
        from,
        &format!("SELECT {list} FROM {table}"),
        &[],
        columns.len(),
    );
    store(rows, &mut copy)?;
    let Some(error) = failure else {
        return Ok(copy);
    };
    tracing::warn!(%error, table, rows = copy.rows, "an unreadable page in this table of the damaged database");
    copy.unreadable_ranges += 1;
    if table != "usage_daily" {
        return Ok(copy);
    }
    // The daily summaries are the only record of days whose raw events retention has
    // purged: past a bad page, read them day by day (a seek per day keyed by
    // `usage_date`), so one bad page costs the days on it, not every later day.
    let by_day = format!("SELECT {list} FROM {table} WHERE usage_date = ?1");
    let today = chrono::Utc::now().date_naive();
    let mut day = today - chrono::Days::new(SUMMARY_DAYS_LOOKED_AT);
    while day <= today + chrono::Days::new(2) {
        let text = Value::Text(day.format("%Y-%m-%d").to_string());
        let (rows, failure) = read_rows(from, &by_day, &[text], columns.len());
        store(rows, &mut copy)?;
        if failure.is_some() {
            copy.unreadable_ranges += 1;
        }
        day = day + chrono::Days::new(1);
    }
    Ok(copy)
}

/// `usage-agent check`: a full `integrity_check` of the database at `path` on a
/// connection of its own, so every page is read from the file, not from a cache.
pub fn integrity_check(path: &Path) -> Result<Verdict, StoreError> {
    sqlite_check::check_file(path, Depth::Full).map_err(|source| StoreError::Check {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Seek, SeekFrom, Write};

    use super::super::PAGE_SIZE;
    use super::*;
    use usage_protocol::event::{Event, ModelName, Origin, Source, Tokens};

    fn event(n: u64) -> Event {
        Event {
            event_id: uuid::Uuid::new_v4(),
            user_id: n,
            source: Source::Inline,
            model: ModelName::parse(if n.is_multiple_of(2) {
                "gpt-4o"
            } else {
                "claude-3"
            })
            .unwrap(),
            tokens: Tokens {
                prompt: 100 + n,
                completion: 7,
                ..Tokens::default()
            },
            origin: n
                .is_multiple_of(3)
                .then(|| Origin::parse("plugin:ai-alt-text").unwrap()),
            hold_id: None,
            context: Some(format!(r#"{{"attachment_id":{n}}}"#)),
            created_at_ms: 1_764_240_000_000 + n as i64,
        }
    }

    /// `(sync state, synced_at, prompt_tokens)` by `seq`: what must survive a salvage. The
    /// state is 1 synced (a range covers the event), 2 failed, 0 pending.
    type Rows = HashMap<i64, (i64, Option<i64>, i64)>;

    fn rows(conn: &Connection) -> Rows {
        let mut stmt = conn
            .prepare(
                "SELECT e.seq,
                     CASE WHEN coalesce((SELECT r.last_seq FROM synced_ranges r
                              WHERE r.first_seq <= e.seq ORDER BY r.first_seq DESC LIMIT 1), 0)
                              >= e.seq THEN 1
                          WHEN EXISTS (SELECT 1 FROM sync_failures f WHERE f.seq = e.seq) THEN 2
                          ELSE 0 END,
                     (SELECT CASE WHEN r.last_seq >= e.seq THEN r.synced_at END
                      FROM synced_ranges r WHERE r.first_seq <= e.seq
                      ORDER BY r.first_seq DESC LIMIT 1),
                     e.prompt_tokens
                 FROM events e",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// A closed database of `n` events, the first `synced` of them marked synced (in
    /// batches of 100, each at its own time).
    fn database(path: &Path, n: u64, synced: i64) -> Rows {
        let mut store = Store::open(path, Synchronous::Normal).unwrap();
        let events: Vec<Event> = (0..n).map(event).collect();
        store.record(&events).unwrap();
        store.merge_event_ids().unwrap();
        let seqs: Vec<i64> = (1..=synced).collect();
        for batch in seqs.chunks(100) {
            store
                .mark_synced(batch, 1_764_240_999_000 + batch[0])
                .unwrap();
        }
        store.checkpoint().unwrap();
        let rows = rows(&store.conn);
        drop(store);
        rows
    }

    /// Pages of `name` of one kind (`leaf`, `internal`) with their cell counts.
    fn pages(path: &Path, name: &str, kind: &str) -> Vec<(i64, i64)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT pageno, ncell FROM dbstat WHERE name = ?1 AND pagetype = ?2 ORDER BY pageno")
            .unwrap();
        stmt.query_map([name, kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Overwrites whole pages with bytes no b-tree page starts with.
    fn garble(path: &Path, pages: impl IntoIterator<Item = i64>) {
        let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for page in pages {
            file.seek(SeekFrom::Start((page as u64 - 1) * PAGE_SIZE as u64))
                .unwrap();
            file.write_all(&[0xA5; PAGE_SIZE as usize]).unwrap();
        }
        file.sync_all().unwrap();
    }

    #[test]
    fn origins_survive_a_salvage_and_a_lost_origin_row_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 300, 0);
        let leaves = pages(&path, "events", "leaf");
        let (bad, lost) = leaves[leaves.len() / 2];
        let origin_pages = pages(&path, "origins", "leaf");
        assert_eq!(origin_pages.len(), 1);
        garble(&path, [bad, origin_pages[0].0]);

        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        assert_eq!(recovery.events_recovered, 300 - lost as u64);
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let pending = store.pending_batch(0, i64::MAX, 1000).unwrap();
        assert_eq!(pending.len() as u64, recovery.events_recovered);
        for p in &pending {
            // The origins row was lost, the events' reference to it was not.
            let expected = p
                .event
                .user_id
                .is_multiple_of(3)
                .then_some("unreadable-origin-1");
            assert_eq!(p.event.origin.as_ref().map(Origin::as_str), expected);
        }
    }

    #[test]
    fn a_damaged_database_of_the_schema_before_origins_is_salvaged_into_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        {
            // The schema before events and summaries had an origin (migration 3).
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "page_size", PAGE_SIZE).unwrap();
            let migrations = super::super::migrations();
            // Every block before migration 3, which gave events and summaries an origin.
            let previous = migrations
                .iter()
                .position(|b| b.starts_with("3\n"))
                .unwrap();
            for block in &migrations[..previous] {
                conn.execute_batch(block.split_once('\n').unwrap().1)
                    .unwrap();
            }
            conn.pragma_update(None, "user_version", previous).unwrap();
            conn.execute("INSERT INTO models (id, name) VALUES (1, 'gpt-4o')", [])
                .unwrap();
            for n in 0..300_i64 {
                conn.execute(
                    "INSERT INTO events (event_id, user_id, source, model_id, prompt_tokens,
                         completion_tokens, context, created_at)
                     VALUES (?1, ?2, 0, 1, 100, 7, '{\"attachment_id\":1}', 1764240000000)",
                    rusqlite::params![uuid::Uuid::new_v4().as_bytes(), n],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO usage_daily VALUES ('2025-11-27', 1, 0, 1, 1, 100, 7, 107, 0, 0, 0)",
                [],
            )
            .unwrap();
        }
        let leaves = pages(&path, "events", "leaf");
        let (bad, lost) = leaves[leaves.len() / 2];
        garble(&path, [bad]);

        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        assert_eq!(recovery.events_recovered, 300 - lost as u64);
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let pending = store.pending_batch(0, i64::MAX, 1000).unwrap();
        assert_eq!(pending.len() as u64, recovery.events_recovered);
        assert!(pending.iter().all(|p| p.event.origin.is_none()));
        let daily = store.daily_page("", None).unwrap();
        assert_eq!(daily.len(), 1);
        assert_eq!(
            (daily[0].origin.as_deref(), daily[0].sums.events),
            (None, 1)
        );
    }

    #[test]
    fn a_sound_database_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 10, 0);
        assert_eq!(
            recover_if_damaged(&path, Synchronous::Normal).unwrap(),
            None
        );
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("damaged"))
            .collect();
        assert!(aside.is_empty(), "nothing moved aside: {aside:?}");
        assert_eq!(
            Store::open(&path, Synchronous::Normal)
                .unwrap()
                .event_count()
                .unwrap(),
            10
        );
    }

    #[test]
    fn every_event_on_a_readable_page_is_salvaged_with_its_sync_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let before = database(&path, 3000, 1500);
        let leaves = pages(&path, "events", "leaf");
        assert!(
            leaves.len() > 40,
            "enough leaves to damage a few: {}",
            leaves.len()
        );
        // Three table leaves in the middle (two side by side, one alone: good pages sit
        // between bad ones) and the whole table of stored ids.
        let bad: Vec<(i64, i64)> = [10, 11, leaves.len() / 2]
            .iter()
            .map(|&i| leaves[i])
            .collect();
        let lost: i64 = bad.iter().map(|(_, cells)| cells).sum();
        let index: Vec<i64> = ["leaf", "internal"]
            .iter()
            .flat_map(|kind| pages(&path, "event_ids", kind))
            .map(|(page, _)| page)
            .collect();
        garble(&path, bad.iter().map(|(page, _)| *page).chain(index));

        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        assert_eq!(recovery.events_recovered as i64, before.len() as i64 - lost);
        assert!(recovery.damaged_file.exists());
        assert!(
            recovery
                .damaged_file
                .to_string_lossy()
                .contains("usage.db.damaged-"),
            "{recovery:?}"
        );

        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let after = rows(&store.conn);
        assert_eq!(after.len() as u64, recovery.events_recovered);
        // The stored ids are built again from the events kept: each is still a duplicate.
        let (ids, missing): (u64, i64) = store
            .conn
            .query_row(
                "SELECT (SELECT count(*) FROM event_ids),
                        (SELECT count(*) FROM events
                         WHERE event_id NOT IN (SELECT event_id FROM event_ids))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((ids, missing), (recovery.events_recovered, 0));
        let kept: [u8; 16] = store
            .conn
            .query_row(
                "SELECT event_id FROM events ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let again = Event {
            event_id: uuid::Uuid::from_bytes(kept),
            ..event(1)
        };
        assert_eq!(
            store.record(&[again]).unwrap(),
            [crate::store::events::Recorded::Duplicate]
        );
        for (seq, row) in &after {
            // Same seq, same tokens, same sync state: nothing synced is sent again.
            assert_eq!(before.get(seq), Some(row), "seq {seq}");
        }
        let max = before.keys().max().unwrap();
        assert!(after.contains_key(max), "rows after the bad pages are kept");
        assert_eq!(
            usage_common::sqlite_check::check(&store.conn, Depth::Full).unwrap(),
            Verdict::Sound
        );
        let models: i64 = store
            .conn
            .query_row("SELECT count(*) FROM models", [], |r| r.get(0))
            .unwrap();
        assert_eq!(models, 2);
        let StorageState::Recovered {
            damaged_file,
            events_recovered,
            ..
        } = store.storage_state().unwrap()
        else {
            panic!("the recovery is not recorded");
        };
        assert_eq!(damaged_file, recovery.damaged_file.display().to_string());
        assert_eq!(events_recovered, recovery.events_recovered);
    }

    fn index_pages(path: &Path) -> Vec<i64> {
        ["leaf", "internal"]
            .iter()
            .flat_map(|kind| pages(path, "events_created_at", kind))
            .map(|(page, _)| page)
            .collect()
    }

    #[test]
    fn a_recovery_cut_short_after_its_salvage_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 50, 10);
        garble(&path, index_pages(&path));
        // What a recovery leaves when killed between its salvage and its renames.
        let salvaging = with_suffix(&path, ".salvaging");
        let target = free_damaged_name(&path, 1);
        let mut store = Store::open(&salvaging, Synchronous::Normal).unwrap();
        let copied = store.salvage_from(&path, &target, 1_000).unwrap();
        assert_eq!(copied.events, 50);
        store.self_contained().unwrap();
        drop(store);
        rename(&salvaging, &with_suffix(&path, ".salvaged")).unwrap();

        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the recovery is finished");
        assert_eq!(recovery.damaged_file, target);
        assert_eq!(recovery.events_recovered, 50);
        assert!(target.exists());
        assert!(!with_suffix(&path, ".salvaged").exists());
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(store.event_count().unwrap(), 50);
        drop(store);
        assert_eq!(
            recover_if_damaged(&path, Synchronous::Normal).unwrap(),
            None
        );
    }

    #[test]
    fn a_salvage_cut_short_is_started_over_and_the_damaged_file_stays_until_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 50, 0);
        garble(&path, index_pages(&path));
        // A salvage killed midway: its file is incomplete, the damaged one untouched.
        std::fs::write(with_suffix(&path, ".salvaging"), b"half a database").unwrap();
        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        assert_eq!(recovery.events_recovered, 50);
        assert!(!with_suffix(&path, ".salvaging").exists());
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(store.event_count().unwrap(), 50);
    }

    #[test]
    fn losing_the_newest_events_lowers_the_rollup_mark_so_new_events_are_rolled_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let before = database(&path, 300, 0);
        let newest = *before.keys().max().unwrap();
        Store::open(&path, Synchronous::Normal)
            .unwrap()
            .set_rollup_seq(newest)
            .unwrap();
        let leaves = pages(&path, "events", "leaf");
        let (last_leaf, lost) = *leaves.iter().max_by_key(|(page, _)| *page).unwrap();
        garble(&path, [last_leaf]);
        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .unwrap();
        assert_eq!(recovery.events_recovered, 300 - lost as u64);
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let kept = store.max_event_seq().unwrap();
        assert!(kept < newest, "the newest rows were on the last page");
        assert_eq!(store.rollup_seq().unwrap(), kept);
    }

    #[test]
    fn daily_summaries_after_a_bad_page_are_read_day_by_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 2, 0);
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let today = chrono::Utc::now().date_naive();
        for back in 0..400_u64 {
            let day = (today - chrono::Days::new(back))
                .format("%Y-%m-%d")
                .to_string();
            for user in 0..5 {
                store
                    .conn
                    .execute(
                        "INSERT INTO usage_daily VALUES (?1, ?2, 0, 1, 0, 1, 10, 1, 11, 0, 0, 0)",
                        rusqlite::params![day, user],
                    )
                    .unwrap();
            }
        }
        store.checkpoint().unwrap();
        drop(store);
        let leaves = pages(&path, "usage_daily", "leaf");
        let (bad, lost) = leaves[leaves.len() / 4];
        garble(&path, [bad]);

        recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let kept: i64 = store
            .conn
            .query_row("SELECT count(*) FROM usage_daily", [], |r| r.get(0))
            .unwrap();
        // The rows on the bad page, and at most the rest of the two days it cuts.
        assert!(kept < 2000, "{kept}");
        assert!(
            kept >= 2000 - lost - 2 * 5,
            "{kept} kept, {lost} on the bad page"
        );
        let newest: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM usage_daily WHERE usage_date = ?1",
                [today.format("%Y-%m-%d").to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(newest, 5, "days after the bad page are kept");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside_with_its_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        database(&path, 20, 0);
        garble(&path, [1]);
        std::fs::write(dir.path().join("usage.db-wal"), b"").unwrap();
        let recovery = recover_if_damaged(&path, Synchronous::Normal)
            .unwrap()
            .expect("the damage is found");
        assert_eq!(recovery.events_recovered, 0);
        let mut wal = recovery.damaged_file.clone().into_os_string();
        wal.push("-wal");
        assert!(Path::new(&wal).exists(), "the WAL went with its database");
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(store.event_count().unwrap(), 0);
        assert!(matches!(
            store.storage_state().unwrap(),
            StorageState::Recovered {
                events_recovered: 0,
                ..
            }
        ));
    }
}
