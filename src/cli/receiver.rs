//! `usage-agent receiver`: run the bundled receiver.

use std::path::PathBuf;

/// Options of `usage-agent receiver`.
#[derive(Debug, clap::Args)]
pub struct ReceiverArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// SQLite database path.
    #[arg(long, default_value = "./receiver-data/receiver.db")]
    pub db: PathBuf,
}

pub fn run(_args: ReceiverArgs) -> anyhow::Result<()> {
    anyhow::bail!("the receiver is not built yet")
}
