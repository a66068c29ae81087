//! Credentials shared by both servers: reading a `Bearer` token whatever the
//! case of its scheme, comparing secrets in constant time, the [`throttle`] of
//! failed attempts per client address, and the client address behind trusted
//! [`proxies`]. The agent's bearer check and the receiver's basic auth and enrollment
//! token use these same pieces; each server answers in its own error type, and keeps a
//! throttle table per kind of credential, so failures at one never block the other.
//!
//! A leaf: it knows HTTP headers and nothing of the agent or the receiver.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod proxies;
pub mod throttle;

pub use proxies::TrustedProxies;
pub use throttle::FailureThrottle;

/// The error code of the `429` a throttled address gets, on both servers.
pub const THROTTLED_CODE: &str = "too_many_failed_credentials";

/// Compares two credentials in constant time. Both sides are hashed first, so the time
/// taken does not even reveal the expected length.
pub fn credential_eq(given: &[u8], expected: &[u8]) -> bool {
    let given = Sha256::digest(given);
    let expected = Sha256::digest(expected);
    given.ct_eq(&expected).into()
}

/// The token of an `Authorization: Bearer <token>` header, the scheme word in any case.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether a request presented credentials at all. Only such a request can be a guess:
/// one without is how a browser or client learns credentials are needed, and counting it
/// would lock out a provider who merely opened the dashboard.
pub fn presented(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_nothing_else_is() {
        let cases = [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ];
        for (value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer_token(&headers), expected, "{value:?}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn credentials_match_only_when_equal_whatever_their_lengths() {
        assert!(credential_eq(b"s3cret", b"s3cret"));
        for given in ["", "s3cre", "s3cret ", "s3cretx", "S3cret"] {
            assert!(!credential_eq(given.as_bytes(), b"s3cret"), "{given:?}");
        }
    }
}
