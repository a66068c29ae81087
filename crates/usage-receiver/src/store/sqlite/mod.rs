//! The receiver's SQLite store, for one node: every SQL statement of it lives here and in
//! `migrations/*.sql` (the PostgreSQL store has its own, [`crate::store::postgres`]).
//!
//! One writer connection (enroll, ingest, retention), one reader connection (install
//! lookups and the other reads) and one for the installations views and the dashboard's
//! chart, so WAL lets lookups and reports run while a batch commits, and a batch's lookup
//! never waits for a view read whole (the first after a start or at midnight UTC).
//! Each install is stored once and events refer to it by an integer key; events sit in a
//! rowid table in arrival order, event ids are 16-byte blobs, and a unique index on
//! `(install, event_id)` is what dedupes (`migrations/0003_events_by_arrival.sql` says
//! why). `daily_usage` holds per install, UTC day and model the events and tokens of every
//! kind stored; ingest adds to it in the same transaction as the events it inserts (only
//! those not deduped), so it always equals a sum over the events ever stored, including
//! those since purged. Batches that arrive while one commits go together
//! (`group_commit.rs`). The request rate is kept in memory ([`crate::store::rate_limit`]),
//! as one process owns the file, and so are the views' figures, each taken only while the
//! version its rows were read at holds (`views.rs`). This module knows nothing about HTTP.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::view_cache::{DayCache, ViewCache};
use super::{
    Alert, AlertCursor, Budget, CostedReport, DailyTokens, DayRange, DeliveryOutcome,
    EnrollOutcome, EventCursor, EventsPage, EventsQuery, IngestCounts, Install, InstallKey,
    InstallUsage, InstallationsReport, MonthSpend, NewAlert, NewEvent, NewInstall, PlanChange,
    PriceList, ReceivedEvent, ReceiverStore, ReceiverStoreError, RetainedDays, SourceModelDay,
    StoreKind, Summary, SummaryQuery, SummaryRow, TimeRange, Totals, UsageWindow, UserModelDay,
};
use crate::billing::money::Micros;
use crate::billing::pricing::{ModelDayTokens, Plan, PlanHistory, PlanPeriod, TokenCounts};
use crate::days::{month_of, month_text};
use crate::store::rate_limit::{Rate, RateLimiter};
use usage_common::private_file::create_private;
use usage_protocol::event::Source;
use usage_protocol::signing::Secret;
use usage_protocol::wire::to_hex;

mod dashboard;
mod group_commit;
mod migrations;
mod views;

use group_commit::{IngestQueue, PendingIngest};
use migrations::migrate;

use crate::days::MS_PER_DAY;
use crate::days::day_of_ms;
/// Events deleted per retention transaction, so a batch waiting to commit gets in soon.
const RETENTION_CHUNK: i64 = 5000;

