//! `usage-agent record`: record one event through the socket, as a site does.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::{Value, json};

use super::UsageError;
use super::client::{AgentClient, error_message};
use crate::config::Config;

/// Options of `usage-agent record`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  usage-agent record --user 5 --source bulk --model gpt-4o-mini \\\n      --prompt-tokens 150 --completion-tokens 25 --context '{\"attachment_id\": 42}'"
)]
pub struct RecordArgs {
    /// The site's user id (0 for no user).
    #[arg(long)]
    pub user: u64,
    /// inline, bulk, queue or manual.
    #[arg(long)]
    pub source: String,
    /// Model name, e.g. gpt-4o-mini.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt_tokens: u64,
    #[arg(long)]
    pub completion_tokens: u64,
    /// Event id (UUID); the agent makes one if absent.
    #[arg(long)]
    pub event_id: Option<String>,
    /// A JSON object such as '{"attachment_id": 42}'.
    #[arg(long)]
    pub context: Option<String>,
}

pub fn run(config: Config, args: RecordArgs) -> anyhow::Result<ExitCode> {
    let mut event = json!({
        "user_id": args.user,
        "source": args.source,
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
    });
    if let Some(id) = args.event_id {
        event["event_id"] = Value::String(id);
    }
    if let Some(text) = args.context {
        let context: Value = serde_json::from_str(&text)
            .map_err(|e| UsageError(format!("--context is not valid JSON: {e}")))?;
        event["context"] = context;
    }
    let client = AgentClient::new(&config)?;
    let (status, body) =
        super::runtime()?.block_on(client.request(Method::POST, "/v1/events", Some(&event)))?;
    if status.is_success() {
        println!("{body}");
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!(
            "the agent refused the event ({status}): {}",
            error_message(&body)
        )
    }
}
