//! `usage-receiver prices check PATH` (and `usage-agent prices check PATH`): validate a
//! receiver price book (docs/install.md, "Prices on the receiver") without starting
//! anything. Exit 0 when it is valid, 1 with the line and key of the first problem
//! otherwise. Touches nothing of the agent's, and no store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::billing::price_book::PriceBook;

/// Options of `usage-receiver prices`.
#[derive(Debug, clap::Args)]
pub struct PricesArgs {
    #[command(subcommand)]
    pub command: PricesCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum PricesCommand {
    /// Check a price book (the TOML file PRICE_BOOK names); exit 0 valid, 1 invalid.
    #[command(after_help = "Example:\n  usage-receiver prices check contrib/prices.example.toml")]
    Check {
        /// The price book to check.
        path: PathBuf,
    },
}

pub fn run(args: PricesArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PricesCommand::Check { path } => {
            let book = PriceBook::load(&path)
                .with_context(|| format!("the price book {} is invalid", path.display()))?;
            println!(
                "{}: valid, {} entries, prices in {}",
                path.display(),
                book.entries.len(),
                book.currency
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