/// The receiver's SQLite database.
pub struct SqliteStore {
    /// A fair lock: the loops that delete in slices hand it to a waiting batch between
    /// slices ([`fair_unlock`]), where a plain unlock let them take it straight back.
    writer: parking_lot::Mutex<Connection>,
    reader: Mutex<Connection>,
    /// The installations views' and the chart's own reader (`views.rs`).
    viewer: Mutex<Connection>,
    /// Group commit: batches that arrive while one commits wait here and are committed
    /// together, one transaction and one fsync for all of them.
    ingest_queue: Mutex<IngestQueue>,
    committed: Condvar,
    /// Requests per install: in memory, as one node owns a SQLite database.
    limiter: RateLimiter,
    /// Figures of the views asked for, kept while each install's `usage_version` holds
    /// (`views.rs`).
    views: ViewCache,
    /// The fleet's figures of each day asked for, kept while the day's version holds.
    days: DayCache<i64, views::DayFigures>,
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
        // The provider's record is never silently rebuilt: damage stops the start
        // (docs/install.md, "When the database is damaged").
        usage_common::sqlite_check::refuse_if_damaged(path).map_err(open_error)?;
        create_private(path).map_err(|e| open_error(Box::new(e)))?;
        let mut writer = connect(path).map_err(|e| open_error(Box::new(e)))?;
        migrate(&mut writer).map_err(|e| open_error(Box::new(e)))?;
        let reader = connect(path).map_err(|e| open_error(Box::new(e)))?;
        let viewer = connect(path).map_err(|e| open_error(Box::new(e)))?;
        Ok(SqliteStore {
            writer: parking_lot::Mutex::new(writer),
            reader: Mutex::new(reader),
            viewer: Mutex::new(viewer),
            ingest_queue: Mutex::new(IngestQueue::default()),
            committed: Condvar::new(),
            limiter: RateLimiter::default(),
            views: ViewCache::default(),
            days: DayCache::default(),
        })
    }

    fn writer(&self) -> parking_lot::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind
        // (rusqlite rolls back on drop); this lock is not poisoned by one.
        self.writer.lock()
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn viewer(&self) -> MutexGuard<'_, Connection> {
        self.viewer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ingest_queue(&self) -> MutexGuard<'_, IngestQueue> {
        self.ingest_queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the batches of a group in one transaction: all of them, or none. A batch
    /// whose install is gone is `None` and stores nothing.
    fn commit_group(
        &self,
        group: &[Arc<PendingIngest>],
    ) -> Result<Vec<Option<IngestCounts>>, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = next_usage_version(&tx)?;
        let counts = group
            .iter()
            .map(|p| insert_batch(&tx, p.install, &p.events, p.received_at_ms, version))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(counts)
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // Every commit syncs (FULL, below), which gathering WAL writes relies on.
    let conn = usage_common::gather_vfs::open_for_full_sync(path)?;
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
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    fn ping(&self) -> Result<(), ReceiverStoreError> {
        self.reader().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn take_request(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError> {
        Ok(self.limiter.check(install, rate, std::time::Instant::now()))
    }

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
                    "INSERT INTO installs (install_id, secret, site_hash, enrolled_at, plan_from)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    install.install_id,
                    install.secret.to_whsec(),
                    install.site_hash,
                    install.enrolled_at_ms,
                    day_of_ms(install.enrolled_at_ms)
                ])?;
                EnrollOutcome::Created
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn find_install(&self, install_id: &str) -> Result<Option<Install>, ReceiverStoreError> {
        let conn = self.reader();
        type Row = (InstallKey, String, bool, Option<i64>, Option<String>);
        let row: Option<Row> = conn
            .prepare_cached(
                "SELECT i.id, i.secret, i.disabled, b.monthly_micros, b.thresholds
                 FROM installs i LEFT JOIN budgets b ON b.install = i.id
                 WHERE i.install_id = ?1",
            )?
            .query_row(params![install_id], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()?;
        let Some((key, secret, disabled, monthly, thresholds)) = row else {
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
            budget: Budget::from_columns(monthly, thresholds.as_deref())?,
        }))
    }

    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError> {
        group_commit::ingest(self, install, events, received_at_ms)
    }

    fn day_models(
        &self,
        install: InstallKey,
        days: &[i64],
    ) -> Result<Vec<(i64, String)>, ReceiverStoreError> {
        let conn = self.reader();
        let mut statement =
            conn.prepare_cached("SELECT model FROM daily_usage WHERE install = ?1 AND day = ?2")?;
        let mut pairs = Vec::new();
        for &day in days {
            let models = statement.query_map(params![install, day], |row| row.get(0))?;
            for model in models {
                pairs.push((day, model?));
            }
        }
        Ok(pairs)
    }

    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError> {
        Ok(self.summary_at_most(query, usize::MAX)?.unwrap_or_default())
    }

    fn summary_at_most(
        &self,
        query: &SummaryQuery,
        max_rows: usize,
    ) -> Result<Option<Summary>, ReceiverStoreError> {
        let conn = self.reader();
        let install = match &query.install_id {
            None => None,
            Some(id) => match install_key(&conn, id)? {
                Some(key) => Some(key),
                None => return Ok(Some(Summary::default())),
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
        if group.origin {
            keys.push("origin".to_owned());
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
             {group_clause} LIMIT ?4"
        );
        let (from, to) = range_bounds(query.range);
        // One row past the most asked for tells there are more; -1 is no limit.
        let limit = i64::try_from(max_rows).map_or(-1, |max| max.saturating_add(1));
        let mut statement = conn.prepare_cached(&sql)?;
        let mut rows = statement.query(params![install, from, to, limit])?;
        let mut summary = Summary::default();
        let mut read = 0;
        while let Some(row) = rows.next()? {
            read += 1;
            if read > max_rows {
                return Ok(None);
            }
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
            let origin = if group.origin {
                Some(row.get::<_, Option<String>>(next())?)
            } else {
                None
            };
            let events: u64 = row.get(next())?;
            let prompt_tokens: u64 = row.get(next())?;
            let completion_tokens: u64 = row.get(next())?;
            summary.add_row(
                SummaryRow {
                    day,
                    user_hash,
                    source,
                    model,
                    origin,
                    totals: Totals::of(events, prompt_tokens, completion_tokens),
                },
                group.any(),
            );
        }
        Ok(Some(summary))
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
                    e.received_at, e.origin
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
                origin: row.get(14)?,
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

    fn maintain(&self, days: RetainedDays) -> Result<u64, ReceiverStoreError> {
        let cutoff = days.first_kept.saturating_mul(MS_PER_DAY);
        let mut total = 0u64;
        loop {
            // Each chunk is its own short transaction, and the lock is handed over between
            // chunks, so a batch waiting to commit gets in.
            let conn = self.writer();
            let deleted = conn
                .prepare_cached(
                    "DELETE FROM events WHERE rowid IN (
                         SELECT rowid FROM events WHERE created_at < ?1 LIMIT ?2)",
                )?
                .execute(params![cutoff, RETENTION_CHUNK])?;
            fair_unlock(conn);
            total += deleted as u64;
            if (deleted as i64) < RETENTION_CHUNK {
                return Ok(total);
            }
        }
    }

    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError> {
        let viewer = self.viewer();
        // One snapshot, so each install's plans are read as its row has them.
        let snapshot = viewer.unchecked_transaction()?;
        views::installations(&snapshot, install_id, window)
    }

    fn costed_installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
        prices: PriceList<'_>,
    ) -> Result<CostedReport, ReceiverStoreError> {
        views::costed(self, install_id, window, prices)
    }

    fn keeps_views(&self) -> bool {
        true
    }

    fn set_plan(&self, install_id: &str, plan: Plan, day: i64) -> Result<bool, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let install: Option<(InstallKey, String, i64, i64)> = tx
            .prepare_cached(
                "SELECT id, plan, enrolled_at, plan_from FROM installs WHERE install_id = ?1",
            )?
            .query_row(params![install_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        let Some((key, current, enrolled_at, current_from)) = install else {
            return Ok(false);
        };
        let current = plan_from(&current)?;
        let current_from = current_from.max(day_of_ms(enrolled_at));
        match PlanChange::of(current, current_from, plan, day) {
            PlanChange::Unchanged => {}
            PlanChange::Start => {
                tx.prepare_cached(
                    "INSERT INTO past_plans (install, from_day, until_day, plan)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![key, current_from, day, current.as_str()])?;
                tx.prepare_cached("UPDATE installs SET plan = ?2, plan_from = ?3 WHERE id = ?1")?
                    .execute(params![key, plan.as_str(), day])?;
            }
            PlanChange::Replace => {
                let resumed: Option<i64> = tx
                    .prepare_cached(
                        "DELETE FROM past_plans WHERE install = ?1 AND until_day = ?2 AND plan = ?3
                         RETURNING from_day",
                    )?
                    .query_row(params![key, current_from, plan.as_str()], |row| row.get(0))
                    .optional()?;
                tx.prepare_cached("UPDATE installs SET plan = ?2, plan_from = ?3 WHERE id = ?1")?
                    .execute(params![key, plan.as_str(), resumed.unwrap_or(current_from)])?;
            }
        }
        tx.commit()?;
        Ok(true)
    }

    fn plan_history(&self, install_id: &str) -> Result<Option<PlanHistory>, ReceiverStoreError> {
        let conn = self.reader();
        let tx = conn.unchecked_transaction()?;
        let Some(key) = install_key(&tx, install_id)? else {
            return Ok(None);
        };
        let mut earlier = past_plans(&tx, Some(key), i64::MIN)?;
        let history = tx
            .prepare_cached("SELECT plan, enrolled_at, plan_from FROM installs WHERE id = ?1")?
            .query_row(params![key], |row| {
                Ok(history_of(
                    row,
                    [0, 1, 2],
                    earlier.remove(&key).unwrap_or_default(),
                ))
            })??;
        tx.commit()?;
        Ok(Some(history))
    }

    fn set_label(&self, install_id: &str, label: &str) -> Result<bool, ReceiverStoreError> {
        let changed = self
            .writer()
            .prepare_cached("UPDATE installs SET label = ?2 WHERE install_id = ?1")?
            .execute(params![install_id, label])?;
        Ok(changed == 1)
    }

    fn source_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<SourceModelDay>, ReceiverStoreError> {
        let conn = self.reader();
        let Some(key) = install_key(&conn, install_id)? else {
            return Ok(Vec::new());
        };
        let mut statement = conn.prepare_cached(&format!(
            "SELECT source, model, created_at / {MS_PER_DAY} AS day, count(*),
                    sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),
                    sum(cache_write_tokens), sum(reasoning_tokens)
             FROM events
             WHERE install = ?1 AND created_at >= ?2 AND created_at < ?3
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ))?;
        let from = days.first.saturating_mul(MS_PER_DAY);
        let to = days.last.saturating_add(1).saturating_mul(MS_PER_DAY);
        let mut rows = statement.query(params![key, from, to])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(SourceModelDay {
                source: source_from(row.get(0)?)?,
                events: row.get(3)?,
                usage: ModelDayTokens {
                    model: row.get(1)?,
                    day: row.get(2)?,
                    tokens: token_counts(row, 4)?,
                },
            });
        }
        Ok(out)
    }

    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError> {
        // Disabled first, so no batch of it is stored from now on; then its events a slice
        // at a time, the writer given back between slices so batches of other installs go
        // in between; then the rest in one transaction.
        let key = {
            let conn = self.writer();
            let Some(key) = install_key(&conn, install_id)? else {
                return Ok(None);
            };
            conn.prepare_cached("UPDATE installs SET disabled = 1 WHERE id = ?1")?
                .execute(params![key])?;
            key
        };
        let mut events = 0;
        loop {
            let conn = self.writer();
            let deleted = conn
                .prepare_cached(
                    "DELETE FROM events WHERE rowid IN
                         (SELECT rowid FROM events WHERE install = ?1 LIMIT ?2)",
                )?
                .execute(params![key, ERASE_SLICE_EVENTS])?;
            fair_unlock(conn);
            events += deleted as u64;
            if deleted == 0 {
                break;
            }
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The days its rollup rows leave change for the chart kept of them.
        let version = next_usage_version(&tx)?;
        tx.prepare_cached(
            "INSERT INTO day_versions (day, version)
             SELECT DISTINCT day, ?2 FROM daily_usage WHERE install = ?1
             ON CONFLICT (day) DO UPDATE SET version = excluded.version",
        )?
        .execute(params![key, version])?;
        for table in ["daily_usage", "budgets", "alerts", "past_plans"] {
            tx.prepare_cached(&format!("DELETE FROM {table} WHERE install = ?1"))?
                .execute(params![key])?;
        }
        tx.prepare_cached("DELETE FROM installs WHERE id = ?1")?
            .execute(params![key])?;
        tx.commit()?;
        Ok(Some(events))
    }

    fn set_budget(
        &self,
        install_id: &str,
        budget: Option<&Budget>,
    ) -> Result<bool, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(key) = install_key(&tx, install_id)? else {
            return Ok(false);
        };
        match budget {
            Some(budget) => tx
                .prepare_cached(
                    "INSERT INTO budgets (install, monthly_micros, thresholds) VALUES (?1, ?2, ?3)
                     ON CONFLICT (install) DO UPDATE SET monthly_micros = excluded.monthly_micros,
                         thresholds = excluded.thresholds",
                )?
                .execute(params![key, budget.monthly.0, budget.thresholds_text()])?,
            None => tx
                .prepare_cached("DELETE FROM budgets WHERE install = ?1")?
                .execute(params![key])?,
        };
        tx.commit()?;
        Ok(true)
    }

    fn month_spend(
        &self,
        install: InstallKey,
        days: DayRange,
        month: &str,
    ) -> Result<MonthSpend, ReceiverStoreError> {
        let conn = self.reader();
        let tx = conn.unchecked_transaction()?;
        let mut spend = MonthSpend::default();
        {
            let mut statement = tx.prepare_cached(
                "SELECT model, day, prompt_tokens, completion_tokens, cached_tokens,
                        cache_write_tokens, reasoning_tokens
                 FROM daily_usage WHERE install = ?1 AND day >= ?2 AND day <= ?3
                 ORDER BY model, day",
            )?;
            let mut rows = statement.query(params![install, days.first, days.last])?;
            while let Some(row) = rows.next()? {
                spend.usage.push(ModelDayTokens {
                    model: row.get(0)?,
                    day: row.get(1)?,
                    tokens: token_counts(row, 2)?,
                });
            }
            let mut statement = tx.prepare_cached(
                "SELECT threshold FROM alerts WHERE install = ?1 AND month = ?2 ORDER BY threshold",
            )?;
            let mut rows = statement.query(params![install, month])?;
            while let Some(row) = rows.next()? {
                spend.alerted.push(row.get(0)?);
            }
        }
        tx.commit()?;
        Ok(spend)
    }

    fn record_alerts(&self, alerts: &[NewAlert]) -> Result<Vec<Uuid>, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut recorded = Vec::new();
        {
            // An install erased meanwhile gets no alert (its row is gone).
            let mut insert = tx.prepare_cached(
                "INSERT INTO alerts (alert_id, install, threshold, month, cost_micros,
                     budget_micros, currency, at, next_attempt_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8
                 WHERE EXISTS (SELECT 1 FROM installs WHERE id = ?2)
                 ON CONFLICT (install, threshold, month) DO NOTHING",
            )?;
            for alert in alerts {
                let inserted = insert.execute(params![
                    alert.alert_id.as_bytes().as_slice(),
                    alert.install,
                    alert.threshold,
                    alert.month,
                    alert.cost.0,
                    alert.budget.0,
                    alert.currency,
                    alert.at_ms,
                ])?;
                if inserted == 1 {
                    recorded.push(alert.alert_id);
                }
            }
        }
        tx.commit()?;
        Ok(recorded)
    }

    fn alerts(&self, range: TimeRange) -> Result<Vec<Alert>, ReceiverStoreError> {
        let conn = self.reader();
        let mut statement = conn.prepare_cached(&format!(
            "{ALERT_COLUMNS} WHERE (?1 IS NULL OR a.at >= ?1) AND (?2 IS NULL OR a.at < ?2)
             ORDER BY a.at, a.alert_id"
        ))?;
        let rows = statement.query_map(params![range.from_ms, range.to_ms], alert_row)?;
        rows.map(|row| row?).collect()
    }

    fn install_alerts(&self, install_id: &str) -> Result<Vec<Alert>, ReceiverStoreError> {
        let conn = self.reader();
        let mut statement = conn.prepare_cached(&format!(
            "{ALERT_COLUMNS} WHERE i.install_id = ?1 ORDER BY a.at, a.alert_id"
        ))?;
        let rows = statement.query_map(params![install_id], alert_row)?;
        rows.map(|row| row?).collect()
    }

    fn alerts_page(
        &self,
        range: TimeRange,
        after: Option<AlertCursor>,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        let conn = self.reader();
        let mut statement = conn.prepare_cached(&format!(
            "{ALERT_COLUMNS} WHERE (?1 IS NULL OR a.at >= ?1) AND (?2 IS NULL OR a.at < ?2)
             AND (?3 IS NULL OR (a.at, a.alert_id) > (?3, ?4))
             ORDER BY a.at, a.alert_id LIMIT ?5"
        ))?;
        let after_id = after.map(|cursor| cursor.alert_id.as_bytes().to_vec());
        let rows = statement.query_map(
            params![
                range.from_ms,
                range.to_ms,
                after.map(|cursor| cursor.at_ms),
                after_id,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            alert_row,
        )?;
        rows.map(|row| row?).collect()
    }

    fn claim_alerts(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let claimed = {
            let mut statement = tx.prepare_cached(
                "UPDATE alerts SET next_attempt_at = ?2, attempts = attempts + 1
                 WHERE alert_id IN (SELECT alert_id FROM alerts
                     WHERE delivered_at IS NULL AND next_attempt_at <= ?1
                     ORDER BY next_attempt_at, at LIMIT ?3)
                 RETURNING alert_id",
            )?;
            let ids = statement.query_map(
                params![now_ms, now_ms.saturating_add(lease_ms), limit as i64],
                |row| row.get::<_, Vec<u8>>(0),
            )?;
            let ids = ids.collect::<Result<Vec<_>, _>>()?;
            let mut select =
                tx.prepare_cached(&format!("{ALERT_COLUMNS} WHERE a.alert_id = ?1"))?;
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                claimed.push(select.query_row(params![id], alert_row)??);
            }
            claimed
        };
        tx.commit()?;
        Ok(claimed)
    }

    fn finish_alert(
        &self,
        alert_id: Uuid,
        outcome: DeliveryOutcome,
    ) -> Result<(), ReceiverStoreError> {
        let id = alert_id.as_bytes().as_slice();
        let conn = self.writer();
        match outcome {
            DeliveryOutcome::Delivered { at_ms } => conn
                .prepare_cached("UPDATE alerts SET delivered_at = ?2 WHERE alert_id = ?1")?
                .execute(params![id, at_ms])?,
            DeliveryOutcome::RetryAt { at_ms } => conn
                .prepare_cached(
                    "UPDATE alerts SET next_attempt_at = ?2
                     WHERE alert_id = ?1 AND delivered_at IS NULL",
                )?
                .execute(params![id, at_ms])?,
        };
        Ok(())
    }

    fn fleet_model_days(&self, days: DayRange) -> Result<Vec<ModelDayTokens>, ReceiverStoreError> {
        let viewer = self.viewer();
        let snapshot = viewer.unchecked_transaction()?;
        views::fleet_model_days(self, &snapshot, days)
    }

    fn user_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<UserModelDay>, ReceiverStoreError> {
        dashboard::user_usage(&self.reader(), install_id, days)
    }
}

