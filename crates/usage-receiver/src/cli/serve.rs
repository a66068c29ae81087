//! `usage-receiver serve` (and `usage-agent receiver`): run the receiver until SIGINT or
//! SIGTERM.
//!
//! Reads the receiver's settings from the environment (docs/reference/receiver-api.md,
//! "Settings"), opens its store (SQLite, or PostgreSQL with `--database-url`), binds the
//! listen address and hands both to [`crate::server::serve`]. It touches nothing of the
//! agent's (no config file, no identity, no agent database).

use std::path::PathBuf;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};

use super::UsageError;
use crate::settings::ReceiverSettings;
use crate::store::postgres::connect::DatabaseUrl;

/// Options of `usage-receiver serve` (and `usage-agent receiver`).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Settings come from the environment: DATABASE_URL (as --database-url), ENROLLMENT_TOKEN, PROVIDER_USERNAME, PROVIDER_PASSWORD, ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE, RATE_LIMIT_PER_MIN, TRUSTED_PROXIES (balancers whose X-Forwarded-For names the client), SIGNATURE_TOLERANCE_S, MAX_CONNECTIONS, MAX_INFLIGHT_BATCHES, LOG_FORMAT (text or json lines on standard error), and the prices: PRICE_BOOK (path to a TOML price book, read at start; check one with `usage-receiver prices check PATH`, see contrib/prices.example.toml), then for models it does not price MODEL_COST_OVERRIDES (JSON, model to price per 1K tokens) and DEFAULT_COST_PER_1K_TOKENS, and PLAN_FREE_MONTHLY, PLAN_PRO_MONTHLY, PLAN_AGENCY_MONTHLY; budgets: DEFAULT_MONTHLY_BUDGET, and ALERT_WEBHOOK_URL with ALERT_WEBHOOK_SECRET (whsec_...) to POST each budget alert there.\n\nExample:\n  ENROLLMENT_TOKEN=secret PROVIDER_USERNAME=admin PROVIDER_PASSWORD=pw \\\n      usage-receiver serve --listen 127.0.0.1:8787 --db ./receiver-data/receiver.db"
)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// SQLite database path.
    #[arg(long, default_value = "./receiver-data/receiver.db")]
    pub db: PathBuf,
    /// Store in PostgreSQL instead (libpq's URL form:
    /// postgres://user:password@host:port/dbname, or ?host=/run/postgresql for a Unix
    /// socket; TLS with ?sslmode=verify-full&sslrootcert=/path/to/ca.pem, or
    /// disable, prefer (the default), require, verify-ca); several receiver nodes may share
    /// one database.
    #[arg(
        long,
        env = "DATABASE_URL",
        conflicts_with = "db",
        hide_env_values = true
    )]
    // Held as a secret (it may hold the password): `Debug` shows nothing of it.
    pub database_url: Option<SecretString>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    super::init_logging(super::log_lines_from_env()?);
    if let Some(url) = &args.database_url {
        // A URL that cannot be read is bad usage, said before anything starts; the error
        // names the parameter, never the URL (it may hold a password).
        DatabaseUrl::parse(url.expose_secret())
            .map_err(|error| UsageError(format!("--database-url (or DATABASE_URL): {error}")))?;
    }
    let settings = ReceiverSettings::from_env().context("reading the receiver settings")?;
    warn_about_settings(&settings);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (store, described) = match &args.database_url {
        Some(url) => (
            crate::server::open_postgres(url.expose_secret(), runtime.handle().clone())
                .context("opening the receiver's PostgreSQL database")?,
            "PostgreSQL".to_owned(),
        ),
        None => (
            crate::server::open_sqlite(&args.db)
                .with_context(|| format!("opening the receiver database {}", args.db.display()))?,
            args.db.display().to_string(),
        ),
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let shutdown = shutdown_signal()?;
        println!("usage-receiver listening on http://{addr} (database {described})");
        crate::server::serve(listener, settings, store, shutdown)
            .await
            .context("serving the receiver")
    })
}

fn warn_about_settings(settings: &ReceiverSettings) {
    if settings.enrollment_token.is_none() && !settings.allow_first_sync_without_signature {
        tracing::warn!(
            "ENROLLMENT_TOKEN is not set and ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE is off: enrollment is refused"
        );
    }
    if let Some(book) = &settings.price_book {
        tracing::info!(
            entries = book.entries.len(),
            currency = %book.currency,
            "costs come from the price book PRICE_BOOK names"
        );
    }
    if settings.provider_username.is_none() || settings.provider_password.is_none() {
        tracing::warn!(
            "PROVIDER_USERNAME or PROVIDER_PASSWORD is not set: provider endpoints answer 401"
        );
    }
}

/// Registers SIGINT (Ctrl-C) and SIGTERM handlers now, before the address is announced,
/// and returns a future that completes on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down the receiver");
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn the_parsed_command_line_never_shows_the_database_url() {
        let cli = crate::cli::Cli::try_parse_from([
            "usage-receiver",
            "--database-url",
            "postgres://u:hunter2@db.example.test/d?password=hunter3",
        ])
        .unwrap();
        let shown = format!("{cli:?} {cli:#?}");
        assert!(
            !shown.contains("hunter2")
                && !shown.contains("hunter3")
                && !shown.contains("db.example"),
            "{shown}"
        );
        let url = cli.serve.database_url.as_ref().unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(url),
            "postgres://u:hunter2@db.example.test/d?password=hunter3"
        );
    }
}
