//! A real WordPress site for the plugin's tests: MariaDB in a temp dir (its own datadir and
//! socket, no network), a temp copy of Debian's WordPress with a `wp-config.php` of its own
//! (Debian's reads `/etc/wordpress`, which the tests leave alone), installed with the plugin
//! and the test plugins active, and served by `php -S` with several workers. Every process
//! is stopped when the [`Site`] drops, also when a test fails.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::shared::{poll, poll_blocking, wait_with_deadline};

/// Where Debian's `wordpress` package puts WordPress.
const WORDPRESS: &str = "/usr/share/wordpress";

/// A child process, leader of its own process group, killed with its group and reaped on
/// drop: `php -S` forks its workers, which would outlive a kill of the parent alone.
pub struct Guard {
    pub child: Child,
}

impl Guard {
    fn spawn(command: &mut Command, what: &str) -> Guard {
        let child = command
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        Guard { child }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = wait_with_deadline(&mut self.child, Duration::from_secs(20));
    }
}

/// The test's fixtures: the must-use plugin, two calling plugins, a calling theme, the WP-CLI
/// stand-in.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wordpress/site")
}

/// The plugin under test.
fn plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/wordpress/usage-agent")
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("running a setup command");
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// An installed WordPress site, served.
pub struct Site {
    // Fields drop in order: the web server first, then the database, then the files.
    php: Option<Guard>,
    _mariadb: Guard,
    pub url: String,
    pub root: PathBuf,
    /// User ids by login: admin, editor, author, subscriber.
    pub users: Value,
    http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl Site {
    /// Starts MariaDB, installs WordPress with the plugins and serves it. The plugin talks
    /// to the agent at `socket`; the test plugins call the AI provider at `provider`.
    pub async fn start(socket: &Path, provider: &str) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let mariadb = start_mariadb(dir.path());
        let root = dir.path().join("wordpress");
        run(Command::new("cp").arg("-r").arg(WORDPRESS).arg(&root));
        for link in [".htaccess", "wp-config.php"] {
            let _ = std::fs::remove_file(root.join(link));
        }
        let content = root.join("wp-content");
        run(Command::new("cp")
            .arg("-r")
            .arg(plugin())
            .arg(content.join("plugins")));
        // One test plugin is a symbolic link into the source tree, as a plugin under
        // development often is: PHP then names its files by their real path.
        std::os::unix::fs::symlink(
            fixtures().join("plugins/post-summarizer"),
            content.join("plugins/post-summarizer"),
        )
        .unwrap();
        for fixture in ["plugins/alt-text-bot", "themes/ua-test-theme", "mu-plugins"] {
            let to = content.join(fixture);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            run(Command::new("cp")
                .arg("-r")
                .arg(fixtures().join(fixture))
                .arg(&to));
        }
        std::fs::copy(
            fixtures().join("ua-test-wp-cli.php"),
            content.join("ua-test-wp-cli.php"),
        )
        .unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        std::fs::write(
            root.join("wp-config.php"),
            wp_config(dir.path(), socket, provider),
        )
        .unwrap();
        let install = fixtures().join("install.php");
        let users: Value =
            serde_json::from_str(&run(Command::new("php").arg(&install).arg(&root).arg(&url)))
                .expect("install.php prints the users");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut site = Site {
            php: None,
            _mariadb: mariadb,
            url,
            root,
            users,
            http,
            dir,
        };
        site.serve(port).await;
        site
    }

