//! The agent's durable log: every SQL statement of the agent lives under this module.
//!
//! `Store` wraps one SQLite connection. The daemon opens two: one owned by the
//! [`writer`] thread (all writes, group-committed) and one for reads, which WAL lets run
//! beside the writer. This module knows nothing about HTTP.

use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};

use crate::config::Synchronous;
use usage_common::private_file::create_private;

pub mod event_ids;
pub mod events;
pub mod export;
pub mod health;
pub mod quota;
pub mod retention;
pub mod rollup;
pub mod salvage;
pub mod status;
pub mod sync;
pub mod writer;

pub use usage_common::sqlite_check::Verdict;

/// The schema and its migrations, applied at open (see the file's header).
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// Page size of a new database: small pages make each commit's WAL frames small, which
/// matters more than the few bytes per event they add (BENCHMARKS.md, "Where the tuned
/// constants come from").
pub const PAGE_SIZE: i64 = 1024;

/// A database failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create database file {path} (mode 0600): {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this binary knows ({known}); upgrade usage-agent"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database error while {doing}: {source}")]
    Sql {
        doing: &'static str,
        source: rusqlite::Error,
    },
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("the database writer is overloaded")]
    Overloaded,
    /// A group commit failed; every request of the group gets this copy of the error.
    #[error("{message}")]
    GroupFailed { message: String, damage: bool },
    #[error("cannot check database {path}: {source}")]
    Check {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot move the damaged database {from} aside to {to}: {source}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the database failed on damage or I/O (SQLite's `CORRUPT`, `NOTADB`,
    /// `IOERR`), as opposed to a full disk, an overload or a stopped writer, which pass.
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Open { source, .. }
            | StoreError::Sql { source, .. }
            | StoreError::Check { source, .. } => usage_common::sqlite_check::is_damage(source),
            StoreError::GroupFailed { damage, .. } => *damage,
            _ => false,
        }
    }
}

/// Attaches what was being done to a rusqlite error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError>;
}

impl<T> Doing<T> for rusqlite::Result<T> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { doing, source })
    }
}

/// Page cache of the connections beside the writer (reads, sync), in KiB: they read the
/// log in `seq` order, which the OS page cache serves as well.
pub const SIDE_CACHE_KIB: u32 = 128;

/// Page cache of the writer, in KiB: a quarter of SQLite's default, because every cache
/// counts toward the agent's resident memory and the OS page cache holds the rest. Since
/// event ids left their random index, a write touches few pages beyond the newest ones
/// (BENCHMARKS.md, "Where the tuned constants come from").
pub const WRITER_CACHE_KIB: u32 = 512;

/// After events were deleted: lowers the `seq` kept in `meta` under `key` to the newest
/// event left, since SQLite hands `max(seq) + 1` out again and a mark above it would cover
/// events not yet written. Runs in the deleting transaction.
pub(crate) fn lower_to_newest_event(conn: &Connection, key: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE meta SET value = CAST((SELECT coalesce(max(seq), 0) FROM events) AS TEXT)
         WHERE key = ?1
           AND CAST(value AS INTEGER) > (SELECT coalesce(max(seq), 0) FROM events)",
    )
    .and_then(|mut stmt| stmt.execute(params![key]))
    .doing("lowering a mark to the newest event")
    .map(drop)
}

/// One connection to the agent database.
pub struct Store {
    conn: Connection,
    /// Model name to `models.id`, so recording an event costs no lookup query.
    model_ids: std::collections::HashMap<String, i64>,
    /// Origin name to `origins.id`, likewise.
    origin_ids: std::collections::HashMap<String, i64>,
    /// What the writer knows of the stored ids: hashes of the newest, not yet in
    /// `event_ids`, and a filter over the table (see [`event_ids`]).
    known_ids: event_ids::KnownIds,
}

/// The migrations in `schema.sql`, numbered from 1.
fn migrations() -> Vec<&'static str> {
    SCHEMA.split("-- migration ").skip(1).collect()
}

/// The schema upgrade that opening the database at `path` would apply: the version the
/// file has and the newest this build knows. `None` when there is none to apply (no file
/// yet, up to date, newer, or unreadable: opening says why).
pub fn pending_upgrade(path: &Path) -> Option<(i64, i64)> {
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .ok()?;
    let known = migrations().len() as i64;
    (found > 0 && found < known).then_some((found, known))
}

