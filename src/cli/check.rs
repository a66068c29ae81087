//! `usage-agent check`: a full integrity check of the agent's database, through
//! the socket (`POST /v1/check`), so a sound result clears the storage state the running
//! agent shows. Exit 0 sound, 3 damaged.
//!
//! With no agent answering, the file is checked directly instead (read only, so safe
//! beside anything): an operator who stopped the agent after a failure still learns
//! whether the file is sound. That result changes no stored state; the next `check`
//! through a running agent does.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::client::{AgentClient, NotRunning, error_message};
use crate::config::Config;
use crate::store::Verdict;
use crate::store::salvage::integrity_check;

/// Exit code of a damaged database.
const DAMAGED: u8 = 3;

/// Options of `usage-agent check`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 sound; 3 damaged; 1 the check could not run.\nWithout a running agent, the database file is checked directly.\n\nExample:\n  usage-agent check --json"
)]
pub struct CheckArgs {
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(config: Config, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(&config)?;
    let answer = super::runtime()?.block_on(client.request(Method::POST, "/v1/check", None));
    let body = match answer {
        Ok((status, body)) if status.is_success() => body,
        Ok((status, body)) => {
            anyhow::bail!(
                "the agent could not check its database ({status}): {}",
                error_message(&body)
            )
        }
        Err(error) if error.downcast_ref::<NotRunning>().is_some() => direct(&config)?,
        Err(error) => return Err(error),
    };
    let sound = body["result"] == "sound";
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else if sound {
        println!("database {} is sound", text(&body["database"]));
    } else {
        println!("database {} is damaged:", text(&body["database"]));
        for problem in body["problems"].as_array().into_iter().flatten() {
            println!("  {}", text(problem));
        }
        println!(
            "Stop the agent and start it again: it moves the damaged file aside and salvages what it can read."
        );
    }
    Ok(if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(DAMAGED)
    })
}

/// Checks the file itself when no agent answers, in the agent's answer shape.
fn direct(config: &Config) -> anyhow::Result<Value> {
    let path = config.database_path();
    if !path.exists() {
        anyhow::bail!(
            "no usage-agent is answering and there is no database at {} to check",
            path.display()
        );
    }
    eprintln!(
        "no usage-agent is answering on {}: checking {} directly",
        config.socket_path().display(),
        path.display()
    );
    let (sound, problems) = match integrity_check(&path)? {
        Verdict::Sound => (true, Vec::new()),
        Verdict::Damaged(problems) => (false, problems),
    };
    Ok(serde_json::json!({
        "result": if sound { "sound" } else { "damaged" },
        "database": path.display().to_string(),
        "problems": problems,
    }))
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}
