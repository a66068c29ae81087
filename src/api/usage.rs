//! `GET /v1/usage?from=&to=&group_by=day,user,source,model,origin&user_id=`: local totals, current
//! to the last committed event (the daily summaries, and the raw events of the days touched
//! since the last rollup; see `store::rollup`). Also the query-parameter helpers of the other read endpoints: every bad or
//! unknown parameter is a `400` naming it.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::NaiveDate;
use serde_json::{Map, Value, json};

use super::ApiError;
use crate::calendar::{day_text, parse_day};
use crate::state::SharedState;
use crate::store::rollup::{DayRange, GroupBy, Sums, UsageRow};
use usage_protocol::event::MAX_USER_ID;

/// Query parameters, checked against the names an endpoint knows.
pub struct Params(HashMap<String, String>);

/// A `400` naming the parameter.
pub fn bad_parameter(name: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!("{name}: {message}"),
    )
    .with_details(vec![json!({"parameter": name, "message": message})])
}

impl Params {
    pub fn parse(
        query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        known: &[&str],
    ) -> Result<Params, ApiError> {
        let Query(pairs) = query.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", e.body_text())
        })?;
        let mut map = HashMap::new();
        for (name, value) in pairs {
            if !known.contains(&name.as_str()) {
                return Err(bad_parameter(
                    &name,
                    format!("unknown parameter (known: {})", known.join(", ")),
                ));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(bad_parameter(&name, "given more than once"));
            }
        }
        Ok(Params(map))
    }

    /// A parameter as given, even when empty (`?daily` alone).
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A parameter's value; an empty value counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The inclusive `from` / `to` days, checked.
    pub fn date_range(&self) -> Result<(Option<NaiveDate>, Option<NaiveDate>), ApiError> {
        let from = self
            .get("from")
            .map(|t| parse_date("from", t))
            .transpose()?;
        let to = self.get("to").map(|t| parse_date("to", t)).transpose()?;
        if let (Some(from), Some(to)) = (from, to)
            && from > to
        {
            return Err(bad_parameter("from", format!("{from} is after to ({to})")));
        }
        Ok((from, to))
    }
}

/// Parses a `YYYY-MM-DD` parameter.
pub fn parse_date(name: &str, text: &str) -> Result<NaiveDate, ApiError> {
    parse_day(text)
        .ok_or_else(|| bad_parameter(name, format!("{text:?} is not a date (YYYY-MM-DD)")))
}

/// The `group_by` keys.
fn parse_group_by(text: Option<&str>) -> Result<GroupBy, ApiError> {
    let mut group = GroupBy::default();
    for key in text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        match key {
            "day" => group.day = true,
            "user" => group.user = true,
            "source" => group.source = true,
            "model" => group.model = true,
            "origin" => group.origin = true,
            other => {
                return Err(bad_parameter(
                    "group_by",
                    format!("unknown key {other:?} (use day, user, source, model, origin)"),
                ));
            }
        }
    }
    Ok(group)
}

/// The six token sums and the event count as JSON fields.
pub fn sums_json(sums: &Sums, object: &mut Map<String, Value>) {
    let Value::Object(fields) = serde_json::to_value(sums).expect("Sums always serializes") else {
        unreachable!("Sums serializes to an object")
    };
    object.extend(fields);
}

fn row_json(row: &UsageRow) -> Value {
    let mut object = Map::new();
    if let Some(day) = &row.day {
        object.insert("day".into(), json!(day));
    }
    if let Some(user_id) = row.user_id {
        object.insert("user_id".into(), json!(user_id));
    }
    if let Some(source) = row.source {
        object.insert("source".into(), json!(source.as_str()));
    }
    if let Some(model) = &row.model {
        object.insert("model".into(), json!(model));
    }
    if let Some(origin) = &row.origin {
        object.insert("origin".into(), json!(origin));
    }
    sums_json(&row.sums, &mut object);
    Value::Object(object)
}

pub async fn usage(
    State(state): State<SharedState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = Params::parse(query, &["from", "to", "group_by", "user_id"])?;
    let (from, to) = params.date_range()?;
    let group = parse_group_by(params.get("group_by"))?;
    let user_id = params
        .get("user_id")
        .map(|text| {
            text.parse::<u64>()
                .ok()
                .filter(|id| *id <= MAX_USER_ID)
                .ok_or_else(|| bad_parameter("user_id", "must be an integer from 0 to 2^53"))
        })
        .transpose()?;
    let (from, to) = (from.map(day_text), to.map(day_text));
    let calendar = state.config.timezone;
    let day_of = move |ms: i64| {
        let day = calendar.date_of(ms);
        let (start_ms, end_ms) = calendar.day_range(day);
        DayRange {
            day: day_text(day),
            start_ms,
            end_ms,
        }
    };
    let (rows, totals) = super::read(&state, move |store| {
        store.usage(from.as_deref(), to.as_deref(), user_id, group, &day_of)
    })
    .await?;
    let mut total = Map::new();
    sums_json(&totals, &mut total);
    Ok(Json(json!({
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
        "totals": total,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_keys_are_checked() {
        let group = parse_group_by(Some("day, model")).unwrap();
        assert!(group.day && group.model && !group.user && !group.source && !group.origin);
        assert!(parse_group_by(Some("origin")).unwrap().origin);
        assert_eq!(parse_group_by(None).unwrap(), GroupBy::default());
        let error = parse_group_by(Some("day,week")).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.message.contains("group_by") && error.message.contains("week"),
            "{}",
            error.message
        );
    }

    #[test]
    fn dates_are_checked_and_named() {
        let error = parse_date("from", "2026-13-01").unwrap_err();
        assert!(error.message.starts_with("from:"), "{}", error.message);
        let params = Params(HashMap::from([
            ("from".to_owned(), "2026-03-02".to_owned()),
            ("to".to_owned(), "2026-03-01".to_owned()),
        ]));
        assert!(params.date_range().is_err());
    }
}
