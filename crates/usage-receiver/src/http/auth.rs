//! Credentials checks of the receiver: the enrollment bearer token, the provider's basic
//! auth and the scrape's `METRICS_TOKEN` ([`authorize_scrape`]), all compared in constant
//! time, their schemes matched whatever their case, and all throttled per client address
//! ([`throttled`]): the provider's credentials in one table, enrollment tokens in another,
//! so failed provider logins never block an agent's enrollment. The client address is the
//! peer's, or, from a peer in `TRUSTED_PROXIES`, the one its `X-Forwarded-For` names
//! ([`client_address`]). The tables are this node's: each node of a fleet counts apart.
//!
//! Where a handler reads a body, the credentials are checked before it ([`Provider`], and
//! the enrollment token's extractor beside its handler), so a request with wrong
//! credentials is answered without waiting for its body.
//!
//! Signature verification is not here: it is [`usage_protocol::signing::verify`], called by
//! the ingest handler. Nothing here logs or echoes a credential.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::http::error::ReceiverError;
use crate::state::ReceiverState;
use crate::store::rate_limit::retry_after_secs;
use usage_common::credentials::{
    FailureThrottle, THROTTLED_CODE, bearer_token, credential_eq, presented,
};

/// The challenge sent with every provider `401`.
pub const BASIC_CHALLENGE: &str = r#"Basic realm="usage-agent""#;