/// Events an erasure deletes in one transaction: a few milliseconds of the writer, so a
/// batch of another install never waits longer than that for it.
const ERASE_SLICE_EVENTS: i64 = 5000;

/// Releases the writing connection to the thread waiting longest for it, if any. A plain
/// unlock wakes a waiter but lets this thread, running on, take the lock again first: a
/// loop of slices then kept it for most of its run, holding up a batch of another install
/// about as long as the whole erasure.
fn fair_unlock(conn: parking_lot::MutexGuard<'_, Connection>) {
    parking_lot::MutexGuard::unlock_fair(conn);
}

/// The columns [`alert_row`] reads, joined to the install for its id.
const ALERT_COLUMNS: &str = "SELECT a.alert_id, i.install_id, a.threshold, a.month,
        a.cost_micros, a.budget_micros, a.currency, a.at, a.delivered_at, a.attempts, i.label
    FROM alerts a JOIN installs i ON i.id = a.install";

fn alert_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Alert, ReceiverStoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let Ok(alert_id) = Uuid::from_slice(&id) else {
        return Ok(Err(ReceiverStoreError::Corrupt(
            "a stored alert id is not 16 bytes".into(),
        )));
    };
    Ok(Ok(Alert {
        alert_id,
        install_id: row.get(1)?,
        label: row.get(10)?,
        threshold: row.get(2)?,
        month: row.get(3)?,
        cost: Micros(row.get(4)?),
        budget: Micros(row.get(5)?),
        currency: row.get(6)?,
        at_ms: row.get(7)?,
        delivered_at_ms: row.get(8)?,
        attempts: row.get(9)?,
    }))
}

