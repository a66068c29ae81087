//! `usage-agent demo`, the README's first command, end to end.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::harness::{bin, signal, wait_with_deadline};

#[test]
fn the_demo_records_syncs_and_stops_on_ctrl_c() {
    let mut child = Command::new(bin())
        .arg("demo")
        .env_remove("USAGE_AGENT_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning usage-agent demo");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut output = Vec::new();
    loop {
        match lines_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let done = line.contains("/api/usage/summary");
                output.push(line);
                if done {
                    break;
                }
            }
            Err(e) => panic!("demo output stalled ({e}); so far:\n{}", output.join("\n")),
        }
    }
    let text = output.join("\n");
    assert_eq!(text.matches("\nrecorded ").count(), 6, "{text}");
    assert!(text.contains("6 accepted"), "{text}");
    assert!(text.contains(": healthy"), "{text}");
    assert!(text.contains("6 synced"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("total") && l.contains("6 events")),
        "{text}"
    );
    let socket = text
        .split_whitespace()
        .skip_while(|w| *w != "--unix-socket")
        .nth(1)
        .expect("the curl hint names the socket")
        .to_owned();
    assert!(std::path::Path::new(&socket).exists(), "{socket}");

    signal(&child, "-INT");
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    assert!(status.success(), "demo exit {status}");
    // A clean stop: the agent stops before its backend does, so nothing is cut short.
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("WARN") || l.contains("ERROR")),
        "{logs}"
    );
    let temp_dir = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .parent()
        .unwrap();
    assert!(
        !temp_dir.exists(),
        "{} should be removed",
        temp_dir.display()
    );
}
