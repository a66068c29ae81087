//! Shipping events to the backend: wire types and signing (shared with the receiver).

pub mod signing;
pub mod wire;

/// Installs the process-wide TLS crypto provider (ring) that reqwest needs before any
/// client is built. Safe to call many times.
pub fn install_tls_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
