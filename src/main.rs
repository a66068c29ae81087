//! The `usage-agent` binary: parse the command line, run it, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;
use usage_agent::cli::{self, Cli, UsageError};

fn main() -> ExitCode {
    let args = Cli::parse();
    // The agent is held to a small memory budget; the receiver is the provider's backend,
    // where one malloc arena cost 13 % of the batch-1000 drain (BENCHMARKS.md). Parsing
    // starts no thread, so this still comes before any arena but the main one exists.
    if !matches!(args.command, cli::Command::Receiver(_)) {
        usage_agent::daemon::limit_malloc_arenas();
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