impl Store {
    /// Opens (creating if needed, mode 0600) the database, applies pending migrations and
    /// sets WAL mode and the configured durability.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Store, StoreError> {
        Store::open_at_version(path, synchronous, None)
    }

    /// [`Store::open`], applying the migrations only up to `version` (all when `None`, or
    /// when it is past the newest): a salvage copies an older file's rows into a fresh
    /// database of that file's schema, then migrates it.
    pub fn open_at_version(
        path: &Path,
        synchronous: Synchronous,
        version: Option<i64>,
    ) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        create_private(path).map_err(|source| StoreError::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Gathering WAL writes relies on every commit syncing (see `usage_common::gather_vfs`).
        let conn = if synchronous == Synchronous::Full {
            usage_common::gather_vfs::open_for_full_sync(path)
        } else {
            Connection::open(path)
        }
        .map_err(open_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        // Small pages: each event's random event_id lands on its own index leaf, and a
        // commit writes whole pages to the WAL, so smaller pages mean fewer bytes per
        // acknowledged event. Only takes effect when the database is created.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(open_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "synchronous", synchronous.as_pragma())
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_error)?;
        // Query planner stability: without it, a statement whose plan could depend on a
        // bound value (`LIMIT ?`) is re-prepared on every rebind, a cost the sync reader
        // felt (BENCHMARKS.md).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(open_error)?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut store = Store {
            conn,
            model_ids: Default::default(),
            origin_ids: Default::default(),
            known_ids: Default::default(),
        };
        store.migrate(path, version)?;
        Ok(store)
    }

    /// Applies the migrations not applied yet, up to `upto` (all when `None`), each in its
    /// own transaction.
    pub(crate) fn migrate(&mut self, path: &Path, upto: Option<i64>) -> Result<(), StoreError> {
        let migrations = migrations();
        let known = migrations.len() as i64;
        let target = upto.map_or(known, |upto| upto.min(known));
        let found: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .doing("reading the schema version")?;
        if found > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                known,
            });
        }
        for (number, block) in migrations
            .iter()
            .enumerate()
            .take(target as usize)
            .skip(found as usize)
        {
            let version = number as i64 + 1;
            let tx = self.conn.transaction().doing("starting a migration")?;
            // The block starts with its number; the rest of that line is not SQL.
            let sql = block.split_once('\n').map_or("", |(_, sql)| sql);
            tx.execute_batch(sql).doing("applying a schema migration")?;
            tx.pragma_update(None, "user_version", version)
                .doing("recording the schema version")?;
            tx.commit().doing("committing a schema migration")?;
        }
        Ok(())
    }

    /// Caps this connection's page cache ([`WRITER_CACHE_KIB`] for the writer,
    /// [`SIDE_CACHE_KIB`] beside it): every cache counts toward the agent's resident memory.
    pub fn limit_cache(&self, kib: u32) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "cache_size", -i64::from(kib))
            .doing("sizing the page cache")
    }

    /// Reads one `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row(params![key], |row| row.get(0)).optional())
            .doing("reading metadata")
    }

    /// Writes one `meta` value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![key, value]))
            .doing("writing metadata")
            .map(drop)
    }

    /// Removes one `meta` value.
    pub fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM meta WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute(params![key]))
            .doing("removing metadata")
            .map(drop)
    }

    /// Records the install id once for the whole database.
    pub fn set_install_id(&self, install_id: &str) -> Result<(), StoreError> {
        self.set_meta("install_id", install_id)
    }

    /// Size of the database file plus its WAL, in bytes.
    pub fn db_bytes(&self) -> Result<u64, StoreError> {
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |row| row.get(0))
            .doing("reading the page count")?;
        let page_size: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .doing("reading the page size")?;
        let wal = self
            .conn
            .path()
            .and_then(|p| std::fs::metadata(format!("{p}-wal")).ok())
            .map_or(0, |m| m.len());
        Ok((pages * page_size) as u64 + wal)
    }

    /// Moves the WAL into the main file and truncates it (used at shutdown).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .doing("checkpointing the WAL")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_applies_every_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/usage.db");
        let store = Store::open(&path, Synchronous::Full).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, migrations().len() as i64);
        drop(store);
        // Reopening must not re-run migration 1 (which would fail on existing tables).
        Store::open(&path, Synchronous::Normal).unwrap();
    }

    #[test]
    fn a_database_of_the_schema_before_origins_keeps_its_events_and_summaries_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        {
            let conn = Connection::open(&path).unwrap();
            let migrations = migrations();
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
            conn.execute_batch(
                "INSERT INTO models (id, name) VALUES (1, 'gpt-4o');
                 INSERT INTO events (event_id, user_id, source, model_id, prompt_tokens,
                     completion_tokens, created_at)
                 VALUES (x'0192f0c17a3b7c4d8e5f6a7b8c9d0e1f', 5, 0, 1, 100, 7, 1764240000000);
                 INSERT INTO usage_daily VALUES ('2025-11-27', 5, 0, 1, 1, 100, 7, 107, 0, 0, 0);",
            )
            .unwrap();
        }
        let mut store = Store::open(&path, Synchronous::Full).unwrap();
        let pending = store.pending_batch(0, i64::MAX, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event.origin, None);
        let daily = store.daily_page("", None).unwrap();
        assert_eq!(daily.len(), 1);
        assert_eq!(
            (daily[0].origin.as_deref(), daily[0].sums.total_tokens),
            (None, 107)
        );
        // The same day rebuilt, now with an event that names its origin beside the old one.
        let mut event = pending[0].event.clone();
        event.event_id = uuid::Uuid::new_v4();
        event.origin = Some(usage_protocol::event::Origin::parse("theme:acme").unwrap());
        store.record(&[event]).unwrap();
        let (start, end) = (1_764_201_600_000, 1_764_288_000_000);
        assert_eq!(store.recompute_day("2025-11-27", start, end).unwrap(), 2);
        let origins: Vec<Option<String>> = store
            .daily_page("", None)
            .unwrap()
            .into_iter()
            .map(|row| row.origin)
            .collect();
        assert_eq!(origins, [None, Some("theme:acme".to_owned())]);
    }

    #[test]
    fn a_new_database_and_its_wal_and_shm_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Under any umask; `tests/it/hardening_agent.rs` runs the agent under 022.
        let store = Store::open(&dir.path().join("usage.db"), Synchronous::Full).unwrap();
        store.set_meta("probe", "1").unwrap();
        for name in ["usage.db", "usage.db-wal", "usage.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let store = Store::open(&path, Synchronous::Full).unwrap();
        store.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        let error = Store::open(&path, Synchronous::Full).err().unwrap();
        assert!(
            error.to_string().contains("newer than this binary"),
            "{error}"
        );
    }
}
