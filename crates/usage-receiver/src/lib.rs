//! usage-receiver, the backend of usage-agent: verifies, dedupes and stores the signed
//! batches agents send, and answers the provider (usage, cost, revenue and profit per
//! install, budgets and alerts, the dashboard), on SQLite or on PostgreSQL for a fleet.
//!
//! **Invariant:** it shares with the agent only `usage-protocol` (the event rules, the wire
//! types, the signing) and the leaves of `usage-common`; no state, store or configuration.
//!
//! Code map, from the top: [`cli`] is the command line; [`server`] holds the route table,
//! the serve loop and `GET /health`; the handlers are [`ingest`] (batches and enrollment),
//! [`views`] (what the provider reads: usage, installations, prices, alerts, the dashboard)
//! and [`admin`] (what the provider changes: plans, labels, budgets, erasure); [`http`] is
//! what handlers share (errors, credentials, CSV answers, clipping values for logs);
//! [`budgets`] checks budgets after each batch and delivers alerts; [`state`] is what
//! handlers share at run time; [`metrics`] counts what the node does for `GET /metrics`;
//! [`settings`] reads the environment; [`store`] is the storage
//! trait with its SQLite and PostgreSQL implementations (all SQL) and the per-install
//! request rate; [`billing`] is the money arithmetic and the price book; [`days`] converts
//! UTC days.

pub mod admin;
pub mod billing;
pub mod budgets;
pub mod cli;
pub mod days;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod server;
pub mod settings;
pub mod state;
pub mod store;
pub mod views;

pub use server::{open_postgres, open_sqlite, router, serve};
pub use settings::{ReceiverSettings, SettingsError};
pub use state::ReceiverState;
pub use store::{EVENT_RETENTION, ReceiverStore, ReceiverStoreError};
