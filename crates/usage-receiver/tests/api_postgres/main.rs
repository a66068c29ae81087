//! The receiver on PostgreSQL: the HTTP API tests of `tests/api` again, each on a fresh
//! database of a throwaway cluster this binary starts (`initdb` in a temp dir, stopped when
//! the binary ends), and the tests of a fleet: two receiver nodes on one database.

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Postgres;

/// The `usage-receiver` binary of this build.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_usage-receiver")
}

#[path = "../api/budgets.rs"]
mod budgets;
#[path = "../support/test_receiver.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod common;
mod fleet;
#[path = "../api/ingest.rs"]
mod ingest;
#[path = "../api/metrics.rs"]
mod metrics;
mod plan_migration;
#[path = "../api/provider.rs"]
mod provider;
#[path = "../api/revenue.rs"]
mod revenue;
#[path = "../support/mod.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod support;
