//! `usage-agent rollup [--date D]`: recompute the daily summaries now (every day touched
//! since the last rollup, or one given day) and print what was done.

use std::process::ExitCode;

use chrono::NaiveDate;
use reqwest::Method;
use serde_json::Value;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent rollup`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  usage-agent rollup\n  usage-agent rollup --date 2026-11-27")]
pub struct RollupArgs {
    /// Recompute this day (YYYY-MM-DD, in the agent's timezone) from its raw events.
    #[arg(long, value_parser = parse_date)]
    pub date: Option<NaiveDate>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a `YYYY-MM-DD` command-line date.
pub fn parse_date(text: &str) -> Result<NaiveDate, String> {
    crate::calendar::parse_day(text).ok_or_else(|| format!("{text:?} is not a date (YYYY-MM-DD)"))
}

pub fn run(config: Config, args: RollupArgs) -> anyhow::Result<ExitCode> {
    let path = match args.date {
        Some(date) => format!("/v1/rollup?date={}", date.format("%Y-%m-%d")),
        None => "/v1/rollup".to_owned(),
    };
    let client = AgentClient::new(&config)?;
    let (status, body) = super::runtime()?.block_on(client.request(Method::POST, &path, None))?;
    if !status.is_success() {
        anyhow::bail!("the rollup failed ({status}): {}", error_message(&body));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let days: Vec<&str> = body["days"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "Recomputed {} day(s) ({} summary rows) after {} new event(s){}",
            days.len(),
            body["rows"],
            body["new_events"],
            if days.is_empty() {
                ".".to_owned()
            } else {
                format!(": {}.", days.join(", "))
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}
