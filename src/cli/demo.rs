//! `usage-agent demo`: a newcomer's first five minutes. Starts a receiver and an agent on
//! embedded defaults in a temp dir, enrolls, records realistic events through the socket,
//! syncs, prints what happened and how to poke at it, and keeps running until Ctrl-C.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};

use super::client::{AgentClient, error_message};
use crate::config::{BackendUrl, Config};
use crate::daemon::Daemon;
use crate::identity::Identity;
use crate::sync::enroll;
use usage_receiver::{self as receiver, ReceiverSettings};

/// Provider login of the demo receiver (it listens on loopback only, in a temp dir).
const DEMO_USER: &str = "demo";

/// A few calls a WordPress site with an AI alt-text plugin would make.
fn sample_events() -> Vec<Value> {
    let context = |id: u32, w: u32, h: u32, mime: &str| json!({"attachment_id": id, "width": w, "height": h, "mime": mime});
    vec![
        json!({"user_id": 5, "source": "inline", "model": "gpt-4o-mini", "prompt_tokens": 150, "completion_tokens": 25, "context": context(42, 1024, 768, "image/jpeg")}),
        json!({"user_id": 5, "source": "bulk", "model": "gpt-4o-mini", "prompt_tokens": 148, "completion_tokens": 31, "context": context(43, 800, 600, "image/png")}),
        json!({"user_id": 5, "source": "bulk", "model": "gpt-4o-mini", "prompt_tokens": 152, "completion_tokens": 22, "cached_tokens": 64, "context": context(44, 1920, 1080, "image/webp")}),
        json!({"user_id": 7, "source": "manual", "model": "gpt-4o", "prompt_tokens": 410, "completion_tokens": 58, "context": context(97, 3000, 2000, "image/jpeg")}),
        json!({"user_id": 0, "source": "queue", "model": "claude-3-5-haiku", "prompt_tokens": 300, "completion_tokens": 40, "context": context(120, 640, 480, "image/gif")}),
        json!({"user_id": 0, "source": "queue", "model": "o3-mini", "prompt_tokens": 220, "completion_tokens": 180, "reasoning_tokens": 128, "context": context(121, 512, 512, "image/png")}),
    ]
}

fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn run() -> anyhow::Result<ExitCode> {
    // Only warnings: the demo's own output tells the story.
    super::run::init_logging_with(crate::config::LogFormat::Text, "warn");
    let dir = std::env::temp_dir().join(format!("usage-agent-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(demo(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo(dir: &Path) -> anyhow::Result<ExitCode> {
    crate::sync::install_tls_provider();
    let (stop_receiver, receiver_stop) = tokio::sync::oneshot::channel::<()>();
    let (stop_agent, agent_stop) = tokio::sync::oneshot::channel::<()>();

    // 1. The backend's receiver, on a free loopback port.
    let enroll_token = random_token();
    let provider_password = random_token();
    let settings = ReceiverSettings {
        enrollment_token: Some(enroll_token.clone().into()),
        provider_username: Some(DEMO_USER.into()),
        provider_password: Some(provider_password.clone().into()),
        // Example prices, so the dashboard shows cost and profit.
        default_cost_per_1k_tokens: Some(0.002),
        model_cost_overrides: [("gpt-4o".to_owned(), 0.01), ("o3-mini".to_owned(), 0.0044)].into(),
        plan_free_monthly: Some(0.0),
        ..ReceiverSettings::default()
    };
    let store = receiver::open_sqlite(&dir.join("receiver/receiver.db"))
        .context("opening the demo receiver database")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo receiver")?;
    let backend_url = format!("http://{}", listener.local_addr()?);
    let receiver_task = tokio::spawn(receiver::serve(
        listener,
        settings,
        Arc::clone(&store),
        async {
            let _ = receiver_stop.await;
        },
    ));

    // 2. The agent's identity, enrolled with that receiver.
    let mut config = Config {
        data_dir: dir.join("agent"),
        ..Config::default()
    };
    let backend = BackendUrl::parse(&backend_url).map_err(anyhow::Error::msg)?;
    config.sync.backend_url = Some(backend.clone());
    let identity_path = config.identity_path();
    let mut identity = Identity::generate("https://demo.example.com")?;
    identity.create_once(&identity_path)?;
    let http = reqwest::Client::new();
    enroll::enroll(&http, &backend, &enroll_token, &identity).await?;
    identity.enrolled_at =
        Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    identity.save(&identity_path)?;

    // 3. The agent itself, serving its socket.
    let daemon = Daemon::start(config.clone()).await?;
    let socket = daemon.socket_path().to_path_buf();
    let agent_task = tokio::spawn(daemon.serve(async {
        let _ = agent_stop.await;
    }));
    let agent = AgentClient::new(&config)?;

    println!(
        "usage-agent demo: a receiver on {backend_url} and an agent on {}\n",
        socket.display()
    );
    let events = sample_events();
    for event in &events {
        let (status, answer) = agent
            .request(Method::POST, "/v1/events", Some(event))
            .await?;
        anyhow::ensure!(
            status.is_success(),
            "recording failed: {}",
            error_message(&answer)
        );
        println!(
            "recorded {}  user={} source={} model={} tokens={}",
            answer["event_id"].as_str().unwrap_or("?"),
            event["user_id"],
            event["source"].as_str().unwrap_or("?"),
            event["model"].as_str().unwrap_or("?"),
            event["prompt_tokens"].as_u64().unwrap_or(0)
                + event["completion_tokens"].as_u64().unwrap_or(0),
        );
    }

    let (_, report) = agent.request(Method::POST, "/v1/sync", None).await?;
    println!("\nsync: {}", super::sync::summary(&report).trim_end());
    let (_, status) = agent.request(Method::GET, "/v1/status", None).await?;
    println!(
        "\nagent status:\n{}",
        super::status::summary(&status, false).trim_end()
    );

    let summary: Value = http
        .get(format!("{backend_url}/api/usage/summary?group_by=model"))
        .basic_auth(DEMO_USER, Some(&provider_password))
        .send()
        .await?
        .json()
        .await?;
    println!("\nreceiver summary by model (what the provider bills from):");
    print_summary(&summary);

    // Ctrl-C is handled from before the hint that invites it is printed.
    let stop = super::run::shutdown_signal()?;
    print_next_steps(&socket, &backend_url, &provider_password);
    stop.await;
    println!("\nstopping the demo and removing {}", dir.display());
    // The agent first, while its backend still answers, so a sync run under way ends on
    // the backend's answer rather than on a closed port.
    let _ = stop_agent.send(());
    agent_task.await??;
    let _ = stop_receiver.send(());
    receiver_task.await??;
    Ok(ExitCode::SUCCESS)
}

fn print_summary(summary: &Value) {
    for row in summary["rows"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {:>3} events {:>6} tokens",
            row["model"].as_str().unwrap_or("?"),
            row["events"],
            row["total_tokens"]
        );
    }
    let totals = &summary["totals"];
    println!(
        "  {:<20} {:>3} events {:>6} tokens",
        "total", totals["events"], totals["total_tokens"]
    );
}

fn print_next_steps(socket: &Path, backend_url: &str, password: &str) {
    let socket = socket.display();
    println!(
        r#"
Try it yourself while the demo runs (Ctrl-C stops it and deletes its temp dir):

  curl --unix-socket {socket} -H 'Content-Type: application/json' \
       -d '{{"user_id": 5, "source": "bulk", "model": "gpt-4o-mini", "prompt_tokens": 150, "completion_tokens": 25}}' \
       http://localhost/v1/events
  curl --unix-socket {socket} http://localhost/v1/status
  curl --unix-socket {socket} -X POST http://localhost/v1/sync
  curl -u {DEMO_USER}:{password} '{backend_url}/api/usage/summary?group_by=day,model'

The provider's dashboard: {backend_url}/dashboard (user {DEMO_USER}, password {password}).
"#
    );
}
