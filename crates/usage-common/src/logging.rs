//! The log subscriber of both binaries: `RUST_LOG` filters (else a binary's default), text
//! or JSON lines on standard error, and colour codes only when standard error is a terminal,
//! never into a file or the journal.

use std::io::IsTerminal;

/// Text lines or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLines {
    Text,
    Json,
}

/// Installs the log subscriber; `default_filter` applies when `RUST_LOG` is unset or does
/// not parse. A subscriber already installed (the demo, tests) is kept.
pub fn init(lines: LogLines, default_filter: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    // `Targets` understands the usual `RUST_LOG` forms ("debug", "warn,usage_agent=info")
    // without pulling a regex engine into the binaries.
    let targets: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| text.parse().ok())
        .or_else(|| default_filter.parse().ok())
        .unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match lines {
        LogLines::Text => builder.finish().with(targets).try_init(),
        LogLines::Json => builder.json().finish().with(targets).try_init(),
    };
}
