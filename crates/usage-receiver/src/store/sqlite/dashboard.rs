//! The SQLite statements of what the dashboard reads besides the installations view and
//! its chart (`views.rs`): one install's usage per user.

use rusqlite::{Connection, params};

use super::{install_key, token_counts};
use crate::billing::pricing::ModelDayTokens;
use crate::days::MS_PER_DAY;
use crate::store::{DayRange, ReceiverStoreError, UserModelDay};

/// [`crate::store::ReceiverStore::user_usage`]: the install's raw events of the days,
/// grouped per user, model and day.
pub(super) fn user_usage(
    conn: &Connection,
    install_id: &str,
    days: DayRange,
) -> Result<Vec<UserModelDay>, ReceiverStoreError> {
    let Some(key) = install_key(conn, install_id)? else {
        return Ok(Vec::new());
    };
    let mut statement = conn.prepare_cached(&format!(
        "SELECT lower(hex(user_hash)), model, created_at / {MS_PER_DAY} AS day, count(*),
                sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),
                sum(cache_write_tokens), sum(reasoning_tokens)
         FROM events
         WHERE install = ?1 AND created_at >= ?2 AND created_at < ?3
         GROUP BY user_hash, model, day"
    ))?;
    let from = days.first.saturating_mul(MS_PER_DAY);
    let to = days.last.saturating_add(1).saturating_mul(MS_PER_DAY);
    let mut rows = statement.query(params![key, from, to])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(UserModelDay {
            user_hash: row.get(0)?,
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