/// A usage version no install or day has had yet (`migrations/0009_usage_versions.sql`),
/// for the rollup rows a transaction changes.
fn next_usage_version(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    tx.prepare_cached("UPDATE usage_clock SET version = version + 1 RETURNING version")?
        .query_row([], |row| row.get(0))
}

/// Inserts one batch's events inside `tx` and adds them to the daily rollup; the counts say
/// how many were new and how many were already stored (or repeated within the batch).
/// `None`, with nothing written, when the install was erased or disabled meanwhile. When
/// the rollup changes, the install and the days changed take `version` (from
/// [`next_usage_version`] in this transaction), so the views kept know to read them again.
fn insert_batch(
    tx: &rusqlite::Transaction<'_>,
    install: InstallKey,
    events: &[NewEvent],
    received_at_ms: i64,
    version: i64,
) -> Result<Option<IngestCounts>, ReceiverStoreError> {
    let accepting: Option<bool> = tx
        .prepare_cached("SELECT NOT disabled FROM installs WHERE id = ?1")?
        .query_row(params![install], |row| row.get(0))
        .optional()?;
    if accepting != Some(true) {
        return Ok(None);
    }
    let mut counts = IngestCounts::default();
    // (day, model) to the events and tokens of the inserted events.
    let mut daily: BTreeMap<(i64, &str), (u64, TokenCounts)> = BTreeMap::new();
    // `OR IGNORE` on the unique (install, event_id) index is the dedupe: it skips an id
    // stored by an earlier batch or earlier in this one, inside this same transaction.
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO events (install, event_id, user_hash, source, model,
             prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
             reasoning_tokens, context, created_at, received_at, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
            event.origin,
        ])?;
        if inserted == 1 {
            counts.accepted += 1;
            let day = day_of_ms(event.created_at_ms);
            let (count, sums) = daily.entry((day, event.model.as_str())).or_default();
            *count += 1;
            sums.prompt += event.prompt_tokens;
            sums.completion += event.completion_tokens;
            sums.cached += event.cached_tokens;
            sums.cache_write += event.cache_write_tokens;
            sums.reasoning += event.reasoning_tokens;
        } else {
            counts.duplicates += 1;
        }
    }
    let mut rollup = tx.prepare_cached(
        "INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
             completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (install, day, model) DO UPDATE SET
             events = events + excluded.events,
             prompt_tokens = prompt_tokens + excluded.prompt_tokens,
             completion_tokens = completion_tokens + excluded.completion_tokens,
             cached_tokens = cached_tokens + excluded.cached_tokens,
             cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
             reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens",
    )?;
    for ((day, model), (events, sums)) in &daily {
        rollup.execute(params![
            install,
            day,
            model,
            events,
            sums.prompt,
            sums.completion,
            sums.cached,
            sums.cache_write,
            sums.reasoning
        ])?;
    }
    let mut day_version = tx.prepare_cached(
        "INSERT INTO day_versions (day, version) VALUES (?1, ?2)
         ON CONFLICT (day) DO UPDATE SET version = excluded.version",
    )?;
    let mut last_day = None;
    // `daily` is in day order: each day once.
    for &(day, _) in daily.keys() {
        if last_day != Some(day) {
            day_version.execute(params![day, version])?;
            last_day = Some(day);
        }
    }
    let changed = (counts.accepted > 0).then_some(version);
    tx.prepare_cached(
        "UPDATE installs SET last_seen = ?2, usage_version = coalesce(?3, usage_version)
         WHERE id = ?1",
    )?
    .execute(params![install, received_at_ms, changed])?;
    Ok(Some(counts))
}

