//! The storage state that status shows: `ok`, `recovered` after a start that
//! found the database damaged and salvaged it, or `failing` after a read or write that
//! failed on damage or I/O.
//!
//! `recovered` is kept in `meta` (key `storage`), so it outlasts restarts until
//! `usage-agent check` finds the database sound. `failing` lives only in memory: a
//! database that just failed a write is no place to record that it failed; the next
//! start's `quick_check` looks at the file again.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use usage_protocol::event::format_millis;

const STORAGE_META_KEY: &str = "storage";

/// The `storage` object of status, in the shape `GET /v1/status` documents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum StorageState {
    #[default]
    Ok,
    Recovered {
        /// RFC 3339 time of the recovery.
        at: String,
        /// Where the damaged file was moved.
        damaged_file: String,
        events_recovered: u64,
    },
    Failing {
        /// RFC 3339 time of the first failure since the state was last `ok`/`recovered`.
        at: String,
        /// The failure, as SQLite named it.
        message: String,
    },
}

/// The daemon's current storage state, shared by the writer thread (which marks failed
/// writes), the API and the check.
#[derive(Debug, Default)]
pub struct StorageHealth {
    state: Mutex<StorageState>,
}

impl StorageHealth {
    pub fn new(state: StorageState) -> StorageHealth {
        StorageHealth {
            state: Mutex::new(state),
        }
    }

    pub fn get(&self) -> StorageState {
        self.lock().clone()
    }

    pub fn set(&self, state: StorageState) {
        *self.lock() = state;
    }

    /// Records a failure if `error` is damage or I/O (not a full disk, an overload or a
    /// stopped writer); returns whether it was. The first failure is kept: it is the one
    /// that says what went wrong.
    pub fn observe(&self, error: &StoreError) -> bool {
        if !error.is_damage() {
            return false;
        }
        let mut state = self.lock();
        if !matches!(*state, StorageState::Failing { .. }) {
            tracing::error!(%error, "the database failed on damage or I/O; storage state is now failing (run `usage-agent check`)");
            *state = StorageState::Failing {
                at: format_millis(chrono::Utc::now().timestamp_millis()),
                message: error.to_string(),
            };
        }
        true
    }

    /// Sets `failing` because a check found damage.
    pub fn fail(&self, message: String) {
        *self.lock() = StorageState::Failing {
            at: format_millis(chrono::Utc::now().timestamp_millis()),
            message,
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StorageState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// The storage state recorded in this database (`ok` when none is).
    pub fn storage_state(&self) -> Result<StorageState, StoreError> {
        Ok(self
            .meta(STORAGE_META_KEY)?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
    }

    /// Records the storage state; `ok` (and `failing`, which is never kept) removes it.
    pub fn set_storage_state(&self, state: &StorageState) -> Result<(), StoreError> {
        match state {
            StorageState::Recovered { .. } => {
                let text = serde_json::to_string(state).expect("StorageState always serializes");
                self.set_meta(STORAGE_META_KEY, &text)
            }
            StorageState::Ok | StorageState::Failing { .. } => self.delete_meta(STORAGE_META_KEY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    #[test]
    fn the_states_have_the_spec_shape_and_recovered_is_kept() {
        let recovered = StorageState::Recovered {
            at: "2026-11-29T21:00:00.000Z".into(),
            damaged_file: "/data/usage.db.damaged-1".into(),
            events_recovered: 7,
        };
        assert_eq!(
            serde_json::to_value(&recovered).unwrap(),
            serde_json::json!({"state": "recovered", "at": "2026-11-29T21:00:00.000Z",
                "damaged_file": "/data/usage.db.damaged-1", "events_recovered": 7})
        );
        assert_eq!(
            serde_json::to_value(StorageState::Ok).unwrap(),
            serde_json::json!({"state": "ok"})
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(store.storage_state().unwrap(), StorageState::Ok);
        store.set_storage_state(&recovered).unwrap();
        drop(store);
        let store = Store::open(&path, Synchronous::Normal).unwrap();
        assert_eq!(store.storage_state().unwrap(), recovered);
        store.set_storage_state(&StorageState::Ok).unwrap();
        assert_eq!(store.storage_state().unwrap(), StorageState::Ok);
    }
}
