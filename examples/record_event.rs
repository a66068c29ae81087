//! Records one event through the agent's Unix socket, as a Rust site would.
//!
//! ```sh
//! cargo run --example record_event -- --socket ./usage-agent-data/agent.sock \
//!     --user 5 --source bulk --model gpt-4o-mini --prompt 150 --completion 25
//! ```
//!
//! A site must never wait long on metering: the client uses a short timeout and the
//! caller treats any failure as non-fatal.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let socket = arg("--socket", "./usage-agent-data/agent.sock");
    let number = |name: &str, default: &str| arg(name, default).parse::<u64>().unwrap_or(0);
    let event = json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "user_id": number("--user", "0"),
        "source": arg("--source", "inline"),
        "model": arg("--model", "gpt-4o-mini"),
        "prompt_tokens": number("--prompt", "0"),
        "completion_tokens": number("--completion", "0"),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds");
    match runtime.block_on(record(&socket, &event)) {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("usage not recorded: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn record(socket: &str, event: &Value) -> Result<Value, String> {
    usage_agent::sync::install_tls_provider();
    let client = reqwest::Client::builder()
        .unix_socket(socket)
        .connect_timeout(Duration::from_millis(250))
        .timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .post("http://localhost/v1/events")
        .json(event)
        .send()
        .await
        .map_err(|e| format!("no answer on {socket}: {e}"))?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {}", body["error"]["message"]))
    }
}
