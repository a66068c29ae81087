//! The Standard Webhooks headers: any `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` text, verified whole (`verify`), piece by piece (`verify_tag`) and
//! through the receiver's header reading (`verified_body`). All three must agree; a
//! signature verifies only if the header holds the right `v1` entry; and a header that
//! holds it (with a canonical timestamp within the tolerance) always verifies.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use usage_protocol::signing::{
    HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, MessageTag, Secret, sign, verify, verify_tag,
};
use usage_receiver::ingest::batch::verified_body;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_800_000_000;
const TOLERANCE_S: i64 = 300;

#[derive(Debug, Arbitrary)]
struct Input {
    msg_id: String,
    timestamp: String,
    signature: String,
    /// Whether the right signature is added to the header, and where.
    add_correct: Option<bool>,
    body: Vec<u8>,
    piece: u8,
}

fuzz_target!(|input: Input| {
    let secret = Secret::parse(SECRET).unwrap();
    let canonical = input
        .timestamp
        .parse::<i64>()
        .ok()
        .filter(|t| t.to_string() == input.timestamp);
    let correct = canonical.map(|t| sign(&secret, &input.msg_id, t, &input.body));
    let header = match (&correct, input.add_correct) {
        (Some(correct), Some(true)) => format!("{correct} {}", input.signature),
        (Some(correct), Some(false)) => format!("{} {correct}", input.signature),
        _ => input.signature.clone(),
    };

    let whole = verify(
        &secret,
        &input.msg_id,
        &input.timestamp,
        &header,
        &input.body,
        NOW,
        TOLERANCE_S,
    );
    let mut tag = MessageTag::new(&secret, &input.msg_id, &input.timestamp);
    for chunk in input.body.chunks(usize::from(input.piece).max(1)) {
        tag.update(chunk);
    }
    let streamed = verify_tag(
        tag,
        &input.msg_id,
        &input.timestamp,
        &header,
        NOW,
        TOLERANCE_S,
    );
    assert_eq!(whole, streamed, "whole and streamed verification differ");

    if whole.is_ok() {
        let correct = correct
            .as_deref()
            .expect("verified with a non-canonical timestamp");
        assert!(
            header.split(' ').any(|entry| entry == correct),
            "verified without the right signature: {header:?}"
        );
    }
    if input.add_correct.is_some()
        && let Some(t) = canonical
        && !input.msg_id.is_empty()
        && (NOW - TOLERANCE_S..=NOW + TOLERANCE_S).contains(&t)
        // Entries past the sixteenth are not looked at.
        && header.split(' ').filter(|e| !e.is_empty()).count() <= 16
    {
        assert_eq!(whole, Ok(()), "the right signature was refused: {header:?}");
    }

    // The receiver reads the same headers from HTTP; text HTTP cannot carry is not tried.
    let (Ok(id), Ok(ts), Ok(sig)) = (
        HeaderValue::from_str(&input.msg_id),
        HeaderValue::from_str(&input.timestamp),
        HeaderValue::from_str(&header),
    ) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_ID, id);
    headers.insert(HEADER_TIMESTAMP, ts);
    headers.insert(HEADER_SIGNATURE, sig);
    let received = verified_body(&input.body, &headers, &secret, NOW, TOLERANCE_S, 1 << 20);
    let as_read = verify(
        &secret,
        as_received(&input.msg_id),
        as_received(&input.timestamp),
        as_received(&header),
        &input.body,
        NOW,
        TOLERANCE_S,
    );
    assert_eq!(
        received.is_ok(),
        as_read.is_ok(),
        "{received:?} against {as_read:?}"
    );
});

/// A header value as the receiver reads it: trimmed, and empty (missing) unless it is
/// visible ASCII; HTTP also carries other bytes (found by this target: a right entry
/// beside non-ASCII bytes counts as no header, never as a signature).
fn as_received(value: &str) -> &str {
    if value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        value.trim()
    } else {
        ""
    }
}
