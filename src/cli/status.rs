//! `usage-agent status`: the sync status, as a short summary or the JSON object of
//! `GET /v1/status`. The exit code tells the health, so monitoring can use it directly.

use std::io::IsTerminal;
use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent status`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 healthy, pending or disabled; 3 degraded; 4 failing; 1 no agent.\n\nExample:\n  usage-agent status --json"
)]
pub struct StatusArgs {
    /// Print the status object as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let (status, body) =
        super::runtime()?.block_on(client.request(Method::GET, "/v1/status", None))?;
    if !status.is_success() {
        anyhow::bail!(
            "the agent could not report its status ({status}): {}",
            error_message(&body)
        );
    }
    let health = body["status"].as_str().unwrap_or("unknown").to_owned();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", summary(&body, std::io::stdout().is_terminal()));
    }
    Ok(exit_code(&health))
}

/// 0 healthy, pending or disabled; 3 degraded; 4 failing.
pub fn exit_code(health: &str) -> ExitCode {
    match health {
        "degraded" => ExitCode::from(3),
        "failing" => ExitCode::from(4),
        "healthy" | "pending" | "disabled" => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// A few human lines; the health word coloured only on a terminal.
pub fn summary(status: &Value, colour: bool) -> String {
    let health = status["status"].as_str().unwrap_or("unknown");
    let painted = if colour {
        let code = match health {
            "healthy" => "32",
            "pending" | "disabled" => "36",
            "degraded" => "33",
            _ => "31",
        };
        format!("\x1b[1;{code}m{health}\x1b[0m")
    } else {
        health.to_owned()
    };
    let text = |key: &str| match &status[key] {
        Value::Null => "never".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "usage-agent {}: {painted}\n  install   {}\n  events    {} pending, {} failed, {} synced\n  last sync {} (next {})\n  database  {} bytes, up {} s\n",
        text("version"),
        text("install_id"),
        text("pending_events"),
        text("failed_events"),
        text("synced_events"),
        text("last_sync"),
        text("next_sync"),
        text("db_bytes"),
        text("uptime_s"),
    );
    if let Some(storage) = status["storage"].as_object()
        && storage.get("state").and_then(Value::as_str) != Some("ok")
    {
        out.push_str(&format!(
            "  storage   {} (run `usage-agent check`)\n",
            Value::Object(storage.clone())
        ));
    }
    if let Some(quota) = status["quota"].as_object() {
        out.push_str(&format!(
            "  quota     {} holds open
",
            quota.get("holds").unwrap_or(&Value::Null)
        ));
        for limit in quota
            .get("site_limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "            {}\n",
                super::quota::limit_line(limit)
            ));
        }
    }
    if let Some(error) = status["last_error"].as_object() {
        out.push_str(&format!(
            "  last error [{}] {}\n",
            error.get("category").and_then(Value::as_str).unwrap_or("?"),
            error.get("message").and_then(Value::as_str).unwrap_or("?"),
        ));
    }
    out
}
