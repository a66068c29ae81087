//! The `usage-receiver` binary: parse the command line, run it, map the result to an exit
//! code (0 success, 1 failure, 2 bad usage from clap).

use std::process::ExitCode;

use clap::Parser;
use usage_receiver::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
