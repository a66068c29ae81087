//! `POST /api/usage/event`: verify, validate, dedupe and store one signed batch
//! (docs/reference/wire-protocol.md, "Batches").
//!
//! Checks run in this order, so an unauthenticated caller learns nothing about the body:
//! body size (413), a turn among the batches in progress (503 after waiting), install id
//! (401), content encoding (415) and decompression (413/400), signature and timestamp
//! (401), install disabled (403), rate limit (429; for a batch with valid events it is
//! taken in the same store call that stores them), content type (415), JSON (400), batch
//! shape and envelope (422), then each event on its own, the cap on models per install
//! and day ([`crate::store::model_cap`]) last (rejected events are listed in the answer,
//! the others stored). After a batch with valid events, duplicates included,
//! the install's budget is checked ([`crate::budgets::rules::check_after_ingest`]).
//!
//! This module decides what is accepted and answers; it holds no SQL (the store dedupes
//! and stores) and no budget rule.
//!
//! The memory one batch can take is bounded (docs/reference/receiver-api.md, "Limits"). A
//! gzip body is inflated twice: first as a stream into the HMAC, piece by piece, keeping
//! nothing, so an unauthenticated bomb costs one piece of memory however far it inflates;
//! then, only if the signature verified, into memory for the JSON reader. Decompression is
//! deterministic, so the bytes parsed are the bytes that verified.
//!
//! The costly work (inflating, HMAC, JSON, the database write) runs for at most
//! [`ReceiverSettings::max_inflight_batches`] batches at once. The turn (a semaphore
//! permit) is taken once the compressed body has been read, not before: a client slow to
//! send its body holds a connection (bounded by `MAX_CONNECTIONS` and the 30 s body
//! deadline) but never a turn. The batch is then handled on a task of its own, which holds
//! the permit, so a client that hangs up neither frees the turn nor stops the work while
//! it still runs.
//!
//! The handler is async from end to end, so a fleet node (PostgreSQL) never hops threads
//! per query: the store's ingest path ([`ReceiverStore::find_install_async`] and its two
//! siblings) is awaited here, and PostgreSQL runs it on this runtime. The CPU work of a
//! small body (an agent's batch of 50 gzips to a few KiB) runs in place, as cheap as a
//! thread switch; a body over [`INLINE_BODY_BYTES`], or one that inflates past
//! [`INLINE_INFLATED_BYTES`], is inflated and parsed on the blocking pool, so a large
//! batch never holds a runtime worker for long. The body is parsed in the
//! same step as its signature is verified, but a parse failure is answered only after the
//! rate limit, in the order above.
//!
//! [`ReceiverStore::find_install_async`]: crate::store::ReceiverStore::find_install_async
//!
//! [`ReceiverSettings::max_inflight_batches`]: crate::ReceiverSettings::max_inflight_batches

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::budgets::rules;
use crate::days::day_of_ms;
use crate::http::clip::clip;
use crate::http::error::{ReceiverError, is_json_content_type};
use crate::http::error::{body_rejection, store_unavailable, unauthenticated};
use crate::state::ReceiverState;
use crate::store::model_cap::Refused;
use crate::store::rate_limit::{Rate, retry_after_secs};
use crate::store::{Install, InstallKey, NewEvent};
use usage_protocol::signing::{
    self, HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, MessageTag, Secret,
};
use usage_protocol::wire::{
    self, BatchResult, CheckedBatch, CheckedWireEvent, GunzipError, MAX_BATCH_EVENTS, RejectedEvent,
};

/// Longest install id looked up; longer ones cannot be enrolled anyway.
const MAX_INSTALL_ID_LEN: usize = 128;

