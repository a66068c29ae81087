//! Shared helpers for the integration tests.

// ---------------------------------------------------------------------------------------
// Receiver helpers (owned by the receiver tests): an in-process receiver on port 0.
// ---------------------------------------------------------------------------------------

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use usage_receiver::store::StoreKind;
use usage_receiver::{self as receiver, ReceiverSettings, ReceiverStore};
use usage_testkit::throwaway::{Durability, ThrowawayCluster};

/// Enrollment token of [`receiver_settings`].
pub const ENROLL_TOKEN: &str = "test-enroll-token";
/// Provider basic-auth user of [`receiver_settings`].
pub const PROVIDER_USER: &str = "provider";
/// Provider basic-auth password of [`receiver_settings`].
pub const PROVIDER_PASSWORD: &str = "provider-password";

/// Settings for tests: an enrollment token, provider credentials, no trust on first use,
/// and a rate limit high enough not to get in the way.
pub fn receiver_settings() -> ReceiverSettings {
    ReceiverSettings {
        enrollment_token: Some(ENROLL_TOKEN.into()),
        provider_username: Some(PROVIDER_USER.into()),
        provider_password: Some(PROVIDER_PASSWORD.into()),
        rate_limit_per_min: 100_000,
        ..ReceiverSettings::default()
    }
}

/// The test binary's PostgreSQL cluster, stopped when the binary ends.
pub fn test_cluster() -> &'static ThrowawayCluster {
    static CLUSTER: OnceLock<ThrowawayCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        ThrowawayCluster::start(Durability::Fast).expect("start a throwaway PostgreSQL cluster")
    })
}

/// The runtime every PostgreSQL store of the test binary runs its connections on.
fn store_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("start the store runtime")
    })
}

/// A PostgreSQL store ("a receiver node's") on the database at `url`. Opened on a thread of
/// its own, as async tests may call this.
pub fn open_postgres(url: &str) -> Arc<dyn ReceiverStore> {
    let url = url.to_owned();
    std::thread::spawn(move || receiver::open_postgres(&url, store_runtime().handle().clone()))
        .join()
        .expect("the open thread")
        .expect("open the PostgreSQL store")
}

