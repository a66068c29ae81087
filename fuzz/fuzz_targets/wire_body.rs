//! The receiver's wire body: bytes, gzipped or not, through `verified_body` (the signature
//! checked while the body inflates as a stream) and, for a body that verified, the batch
//! reader. The first byte chooses the encoding and whether the body is signed.
//!
//! Checks: a correctly signed body always verifies and comes back byte for byte; what
//! comes back is what verified; an unsigned one never does; the typed batch reading
//! agrees with the reference reading; the batch's counts add up.
#![no_main]

use chrono::{TimeZone, Utc};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use usage_protocol::signing::{
    HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign, verify,
};
use usage_protocol::wire::{check_batch, check_batch_values, gzip};
use usage_receiver::ingest::batch::{read_batch, verified_body};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BATCH_ID: &str = "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f";
/// Small, so bombs stay quick; the receiver's own is 10 MiB.
const MAX_INFLATED: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).unwrap();
    let secret = Secret::parse(SECRET).unwrap();
    // bits 0-1: 0 plain, 1 gzip of the body, 2 the body sent as gzip as it is, 3 "identity";
    // bit 2: signed over the body (else signed over something else).
    let (raw, encoding) = match flags & 3 {
        0 => (body.to_vec(), None),
        1 => (gzip(body), Some("gzip")),
        2 => (body.to_vec(), Some("GZip")),
        _ => (body.to_vec(), Some("identity")),
    };
    let signed_over: &[u8] = if flags & 4 != 0 {
        body
    } else {
        b"something else"
    };
    let signature = sign(&secret, BATCH_ID, now.timestamp(), signed_over);
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_ID, HeaderValue::from_static(BATCH_ID));
    headers.insert(HEADER_TIMESTAMP, now.timestamp().into());
    headers.insert(HEADER_SIGNATURE, signature.parse().unwrap());
    if let Some(encoding) = encoding {
        headers.insert("content-encoding", HeaderValue::from_static(encoding));
    }

    let verified = verified_body(&raw, &headers, &secret, now.timestamp(), 300, MAX_INFLATED);
    let readable = flags & 3 != 2 && body.len() <= MAX_INFLATED;
    if flags & 4 != 0 && readable {
        let verified = verified
            .as_ref()
            .unwrap_or_else(|e| panic!("a signed body refused: {e:?}"));
        assert_eq!(
            &verified[..],
            body,
            "the verified body differs from the one signed"
        );
    }
    let Ok(verified) = verified else {
        return;
    };
    verify(
        &secret,
        BATCH_ID,
        &now.timestamp().to_string(),
        &signature,
        &verified,
        now.timestamp(),
        300,
    )
    .expect("what comes back is what verified");
    assert!(verified.len() <= MAX_INFLATED.max(raw.len()));
    if flags & 4 == 0 {
        assert_eq!(
            &verified[..],
            b"something else",
            "an unsigned body verified"
        );
    }

    let typed_or_reference = check_batch(&verified, now);
    let reference = check_batch_values(&verified, now);
    match (&typed_or_reference, &reference) {
        (Ok(read), Ok(expected)) => assert_eq!(read, expected, "the two readings differ"),
        (Err(_), Err(_)) => {}
        (read, expected) => panic!("the readings disagree: {read:?} against {expected:?}"),
    }
    if let Ok(batch) = read_batch(&verified, now) {
        assert_eq!(batch.event_count, batch.valid.len() + batch.rejected.len());
    }
});
