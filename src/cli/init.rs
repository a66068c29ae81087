//! `usage-agent init`: create the install identity once.

use std::process::ExitCode;

use crate::config::Config;
use crate::identity::{Created, Identity};

/// Options of `usage-agent init`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  usage-agent init --site-url https://example.com")]
pub struct InitArgs {
    /// The site this agent meters, e.g. https://example.com (normalised before hashing).
    #[arg(long)]
    pub site_url: String,
    /// Backend to enroll with.
    #[arg(long)]
    pub backend_url: Option<String>,
    /// Enrollment token issued by the backend's operator.
    #[arg(long)]
    pub enroll_token: Option<String>,
}

pub fn run(config: Config, args: InitArgs) -> anyhow::Result<ExitCode> {
    let path = config.identity_path();
    let created = match Identity::load(&path)? {
        Some(_) => Created::AlreadyExisted,
        None => Identity::generate(&args.site_url)?.create_once(&path)?,
    };
    let identity = Identity::load(&path)?.expect("the identity was just written or found");
    match created {
        Created::New => println!(
            "Created install identity {} for {} in {}",
            identity.install_id,
            identity.site_url,
            path.display()
        ),
        Created::AlreadyExisted => println!(
            "An install identity already exists in {} ({}); nothing changed.",
            path.display(),
            identity.install_id
        ),
    }
    Ok(ExitCode::SUCCESS)
}
