//! The HTTP side of one attempt: build the signed `POST {backend}/api/usage/event`, send it,
//! and turn the answer into a [`BatchResult`] or a categorised [`SyncError`].
//!
//! This module owns the request shape of the wire protocol (headers, gzip over 1 KiB,
//! signature over the uncompressed JSON). It knows nothing about retries, the queue or the database; the
//! engine decides what an answer means for the events. The secret and the bearer token
//! never appear in an error or a log line.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use uuid::Uuid;

use super::error::SyncError;
use crate::config::SyncConfig;
use crate::identity::Identity;
use usage_protocol::signing::{
    self, HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret,
};
use usage_protocol::wire::{self, Batch, BatchResult, ErrorBody, GZIP_THRESHOLD};

/// Why a client for the backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("sync.backend_url is not set")]
    NoBackend,
    #[error("the install secret in identity.json cannot be used: {0}")]
    BadSecret(#[from] signing::SigningError),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Builds the reqwest client used for the backend: request timeout from the config, no
/// redirects (a signed batch must not wander to another host), a clear user agent.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, ClientError> {
    super::install_tls_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("usage-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ClientError::Http(error_chain(&e)))
}

/// A batch serialized once, sent as many times as needed: each attempt is signed anew
/// (fresh `webhook-timestamp`) over the same JSON, with the same batch id.
///
/// A gzipped batch holds its JSON only until the first attempt has signed it, and its gzip
/// alone while it is on the wire; a retry inflates the JSON again to sign it. Several lanes
/// each hold a batch while the backend answers, and their JSON (about 200 KB per 500
/// events, four times the gzip) was most of what a drain added to the agent's memory.
#[derive(Debug)]
pub struct PreparedBatch {
    pub id: Uuid,
    /// The uncompressed JSON, which the signature covers, while it is held. `Bytes`, so
    /// that each attempt hands the body to the request without copying it.
    json: std::sync::Mutex<Option<Bytes>>,
    json_len: usize,
    /// The gzip of the JSON when it is over [`GZIP_THRESHOLD`].
    gzipped: Option<Bytes>,
}

impl PreparedBatch {
    pub fn new(batch: &Batch) -> PreparedBatch {
        PreparedBatch::from_json(batch.batch_id, batch.to_json().into())
    }

    /// A batch whose JSON is already written (`id` is its `batch_id`).
    pub fn from_json(id: Uuid, json: Bytes) -> PreparedBatch {
        let gzipped = (json.len() > GZIP_THRESHOLD).then(|| {
            let mut gzipped = wire::gzip(&json);
            gzipped.shrink_to_fit();
            Bytes::from(gzipped)
        });
        PreparedBatch {
            id,
            json_len: json.len(),
            json: std::sync::Mutex::new(Some(json)),
            gzipped,
        }
    }

    pub fn is_gzipped(&self) -> bool {
        self.gzipped.is_some()
    }

    /// The gzip of the JSON, when the batch is sent gzipped.
    pub fn gzipped(&self) -> Option<&Bytes> {
        self.gzipped.as_ref()
    }

    /// The uncompressed JSON, which the signature covers: the one held, or, once a gzipped
    /// batch has let it go, its gzip inflated again.
    pub fn json(&self) -> Bytes {
        let held = self.json.lock().unwrap_or_else(|p| p.into_inner()).clone();
        held.unwrap_or_else(|| self.inflate())
    }

    /// [`PreparedBatch::json`] for signing an attempt: a gzipped batch lets its JSON go
    /// now, since the request carries the gzip.
    fn json_to_sign(&self) -> Bytes {
        let mut held = self.json.lock().unwrap_or_else(|p| p.into_inner());
        let json = match self.gzipped {
            Some(_) => held.take(),
            None => held.clone(),
        };
        drop(held);
        json.unwrap_or_else(|| self.inflate())
    }

    fn inflate(&self) -> Bytes {
        let gzipped = self
            .gzipped
            .as_ref()
            .expect("only a gzipped batch lets its JSON go");
        wire::gunzip(gzipped, self.json_len)
            .expect("the agent's own gzip of this JSON inflates back to it")
            .into()
    }
}

/// Sends signed batches for one install.
pub struct BackendClient {
    http: reqwest::Client,
    events_url: reqwest::Url,
    install_id: String,
    secret: Secret,
    auth_token: Option<String>,
}

impl BackendClient {
    pub fn new(
        http: reqwest::Client,
        sync: &SyncConfig,
        identity: &Identity,
    ) -> Result<BackendClient, ClientError> {
        Ok(BackendClient {
            http,
            events_url: sync
                .backend_url
                .as_ref()
                .ok_or(ClientError::NoBackend)?
                .endpoint("/api/usage/event"),
            install_id: identity.install_id.clone(),
            secret: Secret::parse(&identity.secret)?,
            auth_token: Some(sync.auth_token.clone()).filter(|t| !t.is_empty()),
        })
    }

    pub fn install_id(&self) -> &str {
        &self.install_id
    }

    /// One attempt: signs the batch now and sends it.
    pub async fn send(&self, batch: &PreparedBatch) -> Result<BatchResult, SyncError> {
        let id = batch.id.to_string();
        let timestamp = Utc::now().timestamp();
        let json = batch.json_to_sign();
        let signature = signing::sign(&self.secret, &id, timestamp, &json);
        let mut request = self
            .http
            .post(self.events_url.clone())
            .header(HEADER_ID, &id)
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .header(HEADER_INSTALL_ID, &self.install_id)
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = &self.auth_token {
            request = request.bearer_auth(token);
        }
        request = match &batch.gzipped {
            Some(gzipped) => {
                drop(json);
                request
                    .header(CONTENT_ENCODING, "gzip")
                    .body(gzipped.clone())
            }
            None => request.body(json),
        };
        let response = request.send().await.map_err(network)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // An answer cut off (a reset, a timeout) is a transport failure whatever its
        // status line said: `network`, as the wire protocol files resets and timeouts. `BadAnswer`
        // is for an answer that arrived whole and cannot be read.
        let body = match read_answer(response).await {
            Ok(body) => body,
            Err(AnswerError::Transport(error)) => return Err(network(error)),
            Err(AnswerError::TooLarge) => {
                return Err(SyncError::BadAnswer(format!(
                    "a {status} answer {}",
                    AnswerError::TooLarge
                )));
            }
        };
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                SyncError::BadAnswer(format!("a {status} answer that is not a batch result: {e}"))
            });
        }
        Err(classify(status, &body, retry_after))
    }
}

