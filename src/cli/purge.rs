//! `usage-agent purge`: apply retention now and print what was deleted.

use std::process::ExitCode;

use reqwest::Method;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent purge`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Deletes raw events older than retention.event_days (once their day is rolled up) and daily summaries older than retention.daily_days.\n\nExample:\n  usage-agent purge"
)]
pub struct PurgeArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let (status, body) =
        super::runtime()?.block_on(client.request(Method::POST, "/v1/purge", None))?;
    if !status.is_success() {
        anyhow::bail!("the purge failed ({status}): {}", error_message(&body));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!(
            "Deleted {} raw event(s) before {} ({} never synced) and {} daily row(s) before {}.",
            body["events_deleted"],
            body["events_kept_from"].as_str().unwrap_or("?"),
            body["unsynced_deleted"],
            body["daily_rows_deleted"],
            body["daily_kept_from"].as_str().unwrap_or("?"),
        );
    }
    Ok(ExitCode::SUCCESS)
}
