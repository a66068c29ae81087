//! Standard Webhooks signing and verification (standardwebhooks.com), shared by the agent,
//! which signs every batch, and the receiver, which verifies it.
//!
//! This module owns the install secret type ([`Secret`]), the header names of the scheme
//! and the `v1` HMAC-SHA256 signature. It is pure: it reads no clock (callers pass `now`),
//! does no I/O and knows nothing about HTTP beyond the header names. A secret never appears
//! in a `Debug` output or an error message.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The message id header: the batch id, the same on every retry of a batch.
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the unix seconds at which this attempt was signed.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying one or more space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The header naming the install, so the receiver knows which key to verify with.
pub const HEADER_INSTALL_ID: &str = "x-install-id";

/// Prefix of a secret written as text.
pub const SECRET_PREFIX: &str = "whsec_";
/// Number of random bytes in a generated secret.
pub const SECRET_LEN: usize = 32;
/// Shortest decoded secret accepted (the Standard Webhooks recommendation is 24..=64 bytes).
pub const MIN_SECRET_LEN: usize = 24;
/// Longest decoded secret accepted.
pub const MAX_SECRET_LEN: usize = 64;
/// Default allowed distance between a signature timestamp and the verifier's clock.
pub const DEFAULT_TOLERANCE_S: i64 = 300;
/// Most signatures looked at in one header, so a hostile header cannot cost unbounded work.
const MAX_SIGNATURES: usize = 16;

/// Standard base64 that accepts the secret with or without its `=` padding, as the
/// reference libraries do; it is always written padded.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha256 = Hmac<Sha256>;

/// The key shared by one install and the backend.
///
/// Equality is constant-time; `Debug` never shows the key.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Makes a fresh secret of [`SECRET_LEN`] random bytes from the operating system.
    pub fn generate() -> Secret {
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::fill(&mut bytes).expect("the operating system random source is available");
        Secret(Box::new(bytes))
    }

    /// Wraps raw key bytes, checking their length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, SigningError> {
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            return Err(SigningError::BadLength { len: bytes.len() });
        }
        Ok(Secret(bytes.into()))
    }

    /// Reads a secret written as `whsec_` followed by standard base64 (padding optional).
    pub fn parse(text: &str) -> Result<Secret, SigningError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SigningError::MissingPrefix)?;
        let bytes = LENIENT_STANDARD
            .decode(encoded)
            .map_err(|_| SigningError::BadBase64)?;
        Secret::from_bytes(&bytes)
    }

    /// Writes the secret as `whsec_` followed by standard padded base64.
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a secret could not be read. The messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("the secret must start with \"{SECRET_PREFIX}\"")]
    MissingPrefix,
    #[error("the secret after \"{SECRET_PREFIX}\" must be standard base64")]
    BadBase64,
    #[error("the secret must decode to {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes, not {len}")]
    BadLength { len: usize },
}

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the {HEADER_TIMESTAMP} header must be an integer number of unix seconds")]
    BadTimestamp,
    #[error("the signature timestamp is {age_s} s old, more than the {tolerance_s} s allowed")]
    StaleTimestamp { age_s: i64, tolerance_s: i64 },
    #[error(
        "the signature timestamp is {ahead_s} s in the future, more than the {tolerance_s} s allowed"
    )]
    FutureTimestamp { ahead_s: i64, tolerance_s: i64 },
    #[error("no signature in the {HEADER_SIGNATURE} header matches the message")]
    NoMatchingSignature,
}

/// The HMAC of one message, `{msg_id}.{timestamp}.{body}`, fed the body in pieces, so a
/// verifier can check a body as it inflates it without ever holding it whole.
pub struct MessageTag(HmacSha256);

impl MessageTag {
    /// Starts the tag of a message with this id and timestamp text, as signed.
    pub fn new(secret: &Secret, msg_id: &str, timestamp: &str) -> MessageTag {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        MessageTag(mac)
    }

