//! The `usage-receiver` binary: parse the command line, run it, map the result to an exit
//! code (0 success, 1 failure, 2 bad usage).

use std::process::ExitCode;

use clap::Parser;
use usage_receiver::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", usage_common::logging::error_chain(&*error));
            if error.downcast_ref::<cli::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
