//! usage-agent: meters AI token usage beside a website and ships it, signed, to a backend.
//!
//! Modules in reading order: the site's side of the domain ([`config`], [`identity`]; the
//! event rules are `usage-protocol`'s), the durable log ([`store`]), the local API and
//! daemon ([`api`], [`daemon`]), the local [`quota`]s, its scheduled jobs ([`jobs`]) and [`metrics`], shipping
//! to the backend ([`sync`]) and the command line ([`cli`]). The receiver is a crate of its
//! own, `usage-receiver`, linked in only with the `receiver` feature (`demo`, `receiver`,
//! `prices`).

pub mod api;
pub mod calendar;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod jobs;
pub mod metrics;
pub mod quota;
pub mod state;
pub mod store;
pub mod sync;
