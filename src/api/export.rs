//! `GET /v1/export?from=&to=&daily=&format=csv|json`: data portability. Raw events (or,
//! with `daily`, the daily summaries) as CSV with a header row (the default) or as JSON
//! (`{"events": [...]}` / `{"rows": [...]}`), streamed: a blocking task reads a page at a
//! time from the reader connection and feeds a small bounded channel, so a 90-day export
//! never sits in memory and a slow client slows the reading down. The install secret is
//! never part of it. `from` / `to` are inclusive days in the agent's time zone.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::ApiError;
use super::usage::{Params, bad_parameter, sums_json};
use crate::calendar::{Calendar, day_text};
use crate::state::{AppState, SharedState};
use crate::store::StoreError;
use crate::store::export::{ExportCursor, StoredEvent};
use crate::store::rollup::DailyRow;
use usage_protocol::event::format_millis;

/// Events read per page.
const PAGE: usize = 1000;
/// Pages buffered between the reading task and the socket.
const BUFFERED_PAGES: usize = 4;

/// Column names of an event export, in order.
pub const EVENT_COLUMNS: [&str; 14] = [
    "event_id",
    "user_id",
    "source",
    "model",
    "origin",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "context",
    "created_at",
    "synced_at",
];

/// Column names of a daily export (the `/v1/usage` names).
pub const DAILY_COLUMNS: [&str; 12] = [
    "day",
    "user_id",
    "source",
    "model",
    "origin",
    "events",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

/// What to export.
#[derive(Debug, Clone, Copy)]
struct Plan {
    format: Format,
    daily: bool,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
}

pub async fn export(
    State(state): State<SharedState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = Params::parse(query, &["from", "to", "daily", "format"])?;
    let (from, to) = params.date_range()?;
    let format = match params.get("format").unwrap_or("csv") {
        "csv" => Format::Csv,
        "json" => Format::Json,
        other => {
            return Err(bad_parameter(
                "format",
                format!("{other:?} is not csv or json"),
            ));
        }
    };
    // `?daily` alone means yes.
    let daily = match params.raw("daily") {
        None => false,
        Some("" | "1" | "true") => true,
        Some("0" | "false") => false,
        Some(other) => {
            return Err(bad_parameter(
                "daily",
                format!("{other:?} is not true or false"),
            ));
        }
    };
    let calendar = state.config.timezone;
    let plan = Plan {
        format,
        daily,
        from,
        to,
    };

    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(BUFFERED_PAGES);
    let reading = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        if let Err(error) = produce(&reading, plan, calendar, &tx) {
            tracing::error!(%error, "export failed");
            reading.writer.storage().observe(&error);
            // An error item makes the server cut the chunked body before its last
            // chunk, so a client never takes a partial export for a whole one.
            let _ = tx.blocking_send(Err(std::io::Error::other(error)));
        }
    });
    // The first page is read before answering, so an export that cannot start gets an
    // error answer rather than a `200` cut short.
    let first = match rx.recv().await {
        Some(Ok(bytes)) => bytes,
        Some(Err(error)) => return Err(first_page_error(error)),
        None => return Err(ApiError::internal("the export ended before its first page")),
    };
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Json => "application/json",
    };
    let body = tokio_stream::once(Ok(first)).chain(ReceiverStream::new(rx));
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response())
}

/// The error answer of an export whose first page could not be read.
fn first_page_error(error: std::io::Error) -> ApiError {
    match error
        .into_inner()
        .map(|inner| inner.downcast::<StoreError>())
    {
        Some(Ok(store_error)) => ApiError::from(*store_error),
        Some(Err(other)) => ApiError::internal(other.to_string()),
        None => ApiError::internal("the export failed before its first page"),
    }
}

