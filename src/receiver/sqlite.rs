//! The bundled receiver's SQLite store: every SQL statement of the receiver lives here.
//!
//! One writer connection (enroll, ingest, retention) and one reader connection (install
//! lookups and provider views), so WAL lets lookups and reports run while a batch commits.
//! Each install is stored once and events refer to it by an integer key; event ids are
//! 16-byte blobs and `(install, event_id)` is the primary key, which is what dedupes.
//! `daily_usage` holds per install, UTC day and model the events and tokens stored; ingest
//! adds to it in the same transaction as the events it inserts (only those not deduped),
//! so it always equals a sum over the events ever stored, including those since purged.
//! This module knows nothing about HTTP.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::pricing::{ModelTokens, Plan};
use super::store::{
    DailyTokens, EnrollOutcome, EventCursor, EventsPage, EventsQuery, IngestCounts, Install,
    InstallKey, InstallUsage, InstallationsReport, NewEvent, NewInstall, ReceivedEvent,
    ReceiverStore, ReceiverStoreError, Summary, SummaryQuery, SummaryRow, TimeRange, Totals,
    UsageWindow,
};
use crate::event::Source;
use crate::private_file::create_private;
use crate::protocol::signing::Secret;
use crate::protocol::wire::to_hex;

const MS_PER_DAY: i64 = 86_400_000;

/// Migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Append only: never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE installs (
    id          INTEGER PRIMARY KEY,
    install_id  TEXT NOT NULL UNIQUE,
    secret      TEXT NOT NULL,
    site_hash   TEXT NOT NULL,
    plan        TEXT NOT NULL DEFAULT 'free',
    disabled    INTEGER NOT NULL DEFAULT 0,
    enrolled_at INTEGER NOT NULL,
    last_seen   INTEGER
);
CREATE TABLE events (
    install            INTEGER NOT NULL,
    event_id           BLOB NOT NULL,
    user_hash          BLOB NOT NULL,
    source             INTEGER NOT NULL,
    model              TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    context            TEXT,
    created_at         INTEGER NOT NULL,
    received_at        INTEGER NOT NULL,
    PRIMARY KEY (install, event_id)
) WITHOUT ROWID;
CREATE INDEX events_by_time ON events (created_at);
"#,
    // Daily rollups per install and model, kept in the ingest transaction, so the
    // installations view never scans raw events. Filled once from the events already stored.
    r#"
CREATE TABLE daily_usage (
    install           INTEGER NOT NULL,
    day               INTEGER NOT NULL,
    model             TEXT NOT NULL,
    events            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (install, day, model)
) WITHOUT ROWID;
CREATE INDEX daily_usage_by_day
    ON daily_usage (day, install, model, events, prompt_tokens, completion_tokens);
INSERT INTO daily_usage (install, day, model, events, prompt_tokens, completion_tokens)
    SELECT install, created_at / 86400000, model, count(*), sum(prompt_tokens),
           sum(completion_tokens)
    FROM events GROUP BY 1, 2, 3;
"#,
    // Events move from a table clustered on the random (install, event_id) key to a rowid
    // table that grows at its end, with the dedupe key in a unique index. An insert then
    // dirties the table's last page (shared by the batch) and one small index leaf,
    // instead of a random, nearly full table leaf that often splits: about a third fewer
    // bytes written per event, and fewer checkpoint pages.
    r#"
CREATE TABLE events_by_arrival (
    install            INTEGER NOT NULL,
    event_id           BLOB NOT NULL,
    user_hash          BLOB NOT NULL,
    source             INTEGER NOT NULL,
    model              TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    context            TEXT,
    created_at         INTEGER NOT NULL,
    received_at        INTEGER NOT NULL
);
INSERT INTO events_by_arrival
    SELECT install, event_id, user_hash, source, model, prompt_tokens, completion_tokens,
           cached_tokens, cache_write_tokens, reasoning_tokens, context, created_at,
           received_at
    FROM events ORDER BY received_at, created_at;
DROP TABLE events;
ALTER TABLE events_by_arrival RENAME TO events;
CREATE UNIQUE INDEX events_dedupe ON events (install, event_id);
CREATE INDEX events_by_time ON events (created_at, install, event_id);
"#,
];

/// The receiver's SQLite database.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Group commit: batches that arrive while one commits wait here and are committed
    /// together, one transaction and one fsync for all of them.
    ingest_queue: Mutex<IngestQueue>,
    committed: Condvar,
}

