//! The SQLite statements of what the dashboard reads besides the installations view: the
//! fleet's tokens per model and day (its cost chart) and one install's usage per user.

use rusqlite::{Connection, params};

use super::{install_key, token_counts};
use crate::billing::pricing::{ModelDayTokens, TokenCounts};
use crate::days::MS_PER_DAY;
use crate::store::{DayRange, ReceiverStoreError, UserModelDay};

/// [`crate::store::ReceiverStore::fleet_model_days`]: one range scan of the rollup's
/// by-day index (it covers every column read), summed here by model and day: SQLite's
/// grouping would sort every row first, several times slower. Models are compared as read,
/// so a row allocates nothing.
pub(super) fn fleet_model_days(
    conn: &Connection,
    days: DayRange,
) -> Result<Vec<ModelDayTokens>, ReceiverStoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT day, model, prompt_tokens, completion_tokens, cached_tokens,
                cache_write_tokens, reasoning_tokens
         FROM daily_usage WHERE day >= ?1 AND day <= ?2",
    )?;
    let mut rows = statement.query(params![days.first, days.last])?;
    // Rows come in day order; each day's models are few, so a short list per day.
    let mut out: Vec<ModelDayTokens> = Vec::new();
    let mut day_start = 0;
    while let Some(row) = rows.next()? {
        let day: i64 = row.get(0)?;
        if out.get(day_start).is_some_and(|first| first.day != day) {
            day_start = out.len();
        }
        let model = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
        let tokens = token_counts(row, 2)?;
        let index = match out[day_start..].iter().position(|d| d.model == model) {
            Some(at) => day_start + at,
            None => {
                out.push(ModelDayTokens {
                    model: model.to_owned(),
                    day,
                    tokens: TokenCounts::default(),
                });
                out.len() - 1
            }
        };
        let sum = &mut out[index].tokens;
        sum.prompt = sum.prompt.saturating_add(tokens.prompt);
        sum.completion = sum.completion.saturating_add(tokens.completion);
        sum.cached = sum.cached.saturating_add(tokens.cached);
        sum.cache_write = sum.cache_write.saturating_add(tokens.cache_write);
        sum.reasoning = sum.reasoning.saturating_add(tokens.reasoning);
    }
    out.sort_unstable_by(|a, b| (&a.model, a.day).cmp(&(&b.model, b.day)));
    Ok(out)
}

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
