//! Integration tests: one binary, one module per area.

mod agent;
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
mod ops;
mod provider;
mod receiver;
mod sync;