/// A receiver serving on 127.0.0.1 (port chosen by the OS) from its own thread and runtime,
/// with its database in a temporary directory, or a fresh database of the test cluster
/// when the test binary runs on PostgreSQL (`crate::RECEIVER_STORE`). Works from sync and
/// async tests alike. Dropping it shuts the server down and waits for it.
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn ReceiverStore>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestReceiver {
    pub fn start(settings: ReceiverSettings) -> TestReceiver {
        let (store, dir) = TestReceiver::fresh_store();
        TestReceiver::serve(settings, store, dir)
    }

    /// Like [`TestReceiver::start`], serving from `wrap` of the store (a test's store that
    /// slows or watches some calls); [`TestReceiver::store`] stays the plain one.
    pub fn start_wrapped(
        settings: ReceiverSettings,
        wrap: impl FnOnce(Arc<dyn ReceiverStore>) -> Arc<dyn ReceiverStore>,
    ) -> TestReceiver {
        let (store, dir) = TestReceiver::fresh_store();
        TestReceiver::serve_wrapped(settings, store, dir, wrap)
    }

    /// A new store of this binary's kind, and a temporary directory.
    fn fresh_store() -> (Arc<dyn ReceiverStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let store = match crate::RECEIVER_STORE {
            StoreKind::Sqlite => {
                receiver::open_sqlite(&dir.path().join("receiver.db")).expect("open the store")
            }
            StoreKind::Postgres => {
                open_postgres(&test_cluster().new_database().expect("make a database"))
            }
        };
        (store, dir)
    }

    /// Serves `store` (a node of a shared database, say) with `settings`.
    pub fn serve(
        settings: ReceiverSettings,
        store: Arc<dyn ReceiverStore>,
        dir: tempfile::TempDir,
    ) -> TestReceiver {
        TestReceiver::serve_wrapped(settings, store, dir, |store| store)
    }

    fn serve_wrapped(
        settings: ReceiverSettings,
        store: Arc<dyn ReceiverStore>,
        dir: tempfile::TempDir,
        wrap: impl FnOnce(Arc<dyn ReceiverStore>) -> Arc<dyn ReceiverStore>,
    ) -> TestReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let addr = listener.local_addr().expect("read the bound address");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task_store = wrap(store.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let stop = async move {
                    let _ = stop.await;
                };
                receiver::serve(listener, settings, task_store, stop).await
            })
        });
        TestReceiver {
            addr,
            dir,
            store,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Stops the server and serves the same data again with `settings`, as a node
    /// restarted: the SQLite file of [`TestReceiver::start`] reopened, or the same
    /// PostgreSQL database.
    pub fn restart(mut self, settings: ReceiverSettings) -> TestReceiver {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temp dir"));
        let store = self.store.clone();
        drop(self);
        let store = match store.kind() {
            StoreKind::Sqlite => {
                drop(store);
                receiver::open_sqlite(&dir.path().join("receiver.db")).expect("reopen the store")
            }
            StoreKind::Postgres => store,
        };
        TestReceiver::serve(settings, store, dir)
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Talking to a test receiver as an agent and as the provider (receiver and provider tests).
// ---------------------------------------------------------------------------------------

use chrono::Utc;
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign,
};
use uuid::Uuid;

/// An install as the receiver knows it: its id and signing secret.
pub struct TestInstall {
    pub id: String,
    pub secret: Secret,
}

impl TestInstall {
    pub fn new() -> TestInstall {
        TestInstall {
            id: format!("{}_{}", Uuid::new_v4(), "ab".repeat(32)),
            secret: Secret::generate(),
        }
    }
}

pub fn client() -> Client {
    // reqwest is built without a default TLS provider; install the one the workspace uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}

/// An enrollment request for `install` with `secret` (no token yet).
pub fn enroll_request(rx: &TestReceiver, install: &TestInstall, secret: &Secret) -> RequestBuilder {
    client().post(rx.url("/api/installations")).json(&json!({
        "install_id": install.id,
        "secret": secret.to_whsec(),
        "site_hash": "cd".repeat(32),
    }))
}

/// Enrolls `install` with the test token and checks it was created.
pub async fn enroll(rx: &TestReceiver, install: &TestInstall) {
    let response = enroll_request(rx, install, &install.secret)
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// Enrolls `install` straight into the store of `rx` as enrolled at `at_ms` (Unix
/// milliseconds): the enrollment endpoint stamps the real clock, and a test of what an
/// install earns needs its enrollment day.
pub async fn enroll_at(rx: &TestReceiver, install: &TestInstall, at_ms: i64) {
    let store = rx.store.clone();
    let new = usage_receiver::store::NewInstall {
        install_id: install.id.clone(),
        secret: install.secret.clone(),
        site_hash: "cd".repeat(32),
        enrolled_at_ms: at_ms,
    };
    let outcome = tokio::task::spawn_blocking(move || store.enroll(&new))
        .await
        .expect("the enroll task")
        .expect("enroll in the store");
    assert_eq!(outcome, usage_receiver::store::EnrollOutcome::Created);
}

/// The JSON body of a batch.
pub fn batch_body(batch_id: Uuid, install_id: &str, events: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "batch_id": batch_id,
        "install_id": install_id,
        "sent_at": Utc::now().to_rfc3339(),
        "events": events,
    }))
    .unwrap()
}

/// A correctly signed ingest request for `body`, signed at `timestamp`.
pub fn signed_at(
    rx: &TestReceiver,
    install: &TestInstall,
    batch_id: Uuid,
    body: &[u8],
    timestamp: i64,
) -> RequestBuilder {
    let id = batch_id.to_string();
    client()
        .post(rx.url("/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(
            HEADER_SIGNATURE,
            sign(&install.secret, &id, timestamp, body),
        )
        .header(HEADER_INSTALL_ID, &install.id)
        .body(body.to_vec())
}

/// A correctly signed ingest request for `body`, signed now.
pub fn signed(
    rx: &TestReceiver,
    install: &TestInstall,
    batch_id: Uuid,
    body: &[u8],
) -> RequestBuilder {
    signed_at(rx, install, batch_id, body, Utc::now().timestamp())
}

/// A provider request with the test basic-auth credentials.
pub fn provider_request(rx: &TestReceiver, method: Method, path: &str) -> RequestBuilder {
    client()
        .request(method, rx.url(path))
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
}
