//! `usage-agent init`: create the install identity once and, given a backend and an
//! enrollment token, enroll it there.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{SecondsFormat, Utc};

use super::UsageError;
use crate::config::{BackendUrl, Config};
use crate::identity::{Created, Identity};
use crate::sync::client::http_client;
use crate::sync::enroll;

/// Options of `usage-agent init`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  usage-agent init --site-url https://example.com\n  usage-agent init --site-url https://example.com --backend-url https://usage.example.net --enroll-token-file /run/secrets/enroll-token\n  USAGE_AGENT_ENROLL_TOKEN=T usage-agent init --site-url https://example.com --backend-url https://usage.example.net\n\nPrefer --enroll-token-file or USAGE_AGENT_ENROLL_TOKEN to --enroll-token: a token on the command line is visible to every user of the machine (ps, /proc) and lands in shell history.\n\nThe backend URL must also be set as sync.backend_url in the config for the agent to sync there."
)]
pub struct InitArgs {
    /// The site this agent meters, such as `https://example.com` (normalised before hashing).
    #[arg(long)]
    pub site_url: String,
    /// Backend to enroll with (https, or http to a loopback address); defaults to sync.backend_url.
    #[arg(long)]
    pub backend_url: Option<BackendUrl>,
    /// Enrollment token issued by the backend's operator; enrolls the identity with the
    /// backend. The environment variable counts as this option, so it cannot be combined
    /// with --enroll-token-file either.
    #[arg(long, env = "USAGE_AGENT_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// File holding the enrollment token (a trailing newline is ignored), so the token
    /// stays off the command line.
    #[arg(long, value_name = "PATH", conflicts_with = "enroll_token")]
    pub enroll_token_file: Option<PathBuf>,
}

impl InitArgs {
    /// The enrollment token from `--enroll-token-file`, `--enroll-token` or
    /// `USAGE_AGENT_ENROLL_TOKEN`, if any; read before anything is created.
    fn enroll_token(&self) -> anyhow::Result<Option<String>> {
        match (&self.enroll_token_file, &self.enroll_token) {
            (Some(path), _) => read_token_file(path).map(Some),
            (None, Some(token)) if token.trim().is_empty() => Err(UsageError(
                "the enrollment token (--enroll-token or USAGE_AGENT_ENROLL_TOKEN) is empty".into(),
            )
            .into()),
            (None, token) => Ok(token.clone()),
        }
    }
}

/// Reads a token file: the whole file but a trailing newline, which must leave something.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --enroll-token-file {}", path.display()))?;
    let token = text.strip_suffix('\n').unwrap_or(&text);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.trim().is_empty() {
        return Err(UsageError(format!(
            "--enroll-token-file {} is empty: it must hold the enrollment token",
            path.display()
        ))
        .into());
    }
    Ok(token.to_owned())
}

pub fn run(config: Config, args: InitArgs) -> anyhow::Result<ExitCode> {
    let backend = args
        .backend_url
        .clone()
        .or_else(|| config.sync.backend_url.clone());
    let enrollment = match args.enroll_token()? {
        None => None,
        Some(token) => {
            let backend = backend.clone().ok_or_else(|| {
                UsageError("an enrollment token needs a backend: pass --backend-url URL or set sync.backend_url in the config".into())
            })?;
            // Refuse an insecure or malformed URL before anything is created or sent.
            enroll::enrollment_url(&backend)?;
            Some((backend, token))
        }
    };

    let path = config.identity_path();
    let created = match Identity::load(&path)? {
        Some(_) => Created::AlreadyExisted,
        None => Identity::generate(&args.site_url)?.create_once(&path)?,
    };
    let mut identity =
        Identity::load(&path)?.context("the identity file vanished right after it was written")?;
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

    if let Some(given) = &args.backend_url
        && Some(given) != config.sync.backend_url.as_ref()
    {
        println!(
            "Note: set sync.backend_url = \"{given}\" in the config file (or USAGE_AGENT_BACKEND_URL) so the agent syncs there; init does not edit the config."
        );
    }

    match enrollment {
        Some((backend, token)) => {
            let http = http_client(Duration::from_secs(config.sync.request_timeout_secs))?;
            super::runtime()?
                .block_on(enroll::enroll(&http, &backend, &token, &identity))
                .with_context(|| {
                    format!("enrolling install {} with {backend}", identity.install_id)
                })?;
            identity.enrolled_at = Some(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
            identity.save(&path)?;
            println!("Enrolled install {} with {backend}.", identity.install_id);
        }
        None if args.backend_url.is_some() => println!(
            "Not enrolled (no enrollment token): run init again with --enroll-token-file PATH (or USAGE_AGENT_ENROLL_TOKEN), or set sync.enroll_token and the agent enrolls at its next sync."
        ),
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}