/// The five token kinds from the columns `first..first + 5` (prompt, completion, cached,
/// cache write, reasoning).
fn token_counts(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<TokenCounts> {
    Ok(TokenCounts {
        prompt: row.get(first)?,
        completion: row.get(first + 1)?,
        cached: row.get(first + 2)?,
        cache_write: row.get(first + 3)?,
        reasoning: row.get(first + 4)?,
    })
}

fn plan_from(text: &str) -> Result<Plan, ReceiverStoreError> {
    text.parse()
        .map_err(|_| ReceiverStoreError::Corrupt(format!("unknown plan {text:?}")))
}

/// The plans of every install (or only `only`) that ended after `since`, oldest first.
fn past_plans(
    conn: &Connection,
    only: Option<InstallKey>,
    since: i64,
) -> Result<HashMap<InstallKey, Vec<PlanPeriod>>, ReceiverStoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT install, from_day, plan FROM past_plans
         WHERE until_day > ?1 AND (?2 IS NULL OR install = ?2) ORDER BY install, from_day",
    )?;
    let mut rows = statement.query(params![since, only])?;
    let mut plans: HashMap<InstallKey, Vec<PlanPeriod>> = HashMap::new();
    while let Some(row) = rows.next()? {
        plans.entry(row.get(0)?).or_default().push(PlanPeriod {
            plan: plan_from(&row.get::<_, String>(2)?)?,
            from_day: row.get(1)?,
        });
    }
    Ok(plans)
}