pub async fn ingest(
    State(app): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchResult>, ReceiverError> {
    let body = body
        .map_err(body_rejection)
        .inspect_err(|error| app.metrics.batch(error.status.as_u16(), 0, 0, 0))?;
    let started = Instant::now();
    let install_id = header_str(&headers, HEADER_INSTALL_ID).to_owned();
    let result = match wait_for_turn(&app).await {
        Ok(turn) => {
            let task_app = app.clone();
            tokio::spawn(async move {
                // Held until the work is done, even if the client has gone.
                let _turn = turn;
                handle(&task_app, &headers, body, Utc::now()).await
            })
            .await
            .map_err(|error| {
                tracing::error!(%error, "the ingest task failed");
                internal_error()
            })?
        }
        Err(busy) => Err(busy),
    };
    match &result {
        Ok(result) => app.metrics.batch(
            200,
            result.accepted,
            result.duplicates,
            u64::try_from(result.rejected.len()).unwrap_or(u64::MAX),
        ),
        Err(error) => app.metrics.batch(error.status.as_u16(), 0, 0, 0),
    }
    match &result {
        Ok(result) => tracing::info!(
            install_id = %clip(&install_id),
            batch_id = %result.batch_id,
            accepted = result.accepted,
            duplicates = result.duplicates,
            rejected = result.rejected.len(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "batch ingested"
        ),
        // The install id is the raw header of a request that may not be authenticated.
        Err(error) => tracing::warn!(
            install_id = %clip(&install_id),
            status = error.status.as_u16(),
            code = error.code,
            message = %clip(&error.message),
            "batch refused"
        ),
    }
    result.map(Json)
}

/// Seconds a batch refused for want of a turn is told to wait before it is sent again.
pub const BUSY_RETRY_AFTER_S: u64 = 5;

/// Waits for one of the [`ReceiverState::inflight`] permits, at most
/// [`ReceiverSettings::inflight_wait`](crate::ReceiverSettings::inflight_wait); past that,
/// `503` with `Retry-After`.
async fn wait_for_turn(
    app: &ReceiverState,
) -> Result<tokio::sync::OwnedSemaphorePermit, ReceiverError> {
    let wait = app.settings.inflight_wait;
    match tokio::time::timeout(wait, app.inflight.clone().acquire_owned()).await {
        Ok(Ok(turn)) => Ok(turn),
        // The semaphore is never closed; a closed one would mean no turn ever comes.
        Ok(Err(_)) | Err(_) => Err(ReceiverError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_busy",
            format!(
                "the receiver is working on {} batches and this one waited {} ms for its turn; retry in {BUSY_RETRY_AFTER_S} s",
                app.settings.max_inflight_batches,
                wait.as_millis()
            ),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(BUSY_RETRY_AFTER_S))),
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("")
}

/// Compressed bodies up to this size are inflated, verified and parsed in place on the
/// runtime; larger ones on the blocking pool. An agent's batch of 50 events is about 4 KiB
/// gzipped and takes well under a millisecond; the largest body takes many.
pub const INLINE_BODY_BYTES: usize = 16 * 1024;

/// How far a body checked in place may inflate, so a small body that inflates far (a
/// bomb) never holds a runtime worker for long: past this it is checked again on the
/// blocking pool.
pub const INLINE_INFLATED_BYTES: usize = 256 * 1024;

fn internal_error() -> ReceiverError {
    ReceiverError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the batch could not be processed",
    )
}

/// Checks and stores one batch.
async fn handle(
    app: &Arc<ReceiverState>,
    headers: &HeaderMap,
    raw: Bytes,
    now: DateTime<Utc>,
) -> Result<BatchResult, ReceiverError> {
    let install = find_install(app, headers).await?;

    // The signature first; the batch is read in the same step, and its answer kept for
    // after the checks that come before it. In place only while it stays small: a body
    // that would inflate further is checked again, on the blocking pool, with the
    // receiver's own limit.
    let max_decompressed = app.settings.max_decompressed_bytes;
    let inline_max = max_decompressed.min(INLINE_INFLATED_BYTES);
    let inline = (raw.len() <= INLINE_BODY_BYTES)
        .then(|| checked_body(app, headers, &raw, &install.secret, now, inline_max));
    let batch = match inline {
        Some(Err(error))
            if error.status == StatusCode::PAYLOAD_TOO_LARGE && inline_max < max_decompressed =>
        {
            None
        }
        Some(checked) => Some(checked?),
        None => None,
    };
    let batch = match batch {
        Some(batch) => batch,
        None => {
            let (task_app, task_headers, secret) =
                (app.clone(), headers.clone(), install.secret.clone());
            tokio::task::spawn_blocking(move || {
                checked_body(
                    &task_app,
                    &task_headers,
                    &raw,
                    &secret,
                    now,
                    max_decompressed,
                )
            })
            .await
            .map_err(|error| {
                tracing::error!(%error, "the ingest task failed");
                internal_error()
            })??
        }
    };

    if install.disabled {
        return Err(ReceiverError::new(
            StatusCode::FORBIDDEN,
            "install_disabled",
            "this install is disabled",
        ));
    }
    let rate = Rate {
        per_min: app.settings.rate_limit_per_min,
    };
    // A batch with events to store takes its request in the same step as it is stored;
    // any other takes it alone, and its answer comes after the rate limit's.
    let batch = batch.and_then(|batch| {
        check_envelope(&batch, &install, header_str(headers, HEADER_ID))?;
        Ok(batch)
    });
    let (batch, valid) = match batch {
        Ok(batch) if !batch.valid.is_empty() => {
            let valid: Vec<NewEvent> = batch.valid.into_iter().map(new_event).collect();
            let (valid, refused) = within_model_cap(app, install.key, valid).await?;
            let mut rejected = batch.rejected;
            rejected.extend(refused.into_iter().map(|refused| RejectedEvent {
                event_id: refused.event_id.to_string(),
                reason: refused.reason,
            }));
            let rest = CheckedBatch {
                valid: Vec::new(),
                rejected,
                ..batch
            };
            (Ok(rest), valid)
        }
        other => (other, Vec::new()),
    };
    let has_valid = !valid.is_empty();
    let months = rules::months_of(&valid);
    let models: BTreeSet<(i64, String)> = valid
        .iter()
        .map(|event| (day_of_ms(event.created_at_ms), event.model.clone()))
        .collect();
    let counts = if valid.is_empty() {
        app.store
            .clone()
            .take_request_async(install.key, rate)
            .await
            .map_err(store_unavailable)?
            .map_err(|wait| rate_limited(app, wait))?;
        Default::default()
    } else {
        app.store
            .clone()
            .ingest_async(install.key, valid, now.timestamp_millis(), rate)
            .await
            .map_err(store_unavailable)?
            .map_err(|wait| rate_limited(app, wait))?
    };
    app.known_models
        .learn(install.key, models.into_iter().collect());
    let budget = has_valid
        .then(|| rules::budget_in_force(app, install.budget.as_ref()))
        .flatten();
    if let Some(budget) = budget {
        // Also after a batch of duplicates: the retry of a batch whose node died before
        // its alert was recorded records it. Blocking store calls, so on the blocking pool.
        let (task_app, task_install) = (app.clone(), install.clone());
        tokio::task::spawn_blocking(move || {
            rules::check_after_ingest(&task_app, &task_install, &budget, &months, now)
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, "the budget check task failed");
            internal_error()
        })?
        .map_err(store_unavailable)?;
    }
    let batch = batch?;
    Ok(BatchResult {
        batch_id: batch.batch_id,
        accepted: counts.accepted,
        duplicates: counts.duplicates,
        rejected: batch.rejected,
    })
}