    async fn serve(&mut self, port: u16) {
        let log = std::fs::File::create(self.dir.path().join("php-server.log")).unwrap();
        let php = Guard::spawn(
            Command::new("php")
                .args(["-d", "opcache.enable_cli=1", "-d", "display_errors=0", "-S"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-t")
                .arg(&self.root)
                .current_dir(&self.root)
                // Concurrent requests: WP-cron's loopback, the concurrent-flush checks.
                .env("PHP_CLI_SERVER_WORKERS", "4")
                .stdout(Stdio::null())
                .stderr(log),
            "php must be installed (.ci/setup installs it)",
        );
        self.php = Some(php);
        let login = format!("{}/wp-login.php", self.url);
        poll(
            "WordPress to answer",
            Duration::from_secs(30),
            async || match self.http.get(&login).send().await {
                Ok(response) if response.status() == StatusCode::OK => Some(()),
                _ => None,
            },
        )
        .await;
    }

    /// The id of a test user.
    pub fn user(&self, login: &str) -> u64 {
        self.users[login].as_u64().expect("a test user")
    }

    /// The cookies that log `login` in.
    pub async fn cookies(&self, login: &str) -> String {
        let answer = self
            .get_json(&format!("/?ua_test=cookies&as={login}"), None)
            .await;
        answer["cookie"].as_str().expect("cookies").to_string()
    }

    /// GET `path` (as the user whose `cookie` is given), status and body.
    pub async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, String) {
        let mut request = self.http.get(format!("{}{path}", self.url));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.expect("a request to WordPress");
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    /// GET `path` and decode its JSON answer, which must be `200`.
    pub async fn get_json(&self, path: &str, cookie: Option<&str>) -> Value {
        let (status, body) = self.get(path, cookie).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// GET `path`, timed.
    pub async fn timed_json(&self, path: &str) -> (Value, Duration) {
        let started = Instant::now();
        let value = self.get_json(path, None).await;
        (value, started.elapsed())
    }

    /// POST a form as the user whose `cookie` is given; status, `Location` and body.
    pub async fn post_form(
        &self,
        path: &str,
        cookie: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, String, String) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("cookie", cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                form.iter()
                    .map(|(k, v)| format!("{k}={}", urlencode(v)))
                    .collect::<Vec<_>>()
                    .join("&"),
            )
            .send()
            .await
            .expect("a request to WordPress");
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        (status, location, response.text().await.unwrap_or_default())
    }

    /// The origins the plugin gave its events, in order (the test mu-plugin logs them).
    pub fn origins(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("origins.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// PHP's errors and warnings of the site, to fail on.
    pub fn php_errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("debug.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("usage-agent") && !line.contains("Deprecated"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Percent-encodes a form value.
pub fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// MariaDB with its own datadir and socket, no TCP. Without grant tables it needs no
/// system database, so no `mariadb-install-db` run (seconds saved per site).
fn start_mariadb(dir: &Path) -> Guard {
    let data = dir.join("mariadb");
    std::fs::create_dir_all(&data).unwrap();
    let socket = dir.join("mariadb.sock");
    let mut guard = Guard::spawn(
        Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("mariadb.log").display()))
            .args([
                "--skip-networking",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--user=root",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "mariadbd must be installed (mariadb-server; .ci/setup installs it)",
    );
    poll_blocking(
        "MariaDB to take a database",
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = guard.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("mariadb.log")).unwrap_or_default();
                panic!("mariadbd exited with {status}: {log}");
            }
            let out = Command::new("mariadb")
                .arg(format!("--socket={}", socket.display()))
                .args(["-uroot", "-e", "CREATE DATABASE IF NOT EXISTS wordpress"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        },
    );
    guard
}

fn wp_config(dir: &Path, socket: &Path, provider: &str) -> String {
    let db = dir.join("mariadb.sock");
    let keys: String = [
        "AUTH_KEY",
        "SECURE_AUTH_KEY",
        "LOGGED_IN_KEY",
        "NONCE_KEY",
        "AUTH_SALT",
        "SECURE_AUTH_SALT",
        "LOGGED_IN_SALT",
        "NONCE_SALT",
    ]
    .iter()
    .map(|key| format!("define('{key}', '{}');\n", uuid::Uuid::new_v4()))
    .collect();
    format!(
        r#"<?php
define('DB_NAME', 'wordpress');
define('DB_USER', 'root');
define('DB_PASSWORD', '');
define('DB_HOST', 'localhost:{db}');
define('DB_CHARSET', 'utf8mb4');
define('DB_COLLATE', '');
{keys}$table_prefix = 'wp_';
define('WP_DEBUG', true);
define('WP_DEBUG_LOG', '{debug}');
define('WP_DEBUG_DISPLAY', false);
// No request leaves the machine (update checks would wait on a network there is none of).
define('WP_HTTP_BLOCK_EXTERNAL', true);
define('AUTOMATIC_UPDATER_DISABLED', true);
define('USAGE_AGENT_SOCKET', '{socket}');
define('UA_TEST_PROVIDER', '{provider}');
define('UA_TEST_ORIGIN_LOG', '{origins}');
if (!defined('ABSPATH')) {{
    define('ABSPATH', __DIR__ . '/');
}}
require_once ABSPATH . 'wp-settings.php';
"#,
        db = db.display(),
        debug = dir.join("debug.log").display(),
        socket = socket.display(),
        origins = dir.join("origins.log").display(),
    )
}
