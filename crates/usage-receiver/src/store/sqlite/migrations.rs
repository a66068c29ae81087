//! The SQLite schema: migrations applied in order, counted by `PRAGMA user_version`.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::ReceiverStoreError;

/// Migrations, applied in order (`migrations/*.sql`, each file says why it exists);
/// `PRAGMA user_version` counts those applied. Append only: never edit one that has
/// shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_schema.sql"),
    include_str!("migrations/0002_daily_rollups.sql"),
    include_str!("migrations/0003_events_by_arrival.sql"),
    include_str!("migrations/0004_rollup_token_kinds.sql"),
    include_str!("migrations/0005_install_labels.sql"),
    include_str!("migrations/0006_budgets_alerts.sql"),
    include_str!("migrations/0007_event_origins.sql"),
    include_str!("migrations/0008_plan_history.sql"),
    include_str!("migrations/0009_usage_versions.sql"),
];

/// Applies the migrations not applied yet; refuses a schema newer than this build knows.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), ReceiverStoreError> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if applied > MIGRATIONS.len() {
        return Err(ReceiverStoreError::SchemaTooNew {
            found: applied as i64,
            known: MIGRATIONS.len() as i64,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}
