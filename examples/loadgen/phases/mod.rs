//! One module per kind of measurement. Each runs its phase and returns what it measured;
//! which phases run, in which order, and how their results become figures is `bench`'s
//! business (in `main.rs`).

pub(crate) mod drain;
pub(crate) mod fleet;
pub(crate) mod fsync_floor;
pub(crate) mod http_ceiling;
pub(crate) mod ingest;
pub(crate) mod peer;
pub(crate) mod quota;
pub(crate) mod sqlite_limit;
