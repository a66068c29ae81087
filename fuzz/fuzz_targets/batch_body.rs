//! The agent's `POST /v1/events` body, read as the handler reads it (`read_body`: typed
//! reading, else the reference). Nothing may panic; a refusal is a 400, 413 or 422 that
//! says why; and every event the agent would store must be one the receiver accepts once
//! it goes on the wire (else it would sit `failed` forever).
#![no_main]

use chrono::{Duration, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use usage_agent::api::events::read_body;
use usage_protocol::event::{Limits, MAX_BATCH_EVENTS};
use usage_protocol::wire::{WireEvent, check_wire_event};

const INSTALL_ID: &str = "fuzz-install";

fuzz_target!(|data: &[u8]| {
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).unwrap();
    let limits = Limits {
        now,
        max_age: Duration::days(90),
    };
    match read_body(data, limits) {
        Err(rejected) => {
            let status = rejected.error.status.as_u16();
            assert!(
                [400, 413, 422].contains(&status),
                "refused with {status}: {rejected:?}"
            );
            assert!(!rejected.error.message.is_empty());
        }
        Ok((events, is_batch)) => {
            assert!(events.len() <= MAX_BATCH_EVENTS, "{} events", events.len());
            assert!(is_batch || events.len() == 1);
            for event in &events {
                let wire = WireEvent::from_event(event, INSTALL_ID);
                let value = serde_json::to_value(&wire).expect("a wire event serializes");
                let checked = check_wire_event(&value, now).unwrap_or_else(|errors| {
                    panic!(
                        "the receiver would refuse an event the agent stored: {errors:?} {value}"
                    )
                });
                assert_eq!(checked.event_id, event.event_id);
                assert_eq!(checked.tokens, event.tokens);
                assert_eq!(checked.model, event.model);
                assert_eq!(checked.source, event.source);
                assert_eq!(checked.context, event.context);
                assert_eq!(checked.created_at_ms, event.created_at_ms);
            }
        }
    }
});