/// The most of a backend's answer the agent reads: an answer is a small JSON object, and
/// a backend (or whatever answers in its place) must not fill the agent's memory.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why an answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    /// Cut off: a reset or a timeout.
    #[error("{0}")]
    Transport(reqwest::Error),
    #[error("larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

/// Reads the body of `response`, at most [`MAX_ANSWER_BYTES`] of it: a longer answer is
/// given up on as soon as it is known to be longer.
pub(crate) async fn read_answer(mut response: reqwest::Response) -> Result<Vec<u8>, AnswerError> {
    if response
        .content_length()
        .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
    {
        return Err(AnswerError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(AnswerError::Transport)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(AnswerError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A transport failure: connect, DNS, TLS, timeout, reset.
pub(crate) fn network(error: reqwest::Error) -> SyncError {
    let what = if error.is_timeout() {
        "the request timed out"
    } else if error.is_connect() {
        "the connection failed"
    } else {
        "the request failed"
    };
    SyncError::Network(format!("{what}: {}", error_chain(&error)))
}

/// An error and its causes as one line (reqwest's own message is terse).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `Retry-After` as delta seconds (the form the receiver sends; an HTTP date is ignored).
pub fn parse_retry_after(text: &str) -> Option<Duration> {
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The `message` of an error body in the backend's error shape, else a short piece of the body.
pub fn answer_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        return format!("{}: {}", parsed.error.code, parsed.error.message);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no reason given")
            .to_owned()
    } else {
        text.chars().take(200).collect()
    }
}

/// Maps a non-2xx answer to its wire-protocol error category.
pub fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> SyncError {
    let message = answer_message(status, body);
    let code = status.as_u16();
    match code {
        401 | 403 => SyncError::Authentication {
            status: code,
            message,
        },
        400 | 413 | 415 | 422 => SyncError::Validation {
            status: code,
            message,
        },
        429 => SyncError::RateLimited {
            retry_after,
            message,
        },
        // A proxy that gave up waiting: the batch may not even have arrived.
        408 => SyncError::Network(format!(
            "the backend timed out the request (408): {message}"
        )),
        300..=399 => SyncError::Server {
            status: code,
            message: format!(
                "the backend redirected the batch ({message}); set sync.backend_url to the final URL"
            ),
        },
        // 5xx and any answer we do not understand: retry later, never fail the events.
        _ => SyncError::Server {
            status: code,
            message,
        },
    }
}

/// A backend on a loopback port that answers every request `200` with a body that
/// never ends.
#[cfg(test)]
pub(crate) async fn endless_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = stream.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
                let mut sent = stream.write_all(head.as_bytes()).await;
                while sent.is_ok() {
                    sent = stream.write_all(chunk.as_bytes()).await;
                }
            });
        }
    });
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::error::Category;

    #[test]
    fn answers_map_to_the_spec_categories() {
        let body =
            br#"{"error": {"code": "invalid_signature", "message": "no match", "details": []}}"#;
        let cases: [(u16, Category); 12] = [
            (400, Category::Validation),
            (401, Category::Authentication),
            (403, Category::Authentication),
            (404, Category::Server),
            (408, Category::Network),
            (413, Category::Validation),
            (415, Category::Validation),
            (422, Category::Validation),
            (429, Category::RateLimit),
            (500, Category::Server),
            (503, Category::Server),
            (307, Category::Server),
        ];
        for (code, category) in cases {
            let error = classify(StatusCode::from_u16(code).unwrap(), body, None);
            assert_eq!(error.category(), category, "{code}");
        }
        let error = classify(StatusCode::UNAUTHORIZED, body, None);
        assert!(
            error.to_string().contains("invalid_signature: no match"),
            "{error}"
        );
        let error = classify(StatusCode::BAD_GATEWAY, b"", None);
        assert!(error.to_string().contains("Bad Gateway"), "{error}");
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        let error = classify(StatusCode::TOO_MANY_REQUESTS, b"", parse_retry_after("3"));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
    }

    fn empty_batch() -> Batch {
        Batch {
            batch_id: Uuid::new_v4(),
            install_id: "i".into(),
            sent_at: "2026-11-27T10:30:00Z".into(),
            events: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_off_at_the_cap() {
        let addr = endless_backend().await;
        let sync = SyncConfig {
            backend_url: Some(format!("http://{addr}").parse().unwrap()),
            ..SyncConfig::default()
        };
        let identity = Identity {
            install_id: "i".into(),
            secret: Secret::generate().to_whsec(),
            site_url: "https://example.test".into(),
            created_at: "2026-11-27T10:30:00Z".into(),
            enrolled_at: None,
        };
        // The request timeout is far longer than reading a capped answer takes.
        let http = http_client(Duration::from_secs(20)).unwrap();
        let client = BackendClient::new(http.clone(), &sync, &identity).unwrap();
        let started = std::time::Instant::now();
        let error = client
            .send(&PreparedBatch::new(&empty_batch()))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("larger than 1048576 bytes"),
            "{error}"
        );
        assert_eq!(error.category(), Category::Server);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn large_batches_are_gzipped_small_ones_not() {
        let batch = |n: usize| Batch {
            batch_id: Uuid::new_v4(),
            install_id: "i".into(),
            sent_at: "2026-11-27T10:30:00Z".into(),
            events: (0..n)
                .map(|_| wire::WireEvent {
                    event_id: Uuid::new_v4(),
                    user_hash: wire::user_hash("i", 1),
                    source: usage_protocol::event::Source::Bulk,
                    model: usage_protocol::event::ModelName::parse("m").unwrap(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    total_tokens: 2,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    origin: None,
                    context: None,
                    created_at: "2026-11-27T10:29:58.123Z".into(),
                })
                .collect(),
        };
        assert!(!PreparedBatch::new(&batch(1)).is_gzipped());
        let big = PreparedBatch::new(&batch(20));
        assert!(big.is_gzipped());
        let json = big.json();
        let expanded = wire::gunzip(big.gzipped().unwrap(), 1 << 20).unwrap();
        assert_eq!(expanded, json);
        // Signing lets a gzipped batch's JSON go; a retry signs the same JSON again.
        assert_eq!(big.json_to_sign(), json);
        assert!(big.json.lock().unwrap().is_none());
        assert_eq!(big.json_to_sign(), json);
        assert_eq!(big.json(), json);
        let small = PreparedBatch::new(&batch(1));
        assert_eq!(small.json_to_sign(), small.json_to_sign());
        assert!(small.json.lock().unwrap().is_some());
    }
}
