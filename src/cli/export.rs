//! `usage-agent export`: write raw events (or daily summaries) to stdout as CSV or JSON,
//! streamed from the agent as it reads them.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use chrono::NaiveDate;
use serde_json::Value;

use super::client::{AgentClient, error_message};
use super::rollup::parse_date;
use crate::config::Config;

/// Output format of `usage-agent export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

/// Options of `usage-agent export`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Days are inclusive, in the agent's timezone.\n\nExample:\n  usage-agent export --from 2026-11-01 --to 2026-11-30 > november.csv\n  usage-agent export --daily --format json"
)]
pub struct ExportArgs {
    /// First day (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub from: Option<NaiveDate>,
    /// Last day (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub to: Option<NaiveDate>,
    /// Export the daily summaries instead of raw events.
    #[arg(long)]
    pub daily: bool,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
}

pub fn run(config: Config, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut query = vec![format!(
        "format={}",
        match args.format {
            ExportFormat::Csv => "csv",
            ExportFormat::Json => "json",
        }
    )];
    if let Some(from) = args.from {
        query.push(format!("from={}", from.format("%Y-%m-%d")));
    }
    if let Some(to) = args.to {
        query.push(format!("to={}", to.format("%Y-%m-%d")));
    }
    if args.daily {
        query.push("daily=true".into());
    }
    let path = format!("/v1/export?{}", query.join("&"));
    let client = AgentClient::new(&config)?;
    super::runtime()?.block_on(async {
        let mut response = client
            .get_streamed(&path)
            .await
            .context("the export was cut off: nothing of it is complete")?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            anyhow::bail!("the export failed ({status}): {}", error_message(&body));
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        while let Some(chunk) = response
            .chunk()
            .await
            .context(
                "the export was cut off before its end: what was written is incomplete (the agent's log says why; `usage-agent status` shows the storage state)",
            )?
        {
            out.write_all(&chunk)
                .context("writing the export to stdout")?;
        }
        out.flush().context("writing the export to stdout")?;
        Ok(ExitCode::SUCCESS)
    })
}