/// Reads page after page and sends each, formatted; stops early when the client is gone.
fn produce(
    state: &AppState,
    plan: Plan,
    calendar: Calendar,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), StoreError> {
    let send = |bytes: Vec<u8>| tx.blocking_send(Ok(Bytes::from(bytes))).is_ok();
    let read = |work: &mut dyn FnMut(&crate::store::Store) -> Result<(), StoreError>| {
        let store = state.reader.lock().unwrap_or_else(|p| p.into_inner());
        work(&store)
    };
    let mut out = Encoder::new(plan.format, plan.daily);
    if plan.daily {
        let mut after = plan
            .from
            .and_then(|d| d.pred_opt())
            .map(day_text)
            .unwrap_or_default();
        let to = plan.to.map(day_text);
        loop {
            let mut page = Vec::new();
            read(&mut |store| {
                page = store.daily_page(&after, to.as_deref())?;
                Ok(())
            })?;
            let Some(last) = page.last() else { break };
            after = last.day.clone();
            page.iter().for_each(|row| out.daily(row));
            if !send(out.take()) {
                return Ok(());
            }
        }
    } else {
        let (start, end) = calendar.range_ms(plan.from, plan.to);
        let mut cursor = None;
        loop {
            let mut page = Vec::new();
            read(&mut |store| {
                page = store.events_page(start, end, cursor, PAGE)?;
                Ok(())
            })?;
            let Some(last) = page.last() else { break };
            cursor = Some(ExportCursor {
                created_at_ms: last.created_at_ms,
                seq: last.seq,
            });
            page.iter().for_each(|event| out.event(event));
            if !send(out.take()) {
                return Ok(());
            }
            if page.len() < PAGE {
                break;
            }
        }
    }
    send(out.finish());
    Ok(())
}

/// Formats rows as CSV or JSON, a page at a time.
pub struct Encoder {
    format: Format,
    daily: bool,
    buffer: Vec<u8>,
    rows: u64,
}

impl Encoder {
    /// Starts an export: the CSV header row, or the opening of the JSON object.
    pub fn new(format: Format, daily: bool) -> Encoder {
        let mut encoder = Encoder {
            format,
            daily,
            buffer: Vec::new(),
            rows: 0,
        };
        match format {
            Format::Csv => {
                let header: &[&str] = if daily {
                    &DAILY_COLUMNS
                } else {
                    &EVENT_COLUMNS
                };
                encoder.csv_record(header.iter().map(|s| s.to_string()).collect());
            }
            Format::Json => {
                let key = if daily { "rows" } else { "events" };
                encoder
                    .buffer
                    .extend_from_slice(format!("{{\"{key}\":[").as_bytes());
            }
        }
        encoder
    }

    fn csv_record(&mut self, fields: Vec<String>) {
        let mut writer = csv::Writer::from_writer(&mut self.buffer);
        // Writing to a Vec cannot fail.
        let _ = writer.write_record(&fields);
        let _ = writer.flush();
    }

    fn json_value(&mut self, value: &Value) {
        if self.rows > 0 {
            self.buffer.push(b',');
        }
        serde_json::to_writer(&mut self.buffer, value).expect("a JSON value always serializes");
    }

    pub fn event(&mut self, event: &StoredEvent) {
        debug_assert!(!self.daily);
        let t = &event.tokens;
        match self.format {
            Format::Csv => self.csv_record(vec![
                event.event_id.to_string(),
                event.user_id.to_string(),
                event.source.as_str().to_owned(),
                event.model.clone(),
                event.origin.clone().unwrap_or_default(),
                t.prompt.to_string(),
                t.completion.to_string(),
                t.total().to_string(),
                t.cached.to_string(),
                t.cache_write.to_string(),
                t.reasoning.to_string(),
                event.context.clone().unwrap_or_default(),
                format_millis(event.created_at_ms),
                event.synced_at_ms.map(format_millis).unwrap_or_default(),
            ]),
            Format::Json => {
                let context = event
                    .context
                    .as_deref()
                    .and_then(|text| serde_json::from_str::<Value>(text).ok())
                    .unwrap_or(Value::Null);
                self.json_value(&json!({
                    "event_id": event.event_id.to_string(),
                    "user_id": event.user_id,
                    "source": event.source.as_str(),
                    "model": event.model,
                    "origin": event.origin,
                    "prompt_tokens": t.prompt,
                    "completion_tokens": t.completion,
                    "total_tokens": t.total(),
                    "cached_tokens": t.cached,
                    "cache_write_tokens": t.cache_write,
                    "reasoning_tokens": t.reasoning,
                    "context": context,
                    "created_at": format_millis(event.created_at_ms),
                    "synced_at": event.synced_at_ms.map(format_millis),
                }))
            }
        }
        self.rows += 1;
    }

