//! Why one attempt to ship a batch failed, and what that means for retrying.
//!
//! The retry decision comes from [`SyncError::category`] (and [`SyncError::is_retryable`]),
//! never from message text. Messages say what happened in one sentence and never contain
//! the install secret or a bearer token.

use std::time::Duration;

use serde::Serialize;

use crate::store::StoreError;

/// The error categories of the wire protocol, plus `local` for a failure of the agent's own
/// database (which is no backend's fault and is not counted in status `error_categories`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Connect, DNS, TLS, timeout, reset: retried with backoff.
    Network,
    /// 5xx or an unreadable answer: retried with backoff.
    Server,
    /// 429: retried after max(backoff, Retry-After).
    RateLimit,
    /// 401 or 403: the run stops at once, every event is kept.
    Authentication,
    /// 400, 413, 415 or 422 for a batch: the batch is split to isolate the bad events.
    Validation,
    /// The agent's own database failed while syncing.
    Local,
}

impl Category {
    /// Every category, in the order status lists them.
    pub const ALL: [Category; 6] = [
        Category::Network,
        Category::Server,
        Category::RateLimit,
        Category::Authentication,
        Category::Validation,
        Category::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Network => "network",
            Category::Server => "server",
            Category::RateLimit => "rate_limit",
            Category::Authentication => "authentication",
            Category::Validation => "validation",
            Category::Local => "local",
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed attempt (or a failure that stops the run).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the backend: {0}")]
    Network(String),
    #[error("the backend failed ({status}): {message}")]
    Server { status: u16, message: String },
    #[error("the backend's answer could not be read: {0}")]
    BadAnswer(String),
    #[error("the backend is rate limiting this install: {message}")]
    RateLimited {
        /// The `Retry-After` the backend asked for, if any.
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("the backend refused this install ({status}): {message}")]
    Authentication { status: u16, message: String },
    #[error("no install identity yet: run `usage-agent init --site-url URL` first")]
    NoIdentity,
    #[error("the backend refused the batch ({status}): {message}")]
    Validation { status: u16, message: String },
    #[error("the agent database failed while syncing: {0}")]
    Store(#[from] StoreError),
    #[error("a sync task failed: {0}")]
    Task(String),
}

impl SyncError {
    /// The error category that decides what happens next.
    pub fn category(&self) -> Category {
        match self {
            SyncError::Network(_) => Category::Network,
            SyncError::Server { .. } | SyncError::BadAnswer(_) => Category::Server,
            SyncError::RateLimited { .. } => Category::RateLimit,
            SyncError::Authentication { .. } | SyncError::NoIdentity => Category::Authentication,
            SyncError::Validation { .. } => Category::Validation,
            SyncError::Store(_) | SyncError::Task(_) => Category::Local,
        }
    }

    /// Whether another attempt of the same batch may succeed (with backoff).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.category(),
            Category::Network | Category::Server | Category::RateLimit
        )
    }

    /// The wait the backend asked for (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SyncError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status of a whole-batch refusal, for the 413 rule.
    pub fn status(&self) -> Option<u16> {
        match self {
            SyncError::Server { status, .. }
            | SyncError::Authentication { status, .. }
            | SyncError::Validation { status, .. } => Some(*status),
            SyncError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_decide_retries() {
        let cases: Vec<(SyncError, &str, bool)> = vec![
            (SyncError::Network("reset".into()), "network", true),
            (
                SyncError::Server {
                    status: 503,
                    message: "x".into(),
                },
                "server",
                true,
            ),
            (SyncError::BadAnswer("not json".into()), "server", true),
            (
                SyncError::RateLimited {
                    retry_after: None,
                    message: "x".into(),
                },
                "rate_limit",
                true,
            ),
            (
                SyncError::Authentication {
                    status: 401,
                    message: "x".into(),
                },
                "authentication",
                false,
            ),
            (SyncError::NoIdentity, "authentication", false),
            (
                SyncError::Validation {
                    status: 422,
                    message: "x".into(),
                },
                "validation",
                false,
            ),
            (SyncError::Store(StoreError::WriterGone), "local", false),
        ];
        for (error, category, retryable) in cases {
            assert_eq!(error.category().as_str(), category, "{error}");
            assert_eq!(error.is_retryable(), retryable, "{error}");
        }
    }
}
