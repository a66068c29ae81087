//! Shipping events to the backend (docs/reference/wire-protocol.md).
//!
//! The wire types and the signing it uses are [`usage_protocol`]'s, shared with the
//! receiver. This module is the agent side only: [`client`] (one signed HTTP attempt), [`error`] (categories that decide retries),
//! [`enroll`] (handing the secret to the backend once) and [`engine`] (one sync run over
//! the queue). Scheduling runs is `crate::jobs`' business, not this module's.

pub mod client;
pub mod engine;
pub mod enroll;
pub mod error;

/// Installs the process-wide TLS crypto provider (ring) that reqwest needs before any
/// client is built. Safe to call many times.
pub fn install_tls_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
