//! Wire types of the agent-to-backend protocol (docs/reference/wire-protocol.md), shared by
//! the agent and the receiver: the batch the agent sends, the per-event rules the receiver
//! applies to it, the answer, the enrollment body, the error body, and the gzip helpers for
//! request bodies.
//!
//! Per-event rules reuse the pure checks of [`crate::event`]; this module adds only what
//! differs on the wire (`user_hash` instead of `user_id`, `total_tokens` and `created_at`
//! required, 91 days of age allowed, no `hold_id`: a local quota hold never leaves the
//! agent). `origin` is sent only when the event has one, so a receiver that predates it
//! still takes the events that name none. It does no I/O besides in-memory (de)compression, and
//! never reads the clock: callers pass `now`.

use std::io::{Read, Write};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{
    self, Event, FieldError, FromObject, Limits, ModelName, Origin, Source, Tokens, format_millis,
    present,
};

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Oldest `created_at` the receiver accepts: one day more than the agent keeps events, so a
/// late retry of the oldest pending event still lands.
pub const MAX_WIRE_EVENT_AGE: Duration = Duration::days(91);
/// Bodies larger than this are sent gzip-compressed.
pub const GZIP_THRESHOLD: usize = 1024;

/// The fields a wire event may carry; anything else is rejected as unknown.
const WIRE_EVENT_FIELDS: &[&str] = &[
    "event_id",
    "user_hash",
    "source",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "origin",
    "context",
    "created_at",
];

/// One batch as the agent sends it (the body of `POST /api/usage/event`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batch {
    /// Also the `webhook-id`; the same on every retry of this batch.
    pub batch_id: Uuid,
    pub install_id: String,
    /// RFC 3339 time at which this batch was built.
    pub sent_at: String,
    pub events: Vec<WireEvent>,
}

impl Batch {
    /// The JSON body to sign and send.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a batch always serializes to JSON")
    }
}

/// A batch as the receiver reads it: the envelope is typed, the events stay raw so that
/// each one can be validated (and rejected) on its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEnvelope {
    pub batch_id: Uuid,
    pub install_id: String,
    pub sent_at: String,
    pub events: Vec<Value>,
}

/// One event on the wire. The user appears only as its [`user_hash`]. It serializes as
/// the [`WireEventRef`] of itself, so both write the same JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct WireEvent {
    pub event_id: Uuid,
    /// 64 lowercase hex characters.
    pub user_hash: String,
    pub source: Source,
    pub model: ModelName,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Omitted when zero, as are the next two.
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    /// Omitted, never `null`, when absent: a receiver that predates `origin` refuses it.
    pub origin: Option<Origin>,
    /// Omitted when absent.
    pub context: Option<RawContext>,
    /// RFC 3339 with millisecond precision and `Z`, as made by [`format_millis`].
    pub created_at: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Serialize for WireEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireEventRef {
            event_id: self.event_id,
            user_hash: &self.user_hash,
            source: self.source,
            model: self.model.as_str(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cached_tokens: self.cached_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
            origin: self.origin.as_ref().map(Origin::as_str),
            context: self.context.as_ref().map(|context| &*context.0),
            created_at: &self.created_at,
        }
        .serialize(serializer)
    }
}

/// One event on the wire, borrowing its text: what the agent writes straight from a stored
/// row, without copying each string into a [`WireEvent`] first. The fields, their order and
/// what is left out are the wire event's ([`WireEvent`] serializes through this).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WireEventRef<'a> {
    pub event_id: Uuid,
    pub user_hash: &'a str,
    pub source: Source,
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a RawValue>,
    pub created_at: &'a str,
}

impl WireEventRef<'_> {
    /// Appends this event's JSON to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("a wire event always serializes to JSON");
    }
}

/// Stored context text as the raw JSON it is sent as; `None` if it is not JSON (as
/// [`RawContext::from_json`], without a copy).
pub fn raw_context(text: &str) -> Option<&RawValue> {
    serde_json::from_str(text).ok()
}

/// Writes into `out` the JSON of a batch whose events are already serialized (each as
/// [`WireEventRef::write_json`] writes it): the bytes [`Batch::to_json`] makes of the same
/// batch. Returns where each event's JSON lies in `out`, so that part of a batch can be
/// sent again on its own without serializing its events anew.
pub fn batch_json<'a>(
    batch_id: Uuid,
    install_id: &str,
    sent_at: &str,
    events: impl IntoIterator<Item = &'a [u8]>,
    out: &mut Vec<u8>,
) -> Vec<std::ops::Range<usize>> {
    let text = |out: &mut Vec<u8>, value: &str| {
        serde_json::to_writer(out, value).expect("a string always serializes to JSON");
    };
    out.extend_from_slice(b"{\"batch_id\":\"");
    out.extend_from_slice(
        batch_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"install_id\":");
    text(out, install_id);
    out.extend_from_slice(b",\"sent_at\":");
    text(out, sent_at);
    out.extend_from_slice(b",\"events\":[");
    let mut spans = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let start = out.len();
        out.extend_from_slice(event);
        spans.push(start..out.len());
    }
    out.extend_from_slice(b"]}");
    spans
}

