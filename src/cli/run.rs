//! `usage-agent run`: the daemon in the foreground, with logging and signal handling.

use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, LogFormat};
use crate::daemon::Daemon;
use usage_common::logging::LogLines;

pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let daemon = Daemon::start(config).await?;
        daemon.serve(shutdown_signal()?).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Default log filter: our own info lines, only warnings from the libraries.
pub const DEFAULT_LOG_FILTER: &str = "warn,usage_agent=info,usage_common=info";

/// Installs the log subscriber ([`usage_common::logging`]) with the agent's default filter
/// ([`DEFAULT_LOG_FILTER`]).
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, DEFAULT_LOG_FILTER);
}

/// Like [`init_logging`] with another default filter.
pub fn init_logging_with(format: LogFormat, default_filter: &str) {
    let lines = match format {
        LogFormat::Text => LogLines::Text,
        LogFormat::Json => LogLines::Json,
    };
    usage_common::logging::init(lines, default_filter);
}
