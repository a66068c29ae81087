//! Receiver integration tests.
