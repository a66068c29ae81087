//! Raw events partitioned by UTC day: the partitions of the days a receiver may be sent
//! are made ahead, and those past retention dropped whole, so retention never deletes
//! row by row from the events table.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;

use super::MS_PER_DAY;
use crate::days::day_number;
use crate::store::{ReceiverStoreError, RetainedDays};

/// Partitions made past today: an event may be dated up to 5 minutes ahead, and a day
/// of margin covers a maintenance run missed.
const DAYS_AHEAD: i64 = 2;

/// Key of the advisory lock that makes two nodes take turns changing partitions.
const PARTITION_LOCK: i64 = 0x7573_6167_655f_7074; // "usage_pt"

/// Makes the missing partitions of `days.first_kept ..= days.today + DAYS_AHEAD` and
/// drops those of earlier days; returns how many events were dropped with them.
pub(super) async fn maintain(
    client: &mut Object,
    days: RetainedDays,
) -> Result<u64, ReceiverStoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await?;
    // Dropping a partition locks the whole table: give up rather than hold ingest behind
    // a long query; the next run tries again.
    tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let existing: BTreeSet<i64> = tx
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'events'::regclass",
            &[],
        )
        .await?
        .iter()
        .filter_map(|row| day_of(row.get(0)))
        .collect();
    let mut dropped = 0;
    for &day in existing.range(..days.first_kept) {
        let name = partition_name(day);
        let rows: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
            .await?
            .get(0);
        tx.batch_execute(&format!("DROP TABLE {name}")).await?;
        dropped += u64::try_from(rows).unwrap_or(0);
    }
    for day in days.first_kept..=days.today + DAYS_AHEAD {
        if existing.contains(&day) {
            continue;
        }
        let (from, to) = (day * MS_PER_DAY, (day + 1) * MS_PER_DAY);
        // Events of a day with no partition yet wait in the default partition; a new
        // partition may not take rows from it, so that day stays there (still counted,
        // and deleted below once past retention).
        let stranded: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM events_default
                                WHERE created_at >= $1 AND created_at < $2)",
                &[&from, &to],
            )
            .await?
            .get(0);
        if stranded {
            tracing::warn!(day, "events of this day are in the default partition");
            continue;
        }
        tx.batch_execute(&format!(
            "CREATE TABLE {} PARTITION OF events FOR VALUES FROM ({from}) TO ({to})",
            partition_name(day)
        ))
        .await?;
    }
    let cutoff = days.first_kept.saturating_mul(MS_PER_DAY);
    dropped += tx
        .execute(
            "DELETE FROM events_default WHERE created_at < $1",
            &[&cutoff],
        )
        .await?;
    tx.commit().await?;
    Ok(dropped)
}

/// `events_YYYYMMDD` for a day since the Unix epoch.
fn partition_name(day: i64) -> String {
    let date = DateTime::<Utc>::from_timestamp(day * 86_400, 0)
        .map(|t| t.format("%Y%m%d").to_string())
        .unwrap_or_else(|| "invalid".to_owned());
    format!("events_{date}")
}

/// The day a partition named by [`partition_name`] holds; `None` for any other table.
fn day_of(name: &str) -> Option<i64> {
    let date = name.strip_prefix("events_")?;
    let date = chrono::NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    Some(day_number(date))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_to_their_day() {
        assert_eq!(partition_name(0), "events_19700101");
        let day = 20_786; // 2026-11-29
        assert_eq!(partition_name(day), "events_20261129");
        assert_eq!(day_of("events_20261129"), Some(day));
        assert_eq!(day_of("events_default"), None);
    }
}
