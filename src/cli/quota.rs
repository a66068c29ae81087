//! `usage-agent quota --user N [--tokens T]`: the user's and the site's quota state through
//! the socket. Exit 0 when the user may spend `T` more tokens, 3 when not, so a script can
//! ask before it spends.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent quota`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 allowed; 3 not allowed; 1 no agent.\n\nExample:\n  usage-agent quota --user 5 --tokens 2000"
)]
pub struct QuotaArgs {
    /// The site's user id.
    #[arg(long)]
    pub user: u64,
    /// Tokens the user is about to spend.
    #[arg(long, default_value_t = 0)]
    pub tokens: u64,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: QuotaArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let path = format!("/v1/quota?user_id={}&tokens={}", args.user, args.tokens);
    let (status, body) = super::runtime()?.block_on(client.request(Method::GET, &path, None))?;
    if !status.is_success() {
        anyhow::bail!(
            "could not read the quota of user {} ({status}): {}",
            args.user,
            error_message(&body)
        );
    }
    let allowed = body["allowed"].as_bool().unwrap_or(false);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", summary(&body, args.tokens));
    }
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The answer in a few lines.
fn summary(answer: &Value, tokens: u64) -> String {
    let limits = answer["limits"].as_array().map_or(&[][..], Vec::as_slice);
    let verdict = if answer["allowed"].as_bool().unwrap_or(false) {
        "allowed"
    } else {
        "NOT allowed"
    };
    let mut out = format!(
        "user {}: {verdict} to spend {tokens} more tokens\n",
        answer["user_id"]
    );
    if limits.is_empty() {
        out.push_str("  no quota is set ([quota] in the config)\n");
    }
    for limit in limits {
        out.push_str(&format!("  {}\n", limit_line(limit)));
    }
    out
}

/// One limit: `site_daily     1200 used + 300 held of 5000, 3500 left, resets ...`.
pub fn limit_line(limit: &Value) -> String {
    format!(
        "{:<13} {} used + {} held of {}, {} left, resets {}",
        limit["scope"].as_str().unwrap_or("?"),
        limit["used"],
        limit["held"],
        limit["limit"],
        limit["remaining"],
        limit["resets_at"].as_str().unwrap_or("?"),
    )
}
