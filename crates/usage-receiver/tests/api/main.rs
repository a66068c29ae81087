//! The receiver's HTTP API, one module per subject: ingest and enrollment, the provider's
//! views, revenue and plan history, budgets and alerts. A real receiver on a loopback
//! port, on SQLite; the same modules run on PostgreSQL in `tests/api_postgres`.

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Sqlite;

/// The `usage-receiver` binary of this build.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_usage-receiver")
}

mod budgets;
#[path = "../support/test_receiver.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod common;
mod dashboard;
mod edges;
mod ingest;
mod logging;
mod metrics;
mod provider;
mod revenue;
#[path = "../support/mod.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod support;
