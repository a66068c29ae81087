//! The fault suite: the real agent binary and a real receiver under crashes, a full disk, a
//! misbehaving network and slow clients, each test asserting that nothing acknowledged is
//! lost and nothing is counted twice. `README.md` beside this file says what each fault
//! proves and how to run one.

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Sqlite;

// The integration tests' helpers, shared as they are; this binary uses only some of them.
#[allow(dead_code)]
#[path = "../../crates/usage-receiver/tests/support/test_receiver.rs"]
mod common;
#[allow(dead_code)]
#[path = "../it/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../../crates/usage-receiver/tests/support/mod.rs"]
mod shared;

mod database;
mod disk_full;
mod kill9;
mod network;
mod proxy;
mod receiver_kill9;
mod slow_clients;
mod support;