    /// Feeds the next piece of the body.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    fn finish(self) -> [u8; 32] {
        self.0.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for MessageTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageTag(<redacted>)")
    }
}

fn tag(secret: &Secret, msg_id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
    let mut tag = MessageTag::new(secret, msg_id, timestamp);
    tag.update(body);
    tag.finish()
}

/// Signs one message: `v1,` + base64(HMAC-SHA256(secret, "{msg_id}.{timestamp}.{body}")).
pub fn sign(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = tag(secret, msg_id, &timestamp.to_string(), body);
    format!("v1,{}", STANDARD.encode(tag))
}

/// Verifies a signed message against one secret.
///
/// `timestamp_header` and `signature_header` are the raw header values (an empty string
/// counts as missing). The timestamp must be within `tolerance_s` seconds of `now_unix` in
/// either direction. The signature header may hold several space-separated entries (key
/// rotation); entries of versions other than `v1` are ignored, and any one `v1` entry that
/// matches, compared in constant time, is enough.
pub fn verify(
    secret: &Secret,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    check_headers(
        msg_id,
        timestamp_header,
        signature_header,
        now_unix,
        tolerance_s,
    )?;
    let expected = tag(secret, msg_id, timestamp_header, body);
    matches(signature_header, &expected)
}

/// Verifies a message whose body was fed to `tag` piece by piece (see [`MessageTag`]),
/// with the same checks, in the same order and with the same errors, as [`verify`]. The
/// tag must have been started with the same `msg_id` and `timestamp_header`.
pub fn verify_tag(
    tag: MessageTag,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    check_headers(
        msg_id,
        timestamp_header,
        signature_header,
        now_unix,
        tolerance_s,
    )?;
    matches(signature_header, &tag.finish())
}

/// The checks made before any signature is compared: every header present and the
/// timestamp within the tolerance.
fn check_headers(
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    if msg_id.is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_ID));
    }
    if timestamp_header.is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_TIMESTAMP));
    }
    if signature_header.trim().is_empty() {
        return Err(VerifyError::MissingHeader(HEADER_SIGNATURE));
    }
    let timestamp = parse_timestamp(timestamp_header)?;
    let offset = now_unix.saturating_sub(timestamp);
    if offset > tolerance_s {
        return Err(VerifyError::StaleTimestamp {
            age_s: offset,
            tolerance_s,
        });
    }
    if offset < -tolerance_s {
        return Err(VerifyError::FutureTimestamp {
            ahead_s: offset.saturating_neg(),
            tolerance_s,
        });
    }
    Ok(())
}