impl From<rusqlite::Error> for ReceiverStoreError {
    fn from(error: rusqlite::Error) -> ReceiverStoreError {
        ReceiverStoreError::Backend(Box::new(error))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, creating its parent directories,
    /// and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, ReceiverStoreError> {
        let open_error =
            |source: Box<dyn std::error::Error + Send + Sync>| ReceiverStoreError::Open {
                path: path.to_owned(),
                source,
            };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_error(Box::new(e)))?;
        }
        // SPEC 10: the provider's record is never silently rebuilt; damage stops the start.
        crate::sqlite_check::refuse_if_damaged(path).map_err(open_error)?;
        create_private(path).map_err(|e| open_error(Box::new(e)))?;
        let mut writer = connect(path).map_err(|e| open_error(Box::new(e)))?;
        migrate(&mut writer).map_err(|e| open_error(Box::new(e)))?;
        let reader = connect(path).map_err(|e| open_error(Box::new(e)))?;
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            ingest_queue: Mutex::new(IngestQueue::default()),
            committed: Condvar::new(),
        })
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind
        // (rusqlite rolls back on drop), so a poisoned lock is safe to reuse.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ingest_queue(&self) -> MutexGuard<'_, IngestQueue> {
        self.ingest_queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the batches of a group in one transaction: all of them, or none.
    fn commit_group(
        &self,
        group: &[Arc<PendingIngest>],
    ) -> Result<Vec<IngestCounts>, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let counts = group
            .iter()
            .map(|p| insert_batch(&tx, p.install, &p.events, p.received_at_ms))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(counts)
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // Every commit syncs (FULL, below), which gathering WAL writes relies on.
    let conn = crate::gather_vfs::open_for_full_sync(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Small pages: the (install, event_id) index takes random inserts, and a commit writes
    // whole pages. Only takes effect when the database is created.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    // FULL: a batch is answered 200 only after its commit is on disk. Once the agent has
    // that answer it marks the events synced and never sends them again, so a commit lost
    // to a power cut would be billing data lost.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // A modest page cache, on purpose: when a B-tree page splits, SQLite parks a page
    // under the number of the 1 GiB "pending byte" page for a moment, and every commit
    // then scans the whole page-cache hash table to drop pages past the end of the file.
    // That scan grows with the cache (BENCHMARKS.md, "Where the tuned constants come
    // from", has what a large cache cost). The OS page cache still holds the rest of the
    // database. A larger WAL before the automatic checkpoint means
    // fewer checkpoints inside an ingest commit.
    conn.pragma_update(None, "cache_size", -4 * 1024)?;
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
    // Plans never depend on bound values, so `LIMIT ?` statements are not re-prepared
    // on every rebind.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn install_key(conn: &Connection, install_id: &str) -> rusqlite::Result<Option<InstallKey>> {
    conn.prepare_cached("SELECT id FROM installs WHERE install_id = ?1")?
        .query_row(params![install_id], |row| row.get(0))
        .optional()
}

fn range_bounds(range: TimeRange) -> (i64, i64) {
    (
        range.from_ms.unwrap_or(i64::MIN),
        range.to_ms.unwrap_or(i64::MAX),
    )
}

fn source_from(code: i64) -> Result<Source, ReceiverStoreError> {
    Source::from_code(code)
        .ok_or_else(|| ReceiverStoreError::Corrupt(format!("unknown source code {code}")))
}

fn uuid_from(bytes: &[u8]) -> Result<Uuid, ReceiverStoreError> {
    Uuid::from_slice(bytes)
        .map_err(|_| ReceiverStoreError::Corrupt("an event id is not 16 bytes".into()))
}

