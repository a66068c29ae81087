//! Enrollment (docs/reference/wire-protocol.md): telling the backend this install's id and
//! secret, once, with the operator's enrollment token: `POST {backend}/api/installations`.
//!
//! Enrollment is the only request that carries the secret itself, so it is refused over
//! plain `http://` unless the backend is on a loopback address. This module does the one
//! request; recording the result (identity file, sync bookkeeping) is the caller's job.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};

use super::client::{AnswerError, answer_message, error_chain, read_answer};
use crate::config::BackendUrl;
use crate::identity::Identity;
use usage_protocol::wire::Enrollment;

/// Why an enrollment did not happen. Messages never contain the secret or the token.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "refusing to send the install secret over plain http to {host}: use an https:// backend URL (plain http is allowed only to a loopback address such as 127.0.0.1)"
    )]
    Insecure { host: String },
    #[error("cannot reach the backend at {url}: {message}")]
    Network { url: String, message: String },
    #[error("the backend refused the enrollment token ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error(
        "the backend already has install id {install_id} enrolled with a different secret ({message})"
    )]
    Conflict { install_id: String, message: String },
    #[error("the backend answered the enrollment with {status}: {message}")]
    Unexpected { status: u16, message: String },
}

/// Whether a URL may carry the secret: https anywhere, http only to a loopback host.
pub fn check_secure(url: &Url) -> Result<(), EnrollError> {
    if url.scheme() == "https" {
        return Ok(());
    }
    let host = url.host_str().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    if loopback {
        Ok(())
    } else {
        Err(EnrollError::Insecure {
            host: host.to_owned(),
        })
    }
}

/// The enrollment URL for a backend, refusing an insecure one before anything is sent.
pub fn enrollment_url(backend_url: &BackendUrl) -> Result<Url, EnrollError> {
    let url = backend_url.endpoint("/api/installations");
    check_secure(&url)?;
    Ok(url)
}

/// Enrolls `identity` with the backend. Succeeds when the backend enrolled it now or had
/// it already with the same secret (enrollment is idempotent).
pub async fn enroll(
    http: &reqwest::Client,
    backend_url: &BackendUrl,
    token: &str,
    identity: &Identity,
) -> Result<(), EnrollError> {
    let url = enrollment_url(backend_url)?;
    let body = Enrollment {
        install_id: identity.install_id.clone(),
        secret: identity.secret.clone(),
        site_hash: identity.site_hash(),
    };
    let json = serde_json::to_vec(&body).expect("an enrollment always serializes");
    let mut request = http
        .post(url.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(json);
    if !token.is_empty() {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let network = |error: reqwest::Error| EnrollError::Network {
        url: url.to_string(),
        message: error_chain(&error),
    };
    let response = request.send().await.map_err(network)?;
    let status = response.status();
    let answer = match read_answer(response).await {
        Ok(answer) => answer,
        Err(AnswerError::Transport(error)) => return Err(network(error)),
        Err(too_large @ AnswerError::TooLarge) => {
            return Err(EnrollError::Unexpected {
                status: status.as_u16(),
                message: format!("an answer {too_large}"),
            });
        }
    };
    let message = answer_message(status, &answer);
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(EnrollError::Refused {
            status: status.as_u16(),
            message,
        }),
        StatusCode::CONFLICT => Err(EnrollError::Conflict {
            install_id: identity.install_id.clone(),
            message,
        }),
        _ => Err(EnrollError::Unexpected {
            status: status.as_u16(),
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_allowed_only_to_loopback() {
        let cases = [
            ("https://backend.example", true),
            ("https://203.0.113.9:8443/x", true),
            ("http://127.0.0.1:8787", true),
            ("http://127.8.9.10", true),
            ("http://[::1]:8787", true),
            ("http://localhost:8787", true),
            ("http://LOCALHOST.", true),
            ("http://backend.example", false),
            ("http://10.0.0.5:8787", false),
            ("http://localhost.evil.example", false),
        ];
        for (url, allowed) in cases {
            let result = enrollment_url(&BackendUrl::parse(url).unwrap());
            assert_eq!(result.is_ok(), allowed, "{url}: {result:?}");
        }
        let error = enrollment_url(&BackendUrl::parse("http://backend.example").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("backend.example") && error.contains("https://"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_off_at_the_cap() {
        let addr = super::super::client::endless_backend().await;
        let http = super::super::client::http_client(std::time::Duration::from_secs(20)).unwrap();
        let identity = Identity {
            install_id: "i".into(),
            secret: usage_protocol::signing::Secret::generate().to_whsec(),
            site_url: "https://example.test".into(),
            created_at: "2026-11-27T10:30:00Z".into(),
            enrolled_at: None,
        };
        let backend: BackendUrl = format!("http://{addr}").parse().unwrap();
        let started = std::time::Instant::now();
        let error = enroll(&http, &backend, "token", &identity)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("larger than 1048576 bytes"),
            "{error}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
