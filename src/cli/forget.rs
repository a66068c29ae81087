//! `usage-agent forget --user N`: erase one user's local events and daily summaries (right
//! to erasure) and print the counts.

use std::process::ExitCode;

use reqwest::Method;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent forget`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  usage-agent forget --user 5")]
pub struct ForgetArgs {
    /// The site's user id.
    #[arg(long)]
    pub user: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: ForgetArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let path = format!("/v1/users/{}", args.user);
    let (status, body) = super::runtime()?.block_on(client.request(Method::DELETE, &path, None))?;
    if !status.is_success() {
        anyhow::bail!(
            "could not erase user {} ({status}): {}",
            args.user,
            error_message(&body)
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!(
            "Erased user {}: {} event(s) and {} daily row(s) deleted.",
            args.user, body["events_deleted"], body["daily_rows_deleted"],
        );
    }
    Ok(ExitCode::SUCCESS)
}