impl ReceiverStore for SqliteStore {
    fn enroll(&self, install: &NewInstall) -> Result<EnrollOutcome, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .prepare_cached("SELECT secret FROM installs WHERE install_id = ?1")?
            .query_row(params![install.install_id], |row| row.get(0))
            .optional()?;
        let outcome = match existing {
            Some(stored) => match Secret::parse(&stored) {
                Ok(stored) if stored == install.secret => EnrollOutcome::AlreadyEnrolled,
                _ => EnrollOutcome::Conflict,
            },
            None => {
                tx.prepare_cached(
                    "INSERT INTO installs (install_id, secret, site_hash, enrolled_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    install.install_id,
                    install.secret.to_whsec(),
                    install.site_hash,
                    install.enrolled_at_ms
                ])?;
                EnrollOutcome::Created
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn find_install(&self, install_id: &str) -> Result<Option<Install>, ReceiverStoreError> {
        let conn = self.reader();
        let row: Option<(InstallKey, String, bool)> = conn
            .prepare_cached("SELECT id, secret, disabled FROM installs WHERE install_id = ?1")?
            .query_row(params![install_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        let Some((key, secret, disabled)) = row else {
            return Ok(None);
        };
        let secret = Secret::parse(&secret).map_err(|e| {
            ReceiverStoreError::Corrupt(format!(
                "the stored secret of an install is unreadable: {e}"
            ))
        })?;
        Ok(Some(Install {
            key,
            install_id: install_id.to_owned(),
            secret,
            disabled,
        }))
    }

    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError> {
        let mine = Arc::new(PendingIngest {
            install,
            events,
            received_at_ms,
            outcome: Mutex::new(None),
        });
        let mut queue = self.ingest_queue();
        queue.waiting.push(Arc::clone(&mine));
        loop {
            if let Some(outcome) = mine.take_outcome() {
                return outcome.map_err(|message| ReceiverStoreError::Backend(message.into()));
            }
            if queue.committing {
                queue = self
                    .committed
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead: commit every batch waiting now (this one included) in one transaction.
            queue.committing = true;
            let group = Committing {
                store: self,
                group: std::mem::take(&mut queue.waiting),
            };
            drop(queue);
            group.commit();
            queue = self.ingest_queue();
        }
    }

    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError> {
        let conn = self.reader();
        let install = match &query.install_id {
            None => None,
            Some(id) => match install_key(&conn, id)? {
                Some(key) => Some(key),
                None => return Ok(Summary::default()),
            },
        };
        let group = query.group_by;
        // Only these fixed fragments are ever spliced into the SQL text.
        let mut keys = Vec::new();
        if group.day {
            keys.push(format!("created_at / {MS_PER_DAY}"));
        }
        if group.user {
            keys.push("user_hash".to_owned());
        }
        if group.source {
            keys.push("source".to_owned());
        }
        if group.model {
            keys.push("model".to_owned());
        }
        let key_columns: String = keys.iter().map(|k| format!("{k}, ")).collect();
        let group_clause = if keys.is_empty() {
            String::new()
        } else {
            format!("GROUP BY {0} ORDER BY {0}", keys.join(", "))
        };
        // For one install, a plain `install = ?1` lets SQLite read only that install's
        // events through the primary key.
        let install_clause = if install.is_some() {
            "install = ?1"
        } else {
            "?1 IS NULL"
        };
        let sql = format!(
            "SELECT {key_columns} count(*), coalesce(sum(prompt_tokens), 0),
                    coalesce(sum(completion_tokens), 0)
             FROM events
             WHERE {install_clause} AND created_at >= ?2 AND created_at < ?3
             {group_clause}"
        );
        let (from, to) = range_bounds(query.range);
        let mut statement = conn.prepare_cached(&sql)?;
        let mut rows = statement.query(params![install, from, to])?;
        let mut summary = Summary::default();
        while let Some(row) = rows.next()? {
            let mut column = 0;
            let mut next = || {
                column += 1;
                column - 1
            };
            let day = if group.day {
                Some(row.get::<_, i64>(next())?)
            } else {
                None
            };
            let user_hash = if group.user {
                Some(to_hex(&row.get::<_, Vec<u8>>(next())?))
            } else {
                None
            };
            let source = if group.source {
                Some(source_from(row.get(next())?)?)
            } else {
                None
            };
            let model = if group.model {
                Some(row.get::<_, String>(next())?)
            } else {
                None
            };
            let events: u64 = row.get(next())?;
            let prompt_tokens: u64 = row.get(next())?;
            let completion_tokens: u64 = row.get(next())?;
            let totals = Totals {
                events,
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            };
            summary.totals.add(&totals);
            if group.any() {
                summary.rows.push(SummaryRow {
                    day,
                    user_hash,
                    source,
                    model,
                    totals,
                });
            }
        }
        Ok(summary)
    }

    fn events_page(&self, query: &EventsQuery) -> Result<EventsPage, ReceiverStoreError> {
        let conn = self.reader();
        let install = match &query.install_id {
            None => None,
            Some(id) => match install_key(&conn, id)? {
                Some(key) => Some(key),
                None => return Ok(EventsPage::default()),
            },
        };
        let (from, to) = range_bounds(query.range);
        let (after_at, after_install, after_id) = match query.after {
            Some(cursor) => (
                cursor.created_at_ms,
                cursor.install,
                SqlValue::Blob(cursor.event_id.as_bytes().to_vec()),
            ),
            // An empty blob sorts before every event id.
            None => (i64::MIN, i64::MIN, SqlValue::Blob(Vec::new())),
        };
        let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
        let mut statement = conn.prepare_cached(
            "SELECT i.install_id, e.install, e.event_id, e.user_hash, e.source, e.model,
                    e.prompt_tokens, e.completion_tokens, e.cached_tokens,
                    e.cache_write_tokens, e.reasoning_tokens, e.context, e.created_at,
                    e.received_at
             FROM events e JOIN installs i ON i.id = e.install
             WHERE (?1 IS NULL OR e.install = ?1) AND e.created_at >= ?2 AND e.created_at < ?3
               AND (e.created_at, e.install, e.event_id) > (?4, ?5, ?6)
             ORDER BY e.created_at, e.install, e.event_id
             LIMIT ?7",
        )?;
        let mut rows = statement.query(params![
            install,
            from,
            to,
            after_at,
            after_install,
            after_id,
            limit
        ])?;
        let mut page = EventsPage::default();
        let mut last = None;
        while let Some(row) = rows.next()? {
            let install: InstallKey = row.get(1)?;
            let event_id = uuid_from(&row.get::<_, Vec<u8>>(2)?)?;
            let created_at_ms: i64 = row.get(12)?;
            last = Some(EventCursor {
                created_at_ms,
                install,
                event_id,
            });
            page.events.push(ReceivedEvent {
                install_id: row.get(0)?,
                event_id,
                user_hash: to_hex(&row.get::<_, Vec<u8>>(3)?),
                source: source_from(row.get(4)?)?,
                model: row.get(5)?,
                prompt_tokens: row.get(6)?,
                completion_tokens: row.get(7)?,
                cached_tokens: row.get(8)?,
                cache_write_tokens: row.get(9)?,
                reasoning_tokens: row.get(10)?,
                context: row.get(11)?,
                created_at_ms,
                received_at_ms: row.get(13)?,
            });
        }
        if page.events.len() == query.limit.max(1) {
            page.next = last;
        }
        Ok(page)
    }

    fn delete_events_before(
        &self,
        cutoff_ms: i64,
        chunk: usize,
    ) -> Result<u64, ReceiverStoreError> {
        let chunk = i64::try_from(chunk.max(1)).unwrap_or(i64::MAX);
        let mut total = 0u64;
        loop {
            // Each chunk is its own short transaction, and the lock is released between
            // chunks, so a batch waiting to commit gets in.
            let deleted = self
                .writer()
                .prepare_cached(
                    "DELETE FROM events WHERE rowid IN (
                         SELECT rowid FROM events WHERE created_at < ?1 LIMIT ?2)",
                )?
                .execute(params![cutoff_ms, chunk])?;
            total += deleted as u64;
            if (deleted as i64) < chunk {
                return Ok(total);
            }
        }
    }

    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError> {
        let conn = self.reader();
        // `Some(None)`: every install; `None`: the one asked for is unknown.
        let Some(only) = optional_install(&conn, install_id)? else {
            return Ok(InstallationsReport::default());
        };
        let mut report = InstallationsReport::default();
        let mut by_key = HashMap::new();
        {
            let mut statement = conn.prepare_cached(
                "SELECT id, install_id, plan, last_seen FROM installs
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY install_id",
            )?;
            let mut rows = statement.query(params![only])?;
            while let Some(row) = rows.next()? {
                let key: InstallKey = row.get(0)?;
                by_key.insert(key, report.installs.len());
                report.installs.push(InstallUsage {
                    install_id: row.get(1)?,
                    plan: plan_from(&row.get::<_, String>(2)?)?,
                    last_seen_ms: row.get(3)?,
                    events_30d: 0,
                    tokens_30d: 0,
                    models_mtd: Vec::new(),
                });
            }
        }
        // One range scan of the rollup rows of both windows (a covering index for every
        // install, the primary key for one), summed here: cheaper than SQL grouping, and
        // it gives the chart's days in the same pass.
        let first_day = window.from_30d.min(window.month_start);
        let mut statement = conn.prepare_cached(if only.is_some() {
            "SELECT install, day, model, events, prompt_tokens + completion_tokens
             FROM daily_usage WHERE install = ?3 AND day >= ?1 AND day <= ?2"
        } else {
            "SELECT install, day, model, events, prompt_tokens + completion_tokens
             FROM daily_usage WHERE day >= ?1 AND day <= ?2 AND ?3 IS NULL"
        })?;
        let mut rows = statement.query(params![first_day, window.today, only])?;
        let mut daily: BTreeMap<i64, DailyTokens> = BTreeMap::new();
        while let Some(row) = rows.next()? {
            let key: InstallKey = row.get(0)?;
            let Some(install) = by_key.get(&key).map(|&index| &mut report.installs[index]) else {
                continue;
            };
            let day: i64 = row.get(1)?;
            let events: u64 = row.get(3)?;
            let tokens: u64 = row.get(4)?;
            if day >= window.from_30d {
                install.events_30d += events;
                install.tokens_30d += tokens;
                let totals = daily.entry(day).or_insert(DailyTokens {
                    day,
                    events: 0,
                    tokens: 0,
                });
                totals.events += events;
                totals.tokens += tokens;
            }
            if day >= window.month_start {
                let model = row.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
                // An install uses a handful of models: a linear search beats hashing.
                match install.models_mtd.iter_mut().find(|m| m.model == model) {
                    Some(usage) => usage.tokens += tokens,
                    None => install.models_mtd.push(ModelTokens {
                        model: model.to_owned(),
                        tokens,
                    }),
                }
            }
        }
        for install in &mut report.installs {
            install.models_mtd.sort_by(|a, b| a.model.cmp(&b.model));
        }
        report.daily = daily.into_values().collect();
        Ok(report)
    }

    fn set_plan(&self, install_id: &str, plan: Plan) -> Result<bool, ReceiverStoreError> {
        let changed = self
            .writer()
            .prepare_cached("UPDATE installs SET plan = ?2 WHERE install_id = ?1")?
            .execute(params![install_id, plan.as_str()])?;
        Ok(changed == 1)
    }

    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(key) = install_key(&tx, install_id)? else {
            return Ok(None);
        };
        let events = tx
            .prepare_cached("DELETE FROM events WHERE install = ?1")?
            .execute(params![key])?;
        tx.prepare_cached("DELETE FROM daily_usage WHERE install = ?1")?
            .execute(params![key])?;
        tx.prepare_cached("DELETE FROM installs WHERE id = ?1")?
            .execute(params![key])?;
        tx.commit()?;
        Ok(Some(events as u64))
    }
}

/// One batch waiting for a group commit.
struct PendingIngest {
    install: InstallKey,
    events: Vec<NewEvent>,
    received_at_ms: i64,
    /// Set by whichever thread committed the group; an error as its message.
    outcome: Mutex<Option<Result<IngestCounts, String>>>,
}

impl PendingIngest {
    fn take_outcome(&self) -> Option<Result<IngestCounts, String>> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn settle(&self, outcome: Result<IngestCounts, String>) {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(outcome);
    }
}

/// Batches that arrived while a group was committing; the next thread to find no commit
/// running takes them all.
#[derive(Default)]
struct IngestQueue {
    waiting: Vec<Arc<PendingIngest>>,
    committing: bool,
}

/// A group being committed by the thread that holds this. Dropping it, even by a panic,
/// settles every batch of the group and lets the next group go.
struct Committing<'a> {
    store: &'a SqliteStore,
    group: Vec<Arc<PendingIngest>>,
}

impl Committing<'_> {
    /// Commits the group, settles each batch, and (on drop) lets the next group go.
    fn commit(self) {
        match self.store.commit_group(&self.group) {
            Ok(counts) => {
                for (pending, counts) in self.group.iter().zip(counts) {
                    pending.settle(Ok(counts));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for pending in &self.group {
                    pending.settle(Err(message.clone()));
                }
            }
        }
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        for pending in &self.group {
            pending.settle(Err("the ingest commit did not finish".to_owned()));
        }
        self.store.ingest_queue().committing = false;
        self.store.committed.notify_all();
    }
}

/// Inserts one batch's events inside `tx` and adds them to the daily rollup; the counts say
/// how many were new and how many were already stored (or repeated within the batch).
fn insert_batch(
    tx: &rusqlite::Transaction<'_>,
    install: InstallKey,
    events: &[NewEvent],
    received_at_ms: i64,
) -> Result<IngestCounts, ReceiverStoreError> {
    let mut counts = IngestCounts::default();
    // (day, model) to (events, prompt tokens, completion tokens) of the inserted events.
    let mut daily: BTreeMap<(i64, &str), (u64, u64, u64)> = BTreeMap::new();
    // `OR IGNORE` on the unique (install, event_id) index is the dedupe: it skips an id
    // stored by an earlier batch or earlier in this one, inside this same transaction.
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO events (install, event_id, user_hash, source, model,
             prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
             reasoning_tokens, context, created_at, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    for event in events {
        let inserted = insert.execute(params![
            install,
            event.event_id.as_bytes().as_slice(),
            event.user_hash.as_slice(),
            event.source.code(),
            event.model,
            event.prompt_tokens,
            event.completion_tokens,
            event.cached_tokens,
            event.cache_write_tokens,
            event.reasoning_tokens,
            event.context,
            event.created_at_ms,
            received_at_ms,
        ])?;
        if inserted == 1 {
            counts.accepted += 1;
            let day = event.created_at_ms.div_euclid(MS_PER_DAY);
            let sums = daily.entry((day, event.model.as_str())).or_default();
            sums.0 += 1;
            sums.1 += event.prompt_tokens;
            sums.2 += event.completion_tokens;
        } else {
            counts.duplicates += 1;
        }
    }
    let mut rollup = tx.prepare_cached(
        "INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
             completion_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (install, day, model) DO UPDATE SET
             events = events + excluded.events,
             prompt_tokens = prompt_tokens + excluded.prompt_tokens,
             completion_tokens = completion_tokens + excluded.completion_tokens",
    )?;
    for ((day, model), (events, prompt, completion)) in &daily {
        rollup.execute(params![install, day, model, events, prompt, completion])?;
    }
    tx.prepare_cached("UPDATE installs SET last_seen = ?2 WHERE id = ?1")?
        .execute(params![install, received_at_ms])?;
    Ok(counts)
}

fn plan_from(text: &str) -> Result<Plan, ReceiverStoreError> {
    text.parse()
        .map_err(|_| ReceiverStoreError::Corrupt(format!("unknown plan {text:?}")))
}

fn optional_install(
    conn: &Connection,
    install_id: Option<&str>,
) -> rusqlite::Result<Option<Option<InstallKey>>> {
    match install_id {
        None => Ok(Some(None)),
        Some(id) => Ok(install_key(conn, id)?.map(Some)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::store::SummaryGroupBy;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("nested/receiver.db")).unwrap();
        (dir, store)
    }

    fn enroll(store: &SqliteStore, id: &str) -> Install {
        let install = NewInstall {
            install_id: id.into(),
            secret: Secret::generate(),
            site_hash: "site".into(),
            enrolled_at_ms: 0,
        };
        assert_eq!(store.enroll(&install).unwrap(), EnrollOutcome::Created);
        store.find_install(id).unwrap().unwrap()
    }

    fn event(n: u8, created_at_ms: i64) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_bytes([n; 16]),
            user_hash: [n % 2; 32],
            source: if n.is_multiple_of(2) {
                Source::Bulk
            } else {
                Source::Inline
            },
            model: "m".into(),
            prompt_tokens: 10,
            completion_tokens: u64::from(n),
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            context: Some(r#"{"n":1}"#.into()),
            created_at_ms,
        }
    }

    #[test]
    fn enrollment_is_idempotent_and_never_replaces_a_secret() {
        let (_dir, store) = store();
        let first = NewInstall {
            install_id: "a".into(),
            secret: Secret::generate(),
            site_hash: "h".into(),
            enrolled_at_ms: 1,
        };
        assert_eq!(store.enroll(&first).unwrap(), EnrollOutcome::Created);
        assert_eq!(
            store.enroll(&first).unwrap(),
            EnrollOutcome::AlreadyEnrolled
        );
        let other = NewInstall {
            secret: Secret::generate(),
            ..first.clone()
        };
        assert_eq!(store.enroll(&other).unwrap(), EnrollOutcome::Conflict);
        assert_eq!(
            store.find_install("a").unwrap().unwrap().secret,
            first.secret
        );
        assert!(store.find_install("b").unwrap().is_none());
    }

    #[test]
    fn ingest_dedupes_across_and_within_batches_per_install() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let b = enroll(&store, "b");
        let batch = [event(1, 1000), event(2, 2000), event(1, 1000)];
        let counts = store.ingest(a.key, batch.to_vec(), 5).unwrap();
        assert_eq!(
            counts,
            IngestCounts {
                accepted: 2,
                duplicates: 1
            }
        );
        let again = store.ingest(a.key, batch.to_vec(), 6).unwrap();
        assert_eq!(
            again,
            IngestCounts {
                accepted: 0,
                duplicates: 3
            }
        );
        // The same event id from another install is another event.
        assert_eq!(
            store
                .ingest(b.key, batch[..1].to_vec(), 7)
                .unwrap()
                .accepted,
            1
        );
        let all = store.summary(&SummaryQuery::default()).unwrap();
        assert_eq!(all.totals.events, 3);
        assert!(all.rows.is_empty());
    }

