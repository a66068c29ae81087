//! `usage-agent run`: the daemon in the foreground, with logging and signal handling.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, LogFormat};
use crate::daemon::Daemon;

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

/// Installs the log subscriber: `RUST_LOG` filters (default [`DEFAULT_LOG_FILTER`]), text
/// or JSON lines, with colour codes only when standard error is a terminal (never into a
/// file or the journal).
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, DEFAULT_LOG_FILTER);
}

/// Like [`init_logging`] with another default filter.
pub fn init_logging_with(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    // `Targets` understands the usual `RUST_LOG` forms ("debug", "warn,usage_agent=info")
    // without pulling a regex engine into the binary.
    let targets: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .or_else(|| default_filter.parse().ok())
        .unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A subscriber may already be installed (demo, tests); keeping it is fine.
    let _ = match format {
        LogFormat::Text => builder.finish().with(targets).try_init(),
        LogFormat::Json => builder.json().finish().with(targets).try_init(),
    };
}
