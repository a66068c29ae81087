//! Headless Chromium for tests that read a page as a browser renders it (the provider's
//! dashboard, the plugin's admin screens): the DOM it built, screenshots, and its log.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one run printed.
pub struct Rendered {
    /// Its stdout (`--dump-dom` writes the DOM there).
    pub stdout: String,
    /// Its log: the page's console, where a Content Security Policy violation is reported.
    pub log: String,
}

/// Runs headless Chromium with `args`, its profile in `profile`; fails the test if it
/// fails or has not finished after a minute.
pub fn headless(profile: &Path, args: &[&str]) -> Rendered {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium must be installed (Debian's chromium package; .ci/setup installs it)");
    // Read both pipes while it runs, so a full pipe never stalls it.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).map(|_| text)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within a minute: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "chromium failed: {status:?}");
    Rendered {
        stdout: out.join().unwrap().unwrap_or_default(),
        log: err.join().unwrap().unwrap_or_default(),
    }
}
