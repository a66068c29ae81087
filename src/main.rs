//! The `usage-agent` binary: parse the command line, run it, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;
use usage_agent::cli::{self, Cli, UsageError};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", usage_common::logging::error_chain(&*error));
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