    pub fn daily(&mut self, row: &DailyRow) {
        debug_assert!(self.daily);
        let s = &row.sums;
        match self.format {
            Format::Csv => self.csv_record(vec![
                row.day.clone(),
                row.user_id.to_string(),
                row.source.as_str().to_owned(),
                row.model.clone(),
                row.origin.clone().unwrap_or_default(),
                s.events.to_string(),
                s.prompt_tokens.to_string(),
                s.completion_tokens.to_string(),
                s.total_tokens.to_string(),
                s.cached_tokens.to_string(),
                s.cache_write_tokens.to_string(),
                s.reasoning_tokens.to_string(),
            ]),
            Format::Json => {
                let mut object = Map::new();
                object.insert("day".into(), json!(row.day));
                object.insert("user_id".into(), json!(row.user_id));
                object.insert("source".into(), json!(row.source.as_str()));
                object.insert("model".into(), json!(row.model));
                object.insert("origin".into(), json!(row.origin));
                sums_json(s, &mut object);
                self.json_value(&Value::Object(object));
            }
        }
        self.rows += 1;
    }

    /// The bytes formatted so far.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// The rest, closing the JSON object.
    pub fn finish(mut self) -> Vec<u8> {
        if self.format == Format::Json {
            self.buffer.extend_from_slice(b"]}");
        }
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use usage_protocol::event::{Source, Tokens};

    fn stored(context: Option<&str>) -> StoredEvent {
        StoredEvent {
            seq: 1,
            event_id: Uuid::new_v4(),
            user_id: 42,
            source: Source::Queue,
            model: "gpt-4o-mini".into(),
            origin: context.map(|_| "plugin:ai-alt-text".to_owned()),
            tokens: Tokens {
                prompt: 150,
                completion: 25,
                cached: 100,
                cache_write: 10,
                reasoning: 5,
            },
            context: context.map(str::to_owned),
            created_at_ms: 1_764_240_000_123,
            synced_at_ms: Some(1_764_240_100_000),
        }
    }

    #[test]
    fn csv_parses_back_to_the_same_events() {
        let events = [
            stored(Some(
                r#"{"alt":"a \"quoted\", comma\nand newline","id":42}"#,
            )),
            stored(None),
        ];
        let mut encoder = Encoder::new(Format::Csv, false);
        events.iter().for_each(|e| encoder.event(e));
        let mut text = encoder.take();
        text.extend(encoder.finish());
        let mut reader = csv::Reader::from_reader(text.as_slice());
        assert_eq!(
            reader.headers().unwrap().iter().collect::<Vec<_>>(),
            EVENT_COLUMNS
        );
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(records.len(), 2);
        for (record, event) in records.iter().zip(&events) {
            assert_eq!(record[0].parse::<Uuid>().unwrap(), event.event_id);
            assert_eq!(record[1].parse::<u64>().unwrap(), event.user_id);
            assert_eq!(&record[2], "queue");
            assert_eq!(&record[3], "gpt-4o-mini");
            assert_eq!(
                record.get(4).filter(|c| !c.is_empty()),
                event.origin.as_deref()
            );
            assert_eq!(&record[7], "175");
            assert_eq!(
                record.get(11).filter(|c| !c.is_empty()),
                event.context.as_deref()
            );
            assert_eq!(&record[12], "2025-11-27T10:40:00.123Z");
            assert_eq!(&record[13], "2025-11-27T10:41:40.000Z");
        }
    }

    #[test]
    fn json_export_is_one_valid_document() {
        let mut encoder = Encoder::new(Format::Json, false);
        let mut text = encoder.take();
        encoder.event(&stored(Some(r#"{"id":1}"#)));
        encoder.event(&stored(None));
        text.extend(encoder.take());
        text.extend(encoder.finish());
        let value: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(value["events"].as_array().unwrap().len(), 2);
        assert_eq!(value["events"][0]["context"], json!({"id": 1}));
        assert_eq!(value["events"][0]["origin"], "plugin:ai-alt-text");
        assert_eq!(value["events"][1]["context"], Value::Null);
        assert_eq!(value["events"][1]["origin"], Value::Null);
        let empty = Encoder::new(Format::Json, true).finish();
        assert_eq!(
            serde_json::from_slice::<Value>(&empty).unwrap(),
            json!({"rows": []})
        );
    }
}
