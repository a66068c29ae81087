//! The usage event and its validation rules (docs/reference/local-api.md, Event fields).
//!
//! Raw JSON goes in, an [`Event`] that cannot be invalid comes out, or a list of
//! [`FieldError`]s naming each bad field and the rule it broke. The field rules
//! (`Source`, `ModelName`, `Origin`, `Tokens`, `context`, `created_at`) are also used by
//! the receiver for wire events. This module does no I/O.

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

mod compact;

/// Largest accepted user id: 2^53, the biggest integer every JSON parser keeps exact.
pub const MAX_USER_ID: u64 = 1 << 53;
/// Largest accepted value of any token counter.
pub const MAX_TOKENS: u64 = 100_000_000;
/// Largest serialized `context` in bytes.
pub const MAX_CONTEXT_BYTES: usize = 4096;
/// Deepest allowed nesting of `context` (the object itself is depth 1).
pub const MAX_CONTEXT_DEPTH: usize = 8;
/// How far in the future `created_at` may be, for clock skew between site and agent.
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);
/// Longest accepted model name.
pub const MAX_MODEL_LEN: usize = 128;
/// Longest accepted origin.
pub const MAX_ORIGIN_LEN: usize = 64;
/// Most events in one batch of the local API.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// Which part of the site made the AI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Inline,
    Bulk,
    Queue,
    Manual,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Inline, Source::Bulk, Source::Queue, Source::Manual];

    pub fn parse(text: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Inline => "inline",
            Source::Bulk => "bulk",
            Source::Queue => "queue",
            Source::Manual => "manual",
        }
    }

    /// Compact code used for storage.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i64) -> Option<Source> {
        Source::ALL.get(usize::try_from(code).ok()?).copied()
    }
}

/// A model name: 1..=128 characters of `[A-Za-z0-9._:/@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ModelName(String);

impl ModelName {
    pub fn parse(text: &str) -> Result<ModelName, String> {
        ModelName::check(text)?;
        Ok(ModelName(text.to_owned()))
    }

