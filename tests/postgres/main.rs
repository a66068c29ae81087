//! The agent's end-to-end sync tests of `tests/it` again, against a receiver on PostgreSQL:
//! each on a fresh database of a throwaway cluster this binary starts (`initdb` in a temp
//! dir, stopped when the binary ends). The receiver's own PostgreSQL tests, the fleet's
//! among them, are its crate's (`crates/usage-receiver/tests/api_postgres`).

// The helpers of `tests/it` serve more modules than this binary includes.
#![allow(dead_code)]

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Postgres;

#[path = "../../crates/usage-receiver/tests/support/test_receiver.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod common;
#[path = "../it/harness.rs"]
mod harness;
#[path = "../../crates/usage-receiver/tests/support/mod.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod shared;
#[path = "../it/sync.rs"]
mod sync;
