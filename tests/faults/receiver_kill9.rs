//! Kill -9 of the receiver in the middle of a sync (`kill9.rs` from the other side: killing
//! a receiver with -9 loses nothing acknowledged). The receiver runs as its own process
//! (`usage-agent receiver`) on a fixed port and is SIGKILLed at seeded random moments while
//! the agent ships a backlog, then restarted on the same database. A batch it committed but
//! never answered comes again from the agent and must be a duplicate; after every restart
//! `verify` holds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER};
use crate::harness::{bin, poll};
use crate::support::{
    Ledger, Rng, call, enrolled_agent, install_id, post_events, random_event, seed, socket_client,
    start, sync_table, verify,
};

/// `usage-agent receiver` as a child process, on one port and one database for all its
/// lives.
struct ReceiverProcess {
    addr: SocketAddr,
    db: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ReceiverProcess {
    async fn start() -> ReceiverProcess {
        usage_agent::sync::install_tls_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        // A port the OS just handed out, free again once this listener is dropped.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut receiver = ReceiverProcess {
            addr,
            db: dir.path().join("receiver.db"),
            _dir: dir,
            child: None,
        };
        receiver.spawn().await;
        receiver
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the process and waits until `/health` answers.
    async fn spawn(&mut self) {
        let child = Command::new(bin())
            .arg("receiver")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--db")
            .arg(&self.db)
            .env_remove("DATABASE_URL")
            .env("ENROLLMENT_TOKEN", ENROLL_TOKEN)
            .env("PROVIDER_USERNAME", PROVIDER_USER)
            .env("PROVIDER_PASSWORD", PROVIDER_PASSWORD)
            .env("RATE_LIMIT_PER_MIN", "100000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning usage-agent receiver");
        self.child = Some(child);
        let health = self.url() + "/health";
        poll(
            "the receiver to answer /health",
            Duration::from_secs(20),
            async || {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    panic!("the receiver exited early with {status}");
                }
                let answer = reqwest::get(&health).await.ok()?;
                (answer.status() == StatusCode::OK).then_some(())
            },
        )
        .await;
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("receiver running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping");
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_receiver_mid_sync_loses_nothing_and_counts_nothing_twice() {
    let _alone = crate::support::EXCLUSIVE.lock().await;
    let mut rng = Rng::new(seed(
        "kill_9_of_the_receiver_mid_sync_loses_nothing_and_counts_nothing_twice",
    ));
    let kills: usize = std::env::var("FAULT_RECEIVER_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let mut receiver = ReceiverProcess::start().await;
    let tables = sync_table(
        &receiver.url(),
        "interval_secs = 1\nbatch_size = 10\nmax_attempts = 2\nrequest_timeout_secs = 5",
    );
    let mut agent = enrolled_agent("", &tables, &receiver.url());
    start(&mut agent).await;
    let install = install_id(&agent);
    let client = socket_client(&agent);
    let mut ledger = Ledger::default();
    let mut window = 300u64;
    let (mut in_flight, mut duplicates) = (0usize, 0u64);

    for kill in 0..kills {
        let backlog: Vec<Value> = (0..rng.range(100, 300))
            .map(|_| {
                let user = rng.range(1, 21);
                random_event(&mut rng, user, (0, 30))
            })
            .collect();
        for chunk in backlog.chunks(100) {
            assert!(post_events(&client, chunk).await.unwrap().is_some());
            ledger.note(chunk, true);
        }
        let sync = {
            let client = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = call(&client, Method::POST, "/v1/sync", Some(&json!({}))).await;
                (answer, started, Instant::now())
            })
        };
        let delay = rng.range(0, window + 1);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let killed_at = Instant::now();
        receiver.kill9();
        let (answer, started, answered) = sync.await.expect("the sync task");
        let (code, report) = answer.expect("the agent answers /v1/sync");
        assert_eq!(code, StatusCode::OK, "{report}");
        // A run the kill cut short ends with a network error; any other error is a bug.
        let mid_run = report["error"]["category"] == "network";
        assert!(mid_run || report["error"].is_null(), "{report}");
        if mid_run {
            in_flight += 1;
        } else if answered <= killed_at {
            // Done before the kill: aim the next window at the run's length.
            window = ((answered - started).as_millis() as u64 * 3 / 2).max(2);
        }

        receiver.spawn().await;
        let seen = verify(&client, &receiver.url(), &install, &ledger, &[]).await;
        duplicates += seen.duplicates;
        assert_eq!(seen.received_events, ledger.acked());
        eprintln!(
            "receiver kill {kill:2} after {delay:3} ms, {}: {} events, {} duplicates re-sent",
            if mid_run { "mid-run" } else { "after the run" },
            seen.received_events,
            seen.duplicates
        );
    }
    eprintln!(
        "{kills} receiver kills, {in_flight} during a sync run; {duplicates} events re-sent that the receiver already had"
    );
    if kills >= 10 {
        assert!(
            in_flight >= kills / 4,
            "only {in_flight} of {kills} kills landed during a sync run"
        );
    }
}
