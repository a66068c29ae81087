//! Integration tests: one binary, one module per area. The receiver's HTTP tests and the
//! end-to-end agent tests run again on PostgreSQL in `tests/postgres`.

/// The store the test receivers of this binary use.
pub const RECEIVER_STORE: usage_receiver::store::StoreKind =
    usage_receiver::store::StoreKind::Sqlite;

mod agent;
mod budgets;
mod common;
mod damage;
mod demo;
mod hardening_agent;
mod hardening_receiver;
mod harness;
mod interop;
mod jobs;
mod layers;
mod limits;
mod loadgen;
mod openapi;
mod ops;
mod provider;
mod receiver;
mod site_build;
mod sync;
