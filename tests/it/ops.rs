//! Operations: the PHP site client against a live agent, the systemd units (of a source
//! install and of the packages) and the shell completions the package ships.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Agent;

fn php_record(socket: &str, extra: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/php/record.php");
    Command::new("php")
        .args([
            script,
            "--socket",
            socket,
            "--user",
            "5",
            "--source",
            "bulk",
            "--model",
            "gpt-4o-mini",
            "--prompt",
            "150",
            "--completion",
            "25",
        ])
        .args(extra)
        .output()
        .expect("php must be installed (php-cli and php-curl; .ci/run installs them)")
}

#[tokio::test]
async fn the_php_client_records_an_event() {
    let agent = Agent::start("").await;
    let out = php_record(agent.socket.to_str().unwrap(), &[]);
    assert!(
        out.status.success(),
        "php failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("the agent's JSON answer");
    assert_eq!(answer["status"], "recorded");
    let id = answer["event_id"].as_str().unwrap();
    assert_eq!(agent.stored_events(), 1);
    let stored: Vec<u8> = agent
        .open_db()
        .query_row("SELECT event_id FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(uuid::Uuid::from_slice(&stored).unwrap().to_string(), id);
}

fn php_quota(socket: &str, args: &[&str]) -> (Option<i32>, Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/php/quota.php");
    let out = Command::new("php")
        .args([script, "--socket", socket])
        .args(args)
        .output()
        .expect("php must be installed (php-cli and php-curl; .ci/run installs them)");
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), answer)
}

#[tokio::test]
async fn the_php_client_asks_the_quota_and_holds_tokens_its_event_settles() {
    let mut agent = Agent::configure_with("", "[quota]\nuser_daily_tokens = 1000");
    agent.spawn().await;
    let socket = agent.socket.to_str().unwrap().to_owned();
    let (code, answer) = php_quota(&socket, &["--user", "5", "--tokens", "1000"]);
    assert_eq!(code, Some(0), "{answer}");
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["allowed_fail_closed"], true);
    let (_, hold) = php_quota(&socket, &["--user", "5", "--tokens", "600", "--hold"]);
    assert_eq!(hold["allowed"], true, "{hold}");
    let hold_id = hold["hold_id"].as_str().expect("a hold id").to_owned();
    let (_, answer) = php_quota(&socket, &["--user", "5", "--tokens", "500"]);
    assert_eq!(answer["allowed"], false, "600 held + 500 > 1000: {answer}");
    assert_eq!(answer["allowed_fail_open"], false, "the agent answered");
    let (_, refused) = php_quota(&socket, &["--user", "5", "--tokens", "500", "--hold"]);
    assert_eq!(refused["allowed"], false, "{refused}");
    assert!(refused.get("hold_id").is_none());

    let out = php_record(&socket, &["--hold-id", &hold_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, answer) = php_quota(&socket, &["--user", "5"]);
    let daily = &answer["limits"][0];
    assert_eq!(
        (&daily["used"], &daily["held"]),
        (&json!(175), &json!(0)),
        "{answer}"
    );
    let (_, released) = php_quota(&socket, &["--user", "5", "--release", &hold_id]);
    assert_eq!(released["released"], false, "the event settled it");

    // No agent: allowed() falls back to what the site chose.
    assert!(agent.terminate().success());
    let (code, answer) = php_quota(&socket, &["--user", "5", "--timeout-ms", "200"]);
    assert_eq!(code, Some(1));
    assert_eq!(answer["allowed_fail_open"], true);
    assert_eq!(answer["allowed_fail_closed"], false);
}

