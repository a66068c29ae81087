//! What the workspace's tests and benchmarks need and production code must not carry: a
//! throwaway PostgreSQL cluster ([`throwaway`]), started in a temp dir and stopped on drop,
//! and headless Chromium ([`chromium`]).

pub mod chromium;
pub mod throwaway;

pub use throwaway::{ClusterOptions, Durability, ServerTls, ThrowawayCluster};