/// A `context` object carried as its JSON text. Events keep their context compactly
/// serialized, so it is sent as it is stored, never parsed into a tree and written back.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RawContext(Box<RawValue>);

impl RawContext {
    /// Wraps stored context text; `None` if it is not JSON (a damaged row sends no context
    /// rather than an unreadable batch).
    pub fn from_json(text: &str) -> Option<RawContext> {
        RawValue::from_string(text.to_owned()).ok().map(RawContext)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawContext {
    fn eq(&self, other: &RawContext) -> bool {
        self.as_str() == other.as_str()
    }
}

impl WireEvent {
    /// The wire form of a stored agent event of the install `install_id`.
    pub fn from_event(event: &Event, install_id: &str) -> WireEvent {
        WireEvent::with_user_hash(event, user_hash(install_id, event.user_id))
    }

    /// [`WireEvent::from_event`] with the event's [`user_hash`] already computed (a batch
    /// computes each user's once).
    pub fn with_user_hash(event: &Event, user_hash: String) -> WireEvent {
        WireEvent {
            event_id: event.event_id,
            user_hash,
            source: event.source,
            model: event.model.clone(),
            prompt_tokens: event.tokens.prompt,
            completion_tokens: event.tokens.completion,
            total_tokens: event.tokens.total(),
            cached_tokens: event.tokens.cached,
            cache_write_tokens: event.tokens.cache_write,
            reasoning_tokens: event.tokens.reasoning,
            origin: event.origin.clone(),
            context: event.context.as_deref().and_then(RawContext::from_json),
            created_at: format_millis(event.created_at_ms),
        }
    }

    /// `created_at` in milliseconds since the epoch, if it is a valid RFC 3339 time
    /// (always true for an event made by [`parse_wire_event`] or [`WireEvent::from_event`]).
    pub fn created_at_ms(&self) -> Option<i64> {
        DateTime::parse_from_rfc3339(&self.created_at)
            .ok()
            .map(|at| at.timestamp_millis())
    }
}

/// The receiver's answer to a batch it took (`200`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub batch_id: Uuid,
    /// Events stored by this request.
    pub accepted: u64,
    /// Events already stored before, or repeated within the batch.
    pub duplicates: u64,
    /// Events refused by the per-event rules; none of them was stored.
    pub rejected: Vec<RejectedEvent>,
}

/// One event the receiver refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedEvent {
    /// The event's `event_id` as sent (empty when it was not a string).
    pub event_id: String,
    /// Each broken rule as `field: rule`, separated by `; `.
    pub reason: String,
}

/// The body of `POST /api/installations`. Unknown fields are refused, naming the field, so
/// a misspelt or misplaced field is never silently dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub install_id: String,
    /// `whsec_` + standard base64.
    pub secret: String,
    pub site_hash: String,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("install_id", &self.install_id)
            .field("secret", &"<redacted>")
            .field("site_hash", &self.site_hash)
            .finish()
    }
}

/// The receiver's answer to an enrollment: `201` with `enrolled`, or `200` with
/// `already_enrolled` when the same secret was enrolled before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentResult {
    pub install_id: String,
    pub status: EnrollmentStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentStatus {
    Enrolled,
    AlreadyEnrolled,
}

/// Every error answer of the receiver (and of the local API):
/// `{"error": {"code", "message", "details": [...]}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine-readable code such as `invalid_signature`.
    pub code: String,
    /// One sentence for people.
    pub message: String,
    #[serde(default)]
    pub details: Vec<Value>,
}

/// The pseudonymous user key sent instead of a user id:
/// `sha256_hex(install_id + decimal(user_id) + "user")`.
pub fn user_hash(install_id: &str, user_id: u64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(install_id.as_bytes());
    hasher.update(user_id.to_string().as_bytes());
    hasher.update(b"user");
    to_hex(&hasher.finalize())
}

/// Lowercase hex of some bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Whether `text` is exactly 64 lowercase hex characters (a SHA-256 in hex).
pub fn is_sha256_hex(text: &str) -> bool {
    decode_sha256_hex(text).is_some()
}

/// A validated wire event in the forms the receiver stores: the user hash as bytes, the
/// context as compact JSON text, the time as epoch milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedWireEvent {
    pub event_id: Uuid,
    pub user_hash: [u8; 32],
    pub source: Source,
    pub model: ModelName,
    pub tokens: Tokens,
    pub origin: Option<Origin>,
    /// The `context` object serialized compactly; `None` when absent.
    pub context: Option<String>,
    pub created_at_ms: i64,
}

