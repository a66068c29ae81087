//! Integration tests: one binary, one module per area.

mod agent;
mod common;
mod harness;
mod receiver;
