//! docs/install.md's fleet section, run as written where a test can: the PostgreSQL,
//! backup and restore commands against a throwaway cluster and a real receiver node, the
//! node's listen drop-in through `systemd-analyze verify`, and the nginx configuration's
//! directives (read as text: `nginx -t` runs too when nginx is installed).
//!
//! Two commands are stood in for, as the test cannot run them for real: `runuser -u
//! postgres --` runs the command as the test (the cluster's superuser, through `PGUSER`),
//! and `systemctl stop|start usage-receiver` stops or starts the test's node process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use usage_testkit::throwaway::{Durability, ThrowawayCluster};

use crate::common::{ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER, client};
use crate::harness::{Agent, bin, event, new_id, poll};

fn install_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/install.md"))
        .expect("docs/install.md")
}

/// The text of the section under `heading` (a `##` or `###` line), up to the next heading
/// of the same or a higher level outside a fenced block.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let level = heading.split(' ').next().unwrap().len();
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("install.md has no {heading:?}"))
        + 1
        + heading.len();
    let body = &doc[start..];
    let mut fenced = false;
    let mut at = 0;
    for line in body.split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        at += line.len();
    }
    &body[..at]
}

/// The fenced blocks of `text` whose info string is `lang`, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{lang}") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => found.push(current.take().unwrap()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    found
}

/// Where the stand-ins and the node's files live.
struct Bench {
    dir: tempfile::TempDir,
    cluster_dir: String,
    listen: String,
    node_database_url: String,
}

impl Bench {
    fn new(cluster: &ThrowawayCluster) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let url = cluster.url("usage_receiver");
        let cluster_dir = url
            .split("host=")
            .nth(1)
            .and_then(|rest| rest.split('&').next())
            .expect("the cluster's socket directory")
            .to_owned();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        let runuser = "#!/bin/sh\n\
            # runuser -u USER -- COMMAND...: the test's cluster takes COMMAND as its superuser.\n\
            while [ \"$#\" -gt 0 ] && [ \"$1\" != \"--\" ]; do shift; done\n\
            shift\n\
            exec \"$@\"\n";
        let systemctl = "#!/bin/sh\n\
            echo \"$*\" >> \"$SYSTEMCTL_LOG\"\n\
            case \"$1 $2\" in\n\
            'stop usage-receiver')\n\
              pid=$(cat \"$NODE_PID\")\n\
              kill -TERM \"$pid\"\n\
              # Gone, or a zombie no one reaps: either way it serves no more.\n\
              while state=$(awk '{print $3}' \"/proc/$pid/stat\" 2>/dev/null) && [ \"$state\" != Z ]; do sleep 0.1; done ;;\n\
            'start usage-receiver')\n\
              \"$NODE_BIN\" receiver --listen \"$NODE_LISTEN\" >> \"$NODE_LOG\" 2>&1 &\n\
              echo $! > \"$NODE_PID\" ;;\n\
            *) echo \"systemctl $*: not stood in for\" >&2; exit 1 ;;\n\
            esac\n";
        for (name, text) in [("runuser", runuser), ("systemctl", systemctl)] {
            let path = bin_dir.join(name);
            std::fs::write(&path, text).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let node_database_url = url.replacen("usage_agent@", "usage_receiver@", 1);
        Bench {
            dir,
            cluster_dir,
            listen: format!("127.0.0.1:{port}"),
            node_database_url,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn node_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// Runs `script` with bash (stopping at the first failing command), the stand-ins
    /// first on the `PATH`; panics with its output if it fails.
    fn run(&self, script: &str) {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .args(["-e", "-o", "pipefail", "-c", script])
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("PGHOST", &self.cluster_dir)
            .env("PGPORT", "5432")
            .env("PGUSER", "usage_agent")
            .env("PGDATABASE", "postgres")
            .env("SYSTEMCTL_LOG", self.path("systemctl.log"))
            .env("NODE_PID", self.path("node.pid"))
            .env("NODE_LOG", self.path("node.log"))
            .env("NODE_BIN", bin())
            .env("NODE_LISTEN", &self.listen)
            .env("DATABASE_URL", &self.node_database_url)
            .env("ENROLLMENT_TOKEN", ENROLL_TOKEN)
            .env("PROVIDER_USERNAME", PROVIDER_USER)
            .env("PROVIDER_PASSWORD", PROVIDER_PASSWORD)
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{script}\nfailed: {}{}\nnode log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.path("node.log")).unwrap_or_default()
        );
    }

