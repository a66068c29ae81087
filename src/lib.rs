//! usage-agent: meters AI token usage beside a website and ships it, signed, to a backend.
//!
//! Modules in reading order: the domain ([`event`], [`config`], [`identity`]), the durable
//! log ([`store`]), the local API and daemon ([`api`], [`daemon`]), its scheduled jobs
//! ([`jobs`]) and [`metrics`], shipping to the backend ([`sync`]), the bundled backend ([`receiver`]) and
//! the command line ([`cli`]).

pub mod api;
pub mod calendar;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod event;
mod gather_vfs;
pub mod identity;
pub mod jobs;
pub mod metrics;
mod private_file;
pub mod protocol;
pub mod receiver;
pub mod server;
mod sqlite_check;
pub mod state;
pub mod store;
pub mod sync;
mod toml_place;
