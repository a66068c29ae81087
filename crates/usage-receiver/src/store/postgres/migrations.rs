//! The PostgreSQL schema: `.sql` files applied in order, each once, under a database-wide
//! advisory lock, so receiver nodes starting at the same moment apply each one once.
//! `schema_migrations` records those applied. Append only: never edit a shipped file.

use deadpool_postgres::Object;

use crate::store::ReceiverStoreError;

/// The migrations this build knows, numbered from 1.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_schema.sql"),
    include_str!("migrations/0002_rollup_token_kinds.sql"),
    include_str!("migrations/0003_install_labels.sql"),
    include_str!("migrations/0004_budgets_alerts.sql"),
    include_str!("migrations/0005_view_versions_daily_totals.sql"),
    include_str!("migrations/0006_rollup_hot_updates.sql"),
    include_str!("migrations/0007_event_origins.sql"),
    include_str!("migrations/0008_plan_history.sql"),
];

/// Key of the advisory lock held while migrating (any constant the receiver owns).
const MIGRATION_LOCK: i64 = 0x7573_6167_655f_6d67; // "usage_mg"

/// Applies the migrations not applied yet; refuses a schema newer than this build knows.
pub(super) async fn migrate(client: &mut Object) -> Result<(), ReceiverStoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let outcome = apply(client).await;
    // The lock is the session's: release it before the connection goes back to the pool.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    outcome
}

async fn apply(client: &mut Object) -> Result<(), ReceiverStoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let applied: i64 = client
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        return Err(ReceiverStoreError::SchemaTooNew {
            found: applied,
            known,
        });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(applied as usize) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "applied a receiver schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::store::ReceiverStore;
    use crate::store::fixtures::{enroll, event};
    use crate::store::postgres::test_node;

    #[test]
    fn a_rollup_row_added_to_again_is_updated_in_place_touching_no_index() {
        let store = test_node();
        let install = enroll(&store, "a");
        let day_ms = 20_000 * crate::days::MS_PER_DAY;
        for n in 0..5 {
            store
                .ingest(install.key, vec![event(n, day_ms)], 1)
                .unwrap();
        }
        // Four of the five batches add to the same rollup row. A backend reports its
        // table statistics within about a second of going idle.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let hot_updates: i64 = store
                .run(async |store| {
                    let client = store.client().await?;
                    let row = client
                        .query_one(
                            "SELECT n_tup_hot_upd FROM pg_stat_user_tables
                             WHERE relname = 'daily_usage'",
                            &[],
                        )
                        .await?;
                    Ok(row.get(0))
                })
                .unwrap();
            if hot_updates == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{hot_updates} of 4 rollup updates were HOT"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
