//! `GET /v1/status` (the sync status object of docs/reference/local-api.md) and `GET /healthz`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use chrono::Utc;
use serde_json::{Value, json};

use super::ApiError;
use crate::state::SharedState;
use crate::store::health::StorageState;
use crate::store::status::{QueueCounts, SyncMeta};
use usage_protocol::event::format_millis;

/// Error categories of the wire protocol, always listed in status even when zero.
pub const ERROR_CATEGORIES: [&str; 5] = [
    "network",
    "authentication",
    "server",
    "validation",
    "rate_limit",
];

pub async fn healthz() -> Json<Value> {
    Json(json!({"ok": true}))
}

pub async fn status(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let now_ms = Utc::now().timestamp_millis();
    let read = super::read(&state, move |store| {
        Ok((
            store.queue_counts()?,
            store.sync_meta()?,
            store.sync_error_counts(now_ms)?,
            store.db_bytes()?,
        ))
    })
    .await;
    let storage = state.writer.storage().get();
    // A database that fails on damage still gets a status answer, `failing`, so
    // monitoring sees why; the figures it could not read are `null`.
    let (readable, (counts, meta, errors, db_bytes)) = match read {
        Ok(stored) => (true, stored),
        Err(_) if matches!(storage, StorageState::Failing { .. }) => (false, Default::default()),
        Err(error) => return Err(error),
    };
    let config = &state.config;
    let sync_possible = config.tracking_enabled && config.sync_active();
    let progress = state.sync.as_ref().map(|engine| engine.progress(now_ms));
    let oldest_pending_age_s = counts
        .oldest_pending_ms
        .map_or(0, |at| (now_ms - at).max(0) / 1000) as u64;
    let health = health(&Health {
        sync_possible,
        counts,
        meta: &meta,
        oldest_pending_age_s,
        interval_secs: config.sync.interval_secs,
        storage: &storage,
        paced: meta.last_run_rate_limited
            || progress.is_some_and(|p| p.rate_limited_until_ms.is_some()),
    });
    let mut categories = serde_json::Map::new();
    for category in ERROR_CATEGORIES {
        let n = errors
            .iter()
            .find(|(c, _)| c == category)
            .map_or(0, |(_, n)| *n);
        categories.insert(category.into(), n.into());
    }
    let next_sync_ms = state.next_sync_ms.load(Ordering::Relaxed);
    let mut body = json!({
        "status": health,
        "install_id": state.identity.as_ref().map(|i| i.install_id.clone()),
        "version": env!("CARGO_PKG_VERSION"),
        "tracking_enabled": config.tracking_enabled,
        "sync_enabled": config.sync_active(),
        "enrolled": meta.enrolled_ms.is_some()
            || state.identity.as_ref().is_some_and(|i| i.enrolled_at.is_some()),
        "pending_events": counts.pending,
        "failed_events": counts.failed,
        "synced_events": counts.synced,
        "oldest_pending_age_s": oldest_pending_age_s,
        "consecutive_failures": meta.consecutive_failures,
        "last_sync": meta.last_success_ms.map(format_millis),
        "last_attempt": meta.last_attempt_ms.map(format_millis),
        "next_sync": (next_sync_ms > 0).then(|| format_millis(next_sync_ms)),
        "last_error": meta.last_error,
        "error_categories": categories,
        "db_bytes": db_bytes,
        "uptime_s": state.started.elapsed().as_secs(),
        "storage": storage,
        "sync": {
            "running": progress.is_some_and(|p| p.running),
            "batch_size": progress.map_or(config.sync.batch_size, |p| p.batch_size),
            "rate_limited_until": progress
                .and_then(|p| p.rate_limited_until_ms)
                .map(format_millis),
            "last_run_rate_limited": meta.last_run_rate_limited,
        },
    });
    // The site's quota state, only when limits are set (users' limits are per user: ask
    // `GET /v1/quota` for one).
    if let Some(limits) = state.quota.site_state(Utc::now()) {
        body["quota"] = json!({
            "site_limits": limits,
            "holds": state.quota.open_holds(Utc::now()),
        });
    }
    if !readable {
        for key in UNREADABLE_FIELDS {
            body[key] = Value::Null;
        }
    }
    Ok(Json(body))
}

/// The fields read from the database, `null` when it cannot be read.
const UNREADABLE_FIELDS: [&str; 10] = [
    "pending_events",
    "failed_events",
    "synced_events",
    "oldest_pending_age_s",
    "consecutive_failures",
    "last_sync",
    "last_attempt",
    "last_error",
    "error_categories",
    "db_bytes",
];

/// The inputs of the health word.
pub struct Health<'a> {
    /// Tracking on, sync on and a backend configured.
    pub sync_possible: bool,
    pub counts: QueueCounts,
    pub meta: &'a SyncMeta,
    pub oldest_pending_age_s: u64,
    pub interval_secs: u64,
    /// `failing` storage makes the status `failing`, `recovered` storage at
    /// least `degraded`, whatever sync says (even `disabled`).
    pub storage: &'a StorageState,
    /// The backend is pacing the agent (a `Retry-After` still ahead, or the last run
    /// stopped on the rate limit): events then wait for the backend, not for a fault,
    /// so their age alone does not make the status `degraded`.
    pub paced: bool,
}

