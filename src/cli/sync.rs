//! `usage-agent sync`: ask the running agent to sync now and print what the run did.
//! Exits 1 when the run ended with an error (events then stay pending).

use std::process::ExitCode;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent sync`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Waits for a run already in progress, then runs one. Exit code 1 when the run stopped on an error.\n\nExample:\n  usage-agent sync\n  usage-agent sync --json"
)]
pub struct SyncArgs {
    /// Print the run's report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: SyncArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let (status, body) =
        super::runtime()?.block_on(client.request(Method::POST, "/v1/sync", None))?;
    if status == StatusCode::CONFLICT {
        anyhow::bail!("{}", error_message(&body));
    }
    if !status.is_success() {
        anyhow::bail!(
            "the agent could not run a sync ({status}): {}",
            error_message(&body)
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", summary(&body));
    }
    Ok(if body["error"].is_null() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The report in a few human lines.
pub fn summary(report: &Value) -> String {
    let n = |key: &str| report[key].as_u64().unwrap_or(0);
    let mut out = format!(
        "Sent {} events in {} batches in {} ms: {} accepted, {} duplicates, {} rejected.\n",
        n("sent"),
        n("batches"),
        n("duration_ms"),
        n("accepted"),
        n("duplicates"),
        n("rejected"),
    );
    if n("rejected") > 0 {
        out.push_str(
            "Rejected events are kept as failed; `usage-agent retry-failed` queues them again.\n",
        );
    }
    if let Some(error) = report["error"].as_object() {
        out.push_str(&format!(
            "The run stopped on a {} error: {}\nUnsent events stay pending and are retried at the next run.\n",
            error.get("category").and_then(Value::as_str).unwrap_or("?"),
            error.get("message").and_then(Value::as_str).unwrap_or("?"),
        ));
    }
    out
}