    #[test]
    fn summary_groups_and_filters() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let b = enroll(&store, "b");
        store
            .ingest(
                a.key,
                vec![event(1, 0), event(2, MS_PER_DAY), event(3, MS_PER_DAY + 5)],
                0,
            )
            .unwrap();
        store.ingest(b.key, vec![event(4, 0)], 0).unwrap();
        let query = SummaryQuery {
            install_id: Some("a".into()),
            range: TimeRange::default(),
            group_by: SummaryGroupBy {
                day: true,
                ..SummaryGroupBy::default()
            },
        };
        let summary = store.summary(&query).unwrap();
        assert_eq!(summary.totals.events, 3);
        assert_eq!(summary.totals.total_tokens, 30 + 1 + 2 + 3);
        let days: Vec<_> = summary
            .rows
            .iter()
            .map(|r| (r.day, r.totals.events))
            .collect();
        assert_eq!(days, [(Some(0), 1), (Some(1), 2)]);
        let ranged = SummaryQuery {
            range: TimeRange {
                from_ms: Some(MS_PER_DAY),
                to_ms: None,
            },
            group_by: SummaryGroupBy {
                source: true,
                user: true,
                model: true,
                day: false,
            },
            install_id: None,
        };
        let summary = store.summary(&ranged).unwrap();
        assert_eq!(summary.totals.events, 2);
        assert!(
            summary
                .rows
                .iter()
                .all(|r| r.model.as_deref() == Some("m") && r.day.is_none())
        );
        let unknown = SummaryQuery {
            install_id: Some("zzz".into()),
            ..SummaryQuery::default()
        };
        assert_eq!(store.summary(&unknown).unwrap(), Summary::default());
    }

    #[test]
    fn events_page_walks_every_event_once_in_time_order() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let b = enroll(&store, "b");
        // Two events share a timestamp across installs, to exercise the tie-break.
        store
            .ingest(a.key, vec![event(5, 300), event(6, 100), event(7, 200)], 0)
            .unwrap();
        store
            .ingest(b.key, vec![event(8, 200), event(9, 400)], 0)
            .unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        for _ in 0..10 {
            let page = store
                .events_page(&EventsQuery {
                    install_id: None,
                    range: TimeRange::default(),
                    limit: 2,
                    after,
                })
                .unwrap();
            seen.extend(page.events.iter().map(|e| e.created_at_ms));
            match page.next {
                Some(cursor) => after = Some(cursor),
                None => break,
            }
        }
        assert_eq!(seen, [100, 200, 200, 300, 400]);
    }

    #[test]
    fn retention_deletes_only_old_events_in_chunks() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let events: Vec<_> = (0..10).map(|n| event(n, i64::from(n) * 10)).collect();
        store.ingest(a.key, events, 0).unwrap();
        assert_eq!(store.delete_events_before(50, 2).unwrap(), 5);
        assert_eq!(
            store
                .summary(&SummaryQuery::default())
                .unwrap()
                .totals
                .events,
            5
        );
    }

    fn model_event(n: u8, day: i64, model: &str, tokens: u64) -> NewEvent {
        NewEvent {
            model: model.into(),
            prompt_tokens: tokens,
            completion_tokens: 0,
            ..event(n, day * MS_PER_DAY + 1000)
        }
    }

    #[test]
    fn rollups_follow_ingest_and_skip_duplicates() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let b = enroll(&store, "b");
        // Day 100 is "today"; the month started on day 95; 30 days start on day 71.
        let window = UsageWindow {
            today: 100,
            from_30d: 71,
            month_start: 95,
        };
        let batch = [
            model_event(1, 100, "x", 10),
            model_event(2, 100, "x", 20),
            model_event(3, 95, "y", 5),
            model_event(4, 94, "x", 1000),  // 30d, not this month
            model_event(5, 70, "x", 9999),  // neither
            model_event(6, 101, "x", 7777), // after today
        ];
        store.ingest(a.key, batch.to_vec(), 42).unwrap();
        // Sent again (and one repeat inside the batch): nothing is counted twice.
        let again = store.ingest(a.key, vec![batch[0].clone(), batch[0].clone()], 43);
        assert_eq!(again.unwrap().duplicates, 2);
        store
            .ingest(b.key, vec![model_event(7, 99, "y", 1)], 44)
            .unwrap();

        let report = store.installations(None, window).unwrap();
        let rows = &report.installs;
        assert_eq!(rows.len(), 2);
        let a_row = &rows[0];
        assert_eq!(a_row.install_id, "a");
        assert_eq!(a_row.plan, Plan::Free);
        assert_eq!(a_row.last_seen_ms, Some(43));
        assert_eq!((a_row.events_30d, a_row.tokens_30d), (4, 1035));
        assert_eq!(
            a_row.models_mtd,
            [
                ModelTokens {
                    model: "x".into(),
                    tokens: 30
                },
                ModelTokens {
                    model: "y".into(),
                    tokens: 5
                }
            ]
        );
        assert_eq!(rows[1].models_mtd.len(), 1);

        // The chart: the 30 days summed over every install.
        let tokens: Vec<_> = report.daily.iter().map(|d| (d.day, d.tokens)).collect();
        assert_eq!(tokens, [(94, 1000), (95, 5), (99, 1), (100, 30)]);

        let only_b = store.installations(Some("b"), window).unwrap();
        assert_eq!(only_b.installs.len(), 1);
        assert_eq!(only_b.daily.len(), 1);
        let unknown = store.installations(Some("zz"), window).unwrap();
        assert!(unknown.installs.is_empty() && unknown.daily.is_empty());
    }

    #[test]
    fn plans_change_and_erasure_removes_everything() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        enroll(&store, "b");
        store
            .ingest(a.key, vec![model_event(1, 10, "x", 5)], 0)
            .unwrap();
        assert!(store.set_plan("a", Plan::Agency).unwrap());
        assert!(!store.set_plan("nope", Plan::Pro).unwrap());
        let window = UsageWindow {
            today: 10,
            from_30d: 0,
            month_start: 0,
        };
        assert_eq!(
            store.installations(Some("a"), window).unwrap().installs[0].plan,
            Plan::Agency
        );

        assert_eq!(store.erase_install("a").unwrap(), Some(1));
        assert_eq!(store.erase_install("a").unwrap(), None);
        assert!(store.find_install("a").unwrap().is_none());
        let after = store.installations(None, window).unwrap();
        assert_eq!(after.installs.len(), 1);
        assert!(after.daily.is_empty());
        assert_eq!(
            store
                .summary(&SummaryQuery::default())
                .unwrap()
                .totals
                .events,
            0
        );
        assert!(store.find_install("b").unwrap().is_some());
    }

    #[test]
    fn the_rollup_migration_backfills_stored_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            // A database at schema 1 with events already in it.
            let mut conn = connect(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.execute_batch(
                "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                     VALUES (1, 'a', 'x', 's', 0);
                 INSERT INTO events VALUES (1, x'01', x'00', 0, 'm', 3, 4, 0, 0, 0, NULL,
                     86400000 * 5 + 1, 0);
                 INSERT INTO events VALUES (1, x'02', x'00', 0, 'm', 1, 2, 0, 0, 0, NULL,
                     86400000 * 5 + 2, 0);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let window = UsageWindow {
            today: 10,
            from_30d: 0,
            month_start: 0,
        };
        let report = store.installations(Some("a"), window).unwrap();
        assert_eq!(report.installs[0].tokens_30d, 10);
        assert_eq!(
            report.daily,
            [DailyTokens {
                day: 5,
                events: 2,
                tokens: 10
            }]
        );
    }

    #[test]
    fn the_arrival_order_migration_keeps_events_and_their_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let stored = [event(1, 5_000), event(2, 6_000)];
        {
            // A database at schema 2, its events clustered on (install, event_id).
            let mut conn = connect(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.execute_batch(MIGRATIONS[1]).unwrap();
            tx.pragma_update(None, "user_version", 2).unwrap();
            tx.execute(
                "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                     VALUES (1, 'a', ?1, 's', 0)",
                [Secret::generate().to_whsec()],
            )
            .unwrap();
            for e in &stored {
                tx.execute(
                    "INSERT INTO events VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, 0, 0, 0, ?7, ?8, 9)",
                    params![
                        e.event_id.as_bytes().as_slice(),
                        e.user_hash.as_slice(),
                        e.source.code(),
                        e.model,
                        e.prompt_tokens,
                        e.completion_tokens,
                        e.context,
                        e.created_at_ms
                    ],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let install = store.find_install("a").unwrap().unwrap();
        let page = store
            .events_page(&EventsQuery {
                install_id: None,
                range: TimeRange::default(),
                after: None,
                limit: 10,
            })
            .unwrap();
        let ids: Vec<Uuid> = page.events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, [stored[0].event_id, stored[1].event_id]);
        assert_eq!(page.events[1].context, stored[1].context);
        // The moved events still dedupe a resend; a new event still goes in.
        let counts = store
            .ingest(install.key, vec![stored[1].clone(), event(3, 7_000)], 10)
            .unwrap();
        assert_eq!((counts.accepted, counts.duplicates), (1, 1));
    }

    #[test]
    fn concurrent_batches_commit_together_and_count_each_event_once() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        let shared: Vec<NewEvent> = (0..20).map(|n| event(n, 1_000)).collect();
        let threads = 8u8;
        let counts: Vec<IngestCounts> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let store = &store;
                    let mut batch = shared.clone();
                    // Each thread also sends ten events of its own.
                    batch.extend((0..10).map(|n| event(100 + t * 10 + n, 2_000)));
                    scope.spawn(move || store.ingest(a.key, batch.clone(), 5).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let accepted: u64 = counts.iter().map(|c| c.accepted).sum();
        let duplicates: u64 = counts.iter().map(|c| c.duplicates).sum();
        assert_eq!(accepted, 20 + 10 * u64::from(threads));
        assert_eq!(duplicates, 20 * (u64::from(threads) - 1));
        let stored: i64 = store
            .reader()
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stored, i64::try_from(accepted).unwrap());
    }

    #[test]
    fn a_failed_commit_stores_nothing_and_the_next_batch_still_goes_in() {
        let (_dir, store) = store();
        let a = enroll(&store, "a");
        // Break the rollup the ingest transaction writes after the events.
        store
            .writer()
            .execute_batch("ALTER TABLE daily_usage RENAME TO daily_usage_away")
            .unwrap();
        let error = store
            .ingest(a.key, vec![event(1, 0), event(2, 0)], 5)
            .unwrap_err();
        assert!(error.to_string().contains("daily_usage"), "{error}");
        let count = |store: &SqliteStore| -> i64 {
            store
                .reader()
                .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(count(&store), 0, "no event of the failed batch is stored");
        store
            .writer()
            .execute_batch("ALTER TABLE daily_usage_away RENAME TO daily_usage")
            .unwrap();
        let counts = store
            .ingest(a.key, vec![event(1, 0), event(2, 0)], 6)
            .unwrap();
        assert_eq!((counts.accepted, counts.duplicates), (2, 0));
        assert_eq!(count(&store), 2);
    }

    #[test]
    fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            enroll(&store, "a");
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.find_install("a").unwrap().is_some());
    }
}