    async fn node_healthy(&self) {
        poll("the node's health", Duration::from_secs(30), async || {
            let response = client().get(self.node_url("/health")).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    fn systemctl_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.path("node.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Events of the install the node stored.
async fn stored(bench: &Bench, install_id: &str) -> u64 {
    let response = client()
        .get(bench.node_url(&format!("/api/usage/summary?install_id={install_id}")))
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let summary: Value = response.json().await.unwrap();
    summary["totals"]["events"].as_u64().unwrap()
}

/// Records `n` events at the agent and syncs them; asserts the node accepted them all.
async fn record_and_sync(agent: &Agent, n: usize) {
    let events: Vec<Value> = (0..n).map(|_| event(&new_id())).collect();
    let (code, body) = agent.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let (code, report) = agent.post("/v1/sync", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(report["error"], Value::Null, "{report}");
    assert_eq!(report["accepted"], n as u64, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_backup_and_restore_work_as_written() {
    let doc = install_md();
    let fleet = section(&doc, "## Running the receiver for a fleet");
    let cluster = ThrowawayCluster::start(Durability::Fast).expect("a throwaway cluster");
    let bench = Bench::new(&cluster);

    let database = blocks(section(fleet, "### PostgreSQL"), "sh");
    let create = database
        .iter()
        .find(|block| block.contains("CREATE ROLE usage_receiver"))
        .expect("the block that creates the role and the database");
    bench.run(create);
    bench.run("systemctl start usage-receiver");
    bench.node_healthy().await;

    let mut agent = Agent::configure_with(
        "",
        &format!(
            "[sync]\nbackend_url = {:?}\ninterval_secs = 3600\n",
            bench.node_url("")
        ),
    );
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &bench.node_url(""),
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.spawn().await;
    let install_id = agent.status().await["install_id"]
        .as_str()
        .unwrap()
        .to_owned();
    record_and_sync(&agent, 3).await;

    let backups = bench.path("backups");
    let backup_section = section(fleet, "### Backup and restore");
    let [backup, restore] = &blocks(backup_section, "sh")[..] else {
        panic!("Backup and restore should show a backup block and a restore block");
    };
    let here = |block: &str| {
        assert!(block.contains("/var/backups/usage-receiver"), "{block}");
        block.replace("/var/backups/usage-receiver", backups.to_str().unwrap())
    };
    bench.run(&here(backup));
    let dumps: Vec<_> = std::fs::read_dir(&backups).unwrap().collect();
    assert_eq!(dumps.len(), 1, "one dump in {}", backups.display());

    // Events after the dump are lost by the restore: what a restore to a point means.
    record_and_sync(&agent, 2).await;
    assert_eq!(stored(&bench, &install_id).await, 5);

    bench.run(&here(restore));
    bench.node_healthy().await;
    assert_eq!(stored(&bench, &install_id).await, 3);
    assert_eq!(
        bench.systemctl_calls(),
        [
            "start usage-receiver",
            "stop usage-receiver",
            "start usage-receiver"
        ]
    );
    // The restored node still knows the install: a new event syncs.
    record_and_sync(&agent, 1).await;
    assert_eq!(stored(&bench, &install_id).await, 4);
    bench.run("systemctl stop usage-receiver");
}

/// The drop-in of "Each node's listen address", as written.
fn listen_drop_in(doc: &str) -> String {
    let fleet = section(doc, "## Running the receiver for a fleet");
    let block = blocks(section(fleet, "### Each node's listen address"), "sh")
        .into_iter()
        .next()
        .expect("the drop-in block");
    let start = block.find("<<'UNIT'\n").expect("the drop-in's heredoc") + "<<'UNIT'\n".len();
    let end = block[start..].find("\nUNIT\n").expect("the heredoc's end") + start;
    assert!(
        block.contains("/etc/systemd/system/usage-receiver.service.d/listen.conf"),
        "{block}"
    );
    format!("{}\n", &block[start..end])
}

/// Runs `systemd-analyze verify` on the packaged unit with `drop_in` beside it.
fn verify_with_drop_in(dir: &Path, drop_in: &str) -> std::process::Output {
    let units = dir.join("units");
    std::fs::create_dir_all(units.join("usage-receiver.service.d")).unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/usage-receiver/usage-receiver.service"
    ))
    .unwrap();
    // This package's binary runs the receiver as `usage-agent receiver`.
    let local = |text: &str| {
        text.replace(
            "/usr/bin/usage-receiver serve",
            &format!("{} receiver", bin()),
        )
    };
    std::fs::write(units.join("usage-receiver.service"), local(&unit)).unwrap();
    std::fs::write(
        units.join("usage-receiver.service.d/listen.conf"),
        local(drop_in),
    )
    .unwrap();
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("usage-receiver.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .expect("systemd-analyze must be installed (.ci/run installs systemd)")
}

#[test]
fn the_documented_listen_drop_in_verifies_and_replaces_the_units_address() {
    let drop_in = listen_drop_in(&install_md());
    assert!(
        drop_in.starts_with("[Service]\nExecStart=\nExecStart=/usr/bin/usage-receiver serve --listen 10.0.0.11:8787\n"),
        "{drop_in}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = verify_with_drop_in(dir.path(), &drop_in);
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // systemd reads the drop-in: without the line that clears the unit's own ExecStart,
    // the unit would have two and is refused.
    let without_reset = drop_in.replacen("ExecStart=\n", "", 1);
    let out = verify_with_drop_in(dir.path(), &without_reset);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("more than one ExecStart"),
        "verify without the reset: {stderr}"
    );
}

#[test]
fn the_documented_nginx_configuration_retries_batches_on_the_next_node() {
    let doc = install_md();
    let fleet = section(&doc, "## Running the receiver for a fleet");
    let config = blocks(section(fleet, "### The balancer"), "nginx")
        .into_iter()
        .next()
        .expect("the nginx block");
    // nginx is not part of the test machine's set-up: the directives are checked as text,
    // and by `nginx -t` as well where nginx is installed.
    let directives: Vec<String> = config
        .lines()
        .map(|line| line.split('#').next().unwrap().trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    for wanted in [
        "proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "server 10.0.0.11:8787 max_fails=1 fail_timeout=5s;",
        "server 10.0.0.12:8787 max_fails=1 fail_timeout=5s;",
        "proxy_pass http://usage_receiver;",
    ] {
        assert!(
            directives.iter().any(|d| d == wanted),
            "the nginx block lacks {wanted:?}: {directives:?}"
        );
    }
    // The nodes it names listen where the drop-in puts one of them.
    assert!(listen_drop_in(&doc).contains("--listen 10.0.0.11:8787"));
    let body_limit: u64 = directives
        .iter()
        .find_map(|d| d.strip_prefix("client_max_body_size "))
        .and_then(|v| v.trim_end_matches(';').strip_suffix('m'))
        .and_then(|v| v.parse().ok())
        .expect("client_max_body_size in MiB");
    assert!(
        body_limit >= 2,
        "nginx must pass the receiver's 2 MiB bodies"
    );
    // Every `{` is closed.
    assert_eq!(config.matches('{').count(), config.matches('}').count());

    if Command::new("nginx").arg("-v").output().is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let wrapper = format!(
            "pid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{}}\nhttp {{\naccess_log off;\n{config}}}\n",
            dir.path().display()
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, wrapper).unwrap();
        let out = Command::new("nginx")
            .args(["-t", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nginx -t: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_receiver_keeps_its_files_apart_from_the_agents() {
    let doc = install_md();
    let fleet = section(&doc, "## Running the receiver for a fleet");
    let prices = section(&doc, "## Prices on the receiver");
    for block in blocks(fleet, "sh").iter().chain(&blocks(prices, "sh")) {
        assert!(
            !block.contains("/etc/usage-agent"),
            "a receiver command touches the agent's directory: {block}"
        );
    }
    // The file the node reads as its own user is its group's, mode 0640.
    let price_block = blocks(prices, "sh").into_iter().next().unwrap();
    assert!(
        price_block.contains(
            "install -m 0640 -o root -g usage-receiver prices.toml /etc/usage-receiver/prices.toml"
        ),
        "{price_block}"
    );
    // Every unit reads the settings file the page writes.
    for unit in [
        "contrib/systemd/usage-receiver.service",
        "packaging/usage-receiver/usage-receiver.service",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/{unit}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            text.lines()
                .any(|line| line == "EnvironmentFile=/etc/usage-receiver/env"),
            "{unit}"
        );
    }
    assert!(fleet.contains("cat > /etc/usage-receiver/env <<'ENV'"));
    assert!(fleet.contains("local   usage_receiver   usage_receiver   peer map=usage_receiver"));
    assert!(fleet.contains("TRUSTED_PROXIES="));
}