/// The events of `install` within the cap on models per install and day, and those it
/// refuses ([`crate::store::model_cap`]); the store is read only for a model this node
/// does not know to be stored.
async fn within_model_cap(
    app: &Arc<ReceiverState>,
    install: InstallKey,
    events: Vec<NewEvent>,
) -> Result<(Vec<NewEvent>, Vec<Refused>), ReceiverError> {
    let days = app.known_models.days_to_read(install, &events);
    let stored = if days.is_empty() {
        Vec::new()
    } else {
        app.store
            .clone()
            .day_models_async(install, days)
            .await
            .map_err(store_unavailable)?
    };
    Ok(app.known_models.admit(install, events, stored))
}

/// The `429` for a request that does not fit in its install's allowance for `wait`.
fn rate_limited(app: &ReceiverState, wait: std::time::Duration) -> ReceiverError {
    let seconds = retry_after_secs(wait);
    ReceiverError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "more than {} requests per minute; retry in {seconds} s",
            app.settings.rate_limit_per_min
        ),
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
}

/// The batch of a body whose signature verified with `secret`, inflated to at most
/// `max_decompressed` bytes: `Err` for a body refused before the install's other checks
/// (encoding, decompression, signature), `Ok(Err)` for one refused after them (content
/// type, JSON).
fn checked_body(
    app: &ReceiverState,
    headers: &HeaderMap,
    raw: &[u8],
    secret: &Secret,
    now: DateTime<Utc>,
    max_decompressed: usize,
) -> Result<Result<CheckedBatch, ReceiverError>, ReceiverError> {
    let body = verified_body(
        raw,
        headers,
        secret,
        now.timestamp(),
        app.settings.signature_tolerance_s,
        max_decompressed,
    )?;
    if !is_json_content_type(headers) {
        return Ok(Err(ReceiverError::unsupported_media_type(
            "content-type must be application/json",
        )));
    }
    Ok(read_batch(&body, now))
}