/// `healthy`, `pending`, `degraded`, `failing` or `disabled`, as docs/reference/local-api.md
/// defines them, raised by the storage state.
pub fn health(h: &Health) -> &'static str {
    match (h.storage, sync_health(h)) {
        (StorageState::Failing { .. }, _) | (_, "failing") => "failing",
        (StorageState::Recovered { .. }, _) => "degraded",
        (StorageState::Ok, sync) => sync,
    }
}

fn sync_health(h: &Health) -> &'static str {
    if !h.sync_possible {
        return "disabled";
    }
    let last_failed_category = h
        .meta
        .last_error
        .as_ref()
        .filter(|_| h.meta.last_run_failed)
        .map(|e| e.category.as_str());
    if h.meta.consecutive_failures >= 3 || last_failed_category == Some("authentication") {
        return "failing";
    }
    if last_failed_category.is_some()
        || h.counts.failed > 0
        || (h.oldest_pending_age_s > 3 * h.interval_secs && !h.paced)
    {
        return "degraded";
    }
    if h.counts.pending > 0 {
        return "pending";
    }
    "healthy"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::status::LastError;

    fn failed(category: &str, consecutive: u32) -> SyncMeta {
        SyncMeta {
            consecutive_failures: consecutive,
            last_run_failed: true,
            last_error: Some(LastError {
                category: category.into(),
                message: "x".into(),
                at: "2026-11-27T10:30:00Z".into(),
            }),
            ..SyncMeta::default()
        }
    }

    #[test]
    fn health_follows_the_spec_table() {
        let pending = QueueCounts {
            pending: 3,
            ..QueueCounts::default()
        };
        let with_failed = QueueCounts {
            failed: 1,
            ..QueueCounts::default()
        };
        let ok = SyncMeta::default();
        let cases: Vec<(bool, QueueCounts, SyncMeta, u64, &str)> = vec![
            (false, pending, failed("network", 5), 0, "disabled"),
            (true, QueueCounts::default(), ok.clone(), 0, "healthy"),
            (true, pending, ok.clone(), 10, "pending"),
            (true, pending, ok.clone(), 901, "degraded"),
            (true, with_failed, ok.clone(), 0, "degraded"),
            (true, pending, failed("network", 1), 0, "degraded"),
            (true, pending, failed("server", 3), 0, "failing"),
            (true, pending, failed("authentication", 1), 0, "failing"),
        ];
        for (possible, counts, meta, age, expected) in cases {
            let got = health(&Health {
                sync_possible: possible,
                counts,
                meta: &meta,
                oldest_pending_age_s: age,
                interval_secs: 300,
                storage: &StorageState::Ok,
                paced: false,
            });
            assert_eq!(got, expected, "{counts:?} {meta:?} age {age}");
        }
    }

    #[test]
    fn a_paced_agent_is_pending_however_old_its_backlog() {
        let pending = QueueCounts {
            pending: 20_000,
            ..QueueCounts::default()
        };
        let with_failed = QueueCounts {
            failed: 1,
            ..pending
        };
        let paced_run = SyncMeta {
            last_run_rate_limited: true,
            ..SyncMeta::default()
        };
        let cases: Vec<(QueueCounts, &SyncMeta, bool, &str)> = vec![
            (pending, &paced_run, true, "pending"),
            (pending, &paced_run, false, "degraded"),
            // Pacing excuses age only: failed events and failed runs still count.
            (with_failed, &paced_run, true, "degraded"),
        ];
        let failed_run = failed("network", 1);
        let cases = cases
            .into_iter()
            .chain([(pending, &failed_run, true, "degraded")]);
        for (counts, meta, paced, expected) in cases {
            let got = health(&Health {
                sync_possible: true,
                counts,
                meta,
                oldest_pending_age_s: 100_000,
                interval_secs: 300,
                storage: &StorageState::Ok,
                paced,
            });
            assert_eq!(got, expected, "{counts:?} {meta:?} paced {paced}");
        }
    }

    #[test]
    fn storage_raises_the_health_whatever_sync_says() {
        let recovered = StorageState::Recovered {
            at: "2026-11-29T21:00:00.000Z".into(),
            damaged_file: "/x".into(),
            events_recovered: 1,
        };
        let failing = StorageState::Failing {
            at: "2026-11-29T21:00:00.000Z".into(),
            message: "disk I/O error".into(),
        };
        let ok = SyncMeta::default();
        let cases: Vec<(bool, SyncMeta, &StorageState, &str)> = vec![
            (false, ok.clone(), &recovered, "degraded"),
            (true, ok.clone(), &recovered, "degraded"),
            (true, failed("server", 3), &recovered, "failing"),
            (false, ok.clone(), &failing, "failing"),
            (true, ok.clone(), &failing, "failing"),
            (true, ok.clone(), &StorageState::Ok, "healthy"),
        ];
        for (possible, meta, storage, expected) in cases {
            let got = health(&Health {
                sync_possible: possible,
                counts: QueueCounts::default(),
                meta: &meta,
                oldest_pending_age_s: 0,
                interval_secs: 300,
                storage,
                paced: false,
            });
            assert_eq!(got, expected, "{storage:?} {meta:?}");
        }
    }
}