impl CheckedWireEvent {
    /// The event as it travels (and as [`parse_wire_event`] returns it).
    pub fn to_wire(&self) -> WireEvent {
        WireEvent {
            event_id: self.event_id,
            user_hash: to_hex(&self.user_hash),
            source: self.source,
            model: self.model.clone(),
            prompt_tokens: self.tokens.prompt,
            completion_tokens: self.tokens.completion,
            total_tokens: self.tokens.total(),
            cached_tokens: self.tokens.cached,
            cache_write_tokens: self.tokens.cache_write,
            reasoning_tokens: self.tokens.reasoning,
            origin: self.origin.clone(),
            context: self.context.as_deref().and_then(RawContext::from_json),
            created_at: format_millis(self.created_at_ms),
        }
    }
}

/// Validates one event of a received batch with the event rules of the local API as the
/// wire protocol adapts them (docs/reference/wire-protocol.md, Batches), collecting every
/// broken rule.
pub fn parse_wire_event(value: &Value, now: DateTime<Utc>) -> Result<WireEvent, Vec<FieldError>> {
    check_wire_event(value, now).map(|event| event.to_wire())
}

/// [`parse_wire_event`] without turning the result back into wire form: what the receiver
/// uses on its hot path.
pub fn check_wire_event(
    value: &Value,
    now: DateTime<Utc>,
) -> Result<CheckedWireEvent, Vec<FieldError>> {
    let Some(object) = value.as_object() else {
        return Err(vec![FieldError::new("event", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    for key in object.keys() {
        if !WIRE_EVENT_FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(key, "unknown field"));
        }
    }

    let event_id = match object
        .get("event_id")
        .and_then(Value::as_str)
        .and_then(event::parse_event_id)
    {
        Some(id) => Some(id),
        None => {
            errors.push(FieldError::new(
                "event_id",
                "is required and must be a UUID string",
            ));
            None
        }
    };
    let user_hash = match object
        .get("user_hash")
        .and_then(Value::as_str)
        .and_then(decode_sha256_hex)
    {
        Some(bytes) => Some(bytes),
        None => {
            errors.push(FieldError::new(
                "user_hash",
                "is required and must be 64 lowercase hex characters",
            ));
            None
        }
    };
    let source = event::parse_source(object.get("source"), &mut errors);
    let model = event::parse_model(object.get("model"), &mut errors);
    if matches!(object.get("total_tokens"), None | Some(Value::Null)) {
        errors.push(FieldError::new("total_tokens", "is required"));
    }
    let tokens = event::parse_tokens(object, &mut errors);
    let origin = event::parse_origin(object.get("origin"), &mut errors);
    let context = event::parse_context(object.get("context"), &mut errors);
    let created_at_ms = match object.get("created_at") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("created_at", "is required"));
            None
        }
        Some(v) => {
            let limits = Limits {
                now,
                max_age: MAX_WIRE_EVENT_AGE,
            };
            event::parse_created_at(Some(v), limits, &mut errors)
        }
    };

    match (
        event_id,
        user_hash,
        source,
        model,
        tokens,
        origin,
        context,
        created_at_ms,
    ) {
        (
            Some(event_id),
            Some(user_hash),
            Some(source),
            Some(model),
            Some(tokens),
            Some(origin),
            Some(context),
            Some(created_at_ms),
        ) if errors.is_empty() => Ok(CheckedWireEvent {
            event_id,
            user_hash,
            source,
            model,
            tokens,
            origin,
            context,
            created_at_ms,
        }),
        _ => Err(errors),
    }
}

/// A received batch, each event checked on its own.
#[derive(Debug, PartialEq)]
pub struct CheckedBatch {
    pub batch_id: Uuid,
    pub install_id: String,
    pub sent_at: String,
    /// How many events the batch held, valid or not.
    pub event_count: usize,
    pub valid: Vec<CheckedWireEvent>,
    pub rejected: Vec<RejectedEvent>,
}

/// Reads a batch body and checks each event with the rules of [`check_wire_event`].
///
/// A body in exactly the shape the agent sends, with every event valid, is read straight
/// into typed fields: no tree of `serde_json::Value`s, no map per event. Anything else (an
/// unknown or repeated field, an escaped string, a value of another type, a broken rule)
/// is read again as `Value`s by [`check_wire_event`], which is the reference: it names
/// every broken rule, and the typed reading only accepts what it accepts.
pub fn check_batch(body: &[u8], now: DateTime<Utc>) -> Result<CheckedBatch, serde_json::Error> {
    match check_typed_batch(body, now) {
        Some(batch) => Ok(batch),
        None => check_batch_values(body, now),
    }
}

