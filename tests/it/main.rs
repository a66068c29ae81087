//! Integration tests of the agent: one binary, one module per area, through the real
//! socket and, end to end, a real receiver (the receiver's own HTTP tests are its crate's,
//! `crates/usage-receiver/tests`). The end-to-end sync tests run again on PostgreSQL in
//! `tests/postgres`.

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Sqlite;

mod agent;
#[path = "../../crates/usage-receiver/tests/support/test_receiver.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod common;
mod damage;
mod demo;
mod hardening_agent;
mod hardening_receiver;
mod harness;
mod install_doc;
mod interop;
mod jobs;
mod layers;
mod limits;
mod loadgen;
mod openapi;
mod ops;
mod queue;
mod quota;
mod secrets;
#[path = "../../crates/usage-receiver/tests/support/mod.rs"]
// Shared by several test binaries, each using only some of it.
#[allow(dead_code)]
mod shared;
mod site_build;
mod sync;
