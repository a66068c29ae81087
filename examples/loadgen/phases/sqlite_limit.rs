//! The database side: the in-process SQLite ceiling (the same rows straight into the same
//! schema, 1000 per transaction, no HTTP) and the agent database's size per event after a
//! checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use usage_agent::config::Synchronous;
use usage_agent::store::Store;
use usage_protocol::event::Event;

use crate::generator::Generator;

/// Inserts `events` rows in-process into a database of the same schema and durability,
/// 1000 per transaction, after `prefill` untimed rows; returns how many went in and how
/// long it took.
pub(crate) fn sqlite_limit(
    path: &Path,
    synchronous: Synchronous,
    prefill: usize,
    events: usize,
    cap: Duration,
) -> anyhow::Result<(usize, Duration)> {
    let mut store = Store::open(path, synchronous).context("opening the ceiling database")?;
    let mut generator = Generator::new(7);
    let now = chrono::Utc::now().timestamp_millis();
    for start in (0..prefill).step_by(1000) {
        let rows: Vec<Event> = (start..prefill.min(start + 1000))
            .map(|_| generator.next_event(now))
            .collect();
        store
            .record(&rows)
            .context("prefilling the ceiling database")?;
    }
    // Rows are made before the clock starts: the ceiling is the database alone.
    let rows: Vec<Event> = (0..events).map(|_| generator.next_event(now)).collect();
    let started = Instant::now();
    let mut stored = 0;
    for chunk in rows.chunks(1000) {
        store
            .record(chunk)
            .context("inserting a transaction of rows")?;
        stored += chunk.len();
        if started.elapsed() > cap {
            break;
        }
    }
    Ok((stored, started.elapsed()))
}

/// File size of the checkpointed database (plus any WAL left) and its event count.
pub(crate) fn database_size(database: &Path) -> anyhow::Result<(u64, u64)> {
    let bytes = database_bytes(database);
    let store = Store::open(database, Synchronous::Normal).context("opening the agent database")?;
    let events = store.event_count().context("counting events")?;
    Ok((bytes, events))
}

/// The bytes of a database and its write-ahead log.
pub(crate) fn database_bytes(database: &Path) -> u64 {
    let size = |path: PathBuf| std::fs::metadata(path).map_or(0, |m| m.len());
    let mut wal = database.as_os_str().to_owned();
    wal.push("-wal");
    size(database.to_path_buf()) + size(PathBuf::from(wal))
}
