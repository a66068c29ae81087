//! The command line: one file per subcommand; this file only declares and dispatches them.
//!
//! Exit codes (SPEC 2): 0 success, 1 failure, 2 bad usage; `status` adds 3 (degraded)
//! and 4 (failing).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

pub mod client;
pub mod init;
pub mod receiver;
pub mod record;
pub mod run;
pub mod status;

/// Meters AI token usage beside a website and ships it, signed, to a backend.
#[derive(Debug, Parser)]
#[command(name = "usage-agent", version, about)]
pub struct Cli {
    /// Config file (default: $USAGE_AGENT_CONFIG, else /etc/usage-agent/agent.toml if it
    /// exists, else built-in defaults with data under ./usage-agent-data).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the install identity once (never overwrites an existing one).
    Init(init::InitArgs),
    /// Run the daemon: the local API on the socket, scheduled jobs, graceful shutdown.
    Run,
    /// Record one event through the socket, as a site does.
    Record(record::RecordArgs),
    /// Print the sync status; the exit code tells the health.
    Status(status::StatusArgs),
    /// Run the bundled receiver (the backend's ingest side).
    Receiver(receiver::ReceiverArgs),
}

/// A failure the user caused by how they called us: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let load = || Config::load(cli.config.as_deref());
    match cli.command {
        Command::Init(args) => init::run(load()?, args),
        Command::Run => run::run(load()?),
        Command::Record(args) => record::run(load()?, args),
        Command::Status(args) => status::run(load()?, args),
        Command::Receiver(args) => receiver::run(args).map(|()| ExitCode::SUCCESS),
    }
}

/// Builds the runtime that a client subcommand needs for one request.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