/// The body of a batch whose signature verified with `secret`, decompressed if it came
/// gzipped; or the answer for one that did not: content encoding (415), decompression
/// (413/400), then signature and timestamp (401), in that order.
///
/// A gzip body is inflated as a stream into the HMAC, keeping nothing, and inflated again
/// into memory only once it verified, so an unauthenticated body is never held
/// decompressed.
pub fn verified_body<'a>(
    raw: &'a [u8],
    headers: &HeaderMap,
    secret: &Secret,
    now_unix: i64,
    tolerance_s: i64,
    max_decompressed: usize,
) -> Result<Cow<'a, [u8]>, ReceiverError> {
    let msg_id = header_str(headers, HEADER_ID);
    let timestamp = header_str(headers, HEADER_TIMESTAMP);
    let signature = header_str(headers, HEADER_SIGNATURE);
    match header_str(headers, header::CONTENT_ENCODING.as_str()) {
        "" | "identity" => {
            signing::verify(
                secret,
                msg_id,
                timestamp,
                signature,
                raw,
                now_unix,
                tolerance_s,
            )
            .map_err(invalid_signature)?;
            Ok(Cow::Borrowed(raw))
        }
        encoding if encoding.eq_ignore_ascii_case("gzip") => {
            // First pass: the inflated body goes through the HMAC and nowhere else.
            let mut tag = MessageTag::new(secret, msg_id, timestamp);
            wire::gunzip_each(raw, max_decompressed, |piece| tag.update(piece))
                .map_err(gunzip_error)?;
            signing::verify_tag(tag, msg_id, timestamp, signature, now_unix, tolerance_s)
                .map_err(invalid_signature)?;
            // Second pass, for a body that verified: the same bytes, now kept.
            let decoded = wire::gunzip(raw, max_decompressed).map_err(gunzip_error)?;
            Ok(Cow::Owned(decoded))
        }
        _ => Err(ReceiverError::unsupported_media_type(
            "content-encoding must be gzip or absent",
        )),
    }
}

async fn find_install(
    app: &Arc<ReceiverState>,
    headers: &HeaderMap,
) -> Result<Install, ReceiverError> {
    let install_id = header_str(headers, HEADER_INSTALL_ID);
    if install_id.is_empty() {
        return Err(unauthenticated(
            "missing_install_id",
            format!("the {HEADER_INSTALL_ID} header is required"),
        ));
    }
    let unknown = || unauthenticated("unknown_install", "this install is not enrolled");
    if install_id.len() > MAX_INSTALL_ID_LEN {
        return Err(unknown());
    }
    app.store
        .clone()
        .find_install_async(install_id.to_owned())
        .await
        .map_err(store_unavailable)?
        .ok_or_else(unknown)
}

fn invalid_signature(error: signing::VerifyError) -> ReceiverError {
    unauthenticated("invalid_signature", error.to_string())
}

fn gunzip_error(error: GunzipError) -> ReceiverError {
    match error {
        GunzipError::TooLarge { max } => {
            ReceiverError::too_large(format!("the decompressed body is larger than {max} bytes"))
        }
        GunzipError::Corrupt => {
            ReceiverError::bad_request("bad_gzip", "the body is not valid gzip")
        }
    }
}

/// Reads the batch and checks its events: bad JSON syntax is `400`, JSON of the wrong shape
/// `422`; events that break a rule are listed in the answer, not refused with the batch.
pub fn read_batch(body: &[u8], now: DateTime<Utc>) -> Result<CheckedBatch, ReceiverError> {
    wire::check_batch(body, now).map_err(|error| {
        if error.classify() == serde_json::error::Category::Data {
            ReceiverError::invalid(
                "invalid_batch",
                format!("the batch has the wrong shape: {error}"),
            )
        } else {
            ReceiverError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {error}"),
            )
        }
    })
}

