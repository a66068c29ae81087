//! Shared helpers for the integration tests.

// ---------------------------------------------------------------------------------------
// Receiver helpers (owned by the receiver tests): an in-process receiver on port 0.
// ---------------------------------------------------------------------------------------

use std::net::SocketAddr;
use std::sync::Arc;

use usage_agent::receiver::{self, ReceiverSettings, Store};

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

/// A receiver serving on 127.0.0.1 (port chosen by the OS) from its own thread and runtime,
/// with its database in a temporary directory. Works from sync and async tests alike.
/// Dropping it shuts the server down and waits for it.
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestReceiver {
    pub fn start(settings: ReceiverSettings) -> TestReceiver {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let store = receiver::open_sqlite(&dir.path().join("receiver.db")).expect("open the store");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let addr = listener.local_addr().expect("read the bound address");
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task_store = store.clone();
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
