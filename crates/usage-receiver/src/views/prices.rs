//! `GET /api/prices` (basic auth): the price book in force and the environment's
//! fallback prices, as the provider's tools read them. Amounts are currency units per
//! million tokens (the book) or per 1000 tokens (the fallback), as configured.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use serde_json::{Map, Value, json};

use crate::billing::money::{MICROS_PER_UNIT, Micros};
use crate::http::auth::authorize;
use crate::http::error::ReceiverError;
use crate::state::ReceiverState;

/// A price as a JSON number of currency units (exact for any price below 2^53 micro-units).
fn units(price: Micros) -> Value {
    Value::from(price.0 as f64 / MICROS_PER_UNIT as f64)
}

/// `GET /api/prices`.
pub async fn show(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let book = app.pricing.book();
    let models: Vec<Value> = book
        .map(|book| {
            book.entries
                .iter()
                .map(|entry| {
                    json!({
                        "match": entry.pattern.to_text(),
                        "effective_from": entry.effective_from.format("%Y-%m-%d").to_string(),
                        "input_per_mtok": units(entry.rates.input),
                        "cached_input_per_mtok": units(entry.rates.cached_input),
                        "cache_write_per_mtok": units(entry.rates.cache_write),
                        "output_per_mtok": units(entry.rates.output),
                        "reasoning_per_mtok": units(entry.rates.reasoning),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let settings = &app.settings;
    let overrides: Map<String, Value> = settings
        .model_cost_overrides
        .iter()
        .map(|(model, price)| (model.clone(), json!(price)))
        .collect();
    Ok(Json(json!({
        "currency": book.map(|book| book.currency.clone()),
        "model": models,
        "fallback": {
            "model_cost_overrides": overrides,
            "default_cost_per_1k_tokens": settings.default_cost_per_1k_tokens,
        },
    })))
}
