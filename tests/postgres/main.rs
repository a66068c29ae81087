//! The receiver on PostgreSQL: the receiver's HTTP tests, the provider views and the
//! end-to-end agent tests of `tests/it` again, each on a fresh database of a throwaway
//! cluster this binary starts (`initdb` in a temp dir, stopped when the binary ends), and
//! the tests of a fleet: two receiver nodes on one database.

// The helpers of `tests/it` serve more modules than this binary includes.
#![allow(dead_code)]

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Postgres;

#[path = "../it/budgets.rs"]
mod budgets;
#[path = "../it/common.rs"]
mod common;
mod fleet;
#[path = "../it/harness.rs"]
mod harness;
#[path = "../it/provider.rs"]
mod provider;
#[path = "../it/receiver.rs"]
mod receiver;
#[path = "../it/sync.rs"]
mod sync;