/// The reference reading of [`check_batch`], public so the fuzzer can hold the typed
/// reading to it.
pub fn check_batch_values(
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<CheckedBatch, serde_json::Error> {
    // An object, as the wire protocol has it: a derived struct would also read an array.
    let FromObject(envelope) = serde_json::from_slice::<FromObject<BatchEnvelope>>(body)?;
    let mut valid = Vec::with_capacity(envelope.events.len());
    let mut rejected = Vec::new();
    for value in &envelope.events {
        match check_wire_event(value, now) {
            Ok(event) => valid.push(event),
            Err(errors) => rejected.push(RejectedEvent {
                event_id: value
                    .get("event_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                reason: rejection_reason(&errors),
            }),
        }
    }
    Ok(CheckedBatch {
        batch_id: envelope.batch_id,
        install_id: envelope.install_id,
        sent_at: envelope.sent_at,
        event_count: envelope.events.len(),
        valid,
        rejected,
    })
}

/// A batch in the agent's own shape (see [`check_batch`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedBatch<'a> {
    batch_id: Uuid,
    install_id: String,
    sent_at: String,
    #[serde(borrow)]
    events: Vec<FromObject<TypedWireEvent<'a>>>,
}

/// A wire event in the agent's own shape: strings without escapes, integers, no `null`s
/// (except a `null` context, which both readings take as absent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedWireEvent<'a> {
    event_id: &'a str,
    user_hash: &'a str,
    source: &'a str,
    model: &'a str,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    cache_write_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
    #[serde(default, deserialize_with = "present")]
    origin: Option<&'a str>,
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
    created_at: &'a str,
}

/// The typed reading of [`check_batch`]; `None` sends the body to the reference reading.
fn check_typed_batch(body: &[u8], now: DateTime<Utc>) -> Option<CheckedBatch> {
    let FromObject(batch) = serde_json::from_slice::<FromObject<TypedBatch>>(body).ok()?;
    let limits = Limits {
        now,
        max_age: MAX_WIRE_EVENT_AGE,
    };
    let valid = batch
        .events
        .iter()
        .map(|FromObject(typed)| check_typed_event(typed, limits))
        .collect::<Option<Vec<_>>>()?;
    Some(CheckedBatch {
        batch_id: batch.batch_id,
        install_id: batch.install_id,
        sent_at: batch.sent_at,
        event_count: valid.len(),
        valid,
        rejected: Vec::new(),
    })
}

/// The rules of [`check_wire_event`] on typed fields; `None` if any is broken (the broken
/// rules are then named by the reference reading, so the messages here are dropped).
fn check_typed_event(typed: &TypedWireEvent, limits: Limits) -> Option<CheckedWireEvent> {
    let errors = &mut Vec::new();
    let tokens = Tokens {
        prompt: typed.prompt_tokens,
        completion: typed.completion_tokens,
        cached: typed.cached_tokens,
        cache_write: typed.cache_write_tokens,
        reasoning: typed.reasoning_tokens,
    };
    Some(CheckedWireEvent {
        event_id: event::parse_event_id(typed.event_id)?,
        user_hash: decode_sha256_hex(typed.user_hash)?,
        source: Source::parse(typed.source)?,
        model: ModelName::parse(typed.model).ok()?,
        tokens: event::check_token_counts(tokens, Some(typed.total_tokens), errors)?,
        origin: match typed.origin {
            None => None,
            Some(text) => Some(Origin::parse(text).ok()?),
        },
        context: event::typed_context(typed.context, errors)?,
        created_at_ms: event::check_created_at(typed.created_at, limits, errors)?,
    })
}

/// The 32 bytes of a SHA-256 written as exactly 64 lowercase hex characters.
pub fn decode_sha256_hex(text: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Joins the broken rules of one event into the `reason` of a [`RejectedEvent`].
pub fn rejection_reason(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    parts.join("; ")
}

/// RFC 3339 text for `sent_at`.
pub fn format_sent_at(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Compresses a request body with gzip, favouring speed over size.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(bytes)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Why a gzip body could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GunzipError {
    #[error("the decompressed body is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("the body is not valid gzip")]
    Corrupt,
}

/// Expands a gzip body, refusing to produce more than `max` bytes (a gzip bomb stops there).
pub fn gunzip(bytes: &[u8], max: usize) -> Result<Vec<u8>, GunzipError> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(max));
    gunzip_each(bytes, max, |piece| out.extend_from_slice(piece))?;
    Ok(out)
}

/// Size of the pieces [`gunzip_each`] hands on.
const INFLATE_PIECE: usize = 32 << 10;

