//! Differential: the typed reader of `POST /v1/events` bodies
//! (`event::read_typed_events`) against the reference reading (`parse_event`, through the
//! API's `parse_body`). The typed reader may give up (`None`) on anything; when it reads a
//! body, the reference must accept the same body and read the same events.
#![no_main]

use chrono::{Duration, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use usage_agent::api::events::parse_body;
use usage_protocol::event::{Event, Limits, read_typed_events};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        now: Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).unwrap(),
        max_age: Duration::days(90),
    };
    let Some((typed, typed_batch)) = read_typed_events(data, limits) else {
        return;
    };
    let value: Value = serde_json::from_slice(data)
        .unwrap_or_else(|e| panic!("the typed reader read a body that is not JSON: {e}"));
    let (reference, reference_batch) = parse_body(&value, limits)
        .unwrap_or_else(|e| panic!("the typed reader read a body the reference refuses: {e:?}"));
    assert_eq!(typed_batch, reference_batch, "batch or single event");
    assert_eq!(typed.len(), reference.len(), "number of events");
    let items: Vec<&Value> = if typed_batch {
        value["events"]
            .as_array()
            .expect("a batch")
            .iter()
            .collect()
    } else {
        vec![&value]
    };
    for ((typed, reference), item) in typed.iter().zip(&reference).zip(items) {
        // An event without an id gets a fresh one from each reading.
        let given_id = item.get("event_id").is_some_and(|id| !id.is_null());
        let typed = if given_id {
            typed.clone()
        } else {
            Event {
                event_id: reference.event_id,
                ..typed.clone()
            }
        };
        assert_eq!(&typed, reference, "the two readings read different values");
    }
});