/// Runs the credentials `check` of a request from `client` under `throttle`: while
/// the address is blocked it is answered `429` with `Retry-After` without being checked,
/// and a `401` from `check` counts against it if the request presented credentials (an
/// `Authorization` header; see [`usage_common::credentials::presented`]).
///
/// Checking and counting are not one atomic step, so requests checked at the same moment
/// can pass the limit by at most one per runtime worker thread.
pub fn throttled<T>(
    throttle: &FailureThrottle,
    client: IpAddr,
    headers: &HeaderMap,
    check: impl FnOnce() -> Result<T, ReceiverError>,
) -> Result<T, ReceiverError> {
    throttle.check(client, Instant::now()).map_err(|wait| {
        let seconds = retry_after_secs(wait);
        ReceiverError::new(
            StatusCode::TOO_MANY_REQUESTS,
            THROTTLED_CODE,
            format!("too many failed credentials from this address; retry in {seconds} s"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
    })?;
    let result = check();
    if presented(headers)
        && matches!(&result, Err(error) if error.status == StatusCode::UNAUTHORIZED)
    {
        throttle.record_failure(client, Instant::now());
    }
    result
}

/// Checks provider basic auth. Unset credentials refuse everyone.
pub fn require_provider(
    headers: &HeaderMap,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<(), ReceiverError> {
    let challenge = |message: &str| {
        ReceiverError::unauthorized("unauthorized", message).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(BASIC_CHALLENGE),
        )
    };
    let (Some(username), Some(password)) = (username, password) else {
        return Err(challenge(
            "provider access is disabled: set PROVIDER_USERNAME and PROVIDER_PASSWORD",
        ));
    };
    let Some((given_user, given_password)) = basic_credentials(headers) else {
        return Err(challenge("basic authentication is required"));
    };
    // Both comparisons always run, so timing does not tell which part was wrong.
    let user_ok = credential_eq(given_user.as_bytes(), username.as_bytes());
    let password_ok = credential_eq(given_password.as_bytes(), password.as_bytes());
    if user_ok & password_ok {
        Ok(())
    } else {
        Err(challenge("wrong username or password"))
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The client of a request from `peer`: `peer`, unless it is a trusted proxy
/// (`TRUSTED_PROXIES`), then the right-most `X-Forwarded-For` address it does not trust.
pub fn client_address(app: &ReceiverState, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    app.settings.trusted_proxies.client_address(peer, headers)
}

/// Runs the enrollment token `check` of a request from `peer` under the enrollment
/// throttle of its client address.
pub fn throttled_enrollment<T>(
    app: &ReceiverState,
    headers: &HeaderMap,
    peer: IpAddr,
    check: impl FnOnce() -> Result<T, ReceiverError>,
) -> Result<T, ReceiverError> {
    let client = client_address(app, peer, headers);
    throttled(&app.enrollment_throttle, client, headers, check)
}

/// Checks the provider's basic auth of a request from `peer`, throttled per client
/// address.
pub fn authorize(
    app: &ReceiverState,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<(), ReceiverError> {
    let settings = &app.settings;
    let client = client_address(app, peer, headers);
    throttled(&app.provider_throttle, client, headers, || {
        require_provider(
            headers,
            settings.provider_username.as_deref(),
            settings.provider_password(),
        )
    })
    .inspect_err(
        |error| tracing::warn!(%client, %peer, code = error.code, "provider request refused"),
    )
}

/// The provider's basic auth, checked as an extractor ([`authorize`]): a handler that
/// reads a body lists it before the body, so wrong credentials are answered before the
/// body is read and an unauthenticated client never holds one in the receiver (axum runs
/// the extractors in order, the body's last).
pub struct Provider;

impl FromRequestParts<Arc<ReceiverState>> for Provider {
    type Rejection = ReceiverError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<ReceiverState>,
    ) -> Result<Provider, ReceiverError> {
        authorize(app, &parts.headers, peer_of(parts)?)?;
        Ok(Provider)
    }
}

/// The client address of a request, which the server records on every connection.
pub fn peer_of(parts: &Parts) -> Result<IpAddr, ReceiverError> {
    match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(peer)) => Ok(peer.ip()),
        None => Err(ReceiverError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the client address of the request is unknown",
        )),
    }
}

/// Checks a `GET /metrics` request from `peer`, throttled per client address with the
/// provider's credentials: the bearer `METRICS_TOKEN` when one is set and the request
/// presents a bearer token, else the provider's basic auth.
pub fn authorize_scrape(
    app: &ReceiverState,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<(), ReceiverError> {
    let settings = &app.settings;
    let client = client_address(app, peer, headers);
    throttled(&app.provider_throttle, client, headers, || {
        match (settings.metrics_token(), bearer_token(headers)) {
            (Some(expected), Some(given)) => {
                if credential_eq(given.as_bytes(), expected.as_bytes()) {
                    Ok(())
                } else {
                    Err(
                        ReceiverError::unauthorized("unauthorized", "the metrics token is wrong")
                            .with_header(
                                header::WWW_AUTHENTICATE,
                                HeaderValue::from_static(BASIC_CHALLENGE),
                            ),
                    )
                }
            }
            _ => require_provider(
                headers,
                settings.provider_username.as_deref(),
                settings.provider_password(),
            ),
        }
    })
    .inspect_err(
        |error| tracing::warn!(%client, %peer, code = error.code, "metrics scrape refused"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        with_auth(&format!(
            "Basic {}",
            STANDARD.encode(format!("{user}:{password}"))
        ))
    }

    #[test]
    fn basic_auth_accepts_only_the_configured_pair() {
        let check = |headers: &HeaderMap| require_provider(headers, Some("admin"), Some("p:w"));
        assert!(check(&basic("admin", "p:w")).is_ok());
        for headers in [
            basic("admin", "p:x"),
            basic("Admin", "p:w"),
            basic("", ""),
            with_auth("Bearer p:w"),
            with_auth("Basic !!!"),
            HeaderMap::new(),
        ] {
            let error = check(&headers).unwrap_err();
            assert_eq!(error.status, 401);
        }
    }

    #[test]
    fn unset_credentials_refuse_everyone() {
        let error = require_provider(&basic("", ""), None, None).unwrap_err();
        assert_eq!(error.status, 401);
        assert!(require_provider(&basic("a", ""), Some("a"), None).is_err());
    }

    #[test]
    fn only_refused_credentials_count_against_the_address() {
        let throttle = FailureThrottle::new(2, std::time::Duration::from_secs(60), 10);
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let presented = basic("admin", "guess");
        let refused = || Err::<(), _>(ReceiverError::unauthorized("unauthorized", "wrong"));
        // A `403` (enrollment switched off) says nothing about a guess, and a request
        // without credentials guessed nothing.
        for _ in 0..5 {
            let error = throttled(&throttle, peer, &presented, || {
                Err::<(), _>(ReceiverError::new(StatusCode::FORBIDDEN, "off", "off"))
            })
            .unwrap_err();
            assert_eq!(error.status, StatusCode::FORBIDDEN);
            let error = throttled(&throttle, peer, &HeaderMap::new(), refused).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED);
        }
        assert!(throttled(&throttle, peer, &presented, || Ok(())).is_ok());
        for _ in 0..2 {
            let error = throttled(&throttle, peer, &presented, refused).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED);
        }
        let blocked = throttled(&throttle, peer, &basic("admin", "right"), || Ok(())).unwrap_err();
        assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(blocked.code, "too_many_failed_credentials");
    }
}
