//! Integration tests: one binary, one module per area.

mod agent;
mod common;
mod demo;
mod harness;
mod interop;
mod jobs;
mod layers;
mod loadgen;
mod ops;
mod provider;
mod receiver;
mod sync;
