//! The PostgreSQL schema: `.sql` files applied in order, each once, under a database-wide
//! advisory lock, so receiver nodes starting at the same moment apply each one once.
//! `schema_migrations` records those applied. Append only: never edit a shipped file.

use deadpool_postgres::Object;

use crate::receiver::store::ReceiverStoreError;

/// The migrations this build knows, numbered from 1.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_schema.sql"),
    include_str!("migrations/0002_rollup_token_kinds.sql"),
    include_str!("migrations/0003_install_labels.sql"),
    include_str!("migrations/0004_budgets_alerts.sql"),
    include_str!("migrations/0005_view_versions_daily_totals.sql"),
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
