//! The command line: one file per subcommand; this file only declares and dispatches them.
//!
//! Exit codes (docs/reference/cli.md): 0 success, 1 failure, 2 bad usage; `status` adds 3
//! (degraded) and 4 (failing), `check` 3 (damaged).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

pub mod check;
pub mod client;
pub mod completions;
#[cfg(feature = "receiver")]
pub mod demo;
pub mod export;
pub mod forget;
pub mod init;
pub mod purge;
pub mod quota;
pub mod record;
pub mod retry_failed;
pub mod rollup;
pub mod run;
pub mod status;
pub mod sync;

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
    #[command(
        after_help = "Stops on SIGTERM or SIGINT: finishes in-flight requests, makes one last short sync, checkpoints the database and removes the socket.\n\nExample:\n  usage-agent --config /etc/usage-agent/agent.toml run"
    )]
    Run,
    /// Record one event through the socket, as a site does.
    Record(record::RecordArgs),
    /// Print the sync status; the exit code tells the health.
    Status(status::StatusArgs),
    /// Run a sync now (after any run in progress) and print what it did.
    Sync(sync::SyncArgs),
    /// Put events the backend rejected back in the sync queue.
    RetryFailed(retry_failed::RetryFailedArgs),
    /// Recompute the daily summaries now (every day touched since the last rollup).
    Rollup(rollup::RollupArgs),
    /// Apply retention now.
    Purge(purge::PurgeArgs),
    /// Run a full integrity check of the database; exit 0 sound, 3 damaged.
    Check(check::CheckArgs),
    /// Write events (or daily summaries) to stdout as CSV or JSON.
    Export(export::ExportArgs),
    /// Erase one user's local data (right to erasure).
    Forget(forget::ForgetArgs),
    /// Ask whether a user may spend more tokens (the local quotas); exit 0 allowed, 3 not.
    Quota(quota::QuotaArgs),
    /// Run the receiver (the backend), as `usage-receiver serve` does.
    #[cfg(feature = "receiver")]
    Receiver(usage_receiver::cli::serve::ServeArgs),
    /// Receiver price books: `prices check PATH` validates one.
    #[cfg(feature = "receiver")]
    Prices(usage_receiver::cli::prices::PricesArgs),
    /// Newcomer quickstart: a receiver and an agent in a temp dir, sample events, a sync,
    /// and what to try next; runs until Ctrl-C.
    #[cfg(feature = "receiver")]
    #[command(after_help = "Example:\n  cargo run --release -- demo")]
    Demo,
    /// Print the shell completion script of usage-agent for SHELL (the package installs them).
    #[command(
        hide = true,
        after_help = "Example:\n  usage-agent completions bash > /usr/share/bash-completion/completions/usage-agent"
    )]
    Completions(completions::CompletionsArgs),
}

/// A failure the user caused by how they called us: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The agent is held to a small memory budget; the receiver, the provider's backend,
    // keeps glibc's default arenas for its throughput (BENCHMARKS.md). Nothing has started
    // a thread yet, so this comes before any arena but the main one exists.
    #[cfg(feature = "receiver")]
    let is_receiver = matches!(cli.command, Command::Receiver(_));
    #[cfg(not(feature = "receiver"))]
    let is_receiver = false;
    if !is_receiver {
        crate::daemon::limit_malloc_arenas();
    }
    let load = || Config::load(cli.config.as_deref());
    match cli.command {
        Command::Init(args) => init::run(load()?, args),
        Command::Run => run::run(load()?),
        Command::Record(args) => record::run(load()?, args),
        Command::Status(args) => status::run(load()?, args),
        Command::Sync(args) => sync::run(load()?, args),
        Command::RetryFailed(args) => retry_failed::run(load()?, args),
        Command::Rollup(args) => rollup::run(load()?, args),
        Command::Purge(args) => purge::run(load()?, args),
        Command::Check(args) => check::run(load()?, args),
        Command::Export(args) => export::run(load()?, args),
        Command::Forget(args) => forget::run(load()?, args),
        Command::Quota(args) => quota::run(load()?, args),
        #[cfg(feature = "receiver")]
        Command::Receiver(args) => usage_receiver::cli::serve::run(args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(
                |error| match error.downcast::<usage_receiver::cli::UsageError>() {
                    Ok(usage) => anyhow::Error::new(UsageError(usage.to_string())),
                    Err(other) => other,
                },
            ),
        #[cfg(feature = "receiver")]
        Command::Prices(args) => usage_receiver::cli::prices::run(args),
        #[cfg(feature = "receiver")]
        Command::Demo => demo::run(),
        Command::Completions(args) => completions::run(args),
    }
}

/// Builds the runtime that a client subcommand needs for one request.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
