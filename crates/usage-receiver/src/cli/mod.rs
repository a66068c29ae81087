//! The receiver's command line, shared by its own binary (`usage-receiver [serve]`,
//! `usage-receiver prices check`) and by `usage-agent receiver` / `usage-agent prices` in
//! the agent's developer build (docs/reference/cli.md); and the receiver's log setup
//! ([`init_logging`]). It parses and dispatches: serving is [`crate::server`]'s.

use usage_common::logging::LogLines;

pub mod prices;
pub mod serve;

/// The receiver, the backend of usage-agent: verifies, dedupes and stores signed batches,
/// and answers the provider.
#[derive(Debug, clap::Parser)]
#[command(
    name = "usage-receiver",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s options, for the default command.
    #[command(flatten)]
    pub serve: serve::ServeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the receiver (the default command).
    Serve(serve::ServeArgs),
    /// Price books: `prices check PATH` validates one.
    Prices(prices::PricesArgs),
}

/// Bad input on the command line that clap could not see (a database URL's parameter):
/// the binaries exit 2 on it, as on clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        None => serve::run(cli.serve).map(|()| std::process::ExitCode::SUCCESS),
        Some(Command::Serve(args)) => serve::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Some(Command::Prices(args)) => prices::run(args),
    }
}

/// Default log filter: the receiver's own info lines, only warnings from the libraries.
pub const DEFAULT_LOG_FILTER: &str = "warn,usage_receiver=info,usage_common=info";

/// The log lines `LOG_FORMAT` asks for (`text` when unset), or the rule it breaks.
pub fn log_lines_from_env() -> anyhow::Result<LogLines> {
    match std::env::var("LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => Ok(LogLines::Text),
        Ok("json") => Ok(LogLines::Json),
        Ok(other) => anyhow::bail!("LOG_FORMAT must be text or json, not {other:?}"),
    }
}

/// Installs the log subscriber ([`usage_common::logging`]) with the receiver's default
/// filter ([`DEFAULT_LOG_FILTER`]).
pub fn init_logging(lines: LogLines) {
    usage_common::logging::init(lines, DEFAULT_LOG_FILTER);
}