/// Expands a gzip body piece by piece, handing each piece to `sink` and keeping none, and
/// returns the expanded length. Refuses, as [`gunzip`] does, to go past `max` bytes: it
/// stops as soon as the output passes `max`, so `sink` never sees more than `max` bytes.
/// The pieces, joined, are exactly what [`gunzip`] returns for the same input, since
/// [`gunzip`] is this with a sink that keeps them.
pub fn gunzip_each(
    bytes: &[u8],
    max: usize,
    mut sink: impl FnMut(&[u8]),
) -> Result<usize, GunzipError> {
    let mut decoder = flate2::read::GzDecoder::new(bytes);
    let mut piece = vec![0u8; INFLATE_PIECE];
    let mut total = 0usize;
    loop {
        // Never ask for more than one byte past the limit, so the answer to a body that
        // is corrupt after `max + 1` bytes is `TooLarge`, whatever the piece size.
        let want = piece.len().min(max.saturating_sub(total).saturating_add(1));
        let n = match decoder.read(&mut piece[..want]) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(GunzipError::Corrupt),
        };
        total += n;
        if total > max {
            return Err(GunzipError::TooLarge { max });
        }
        sink(&piece[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
    }

    fn valid() -> Value {
        json!({"event_id": "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f",
               "user_hash": user_hash("inst", 5), "source": "bulk", "model": "gpt-4o-mini",
               "prompt_tokens": 150, "completion_tokens": 25, "total_tokens": 175,
               "context": {"attachment_id": 42}, "created_at": "2026-11-27T10:29:58.123Z"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut event = valid();
        event[field] = value;
        event
    }

    fn without(field: &str) -> Value {
        let mut event = valid();
        event.as_object_mut().unwrap().remove(field);
        event
    }

    fn fields_rejected(event: &Value) -> Vec<String> {
        parse_wire_event(event, now())
            .expect_err("event should be rejected")
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn user_hash_matches_the_spec_formula() {
        // sha256("inst5user"), computed independently with `printf inst5user | sha256sum`.
        assert_eq!(
            user_hash("inst", 5),
            "e3bb18cdf81c540bb2435cf887d152e7972812e23cd9393ecf5832c3193e1ff1"
        );
        assert!(is_sha256_hex(&user_hash("inst", 5)));
        assert_ne!(user_hash("inst", 5), user_hash("inst", 50));
        assert_ne!(user_hash("other", 5), user_hash("inst", 5));
    }

    #[test]
    fn sha256_hex_decodes_to_its_bytes() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(decode_sha256_hex(&to_hex(&bytes)), Some(bytes));
        assert_eq!(decode_sha256_hex("ab"), None);
        assert_eq!(decode_sha256_hex(&"g".repeat(64)), None);
        assert_eq!(decode_sha256_hex(&"AB".repeat(32)), None);
    }

    #[test]
    fn a_valid_event_parses_and_normalizes() {
        let event = parse_wire_event(&valid(), now()).unwrap();
        assert_eq!(event.source, Source::Bulk);
        assert_eq!(event.total_tokens, 175);
        assert_eq!(event.cached_tokens, 0);
        assert_eq!(
            event
                .context
                .map(|c| serde_json::from_str::<Value>(c.as_str()).unwrap()),
            Some(json!({"attachment_id": 42}))
        );
        assert_eq!(event.created_at, "2026-11-27T10:29:58.123Z");
        let offset = with("created_at", json!("2026-11-27T11:29:58+01:00"));
        assert_eq!(
            parse_wire_event(&offset, now()).unwrap().created_at,
            "2026-11-27T10:29:58.000Z"
        );
    }

    #[test]
    fn serialization_round_trips_through_the_parser() {
        let event = parse_wire_event(&valid(), now()).unwrap();
        let text = serde_json::to_value(&event).unwrap();
        assert!(
            text.get("cached_tokens").is_none(),
            "zero optional fields are omitted"
        );
        assert_eq!(parse_wire_event(&text, now()).unwrap(), event);
        let full = with("reasoning_tokens", json!(5));
        let event = parse_wire_event(&full, now()).unwrap();
        assert_eq!(serde_json::to_value(&event).unwrap()["reasoning_tokens"], 5);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(Value, &str)> = vec![
            (without("event_id"), "event_id"),
            (with("event_id", json!("nope")), "event_id"),
            (
                with("event_id", json!("00000000-0000-0000-0000-000000000000")),
                "event_id",
            ),
            (without("user_hash"), "user_hash"),
            (with("user_hash", json!("ABCD")), "user_hash"),
            (
                with("user_hash", json!(user_hash("i", 1).to_uppercase())),
                "user_hash",
            ),
            (with("user_id", json!(5)), "user_id"),
            (with("source", json!("cron")), "source"),
            (with("model", json!("gpt 4")), "model"),
            (without("total_tokens"), "total_tokens"),
            (with("total_tokens", json!(176)), "total_tokens"),
            (with("cached_tokens", json!(151)), "cached_tokens"),
            (with("context", json!("text")), "context"),
            (with("origin", json!("Plugin:X")), "origin"),
            (with("origin", json!("")), "origin"),
            (with("origin", json!(5)), "origin"),
            // A quota hold is the agent's own: never part of the wire protocol.
            (
                with("hold_id", json!("5f0c6c1e-2b7a-4d3e-9f10-0a1b2c3d4e5f")),
                "hold_id",
            ),
            (without("created_at"), "created_at"),
            (
                with("created_at", json!("2026-11-27T12:05:01Z")),
                "created_at",
            ),
            (
                with("created_at", json!("2026-08-28T11:59:59Z")),
                "created_at",
            ),
        ];
        for (event, field) in cases {
            assert_eq!(fields_rejected(&event), [field], "event {event}");
            assert!(
                check_typed_batch(&batch_body(vec![event.clone()]), now()).is_none(),
                "the typed reading must not accept {event}"
            );
        }
        assert!(check_typed_batch(&batch_body(vec![valid()]), now()).is_some());
        assert_eq!(fields_rejected(&json!([1])), ["event"]);
    }

    #[test]
    fn created_at_may_be_91_days_old_and_5_minutes_ahead() {
        for at in ["2026-08-28T12:00:00Z", "2026-11-27T12:05:00Z"] {
            assert!(
                parse_wire_event(&with("created_at", json!(at)), now()).is_ok(),
                "{at}"
            );
        }
    }

    #[test]
    fn rejection_reasons_name_field_and_rule() {
        let errors = parse_wire_event(&with("model", json!("")).clone(), now()).unwrap_err();
        assert_eq!(
            rejection_reason(&errors),
            "model: must be 1 to 128 characters"
        );
    }

    #[test]
    fn from_event_matches_what_the_receiver_accepts() {
        let local = Event {
            event_id: Uuid::now_v7(),
            user_id: 7,
            source: Source::Inline,
            model: ModelName::parse("claude-3.5").unwrap(),
            tokens: event::Tokens {
                prompt: 10,
                completion: 5,
                cached: 2,
                cache_write: 0,
                reasoning: 1,
            },
            origin: None,
            hold_id: None,
            context: Some(r#"{"a":1}"#.into()),
            created_at_ms: now().timestamp_millis() - 1000,
        };
        let wire = WireEvent::from_event(&local, "inst");
        assert_eq!(wire.user_hash, user_hash("inst", 7));
        assert_eq!(wire.created_at_ms(), Some(local.created_at_ms));
        let sent = serde_json::to_value(&wire).unwrap();
        assert_eq!(parse_wire_event(&sent, now()).unwrap(), wire);
        // No origin: the key is left out, not sent as null, for receivers that predate it.
        assert!(sent.get("origin").is_none(), "{sent}");

        let local = Event {
            origin: Some(Origin::parse("plugin:ai-alt-text").unwrap()),
            hold_id: Some(Uuid::new_v4()),
            ..local
        };
        let sent = serde_json::to_value(WireEvent::from_event(&local, "inst")).unwrap();
        assert_eq!(sent["origin"], "plugin:ai-alt-text");
        assert!(
            sent.get("hold_id").is_none(),
            "a hold never leaves the agent: {sent}"
        );
        let received = check_wire_event(&sent, now()).unwrap();
        assert_eq!(received.origin, local.origin);
    }

    #[test]
    fn batches_assembled_from_borrowed_events_are_the_batch_json() {
        let events: Vec<WireEvent> = (0..5u64)
            .map(|i| WireEvent {
                event_id: Uuid::new_v4(),
                user_hash: user_hash("inst", i),
                source: Source::ALL[i as usize % 4],
                model: ModelName::parse("claude-sonnet-4-5").unwrap(),
                prompt_tokens: 100 + i,
                completion_tokens: 10,
                total_tokens: 110 + i,
                cached_tokens: i % 2,
                cache_write_tokens: i % 3,
                reasoning_tokens: i / 4,
                origin: (i % 2 == 1).then(|| Origin::parse("plugin:ai-alt-text").unwrap()),
                context: (i % 3 != 2)
                    .then(|| RawContext::from_json(r#"{"b":"\u00e9\"x","a":[1, 2]}"#).unwrap()),
                created_at: format_millis(1_764_240_000_123 + i as i64),
            })
            .collect();
        let batch = Batch {
            batch_id: Uuid::new_v4(),
            install_id: "inst \"quoted\" \\ é".into(),
            sent_at: format_sent_at(now()),
            events: events.clone(),
        };
        let pieces: Vec<Vec<u8>> = events
            .iter()
            .map(|event| {
                let mut out = Vec::new();
                WireEventRef {
                    event_id: event.event_id,
                    user_hash: &event.user_hash,
                    source: event.source,
                    model: event.model.as_str(),
                    prompt_tokens: event.prompt_tokens,
                    completion_tokens: event.completion_tokens,
                    total_tokens: event.total_tokens,
                    cached_tokens: event.cached_tokens,
                    cache_write_tokens: event.cache_write_tokens,
                    reasoning_tokens: event.reasoning_tokens,
                    origin: event.origin.as_ref().map(Origin::as_str),
                    context: event
                        .context
                        .as_ref()
                        .and_then(|context| raw_context(context.as_str())),
                    created_at: &event.created_at,
                }
                .write_json(&mut out);
                out
            })
            .collect();
        let mut body = Vec::new();
        let spans = batch_json(
            batch.batch_id,
            &batch.install_id,
            &batch.sent_at,
            pieces.iter().map(Vec::as_slice),
            &mut body,
        );
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            String::from_utf8(batch.to_json()).unwrap()
        );
        for (span, piece) in spans.iter().zip(&pieces) {
            assert_eq!(&body[span.clone()], piece.as_slice());
        }
        let mut empty = Vec::new();
        assert!(batch_json(batch.batch_id, "i", "s", std::iter::empty(), &mut empty).is_empty());
        let none = Batch {
            install_id: "i".into(),
            sent_at: "s".into(),
            events: Vec::new(),
            ..batch
        };
        assert_eq!(empty, none.to_json());
        assert!(raw_context("not json").is_none());
        assert_eq!(raw_context(" {\"a\":1} ").unwrap().get(), r#"{"a":1}"#);
    }

    #[test]
    fn batches_serialize_to_the_spec_shape() {
        let batch = Batch {
            batch_id: Uuid::now_v7(),
            install_id: "inst".into(),
            sent_at: format_sent_at(now()),
            events: vec![parse_wire_event(&valid(), now()).unwrap()],
        };
        let envelope: BatchEnvelope = serde_json::from_slice(&batch.to_json()).unwrap();
        assert_eq!(envelope.batch_id, batch.batch_id);
        assert_eq!(envelope.sent_at, "2026-11-27T12:00:00Z");
        assert_eq!(envelope.events.len(), 1);
        assert!(
            serde_json::from_value::<BatchEnvelope>(json!({"batch_id": Uuid::nil(),
            "install_id": "i", "sent_at": "x", "events": [], "extra": 1}))
            .is_err()
        );
    }

    fn batch_body(events: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({"batch_id": "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f",
            "install_id": "inst", "sent_at": "2026-11-27T12:00:00Z", "events": events}))
        .unwrap()
    }

    #[test]
    fn the_agents_batches_take_the_typed_reading_and_match_the_reference() {
        let agent_event = |i: u64| {
            let local = Event {
                event_id: Uuid::new_v4(),
                user_id: i,
                source: Source::ALL[i as usize % 4],
                model: ModelName::parse("gpt-4o-mini").unwrap(),
                tokens: event::Tokens {
                    prompt: 100 + i,
                    completion: 10,
                    cached: i % 3,
                    cache_write: 0,
                    reasoning: i % 2,
                },
                origin: (i % 3 == 1).then(|| Origin::parse("theme:acme").unwrap()),
                hold_id: None,
                context: i
                    .is_multiple_of(2)
                    .then(|| format!(r#"{{"width":{i},"mime":"image/png"}}"#)),
                created_at_ms: now().timestamp_millis() - 1000,
            };
            WireEvent::from_event(&local, "inst")
        };
        let batch = Batch {
            batch_id: Uuid::new_v4(),
            install_id: "inst".into(),
            sent_at: format_sent_at(now()),
            events: (0..6).map(agent_event).collect(),
        };
        let body = batch.to_json();
        let typed = check_typed_batch(&body, now()).expect("the agent's shape is read typed");
        assert_eq!(typed, check_batch_values(&body, now()).unwrap());
        assert_eq!(typed.valid.len(), 6);
        assert_eq!(
            typed.valid[1].origin.as_ref().map(Origin::as_str),
            Some("theme:acme")
        );
        assert_eq!(typed.valid[0].origin, None);
        assert_eq!(
            typed.valid[0].context.as_deref(),
            Some(r#"{"width":0,"mime":"image/png"}"#),
            "context keeps its key order"
        );
        assert_eq!(check_batch(&body, now()).unwrap(), typed);
    }

    #[test]
    fn bodies_off_the_typed_shape_get_the_reference_reading() {
        let escaped = br#"{"batch_id": "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f", "install_id": "inst",
            "sent_at": "2026-11-27T12:00:00Z", "events": [{"event_id": "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f",
            "user_hash": "e3bb18cdf81c540bb2435cf887d152e7972812e23cd9393ecf5832c3193e1ff1",
            "source": "bulk", "model": "gpt\u002d4", "prompt_tokens": 1, "completion_tokens": 1,
            "total_tokens": 2, "context": { "a" : [1, 2] }, "created_at": "2026-11-27T10:29:58Z"}]}"#;
        let nulls = batch_body(vec![with("cached_tokens", Value::Null)]);
        for body in [&escaped[..], &nulls] {
            assert!(check_typed_batch(body, now()).is_none());
            let batch = check_batch(body, now()).unwrap();
            assert_eq!((batch.valid.len(), batch.rejected.len()), (1, 0));
        }
        let batch = check_batch(escaped, now()).unwrap();
        assert_eq!(batch.valid[0].model.as_str(), "gpt-4");
        assert_eq!(batch.valid[0].context.as_deref(), Some(r#"{"a":[1,2]}"#));
    }

    #[test]
    fn one_bad_event_is_rejected_alone_whichever_reading() {
        let body = batch_body(vec![
            valid(),
            with("total_tokens", json!(176)),
            with("event_id", json!("0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e20")),
        ]);
        assert!(check_typed_batch(&body, now()).is_none());
        let batch = check_batch(&body, now()).unwrap();
        assert_eq!(batch.event_count, 3);
        assert_eq!(batch.valid.len(), 2);
        assert_eq!(
            batch.rejected,
            [RejectedEvent {
                event_id: "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f".into(),
                reason: "total_tokens: must equal prompt_tokens + completion_tokens (175)".into(),
            }]
        );
        assert!(check_batch(b"{\"events\": 1}", now()).is_err());
    }

    /// A wire event as a JSON array of its field values, in the typed struct's order.
    fn array_event() -> Value {
        json!([
            "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f",
            user_hash("inst", 5),
            "bulk",
            "gpt-4o-mini",
            150,
            25,
            175,
            0,
            0,
            0,
            null,
            "2026-11-27T10:29:58.123Z"
        ])
    }

    /// Serde's derived structs also read arrays: the typed reading took an event written
    /// as an array, which the reference rejects, and both took an array envelope.
    #[test]
    fn batches_and_events_in_array_form_are_refused_by_both_readings() {
        let body = batch_body(vec![array_event(), valid()]);
        assert!(check_typed_batch(&body, now()).is_none());
        let batch = check_batch(&body, now()).unwrap();
        assert_eq!(batch, check_batch_values(&body, now()).unwrap());
        assert_eq!((batch.valid.len(), batch.rejected.len()), (1, 1));
        assert_eq!(batch.rejected[0].reason, "event: must be a JSON object");

        let envelope = serde_json::to_vec(&json!([
            "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f",
            "inst",
            "2026-11-27T12:00:00Z",
            [valid()]
        ]))
        .unwrap();
        let error = check_batch(&envelope, now()).unwrap_err();
        assert_eq!(error.classify(), serde_json::error::Category::Data);
        assert!(check_batch_values(&envelope, now()).is_err());
    }

    #[test]
    fn enrollment_debug_hides_the_secret() {
        let enrollment = Enrollment {
            install_id: "i".into(),
            secret: "whsec_c2VjcmV0".into(),
            site_hash: "h".into(),
        };
        assert!(!format!("{enrollment:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn gzip_round_trips_and_bombs_are_capped() {
        let body = br#"{"events":[]}"#.repeat(500);
        let packed = gzip(&body);
        assert!(packed.len() < body.len());
        assert_eq!(gunzip(&packed, body.len()).unwrap(), body);
        assert_eq!(
            gunzip(&packed, body.len() - 1),
            Err(GunzipError::TooLarge {
                max: body.len() - 1
            })
        );
        let bomb = gzip(&vec![0u8; 20 << 20]);
        assert!(bomb.len() < 100 << 10);
        assert_eq!(
            gunzip(&bomb, 10 << 20),
            Err(GunzipError::TooLarge { max: 10 << 20 })
        );
        assert_eq!(gunzip(b"not gzip", 1000), Err(GunzipError::Corrupt));
    }

    /// The plain reading `gunzip_each` must agree with: the whole output through
    /// `read_to_end`, capped at one byte past `max`.
    fn reference_gunzip(bytes: &[u8], max: usize) -> Result<Vec<u8>, GunzipError> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|_| GunzipError::Corrupt)?;
        if out.len() > max {
            return Err(GunzipError::TooLarge { max });
        }
        Ok(out)
    }

    #[test]
    fn streamed_gunzip_hands_on_what_gunzip_keeps_and_stops_at_the_same_cap() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
        let packed = gzip(&body);
        let mut joined = Vec::new();
        let mut largest = 0;
        let len = gunzip_each(&packed, body.len(), |piece| {
            largest = largest.max(piece.len());
            joined.extend_from_slice(piece);
        });
        assert_eq!(len, Ok(body.len()));
        assert_eq!(joined, body);
        assert_eq!(gunzip(&packed, body.len()).unwrap(), body);
        assert!(largest <= INFLATE_PIECE, "{largest}");

        // Past the cap nothing beyond `max` reaches the sink, and the answer is the same
        // as the reference's, even when the damage lies past the cap.
        for max in [0, 1, 1000, body.len() - 1] {
            let mut seen = 0;
            let streamed = gunzip_each(&packed, max, |piece| seen += piece.len());
            assert_eq!(streamed, Err(GunzipError::TooLarge { max }), "{max}");
            assert_eq!(
                reference_gunzip(&packed, max),
                Err(GunzipError::TooLarge { max })
            );
            assert!(seen <= max, "{seen} > {max}");
        }
        let mut damaged = packed.clone();
        let at = damaged.len() - 6;
        damaged[at] ^= 0xff; // the CRC at the end
        for max in [1000, body.len(), body.len() + 1] {
            let expected = reference_gunzip(&damaged, max).map(|out| out.len());
            assert_eq!(gunzip_each(&damaged, max, |_| ()), expected, "{max}");
        }
        assert_eq!(
            reference_gunzip(&damaged, body.len()),
            Err(GunzipError::Corrupt)
        );
        for odd in [&b""[..], b"not gzip", &packed[..10]] {
            let expected = reference_gunzip(odd, 1000).map(|out| out.len());
            assert_eq!(gunzip_each(odd, 1000, |_| ()), expected);
        }
    }
}