#[test]
fn the_php_client_returns_quickly_when_the_agent_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    // A socket file that nobody listens on, as a crashed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    for path in [socket.clone(), dir.path().join("missing.sock")] {
        let started = Instant::now();
        let out = php_record(path.to_str().unwrap(), &["--timeout-ms", "200"]);
        let took = started.elapsed();
        assert_eq!(
            out.status.code(),
            Some(1),
            "stdout {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("usage not recorded"), "{stderr}");
        assert!(
            !stderr.contains("Fatal") && !stderr.contains("Uncaught"),
            "it threw: {stderr}"
        );
        // Generous bound: PHP start-up plus the 200 ms connect timeout, on a busy machine.
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut paths = Vec::new();
    // verify checks that ExecStart exists, so point the copies at the binary under test.
    for (source, target) in [
        ("contrib/systemd/usage-agent.service", "usage-agent.service"),
        (
            "contrib/systemd/usage-agent@.service",
            "usage-agent@shop.service",
        ),
        (
            "contrib/systemd/usage-receiver.service",
            "usage-receiver.service",
        ),
        (
            "packaging/usage-agent/usage-agent.service",
            "packaged/usage-agent.service",
        ),
        (
            "packaging/usage-receiver/usage-receiver.service",
            "packaged/usage-receiver.service",
        ),
    ] {
        let text = std::fs::read_to_string(format!("{root}/{source}")).unwrap();
        assert!(text.contains("ProtectSystem=strict") && text.contains("NoNewPrivileges=yes"));
        if source.contains("/usage-agent") {
            assert!(text.contains("Type=notify"), "{source}");
        }
        let path = dir.path().join(target);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // The receiver's unit runs `usage-receiver serve`; this package's binary runs the
        // same receiver as `usage-agent receiver`, so the copy points at that.
        let mut text = text;
        for dir in ["/usr/local/bin", "/usr/bin"] {
            text = text
                .replace(
                    &format!("{dir}/usage-receiver serve"),
                    &format!("{} receiver", crate::harness::bin()),
                )
                .replace(
                    &format!("{dir}/usage-agent "),
                    &format!("{} ", crate::harness::bin()),
                );
        }
        assert!(!text.contains("bin/usage-"), "{source}: {text}");
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze must be installed (.ci/run installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("usage-agent"),
        "verify: {stderr}"
    );
}

/// Starts the agent with `NOTIFY_SOCKET` set, as systemd does for `Type=notify`; the
/// socket its notices arrive on.
fn run_under_systemd(agent: &mut Agent) -> std::os::unix::net::UnixDatagram {
    let notify_path = agent.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(crate::harness::bin())
        .args(["--config", agent.config_path.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    agent.child = Some(child);
    notify
}

/// The next notice, within the socket's deadline.
fn next_notice(notify: &std::os::unix::net::UnixDatagram, what: &str) -> String {
    let mut buffer = [0u8; 256];
    let n = notify
        .recv(&mut buffer)
        .unwrap_or_else(|error| panic!("{what} within the deadline: {error}"));
    std::str::from_utf8(&buffer[..n]).unwrap().trim().to_owned()
}

#[tokio::test]
async fn systemd_is_told_ready_and_stopping() {
    let mut agent = Agent::configure("");
    let notify = run_under_systemd(&mut agent);
    assert_eq!(next_notice(&notify, "READY=1"), "READY=1");
    // READY means the socket already answers.
    assert_eq!(
        agent.get("/healthz").await.unwrap().0,
        reqwest::StatusCode::OK
    );
    let status = agent.terminate();
    assert!(status.success());
    assert_eq!(next_notice(&notify, "STOPPING=1"), "STOPPING=1");
}

#[tokio::test]
async fn systemd_is_kept_waiting_and_told_why_while_the_schema_is_upgraded() {
    let mut agent = Agent::configure("");
    // A database of the schema before the newest, as the previous release left it.
    std::fs::create_dir_all(agent.data_dir()).unwrap();
    let previous = crate::harness::create_previous_schema(&agent.open_db());
    let newest = previous + 1;

    let notify = run_under_systemd(&mut agent);
    let notice = next_notice(&notify, "a notice");
    let lines: Vec<&str> = notice.lines().collect();
    assert_eq!(
        lines,
        [
            format!("STATUS=upgrading the database schema from version {previous} to {newest}")
                .as_str(),
            "EXTEND_TIMEOUT_USEC=60000000",
        ],
        "{notice}"
    );
    // Then ready, on the upgraded schema.
    assert_eq!(next_notice(&notify, "READY=1"), "READY=1");
    let version: i64 = agent
        .open_db()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, newest);
    assert!(agent.terminate().success());
}

#[test]
fn every_subcommand_explains_itself_with_an_example() {
    let commands = [
        "init",
        "run",
        "record",
        "status",
        "sync",
        "retry-failed",
        "rollup",
        "purge",
        "export",
        "forget",
        "receiver",
        "demo",
        "completions",
    ];
    for command in commands {
        let out = Command::new(crate::harness::bin())
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "{command} --help has no example:\n{help}"
        );
        assert!(
            help.contains(&format!("usage-agent {command}"))
                || help.contains(&format!(" {command}")),
            "{help}"
        );
    }
    let out = Command::new(crate::harness::bin())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("usage-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(crate::harness::bin())
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad usage exits 2");
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish_and_hidden_from_help() {
    for (shell, marker) in [
        ("bash", "-o default usage-agent"),
        ("zsh", "#compdef usage-agent"),
        ("fish", "complete -c usage-agent"),
    ] {
        let out = Command::new(crate::harness::bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "completions {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains(marker),
            "{shell}: no {marker:?} in\n{script}"
        );
        assert!(
            script.contains("retry-failed") && script.contains("config"),
            "{shell}: the subcommands and global options are completed"
        );
    }
    let out = Command::new(crate::harness::bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is bad usage");
    let out = Command::new(crate::harness::bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("completions"),
        "completions is hidden from --help"
    );
}

/// Runs `promtool` with `args` from `contrib/prometheus/` and asserts it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus"))
        .output()
        .expect("promtool must be installed (.ci/setup installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_shipped_alert_rules_are_valid_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("4 rules found"), "{checked}");
    // The unit tests feed each rule series that must and must not alert.
    promtool(&["test", "rules", "alerts.test.yml"]);
}

#[test]
fn the_alert_rules_only_name_metrics_the_agent_serves() {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/prometheus/alerts.yml"
    ))
    .unwrap();
    // Labelled families appear once they have a child: touch every one the rules use.
    let metrics = usage_agent::metrics::Metrics::new();
    metrics.job_run("sync", false);
    metrics.job_missed("rollup", 1);
    metrics.sync_round_trip(Duration::from_millis(20));
    metrics.purged(1, 1);
    let served = metrics.encode(Default::default());
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(family) = word.strip_prefix("usage_agent_") {
            named += 1;
            // A counter is served as `<name>_total`, a histogram's buckets as `<name>_bucket`.
            let base = family.strip_suffix("_bucket").unwrap_or(family);
            assert!(
                served.contains(&format!("# TYPE usage_agent_{base} "))
                    || served.contains(&format!(
                        "# TYPE usage_agent_{} ",
                        base.strip_suffix("_total").unwrap_or(base)
                    )),
                "alerts.yml names usage_agent_{family}, which GET /metrics does not serve:\n{served}"
            );
        }
    }
    assert!(named >= 4, "the rules name the agent's metrics");
}