/// An install's plan history from its row's `[plan, enrolled_at, plan_from]` columns (at
/// these indexes) and its `earlier` plans.
fn history_of(
    row: &rusqlite::Row<'_>,
    [plan, enrolled_at, plan_day]: [usize; 3],
    earlier: Vec<PlanPeriod>,
) -> Result<PlanHistory, ReceiverStoreError> {
    let current = PlanPeriod {
        plan: plan_from(&row.get::<_, String>(plan)?)?,
        from_day: row.get(plan_day)?,
    };
    Ok(PlanHistory::new(
        day_of_ms(row.get(enrolled_at)?),
        current,
        earlier,
    ))
}

/// An install as the views read it: what is never kept (plans, label, budget, alerts),
/// and its usage over the window (when read) with the version of that usage.
struct Head {
    key: InstallKey,
    usage_version: i64,
    usage: InstallUsage,
}

/// Every install (or only `only`) in install id order, with its plans over the months of
/// `window`, its budget and the thresholds alerted in the month of `window.today`; its
/// usage not read yet.
fn install_heads(
    conn: &Connection,
    only: Option<InstallKey>,
    window: UsageWindow,
) -> Result<Vec<Head>, ReceiverStoreError> {
    let mut heads = Vec::new();
    let mut by_key = HashMap::new();
    let mut earlier = past_plans(conn, only, month_of(window.month_start).0)?;
    let mut statement = conn.prepare_cached(
        "SELECT i.id, i.install_id, i.plan, i.last_seen, b.monthly_micros, b.thresholds,
                i.label, i.enrolled_at, i.plan_from, i.usage_version
         FROM installs i LEFT JOIN budgets b ON b.install = i.id
         WHERE ?1 IS NULL OR i.id = ?1 ORDER BY i.install_id",
    )?;
    let mut rows = statement.query(params![only])?;
    while let Some(row) = rows.next()? {
        let key: InstallKey = row.get(0)?;
        by_key.insert(key, heads.len());
        heads.push(Head {
            key,
            usage_version: row.get(9)?,
            usage: InstallUsage {
                install_id: row.get(1)?,
                label: row.get(6)?,
                plans: history_of(row, [2, 7, 8], earlier.remove(&key).unwrap_or_default())?,
                last_seen_ms: row.get(3)?,
                events_30d: 0,
                tokens_30d: 0,
                usage_mtd: Vec::new(),
                budget: Budget::from_columns(
                    row.get(4)?,
                    row.get::<_, Option<String>>(5)?.as_deref(),
                )?,
                alerted_in_month: Vec::new(),
            },
        });
    }
    let mut statement = conn.prepare_cached(
        "SELECT install, threshold FROM alerts
         WHERE month = ?1 AND (?2 IS NULL OR install = ?2) ORDER BY install, threshold",
    )?;
    let mut rows = statement.query(params![month_text(window.today), only])?;
    while let Some(row) = rows.next()? {
        if let Some(&index) = by_key.get(&row.get::<_, InstallKey>(0)?) {
            heads[index].usage.alerted_in_month.push(row.get(1)?);
        }
    }
    Ok(heads)
}

