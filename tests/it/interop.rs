//! Interoperability with the reference Standard Webhooks library (PyPI `standardwebhooks`):
//! what the agent signs, any backend using that library can verify, and the reverse.
//!
//! These tests fail, never skip, when `python3` or the package is missing; install it with
//! `python3 -m pip install standardwebhooks`. Set `PYTHON` to use another interpreter.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use usage_protocol::signing::{Secret, sign, verify};
use usage_protocol::wire::{Batch, format_sent_at, parse_wire_event, user_hash};

use crate::shared::standard_webhooks as python;

/// A real batch body, with non-ASCII text in the context so the bytes must match exactly.
fn sample_batch() -> Vec<u8> {
    let install_id = format!("{}_{}", Uuid::new_v4(), "ab".repeat(32));
    let now = Utc::now();
    let event = json!({"event_id": Uuid::now_v7(), "user_hash": user_hash(&install_id, 7),
        "source": "bulk", "model": "gpt-4o-mini", "prompt_tokens": 150, "completion_tokens": 25,
        "total_tokens": 175, "context": {"attachment_id": 42, "note": "é ✓"},
        "created_at": now.to_rfc3339()});
    let event = parse_wire_event(&event, now).expect("a fresh event is valid");
    Batch {
        batch_id: Uuid::now_v7(),
        install_id,
        sent_at: format_sent_at(now),
        events: vec![event],
    }
    .to_json()
}

#[test]
fn the_reference_library_verifies_our_signatures_and_catches_tampering() {
    let secret = Secret::generate();
    let msg_id = Uuid::now_v7().to_string();
    let timestamp = Utc::now().timestamp();
    let body = sample_batch();
    let signature = sign(&secret, &msg_id, timestamp, &body);
    let ts = timestamp.to_string();
    let args = ["verify", &secret.to_whsec(), &msg_id, &ts, &signature];

    let accepted = python(&args, &body);
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&accepted.stdout)
    );

    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'5').unwrap();
    tampered[at] = b'6';
    let rejected = python(&args, &tampered);
    assert_eq!(
        rejected.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&rejected.stdout)
    );

    let other_key = Secret::generate().to_whsec();
    let wrong_key = python(&["verify", &other_key, &msg_id, &ts, &signature], &body);
    assert_eq!(wrong_key.status.code(), Some(1));
}

#[test]
fn we_verify_what_the_reference_library_signs() {
    let secret = Secret::generate();
    let msg_id = Uuid::now_v7().to_string();
    let now = Utc::now().timestamp();
    let body = sample_batch();
    let ts = now.to_string();
    let output = python(&["sign", &secret.to_whsec(), &msg_id, &ts], &body);
    assert_eq!(output.status.code(), Some(0));
    let signature = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert_eq!(signature, sign(&secret, &msg_id, now, &body));
    assert_eq!(
        verify(&secret, &msg_id, &ts, &signature, &body, now, 300),
        Ok(())
    );
}
