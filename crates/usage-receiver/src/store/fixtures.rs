//! Test data the store's tests share: an install enrolled under a given id (at a given
//! instant, when a test needs its enrollment day), and a numbered event. Also included by
//! the store conformance suite (`crates/usage-receiver/tests/conformance.rs`), which
//! reaches the same types through a `store` module of its own.

use uuid::Uuid;

use crate::store::{EnrollOutcome, Install, NewEvent, NewInstall, ReceiverStore};
use usage_protocol::event::Source;
use usage_protocol::signing::Secret;

pub fn enroll(store: &dyn ReceiverStore, id: &str) -> Install {
    enroll_at(store, id, 0)
}

/// Enrolls `id` at `enrolled_at_ms` (Unix milliseconds).
pub fn enroll_at(store: &dyn ReceiverStore, id: &str, enrolled_at_ms: i64) -> Install {
    let install = NewInstall {
        install_id: id.into(),
        secret: Secret::generate(),
        site_hash: "site".into(),
        enrolled_at_ms,
    };
    assert_eq!(store.enroll(&install).unwrap(), EnrollOutcome::Created);
    store.find_install(id).unwrap().unwrap()
}

pub fn event(n: u8, created_at_ms: i64) -> NewEvent {
    NewEvent {
        event_id: Uuid::from_bytes([n; 16]),
        user_hash: [n % 2; 32],
        source: if n.is_multiple_of(2) {
            Source::Bulk
        } else {
            Source::Inline
        },
        model: "m".into(),
        prompt_tokens: 10,
        completion_tokens: u64::from(n),
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        origin: (n % 3 == 1).then(|| "plugin:ai-alt-text".into()),
        context: Some(r#"{"n":1}"#.into()),
        created_at_ms,
    }
}