/// Adds to `heads` (every install, or only `only`'s head) their usage over `window` from
/// the rollup rows, and returns the chart's days (events and tokens per day over the
/// counted days). One range scan of the rollup rows of both windows (a covering index for
/// every install, the primary key for one), summed here: cheaper than SQL grouping, and it
/// gives the chart's days in the same pass. With `days`, also each day's figures
/// (every install's, so only when `only` is `None`).
fn add_usage(
    conn: &Connection,
    only: Option<InstallKey>,
    window: UsageWindow,
    heads: &mut [Head],
    mut days: Option<&mut HashMap<i64, views::DayFigures>>,
) -> Result<BTreeMap<i64, DailyTokens>, ReceiverStoreError> {
    let by_key: HashMap<InstallKey, usize> = heads
        .iter()
        .enumerate()
        .map(|(index, head)| (head.key, index))
        .collect();
    let first_day = window.from_30d.min(window.month_start);
    let mut statement = conn.prepare_cached(if only.is_some() {
        "SELECT install, day, model, events, prompt_tokens, completion_tokens,
                cached_tokens, cache_write_tokens, reasoning_tokens
         FROM daily_usage WHERE install = ?3 AND day >= ?1 AND day <= ?2"
    } else {
        "SELECT install, day, model, events, prompt_tokens, completion_tokens,
                cached_tokens, cache_write_tokens, reasoning_tokens
         FROM daily_usage WHERE day >= ?1 AND day <= ?2 AND ?3 IS NULL"
    })?;
    let mut rows = statement.query(params![first_day, window.today, only])?;
    let mut daily: BTreeMap<i64, DailyTokens> = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let key: InstallKey = row.get(0)?;
        let day: i64 = row.get(1)?;
        let events: u64 = row.get(3)?;
        let kinds = token_counts(row, 4)?;
        if let Some(days) = days.as_deref_mut() {
            let model = row.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
            days.entry(day).or_default().add(day, model, events, &kinds);
        }
        let Some(install) = by_key.get(&key).map(|&index| &mut heads[index].usage) else {
            continue;
        };
        let tokens = kinds.total();
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
            // The primary key makes each (install, day, model) one row.
            install.usage_mtd.push(ModelDayTokens {
                model: row.get(2)?,
                day,
                tokens: kinds,
            });
        }
    }
    Ok(daily)
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
mod tests;
