//! `usage-agent retry-failed`: put the events the backend rejected back in the sync queue.

use std::process::ExitCode;

use reqwest::Method;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent retry-failed`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Use it after the cause of a rejection is fixed (for example the backend's rules changed).\n\nExample:\n  usage-agent retry-failed && usage-agent sync"
)]
pub struct RetryFailedArgs {}

pub fn run(config: Config, _args: RetryFailedArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let (status, body) =
        super::runtime()?.block_on(client.request(Method::POST, "/v1/retry-failed", None))?;
    if !status.is_success() {
        anyhow::bail!(
            "the agent could not requeue failed events ({status}): {}",
            error_message(&body)
        );
    }
    let requeued = body["requeued"].as_u64().unwrap_or(0);
    println!(
        "Requeued {requeued} failed events; the next sync sends them (`usage-agent sync` to send them now)."
    );
    Ok(ExitCode::SUCCESS)
}
