//! usage-agent: meters AI token usage beside a website and ships it, signed, to a backend.
//!
//! Modules in reading order: the domain ([`event`], [`config`], [`identity`]), the durable
//! log ([`store`]), the local API and daemon ([`api`], [`daemon`]), its scheduled jobs
//! ([`jobs`]) and [`metrics`], shipping to the backend ([`sync`]), the bundled backend ([`receiver`]) and
//! the command line ([`cli`]).

pub mod event;
pub mod config;
pub mod identity;
pub mod store;
pub mod api;
pub mod daemon;
pub mod jobs;
pub mod metrics;
pub mod sync;
pub mod receiver;
pub mod cli;
