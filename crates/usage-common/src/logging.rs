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

/// `error` and its causes as one line, `outer: cause: root`, each said once. Many
/// libraries put their cause into their own message and return it as the source too
/// (tokio-postgres, deadpool, `thiserror` types with `{source}`), so a plain walk down the
/// chain repeats it: a cause whose message the one above it already holds is left out.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut above = line.clone();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if !message.is_empty() && !above.contains(&message) {
            line.push_str(": ");
            line.push_str(&message);
        }
        above = message;
        cause = error.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    /// An error whose message may or may not hold its cause's.
    #[derive(Debug)]
    struct Layer {
        message: String,
        cause: Option<Box<Layer>>,
    }

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.cause.as_deref().map(|cause| cause as _)
        }
    }

    fn layer(message: &str, cause: Option<Layer>) -> Layer {
        Layer {
            message: message.to_owned(),
            cause: cause.map(Box::new),
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let refused = layer("Connection refused (os error 111)", None);
        let postgres = layer(
            "error connecting to server: Connection refused (os error 111)",
            Some(refused),
        );
        let pool = layer(
            "error connecting to server: Connection refused (os error 111)",
            Some(postgres),
        );
        let store = layer(
            "could not connect to postgres://u@h:1/d: error connecting to server: Connection refused (os error 111)",
            Some(pool),
        );
        let outer = layer("opening the database", Some(store));
        assert_eq!(
            error_chain(&outer),
            "opening the database: could not connect to postgres://u@h:1/d: error connecting to server: Connection refused (os error 111)"
        );
    }

    #[test]
    fn causes_not_in_the_message_are_added() {
        let root = layer("permission denied", None);
        let outer = layer("reading /etc/x", Some(root));
        assert_eq!(error_chain(&outer), "reading /etc/x: permission denied");
    }
}
