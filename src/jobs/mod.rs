//! Scheduled jobs of the daemon. Each job separates *when* (the loop here, with its timing
//! and skipped ticks) from *what* (a `run_once` that returns an outcome and is tested
//! directly). Jobs reach the database only through the store's writer and their own
//! read connections; they never touch the API's.

pub mod maintenance;
pub mod retention;
pub mod rollup;
pub mod schedule;
pub mod sync;
