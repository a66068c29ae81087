//! What the integration tests of both servers share: polling with a deadline, waiting for
//! a child process, the error shape of both servers, and the reference Standard Webhooks
//! library. The agent's tests include this
//! file too, as does `test_receiver.rs` (the in-process test receiver).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`poll`] for code outside the runtime.
pub fn poll_blocking<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit within `timeout`.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> ExitStatus {
    poll_blocking("the process to exit", timeout, || {
        child.try_wait().expect("try_wait")
    })
}

/// Asserts `body` is `{"error": {"code": code, "message": "...", "details": [...]}}`, the
/// error shape of both servers.
pub fn assert_error_shape(body: &Value, code: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["details"].is_array(), "{body}");
}

/// Runs the reference Standard Webhooks library (PyPI `standardwebhooks`, through
/// `tests/interop/verify_standardwebhooks.py`) with `args`, `stdin` as the payload. Fails,
/// never skips, when `python3` or the package is missing; `PYTHON` names another
/// interpreter.
pub fn standard_webhooks(args: &[&str], stdin: &[u8]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/interop/verify_standardwebhooks.py"))
        .find(|script| script.exists())
        .expect("the interop script in the workspace");
    let interpreter = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&interpreter)
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {interpreter} (needed for interop tests): {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_ne!(
        output.status.code(),
        Some(2),
        "the interop script could not run: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The (method, path) pairs of the OpenAPI 3.1 document at `path` (from the workspace
/// root), each operation checked to document its answers.
pub fn openapi_routes(path: &str) -> std::collections::BTreeSet<(String, String)> {
    let document = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(path))
        .find(|document| document.exists())
        .unwrap_or_else(|| panic!("{path} in the workspace"));
    let text = std::fs::read_to_string(&document).expect("read the OpenAPI document");
    let document: Value = serde_json::from_str(&text).expect("the document is JSON");
    assert_eq!(document["openapi"], "3.1.0", "an OpenAPI 3.1 document");
    let mut pairs = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            if ["get", "post", "put", "delete", "patch", "head"].contains(&method.as_str()) {
                assert!(
                    operation["responses"].is_object(),
                    "{method} {path} documents its answers"
                );
                pairs.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    pairs
}

/// The address a receiver process announces on its first line of standard output
/// (`usage-receiver listening on http://ADDR ...`), without a trailing slash.
pub fn announced_address(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(
        child
            .stdout
            .take()
            .expect("the receiver's standard output is piped"),
    )
    .read_line(&mut line)
    .expect("read the receiver's first line");
    line.split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_owned()
}
