//! What the provider changes on an install: its plan (`PUT .../plan`, kept as history that
//! `GET .../plans` lists), its label
//! (`PUT .../label`) and its erasure with every event and rollup (`DELETE
//! /api/installations/{install_id}`); and [`change_install`], how every admin handler
//! changes one install (`404 unknown_install` when there is none).
//!
//! Each handler checks the provider, reads its body and answers; the change itself is one
//! store call. A budget is [`crate::admin::budget`]'s; nothing here reads usage or money.

use crate::billing::pricing::Plan;
use crate::days::{day_of_ms, day_text};
use crate::http::auth::authorize;
use crate::http::clip::clip;
use crate::http::error::blocking;
use crate::http::error::body_rejection;
use crate::http::error::unknown_install;
use crate::http::error::{ReceiverError, json_body};
use crate::state::ReceiverState;
use crate::store::{ReceiverStore, ReceiverStoreError};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;

/// `PUT /api/installations/{install_id}/plan` with `{"plan": "free" | "pro" | "agency"}`.
pub async fn set_plan(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let body = body.map_err(body_rejection)?;
    let value = json_body(&body)?;
    let plan = value
        .get("plan")
        .and_then(Value::as_str)
        .and_then(|text| text.parse::<Plan>().ok())
        .ok_or_else(|| {
            ReceiverError::invalid_field("invalid_plan", "plan", "must be one of free, pro, agency")
        })?;
    // A change takes effect on the day it is made (the provider's clock, as in the views).
    let today = day_of_ms(app.provider_now().timestamp_millis());
    change_install(&app, &install_id, move |store, id| {
        store.set_plan(id, plan, today)
    })
    .await?;
    tracing::info!(install_id = %clip(&install_id), plan = plan.as_str(), "plan changed");
    Ok(Json(
        json!({"install_id": install_id, "plan": plan.as_str()}),
    ))
}

/// `GET /api/installations/{install_id}/plans`: the install's plans, oldest first, as
/// `[{"plan", "from"}]`, `from` the UTC day each took effect (the first, its enrollment
/// day).
pub async fn plans(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let store = app.store.clone();
    let Some(history) = blocking(move || store.plan_history(&install_id)).await? else {
        return Err(unknown_install());
    };
    let periods: Vec<Value> = history
        .periods()
        .iter()
        .map(|period| json!({"plan": period.plan.as_str(), "from": day_text(period.from_day)}))
        .collect();
    Ok(Json(Value::Array(periods)))
}

/// `PUT /api/installations/{install_id}/label` with `{"label": "..."}` (1 to 100
/// characters, none of them a control character).
pub async fn set_label(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let body = body.map_err(body_rejection)?;
    let value = json_body(&body)?;
    let label = value
        .get("label")
        .and_then(Value::as_str)
        .filter(|label| is_valid_label(label))
        .map(str::to_owned)
        .ok_or_else(|| {
            let rule = "must be a string of 1 to 100 characters, none of them a control character";
            ReceiverError::invalid_field("invalid_label", "label", rule)
        })?;
    let text = label.clone();
    change_install(&app, &install_id, move |store, id| {
        store.set_label(id, &text)
    })
    .await?;
    tracing::info!(install_id = %clip(&install_id), "label changed");
    Ok(Json(json!({"install_id": install_id, "label": label})))
}

/// A label is 1 to 100 characters (Unicode scalar values), as
/// docs/reference/receiver-api.md has it; control characters would only garble the
/// dashboard and the CSV.
fn is_valid_label(label: &str) -> bool {
    let count = label.chars().count();
    (1..=100).contains(&count) && !label.chars().any(char::is_control)
}

/// `DELETE /api/installations/{install_id}`: erases the install's events, rollups and
/// enrollment. The agent would have to enroll again to send anything more.
pub async fn erase(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
) -> Result<Json<Value>, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let store = app.store.clone();
    let id = install_id.clone();
    let Some(events) = blocking(move || store.erase_install(&id)).await? else {
        return Err(unknown_install());
    };
    tracing::info!(install_id = %clip(&install_id), events, "install erased");
    Ok(Json(
        json!({"install_id": install_id, "erased": true, "events_deleted": events}),
    ))
}

/// Runs `change` of the install `install_id` on the blocking pool: `404 unknown_install`
/// when it finds no such install (answers `false`).
pub async fn change_install(
    app: &ReceiverState,
    install_id: &str,
    change: impl FnOnce(&dyn ReceiverStore, &str) -> Result<bool, ReceiverStoreError> + Send + 'static,
) -> Result<(), ReceiverError> {
    let store = app.store.clone();
    let id = install_id.to_owned();
    if blocking(move || change(&*store, &id)).await? {
        Ok(())
    } else {
        Err(unknown_install())
    }
}
