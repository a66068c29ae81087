//! The receiver's log lines as an operator's collector reads them: `LOG_FORMAT=json` gives
//! one JSON object a line, text is the default, neither carries terminal colour codes when
//! standard error is a file, and a `LOG_FORMAT` it does not know stops it with a clear error.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::wait_with_deadline;

/// Runs `usage-receiver serve` on a free port with `log_format` (none: unset) until it has
/// answered one request and stopped on SIGTERM; its standard error.
fn log_of_a_short_run(log_format: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut command = Command::new(crate::bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("receiver.db"))
        .env_remove("LOG_FORMAT")
        .env("ENROLLMENT_TOKEN", "token")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(format) = log_format {
        command.env("LOG_FORMAT", format);
    }
    let mut child = command.spawn().unwrap();
    let base = crate::support::announced_address(&mut child);
    // A refused enrollment logs a warning line.
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-X", "POST"])
        .arg(format!("{base}/api/installations"))
        .status()
        .unwrap();
    assert!(status.success());
    let stop = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    assert!(wait_with_deadline(&mut child, Duration::from_secs(20)).success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn log_format_json_writes_one_json_object_a_line_without_colour_codes() {
    let log = log_of_a_short_run(Some("json"));
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
    }
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[test]
fn text_logs_written_to_a_file_carry_no_colour_codes() {
    let log = log_of_a_short_run(None);
    assert!(log.contains("receiver listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file: {log:?}");
    assert!(serde_json::from_str::<serde_json::Value>(log.lines().next().unwrap()).is_err());
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_setting_and_its_values() {
    let output = Command::new(crate::bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "/nonexistent/receiver.db",
        ])
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LOG_FORMAT must be text or json, not \"xml\""),
        "{stderr}"
    );
}