    /// The rule of [`ModelName::parse`], without making a copy of the name.
    pub fn check(text: &str) -> Result<(), String> {
        if text.is_empty() || text.len() > MAX_MODEL_LEN {
            return Err(format!("must be 1 to {MAX_MODEL_LEN} characters"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._:/@-".contains(c);
        if !text.chars().all(allowed) {
            return Err("may only contain letters, digits and . _ : / @ -".into());
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What on the site made the call (`plugin:ai-alt-text`, `theme:acme`, `core`):
/// 1..=64 characters of `[a-z0-9._:/-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Origin(String);

impl Origin {
    pub fn parse(text: &str) -> Result<Origin, String> {
        Origin::check(text)?;
        Ok(Origin(text.to_owned()))
    }

    /// The rule of [`Origin::parse`], without making a copy of the name.
    pub fn check(text: &str) -> Result<(), String> {
        if text.is_empty() || text.len() > MAX_ORIGIN_LEN {
            return Err(format!("must be 1 to {MAX_ORIGIN_LEN} characters"));
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._:/-".contains(c);
        if !text.chars().all(allowed) {
            return Err("may only contain lowercase letters, digits and . _ : / -".into());
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Token counts of one AI call. `total` is always `prompt + completion`;
/// cached and cache-write tokens are part of the prompt, reasoning tokens part of the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl Tokens {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// One rule broken by one field of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position of the event in a batch; `None` for a single event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            index: None,
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "events[{i}].{}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// A validated usage event as the agent stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: Uuid,
    pub user_id: u64,
    pub source: Source,
    pub model: ModelName,
    pub tokens: Tokens,
    /// What on the site made the call; `None` when the site did not say.
    pub origin: Option<Origin>,
    /// The local quota hold this event settles. Only the agent's quotas read it: it is
    /// never stored and never sent.
    pub hold_id: Option<Uuid>,
    /// The `context` object, serialized compactly; `None` when absent.
    pub context: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

impl Event {
    pub fn created_at(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.created_at_ms)
            .single()
            .unwrap_or_default()
    }
}

/// Formats a millisecond timestamp as RFC 3339 with millisecond precision and `Z`.
pub fn format_millis(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// [`format_millis`] without allocating, for a sync batch's hundreds of times: the text of
/// the years 0 to 9999 is written in place; any other time goes through [`format_millis`].
pub struct MillisText {
    text: [u8; 24],
    other: Option<String>,
}

impl MillisText {
    pub fn new(ms: i64) -> MillisText {
        use chrono::{Datelike, Timelike};
        let at = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        let mut text = *b"0000-00-00T00:00:00.000Z";
        let Ok(year) = u32::try_from(at.year()) else {
            return MillisText {
                text,
                other: Some(format_millis(ms)),
            };
        };
        if year > 9999 {
            return MillisText {
                text,
                other: Some(format_millis(ms)),
            };
        }
        let mut put = |at: usize, value: u32, digits: usize| {
            let mut value = value;
            for place in (at..at + digits).rev() {
                text[place] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, year, 4);
        put(5, at.month(), 2);
        put(8, at.day(), 2);
        put(11, at.hour(), 2);
        put(14, at.minute(), 2);
        put(17, at.second(), 2);
        put(20, at.timestamp_subsec_millis().min(999), 3);
        MillisText { text, other: None }
    }

    pub fn as_str(&self) -> &str {
        match &self.other {
            Some(other) => other,
            // Only ASCII digits and separators were written.
            None => std::str::from_utf8(&self.text).expect("ASCII"),
        }
    }
}

/// The fields a local event may carry; anything else is rejected as unknown.
const EVENT_FIELDS: &[&str] = &[
    "event_id",
    "user_id",
    "wp_user_id",
    "source",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "origin",
    "hold_id",
    "context",
    "created_at",
];

/// Limits that depend on the clock and configuration rather than on the event alone.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub now: DateTime<Utc>,
    /// The oldest `created_at` accepted (the event retention).
    pub max_age: Duration,
}

/// Validates one JSON event of the local API, collecting every broken rule.
pub fn parse_event(value: &Value, limits: Limits) -> Result<Event, Vec<FieldError>> {
    let Some(object) = value.as_object() else {
        return Err(vec![FieldError::new("event", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    for key in object.keys() {
        if !EVENT_FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(key, "unknown field"));
        }
    }

    let event_id = match object.get("event_id") {
        None | Some(Value::Null) => Some(Uuid::now_v7()),
        Some(v) => match v.as_str().and_then(parse_event_id) {
            Some(id) => Some(id),
            None => {
                errors.push(FieldError::new("event_id", "must be a UUID string"));
                None
            }
        },
    };

    let user_id = match (object.get("user_id"), object.get("wp_user_id")) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "user_id",
                "give user_id or its alias wp_user_id, not both",
            ));
            None
        }
        (Some(v), None) => bounded_integer(v, "user_id", MAX_USER_ID, &mut errors),
        (None, Some(v)) => bounded_integer(v, "wp_user_id", MAX_USER_ID, &mut errors),
        (None, None) => {
            errors.push(FieldError::new("user_id", "is required"));
            None
        }
    };

    let source = parse_source(object.get("source"), &mut errors);
    let model = parse_model(object.get("model"), &mut errors);
    let tokens = parse_tokens(object, &mut errors);
    let origin = parse_origin(object.get("origin"), &mut errors);
    let hold_id = parse_hold_id(object.get("hold_id"), &mut errors);
    let context = parse_context(object.get("context"), &mut errors);
    let created_at_ms = parse_created_at(object.get("created_at"), limits, &mut errors);

    match (
        event_id,
        user_id,
        source,
        model,
        tokens,
        origin,
        hold_id,
        context,
        created_at_ms,
    ) {
        (
            Some(event_id),
            Some(user_id),
            Some(source),
            Some(model),
            Some(tokens),
            Some(origin),
            Some(hold_id),
            Some(context),
            Some(created_at_ms),
        ) if errors.is_empty() => Ok(Event {
            event_id,
            user_id,
            source,
            model,
            tokens,
            origin,
            hold_id,
            context,
            created_at_ms,
        }),
        _ => Err(errors),
    }
}

/// The body of `POST /v1/events` read straight into typed fields, when it is in the plain
/// shape a site sends: one event or `{"events": [...]}`, strings without escapes, integers,
/// no `null`s, every rule kept. Returns the events and whether the body was a batch.
///
/// `None` means "read it as `Value`s": [`parse_event`] is the reference, which names every
/// broken rule; this reading only accepts what it accepts, without a map per event.
pub fn read_typed_events(body: &[u8], limits: Limits) -> Option<(Vec<Event>, bool)> {
    if let Ok(FromObject(one)) = serde_json::from_slice::<FromObject<TypedEvent>>(body) {
        return Some((vec![check_typed_event(&one, limits)?], false));
    }
    let FromObject(batch) = serde_json::from_slice::<FromObject<TypedBatch>>(body).ok()?;
    if batch.events.len() > MAX_BATCH_EVENTS {
        return None;
    }
    let events = batch
        .events
        .iter()
        .map(|FromObject(typed)| check_typed_event(typed, limits))
        .collect::<Option<Vec<_>>>()?;
    Some((events, true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedBatch<'a> {
    #[serde(borrow)]
    events: Vec<FromObject<TypedEvent<'a>>>,
}

/// An event in the plain shape. Optional fields use [`present`], so an explicit `null` is
/// left to the reference reading rather than read as absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedEvent<'a> {
    #[serde(default, deserialize_with = "present")]
    event_id: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    wp_user_id: Option<u64>,
    source: &'a str,
    model: &'a str,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default, deserialize_with = "present")]
    total_tokens: Option<u64>,
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    cache_write_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
    #[serde(default, deserialize_with = "present")]
    origin: Option<&'a str>,
    #[serde(default, deserialize_with = "present")]
    hold_id: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    context: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "present")]
    created_at: Option<&'a str>,
}

/// A derived struct read only from a JSON object.
///
/// Serde's derived structs also read a JSON array of the field values in order
/// (`[[{...}]]` as a batch), a shape neither the local API nor the wire protocol allows and
/// the reference readings (`Value` objects) refuse. Found by the `event_reader` fuzz target:
/// the typed readings wrap their structs in this so they never accept what the reference
/// refuses.
pub struct FromObject<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FromObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(ObjectOnly(deserializer)).map(FromObject)
    }
}

/// Hands a derived struct's request to a map, so an array is a type error. Only
/// `deserialize_struct` is ever asked of it; everything else goes through unchanged.
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Reads a field that is there (absent fields take their `default`, `None`); `null` fails.
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The rules of [`parse_event`] on typed fields; `None` if any is broken.
fn check_typed_event(typed: &TypedEvent, limits: Limits) -> Option<Event> {
    let errors = &mut Vec::new();
    let event_id = match typed.event_id {
        None => Uuid::now_v7(),
        Some(text) => parse_event_id(text)?,
    };
    let user_id = match (typed.user_id, typed.wp_user_id) {
        (Some(id), None) | (None, Some(id)) => within(id, "user_id", MAX_USER_ID, errors)?,
        _ => return None,
    };
    let tokens = Tokens {
        prompt: typed.prompt_tokens,
        completion: typed.completion_tokens,
        cached: typed.cached_tokens,
        cache_write: typed.cache_write_tokens,
        reasoning: typed.reasoning_tokens,
    };
    Some(Event {
        event_id,
        user_id,
        source: Source::parse(typed.source)?,
        model: ModelName::parse(typed.model).ok()?,
        tokens: check_token_counts(tokens, typed.total_tokens, errors)?,
        origin: match typed.origin {
            None => None,
            Some(text) => Some(Origin::parse(text).ok()?),
        },
        hold_id: match typed.hold_id {
            None => None,
            Some(text) => Some(parse_hold_id_text(text)?),
        },
        context: typed_context(typed.context, errors)?,
        created_at_ms: match typed.created_at {
            None => limits.now.timestamp_millis(),
            Some(text) => check_created_at(text, limits, errors)?,
        },
    })
}

/// Every token rule for counters read as integers: each within its bound, then
/// [`token_relations`].
pub fn check_token_counts(
    tokens: Tokens,
    total: Option<u64>,
    errors: &mut Vec<FieldError>,
) -> Option<Tokens> {
    let counters = [
        (tokens.prompt, "prompt_tokens"),
        (tokens.completion, "completion_tokens"),
        (tokens.cached, "cached_tokens"),
        (tokens.cache_write, "cache_write_tokens"),
        (tokens.reasoning, "reasoning_tokens"),
    ];
    let before = errors.len();
    for (n, field) in counters {
        within(n, field, MAX_TOKENS, errors);
    }
    if let Some(total) = total {
        within(total, "total_tokens", 2 * MAX_TOKENS, errors);
    }
    if errors.len() > before {
        return None;
    }
    token_relations(tokens, total, errors)
}

/// [`parse_context`] for a context read as raw JSON text; one already in the form it is
/// stored in is taken as it is.
pub fn typed_context(
    raw: Option<&RawValue>,
    errors: &mut Vec<FieldError>,
) -> Option<Option<String>> {
    match raw {
        None => Some(None),
        Some(raw) if raw.get().len() <= MAX_CONTEXT_BYTES && compact::is_as_stored(raw.get()) => {
            Some(Some(raw.get().to_owned()))
        }
        Some(raw) => {
            let value: Value = serde_json::from_str(raw.get()).ok()?;
            parse_context(Some(&value), errors)
        }
    }
}

/// Reads a required integer field in `0..=max`.
pub fn bounded_integer(
    value: &Value,
    field: &str,
    max: u64,
    errors: &mut Vec<FieldError>,
) -> Option<u64> {
    match value.as_u64() {
        Some(n) => within(n, field, max, errors),
        None => {
            errors.push(out_of_bounds(field, max));
            None
        }
    }
}

/// Checks an integer already read against its bound `0..=max`.
pub fn within(n: u64, field: &str, max: u64, errors: &mut Vec<FieldError>) -> Option<u64> {
    if n <= max {
        Some(n)
    } else {
        errors.push(out_of_bounds(field, max));
        None
    }
}

fn out_of_bounds(field: &str, max: u64) -> FieldError {
    FieldError::new(field, format!("must be an integer from 0 to {max}"))
}

/// Reads an `event_id`: a UUID string other than the nil UUID.
pub fn parse_event_id(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok().filter(|id| !id.is_nil())
}

pub fn parse_source(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Source> {
    match value.and_then(Value::as_str).and_then(Source::parse) {
        Some(source) => Some(source),
        None => {
            errors.push(FieldError::new(
                "source",
                "is required and must be one of inline, bulk, queue, manual",
            ));
            None
        }
    }
}

pub fn parse_model(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<ModelName> {
    let Some(text) = value.and_then(Value::as_str) else {
        errors.push(FieldError::new("model", "is required and must be a string"));
        return None;
    };
    ModelName::parse(text)
        .map_err(|rule| errors.push(FieldError::new("model", rule)))
        .ok()
}

/// Checks an optional `origin`; `Some(None)` means absent, `None` means invalid.
pub fn parse_origin(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Option<Origin>> {
    let text = match value {
        None | Some(Value::Null) => return Some(None),
        Some(Value::String(text)) => text,
        Some(_) => {
            errors.push(FieldError::new("origin", "must be a string"));
            return None;
        }
    };
    match Origin::parse(text) {
        Ok(origin) => Some(Some(origin)),
        Err(rule) => {
            errors.push(FieldError::new("origin", rule));
            None
        }
    }
}

/// Checks an optional `hold_id`; `Some(None)` means absent, `None` means invalid.
fn parse_hold_id(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Option<Uuid>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(v) => match v.as_str().and_then(parse_hold_id_text) {
            Some(id) => Some(Some(id)),
            None => {
                errors.push(FieldError::new(
                    "hold_id",
                    "must be a UUID string, the id of a quota hold",
                ));
                None
            }
        },
    }
}

/// Reads a `hold_id`: a UUID string other than the nil UUID, as the agent issues them.
fn parse_hold_id_text(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text).ok().filter(|id| !id.is_nil())
}

/// Reads the token fields of an event object and checks how they relate.
pub fn parse_tokens(object: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Tokens> {
    let before = errors.len();
    let mut required = |field: &str| match object.get(field) {
        Some(v) => bounded_integer(v, field, MAX_TOKENS, errors),
        None => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
    };
    let prompt = required("prompt_tokens");
    let completion = required("completion_tokens");
    let mut optional = |field: &str| match object.get(field) {
        None | Some(Value::Null) => Some(0),
        Some(v) => bounded_integer(v, field, MAX_TOKENS, errors),
    };
    let cached = optional("cached_tokens");
    let cache_write = optional("cache_write_tokens");
    let reasoning = optional("reasoning_tokens");
    let total = match object.get("total_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => bounded_integer(v, "total_tokens", 2 * MAX_TOKENS, errors),
    };
    if errors.len() > before {
        return None;
    }
    let tokens = Tokens {
        prompt: prompt?,
        completion: completion?,
        cached: cached?,
        cache_write: cache_write?,
        reasoning: reasoning?,
    };
    token_relations(tokens, total, errors)
}

/// Checks how counters already read and bounded relate: `total` (if given) is prompt +
/// completion, cached and cache-write tokens are part of the prompt, reasoning tokens part
/// of the completion.
pub fn token_relations(
    tokens: Tokens,
    total: Option<u64>,
    errors: &mut Vec<FieldError>,
) -> Option<Tokens> {
    let before = errors.len();
    if let Some(total) = total
        && total != tokens.total()
    {
        errors.push(FieldError::new(
            "total_tokens",
            format!(
                "must equal prompt_tokens + completion_tokens ({})",
                tokens.total()
            ),
        ));
    }
    if tokens.cached > tokens.prompt {
        errors.push(FieldError::new(
            "cached_tokens",
            "must not exceed prompt_tokens",
        ));
    }
    if tokens.cache_write > tokens.prompt {
        errors.push(FieldError::new(
            "cache_write_tokens",
            "must not exceed prompt_tokens",
        ));
    }
    if tokens.reasoning > tokens.completion {
        errors.push(FieldError::new(
            "reasoning_tokens",
            "must not exceed completion_tokens",
        ));
    }
    (errors.len() == before).then_some(tokens)
}

/// Checks an optional `context` object; `Some(None)` means absent, `None` means invalid.
pub fn parse_context(
    value: Option<&Value>,
    errors: &mut Vec<FieldError>,
) -> Option<Option<String>> {
    let object = match value {
        None | Some(Value::Null) => return Some(None),
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            errors.push(FieldError::new("context", "must be a JSON object"));
            return None;
        }
    };
    if depth(object) > MAX_CONTEXT_DEPTH {
        errors.push(FieldError::new(
            "context",
            format!("must not nest deeper than {MAX_CONTEXT_DEPTH} levels"),
        ));
        return None;
    }
    let text = object.to_string();
    if text.len() > MAX_CONTEXT_BYTES {
        errors.push(FieldError::new(
            "context",
            format!("must be at most {MAX_CONTEXT_BYTES} bytes serialized"),
        ));
        return None;
    }
    Some(Some(text))
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Reads an optional RFC 3339 `created_at` (default now) within the allowed window,
/// as milliseconds since the epoch.
pub fn parse_created_at(
    value: Option<&Value>,
    limits: Limits,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    match value {
        None | Some(Value::Null) => Some(limits.now.timestamp_millis()),
        Some(v) => check_created_at(v.as_str().unwrap_or(""), limits, errors),
    }
}

/// Checks a `created_at` text: RFC 3339, within the allowed window.
pub fn check_created_at(text: &str, limits: Limits, errors: &mut Vec<FieldError>) -> Option<i64> {
    let Ok(at) = DateTime::parse_from_rfc3339(text).map(|at| at.with_timezone(&Utc)) else {
        errors.push(FieldError::new(
            "created_at",
            "must be an RFC 3339 timestamp such as 2026-11-27T10:29:58Z",
        ));
        return None;
    };
    if at > limits.now + MAX_FUTURE_SKEW {
        errors.push(FieldError::new(
            "created_at",
            "must not be more than 5 minutes in the future",
        ));
        return None;
    }
    if at < limits.now - limits.max_age {
        errors.push(FieldError::new(
            "created_at",
            format!("must not be older than {} days", limits.max_age.num_days()),
        ));
        return None;
    }
    Some(at.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_text_is_format_millis() {
        let mut times = vec![
            0,
            -1,
            1,
            999,
            1_764_240_000_000,
            1_764_240_000_999,
            951_782_400_000,     // 2000-02-29
            253_402_300_799_999, // 9999-12-31T23:59:59.999Z
            253_402_300_800_000, // year 10000: the other form
            -62_167_219_200_000, // year 0
            -62_167_219_200_001, // before year 0
            i64::MAX,
            i64::MIN,
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            times.push((state % 4_000_000_000_000) as i64 - 200_000_000_000);
        }
        for ms in times {
            assert_eq!(MillisText::new(ms).as_str(), format_millis(ms), "{ms}");
        }
    }
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            now: Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap(),
            max_age: Duration::days(90),
        }
    }

    fn valid() -> Value {
        json!({"user_id": 5, "source": "bulk", "model": "gpt-4o-mini",
               "prompt_tokens": 150, "completion_tokens": 25})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut event = valid();
        event[field] = value;
        event
    }

    fn fields_rejected(event: Value) -> Vec<String> {
        parse_event(&event, limits())
            .expect_err("event should be rejected")
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_minimal_event_gets_defaults() {
        let event = parse_event(&valid(), limits()).unwrap();
        assert_eq!(event.user_id, 5);
        assert_eq!(event.source, Source::Bulk);
        assert_eq!(event.tokens.total(), 175);
        assert_eq!(event.created_at_ms, limits().now.timestamp_millis());
        assert_eq!(event.event_id.get_version_num(), 7);
        assert_eq!(event.context, None);
        assert_eq!(event.origin, None);
        assert_eq!(event.hold_id, None);
    }

    #[test]
    fn origin_and_hold_id_are_read_when_given() {
        let hold = "5f0c6c1e-2b7a-4d3e-9f10-0a1b2c3d4e5f";
        for origin in ["plugin:ai-alt-text", "theme:acme", "core", "a", "x.y_z/1-2"] {
            let mut event = with("origin", json!(origin));
            event["hold_id"] = json!(hold);
            event["event_id"] = json!("0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f");
            let parsed = parse_event(&event, limits()).unwrap();
            assert_eq!(parsed.origin.as_ref().map(Origin::as_str), Some(origin));
            assert_eq!(parsed.hold_id, Some(Uuid::parse_str(hold).unwrap()));
            assert_eq!(typed(&event), Some((vec![parsed], false)), "{event}");
        }
        let longest = "o".repeat(MAX_ORIGIN_LEN);
        let parsed = parse_event(&with("origin", json!(longest)), limits()).unwrap();
        assert_eq!(parsed.origin.unwrap().as_str(), longest);
        // An explicit null is absent for the reference reading.
        let null = with("origin", Value::Null);
        assert_eq!(parse_event(&null, limits()).unwrap().origin, None);
    }

    #[test]
    fn a_bad_origin_or_hold_id_names_the_field_and_the_rule() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (with("origin", json!("")), "origin", "1 to 64 characters"),
            (
                with("origin", json!("o".repeat(MAX_ORIGIN_LEN + 1))),
                "origin",
                "1 to 64 characters",
            ),
            (with("origin", json!("Plugin:x")), "origin", "lowercase"),
            (with("origin", json!("plugin x")), "origin", "lowercase"),
            (with("origin", json!("plugin@x")), "origin", "lowercase"),
            (with("origin", json!("thème")), "origin", "lowercase"),
            (with("origin", json!(7)), "origin", "must be a string"),
            (with("hold_id", json!("hold-1")), "hold_id", "UUID"),
            (with("hold_id", json!(12)), "hold_id", "UUID"),
            (
                with("hold_id", json!(Uuid::nil().to_string())),
                "hold_id",
                "UUID",
            ),
        ];
        for (event, field, rule) in cases {
            let errors = parse_event(&event, limits()).expect_err("must be rejected");
            assert_eq!(errors.len(), 1, "{event}: {errors:?}");
            assert_eq!(errors[0].field, field, "{event}");
            assert!(errors[0].message.contains(rule), "{event}: {}", errors[0]);
            assert_eq!(
                typed(&event),
                None,
                "the typed reading must not accept {event}"
            );
        }
    }

    #[test]
    fn wp_user_id_is_an_alias() {
        let mut event = valid();
        event.as_object_mut().unwrap().remove("user_id");
        event["wp_user_id"] = json!(9);
        assert_eq!(parse_event(&event, limits()).unwrap().user_id, 9);
        assert_eq!(fields_rejected(with("wp_user_id", json!(9))), ["user_id"]);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(Value, &str)> = vec![
            (with("event_id", json!("not-a-uuid")), "event_id"),
            (with("user_id", json!(-1)), "user_id"),
            (with("user_id", json!(MAX_USER_ID + 1)), "user_id"),
            (with("user_id", json!("5")), "user_id"),
            (with("source", json!("cron")), "source"),
            (with("model", json!("")), "model"),
            (with("model", json!("gpt 4")), "model"),
            (with("model", json!("x".repeat(129))), "model"),
            (
                with("prompt_tokens", json!(MAX_TOKENS + 1)),
                "prompt_tokens",
            ),
            (with("completion_tokens", json!(1.5)), "completion_tokens"),
            (with("total_tokens", json!(100)), "total_tokens"),
            (with("cached_tokens", json!(151)), "cached_tokens"),
            (with("cache_write_tokens", json!(151)), "cache_write_tokens"),
            (with("reasoning_tokens", json!(26)), "reasoning_tokens"),
            (with("context", json!([1, 2])), "context"),
            (with("context", json!({"a": "x".repeat(4100)})), "context"),
            (
                with(
                    "context",
                    json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}),
                ),
                "context",
            ),
            (with("created_at", json!("yesterday")), "created_at"),
            (
                with("created_at", json!("2026-11-27T12:06:00Z")),
                "created_at",
            ),
            (
                with("created_at", json!("2026-08-01T00:00:00Z")),
                "created_at",
            ),
            (with("colour", json!("red")), "colour"),
        ];
        for (event, field) in cases {
            assert_eq!(fields_rejected(event.clone()), [field], "event {event}");
            assert_eq!(
                typed(&event),
                None,
                "the typed reading must not accept {event}"
            );
        }
        for both in [
            with("wp_user_id", json!(9)),
            with("user_id", Value::Null),
            json!({}),
        ] {
            assert_eq!(typed(&both), None, "{both}");
        }
    }

    /// The typed reading of one event, as the local API would try it.
    fn typed(event: &Value) -> Option<(Vec<Event>, bool)> {
        read_typed_events(&serde_json::to_vec(event).unwrap(), limits())
    }

    #[test]
    fn the_typed_reading_agrees_with_the_reference() {
        let id = "0192f0c1-7a3b-7c4d-8e5f-6a7b8c9d0e1f";
        let events = [
            with("event_id", json!(id)),
            json!({"event_id": id, "wp_user_id": 0, "source": "inline", "model": "m@1:x/y",
                "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "cached_tokens": 3, "cache_write_tokens": 2, "reasoning_tokens": 5,
                "context": {"width": 1024, "mime": "image/png", "nested": [1, {"a": null}]},
                "created_at": "2026-11-27T11:29:58.5+01:00"}),
        ];
        for event in &events {
            let reference = parse_event(event, limits()).unwrap();
            assert_eq!(
                typed(event),
                Some((vec![reference.clone()], false)),
                "{event}"
            );
            let batch = serde_json::to_vec(&json!({"events": [event, event]})).unwrap();
            assert_eq!(
                read_typed_events(&batch, limits()),
                Some((vec![reference.clone(), reference], true))
            );
        }
        let minimal = typed(&valid()).unwrap().0.remove(0);
        assert_eq!(minimal.event_id.get_version_num(), 7);
        assert_eq!(minimal.created_at_ms, limits().now.timestamp_millis());
        // Off the plain shape: left to the reference reading, which accepts these.
        for event in [
            with("cached_tokens", Value::Null),
            with("event_id", Value::Null),
        ] {
            assert!(parse_event(&event, limits()).is_ok());
            assert_eq!(typed(&event), None, "{event}");
        }
        let escaped = br#"{"user_id": 5, "source": "bulk", "model": "gpt\u002d4",
            "prompt_tokens": 1, "completion_tokens": 1}"#;
        assert_eq!(read_typed_events(escaped, limits()), None);
        let value: Value = serde_json::from_slice(escaped).unwrap();
        assert_eq!(
            parse_event(&value, limits()).unwrap().model.as_str(),
            "gpt-4"
        );
        let too_many = json!({"events": vec![valid(); MAX_BATCH_EVENTS + 1]});
        assert_eq!(
            read_typed_events(&serde_json::to_vec(&too_many).unwrap(), limits()),
            None
        );
    }

    /// Found by the `event_reader` fuzz target (`fuzz/corpus/event_reader/regression-array-batch`):
    /// the typed reading took `[[]]` as an empty batch, which the reference refuses.
    #[test]
    fn bodies_in_array_form_are_refused_by_the_typed_reading_as_by_the_reference() {
        for body in [
            &b"[[]]"[..],
            br#"[[{"user_id": 5, "source": "bulk", "model": "m",
            "prompt_tokens": 1, "completion_tokens": 1}]]"#,
            br#"{"events": [[5, 0]]}"#,
        ] {
            assert_eq!(read_typed_events(body, limits()), None, "{:?}", body);
            let value: Value = serde_json::from_slice(body).unwrap();
            let reference = match value.get("events") {
                Some(events) => parse_event(&events[0], limits()),
                None => parse_event(&value, limits()),
            };
            assert!(reference.is_err(), "{value}");
        }
        // The object form of the same batch still takes the typed reading.
        let object = br#"{"events": [{"user_id": 5, "source": "bulk", "model": "m",
            "prompt_tokens": 1, "completion_tokens": 1}]}"#;
        assert_eq!(read_typed_events(object, limits()).unwrap().0.len(), 1);
    }

    #[test]
    fn missing_required_fields_are_all_reported() {
        let fields = fields_rejected(json!({}));
        for field in [
            "user_id",
            "source",
            "model",
            "prompt_tokens",
            "completion_tokens",
        ] {
            assert!(
                fields.contains(&field.to_string()),
                "{field} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn boundaries_are_inclusive() {
        let event = json!({"user_id": MAX_USER_ID, "source": "manual", "model": "a",
            "prompt_tokens": MAX_TOKENS, "completion_tokens": 0, "total_tokens": MAX_TOKENS,
            "cached_tokens": MAX_TOKENS, "created_at": "2026-11-27T12:05:00Z",
            "context": {"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}});
        assert!(parse_event(&event, limits()).is_ok());
        assert!(typed(&event).is_some());
    }

    #[test]
    fn source_codes_round_trip() {
        for source in Source::ALL {
            assert_eq!(Source::from_code(source.code().into()), Some(source));
        }
        assert_eq!(Source::from_code(4), None);
    }
}