/// Whether any `v1` entry of the header (several during key rotation: each is compared
/// with the one tag of the install's key) equals `expected`, compared in constant time.
fn matches(signature_header: &str, expected: &[u8; 32]) -> Result<(), VerifyError> {
    let mut matched = subtle::Choice::from(0u8);
    for entry in signature_header
        .split(' ')
        .filter(|e| !e.is_empty())
        .take(MAX_SIGNATURES)
    {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        if let Ok(candidate) = STANDARD.decode(encoded) {
            matched |= candidate.as_slice().ct_eq(expected);
        }
    }
    if matched.into() {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Reads unix seconds written as plain decimal digits (an optional leading `-` aside),
/// so the signed text and the value it stands for cannot differ.
fn parse_timestamp(text: &str) -> Result<i64, VerifyError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::BadTimestamp);
    }
    text.parse().map_err(|_| VerifyError::BadTimestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Standard Webhooks test vector (also used by the Svix libraries).
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    const NOW: i64 = 1_800_000_000;

    fn check(
        secret: &Secret,
        timestamp: i64,
        signature: &str,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        verify(
            secret,
            "msg_1",
            &timestamp.to_string(),
            signature,
            body,
            NOW,
            DEFAULT_TOLERANCE_S,
        )
    }

    #[test]
    fn signs_the_published_test_vector() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        assert_eq!(
            sign(&secret, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        let result = verify(
            &secret,
            VECTOR_ID,
            &VECTOR_TIMESTAMP.to_string(),
            VECTOR_SIGNATURE,
            VECTOR_BODY,
            VECTOR_TIMESTAMP + 10,
            DEFAULT_TOLERANCE_S,
        );
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn generated_secrets_round_trip_through_text() {
        let secret = Secret::generate();
        assert_eq!(secret.as_bytes().len(), SECRET_LEN);
        let text = secret.to_whsec();
        assert!(text.starts_with("whsec_") && text.ends_with('='), "{text}");
        assert_eq!(Secret::parse(&text).unwrap(), secret);
        assert_ne!(Secret::generate(), secret);
        // The padding is optional on input, as in the reference libraries.
        assert_eq!(Secret::parse(text.trim_end_matches('=')).unwrap(), secret);
    }

    #[test]
    fn bad_secrets_are_rejected_without_echoing_them() {
        let cases = [
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                SigningError::MissingPrefix,
            ),
            ("whsec_not base64!", SigningError::BadBase64),
            ("whsec_c2hvcnQ=", SigningError::BadLength { len: 5 }),
            ("whsec_", SigningError::BadLength { len: 0 }),
        ];
        for (text, expected) in cases {
            let error = Secret::parse(text).unwrap_err();
            assert_eq!(error, expected, "{text}");
            let encoded = text.trim_start_matches("whsec_");
            assert!(
                !error.to_string().contains(encoded) || encoded.is_empty(),
                "{error}"
            );
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        let shown = format!("{secret:?}");
        assert_eq!(shown, "Secret(<redacted>)");
    }

    #[test]
    fn sign_then_verify_round_trips_for_many_inputs() {
        for i in 0..200u32 {
            let secret = Secret::generate();
            let body: Vec<u8> = (0..i).map(|b| (b * 7 % 256) as u8).collect();
            let msg_id = format!("batch-{i}");
            let timestamp = NOW - i64::from(i % 300);
            let signature = sign(&secret, &msg_id, timestamp, &body);
            let result = verify(
                &secret,
                &msg_id,
                &timestamp.to_string(),
                &signature,
                &body,
                NOW,
                300,
            );
            assert_eq!(result, Ok(()), "case {i}");
        }
    }

    #[test]
    fn tampering_with_any_signed_part_is_detected() {
        let secret = Secret::generate();
        let signature = sign(&secret, "msg_1", NOW, b"{\"a\":1}");
        assert_eq!(check(&secret, NOW, &signature, b"{\"a\":1}"), Ok(()));
        assert_eq!(
            check(&secret, NOW, &signature, b"{\"a\":2}"),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&secret, NOW - 1, &signature, b"{\"a\":1}"),
            Err(VerifyError::NoMatchingSignature)
        );
        let other_id = verify(
            &secret,
            "msg_2",
            &NOW.to_string(),
            &signature,
            b"{\"a\":1}",
            NOW,
            300,
        );
        assert_eq!(other_id, Err(VerifyError::NoMatchingSignature));
        assert_eq!(
            check(&Secret::generate(), NOW, &signature, b"{\"a\":1}"),
            Err(VerifyError::NoMatchingSignature)
        );
        // A truncated or garbled signature is no match either.
        assert_eq!(
            check(&secret, NOW, &signature[..20], b"{\"a\":1}"),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&secret, NOW, "v1,%%%", b"{\"a\":1}"),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn a_body_fed_in_pieces_verifies_exactly_as_the_whole_body() {
        let secret = Secret::generate();
        let body: Vec<u8> = (0..5000u32).map(|b| (b * 31 % 251) as u8).collect();
        let ts = NOW.to_string();
        let good = sign(&secret, "msg_1", NOW, &body);
        let headers: [(&str, &str, String); 5] = [
            ("msg_1", ts.as_str(), good.clone()),
            ("msg_1", ts.as_str(), format!("v1,AAAA {good}")),
            ("msg_1", ts.as_str(), sign(&secret, "msg_1", NOW, b"other")),
            ("", ts.as_str(), good.clone()),
            ("msg_1", "1", good.clone()),
        ];
        for (id, timestamp, signature) in &headers {
            let whole = verify(&secret, id, timestamp, signature, &body, NOW, 300);
            for piece in [1, 7, 4096, body.len()] {
                let mut tag = MessageTag::new(&secret, id, timestamp);
                body.chunks(piece).for_each(|chunk| tag.update(chunk));
                let streamed = verify_tag(tag, id, timestamp, signature, NOW, 300);
                assert_eq!(
                    streamed, whole,
                    "{id:?} {timestamp:?} {signature:?} {piece}"
                );
            }
        }
        assert_eq!(
            verify(&secret, "msg_1", &ts, &good, &body, NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn any_one_of_several_signatures_may_match() {
        let old = Secret::generate();
        let new = Secret::generate();
        let body = b"payload";
        let by_old = sign(&old, "msg_1", NOW, body);
        let by_new = sign(&new, "msg_1", NOW, body);
        let header = format!("v1a,ignored {by_old} {by_new}");
        assert_eq!(check(&old, NOW, &header, body), Ok(()));
        assert_eq!(check(&new, NOW, &header, body), Ok(()));
        assert_eq!(
            check(&Secret::generate(), NOW, &header, body),
            Err(VerifyError::NoMatchingSignature)
        );
        // Entries of another version are skipped even if their bytes match.
        let v2 = by_new.replacen("v1,", "v2,", 1);
        assert_eq!(
            check(&new, NOW, &v2, body),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn timestamps_are_accepted_up_to_the_tolerance_in_both_directions() {
        let secret = Secret::generate();
        let at = |t: i64| check(&secret, t, &sign(&secret, "msg_1", t, b"x"), b"x");
        assert_eq!(at(NOW), Ok(()));
        assert_eq!(at(NOW - 300), Ok(()));
        assert_eq!(at(NOW + 300), Ok(()));
        assert_eq!(
            at(NOW - 301),
            Err(VerifyError::StaleTimestamp {
                age_s: 301,
                tolerance_s: 300
            })
        );
        assert_eq!(
            at(NOW + 301),
            Err(VerifyError::FutureTimestamp {
                ahead_s: 301,
                tolerance_s: 300
            })
        );
        assert!(matches!(
            at(i64::MIN),
            Err(VerifyError::StaleTimestamp { .. })
        ));
        assert!(matches!(
            at(i64::MAX),
            Err(VerifyError::FutureTimestamp { .. })
        ));
    }

    #[test]
    fn missing_and_malformed_headers_are_named() {
        let secret = Secret::generate();
        let signature = sign(&secret, "msg_1", NOW, b"x");
        let ts = NOW.to_string();
        let cases: [(&str, &str, &str, VerifyError); 7] = [
            ("", &ts, &signature, VerifyError::MissingHeader(HEADER_ID)),
            (
                "msg_1",
                "",
                &signature,
                VerifyError::MissingHeader(HEADER_TIMESTAMP),
            ),
            (
                "msg_1",
                &ts,
                "",
                VerifyError::MissingHeader(HEADER_SIGNATURE),
            ),
            ("msg_1", "12.5", &signature, VerifyError::BadTimestamp),
            (
                "msg_1",
                "+1800000000",
                &signature,
                VerifyError::BadTimestamp,
            ),
            ("msg_1", "soon", &signature, VerifyError::BadTimestamp),
            (
                "msg_1",
                "99999999999999999999",
                &signature,
                VerifyError::BadTimestamp,
            ),
        ];
        for (id, timestamp, signature, expected) in cases {
            assert_eq!(
                verify(&secret, id, timestamp, signature, b"x", NOW, 300),
                Err(expected)
            );
        }
    }
}