fn check_envelope(
    envelope: &CheckedBatch,
    install: &Install,
    webhook_id: &str,
) -> Result<(), ReceiverError> {
    let mut details = Vec::new();
    if envelope.install_id != install.install_id {
        details.push(json!({"field": "install_id",
            "message": format!("must equal the {HEADER_INSTALL_ID} header")}));
    }
    if uuid::Uuid::parse_str(webhook_id).ok() != Some(envelope.batch_id) {
        details.push(json!({"field": "batch_id",
            "message": format!("must equal the {HEADER_ID} header")}));
    }
    if envelope.event_count > MAX_BATCH_EVENTS {
        details.push(json!({"field": "events",
            "message": format!("must hold at most {MAX_BATCH_EVENTS} events, not {}", envelope.event_count)}));
    }
    if DateTime::parse_from_rfc3339(&envelope.sent_at).is_err() {
        details.push(json!({"field": "sent_at", "message": "must be an RFC 3339 timestamp"}));
    }
    if details.is_empty() {
        Ok(())
    } else {
        Err(
            ReceiverError::invalid("invalid_batch", "the batch envelope is invalid")
                .with_details(details),
        )
    }
}

/// The storable form of a validated wire event.
fn new_event(event: CheckedWireEvent) -> NewEvent {
    NewEvent {
        event_id: event.event_id,
        user_hash: event.user_hash,
        source: event.source,
        model: event.model.as_str().to_owned(),
        prompt_tokens: event.tokens.prompt,
        completion_tokens: event.tokens.completion,
        cached_tokens: event.tokens.cached,
        cache_write_tokens: event.tokens.cache_write,
        reasoning_tokens: event.tokens.reasoning,
        origin: event.origin.map(|origin| origin.as_str().to_owned()),
        context: event.context,
        created_at_ms: event.created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_protocol::signing::sign;

    const NOW: i64 = 1_800_000_000;

    fn headers(signature: HeaderValue, encoding: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, HeaderValue::from_static("batch-1"));
        headers.insert(HEADER_TIMESTAMP, HeaderValue::from(NOW));
        headers.insert(HEADER_SIGNATURE, signature);
        if let Some(encoding) = encoding {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        headers
    }

    fn code(result: Result<Cow<'_, [u8]>, ReceiverError>) -> (u16, &'static str) {
        let error = result.expect_err("a refusal");
        (error.status.as_u16(), error.code)
    }

    #[test]
    fn a_gzip_body_comes_back_as_signed_and_is_refused_in_the_documented_order() {
        let secret = Secret::generate();
        let body = br#"{"events":[]}"#.repeat(100);
        let signed = sign(&secret, "batch-1", NOW, &body);
        let good = headers(signed.parse().unwrap(), Some("gzip"));
        let packed = wire::gzip(&body);
        let verified = verified_body(&packed, &good, &secret, NOW, 300, body.len()).unwrap();
        assert_eq!(&verified[..], &body[..]);
        // Decompression answers come before the signature's, as before streaming.
        let unsigned = headers(HeaderValue::from_static("v1,AAAA"), Some("gzip"));
        assert_eq!(
            code(verified_body(
                &packed,
                &unsigned,
                &secret,
                NOW,
                300,
                body.len()
            )),
            (401, "invalid_signature")
        );
        assert_eq!(
            code(verified_body(
                &packed,
                &unsigned,
                &secret,
                NOW,
                300,
                body.len() - 1
            )),
            (413, "payload_too_large")
        );
        assert_eq!(
            code(verified_body(
                b"not gzip",
                &unsigned,
                &secret,
                NOW,
                300,
                1000
            )),
            (400, "bad_gzip")
        );
        let brotli = headers(signed.parse().unwrap(), Some("br"));
        assert_eq!(
            code(verified_body(&packed, &brotli, &secret, NOW, 300, 1000)),
            (415, "unsupported_media_type")
        );
    }

    /// Found by the `signature_headers` fuzz target: HTTP carries header bytes that are not
    /// visible ASCII, which the receiver cannot read as text. Such a header counts as
    /// missing, even with the right entry beside the odd bytes: never as a signature.
    #[test]
    fn a_signature_header_that_is_not_visible_ascii_counts_as_missing() {
        let secret = Secret::generate();
        let body = b"{}";
        let right = sign(&secret, "batch-1", NOW, body);
        let odd = HeaderValue::from_bytes(format!("{right} v2,\u{e9}").as_bytes()).unwrap();
        let result = verified_body(body, &headers(odd, None), &secret, NOW, 300, 1000);
        let error = result.expect_err("refused");
        assert_eq!(
            (error.status.as_u16(), error.code),
            (401, "invalid_signature")
        );
        assert_eq!(error.message, "the webhook-signature header is missing");
        let plain = headers(right.parse().unwrap(), None);
        assert!(verified_body(body, &plain, &secret, NOW, 300, 1000).is_ok());
    }
}
