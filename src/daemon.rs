//! The daemon's life: take the data-dir lock, open the store, bind the socket safely,
//! serve the API until the shutdown future resolves, then drain, checkpoint and clean up.
//!
//! [`Daemon::start`] binds everything (so errors surface before the process detaches
//! into serving) and [`Daemon::serve`] runs until the shutdown signal.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};

use tokio_cron_scheduler::JobSchedulerError;

use crate::api;
use crate::config::Config;
use crate::identity::{Identity, IdentityError};
use crate::jobs;
use crate::jobs::schedule::Scheduler;
use crate::metrics::Metrics;
use crate::quota::Quota;
use crate::state::{AppState, MaintenanceLock, SharedState};
use crate::store::writer::Writer;
use crate::store::{SIDE_CACHE_KIB, Store, StoreError, WRITER_CACHE_KIB};
use crate::sync::engine::{SetupError, SyncEngine};
use usage_common::server::{self, Limits};

/// Why the daemon could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another usage-agent is already running with data directory {data_dir} (lock file {lock} is held)"
    )]
    AlreadyRunning { data_dir: PathBuf, lock: PathBuf },
    #[error("cannot take the lock file {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another process is already listening on socket {0}")]
    SocketInUse(PathBuf),
    #[error("cannot listen on socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket_group {0:?} does not exist")]
    UnknownGroup(String),
    #[error("cannot listen on tcp_listen {addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot set up sync: {0}")]
    Sync(#[from] SetupError),
    #[error("the job scheduler failed: {0}")]
    Schedule(#[from] JobSchedulerError),
}

/// A long step of the start, told to systemd (`Type=notify`) while it runs: `STATUS=` what
/// it is, and `EXTEND_TIMEOUT_USEC` now and again every third of the extension until the
/// step is dropped, so the start timeout never stops a start that is still working. A
/// no-op outside systemd.
struct StartupStep {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long each notice asks systemd to wait.
const STEP_EXTENSION: Duration = Duration::from_secs(60);

impl StartupStep {
    fn announce(what: String) -> StartupStep {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("startup-step".into())
            .spawn(move || {
                let extension = STEP_EXTENSION.as_micros() as u32;
                loop {
                    let _ = sd_notify::notify(&[
                        sd_notify::NotifyState::Status(&what),
                        sd_notify::NotifyState::ExtendTimeoutUsec(extension),
                    ]);
                    // Until the step is dropped, which drops the sender.
                    match finished.recv_timeout(STEP_EXTENSION / 3) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        _ => return,
                    }
                }
            })
            .ok();
        StartupStep {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for StartupStep {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A started daemon: lock held, store open, listeners bound.
pub struct Daemon {
    state: SharedState,
    writer_thread: std::thread::JoinHandle<()>,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    socket_path: PathBuf,
    /// Held for the daemon's whole life; the OS releases it if the process dies.
    _lock: File,
}

impl Daemon {
    /// Takes the lock, opens the store and binds the listeners.
    pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let lock = take_lock(&config)?;
        let identity = Identity::load(&config.identity_path())?;
        if identity.is_none() {
            tracing::warn!(
                path = %config.identity_path().display(),
                "no install identity yet: events are stored locally; run `usage-agent init --site-url URL` before syncing"
            );
        }

        // A damaged database is moved aside and salvaged before anything opens it.
        crate::store::salvage::recover_if_damaged(&config.database_path(), config.synchronous)?;
        // A schema upgrade rewrites tables, which on a large database can outlast systemd's
        // start timeout: keep it waiting, and say why, until the store is open.
        let upgrading = crate::store::pending_upgrade(&config.database_path()).map(|(from, to)| {
            tracing::info!(
                from,
                to,
                "upgrading the database schema (minutes on a database of millions of events)"
            );
            StartupStep::announce(format!(
                "upgrading the database schema from version {from} to {to}"
            ))
        });
        let writing = Store::open(&config.database_path(), config.synchronous)?;
        drop(upgrading);
        if let Some(identity) = &identity {
            writing.set_install_id(&identity.install_id)?;
        }
        writing.limit_cache(WRITER_CACHE_KIB)?;
        let reader = Store::open(&config.database_path(), config.synchronous)?;
        reader.limit_cache(SIDE_CACHE_KIB)?;
        let (writer, writer_thread) = Writer::spawn(writing);
        let metrics = Arc::new(Metrics::new());
        metrics.start_at_zero(
            &[
                crate::jobs::maintenance::ROLLUP,
                crate::jobs::maintenance::CLEANUP,
                crate::sync::engine::SYNC_JOB,
            ],
            &crate::sync::error::Category::ALL.map(crate::sync::error::Category::as_str),
        );
        let sync = match config.sync_disabled_reason() {
            Some(reason) => {
                tracing::info!("{reason}");
                None
            }
            None => Some(Arc::new(SyncEngine::new(
                &config,
                identity.clone(),
                writer.clone(),
                Arc::clone(&metrics),
            )?)),
        };

        let socket_path = config.socket_path();
        let unix = bind_socket(&config, &socket_path)?;
        let tcp =
            match config.tcp_listen {
                None => None,
                Some(listen) => Some(TcpListener::bind(listen.addr()).await.map_err(|source| {
                    DaemonError::Tcp {
                        addr: listen.addr(),
                        source,
                    }
                })?),
            };

        // Counted before the socket answers, so the first quota answer is already right.
        let quota = Quota::rebuild(
            config.quota.clone(),
            config.timezone,
            &reader,
            chrono::Utc::now(),
        )?;
        let state = Arc::new(AppState {
            config,
            identity,
            writer,
            reader: Mutex::new(reader),
            quota,
            started: Instant::now(),
            next_sync_ms: AtomicI64::new(0),
            sync,
            metrics,
            maintenance: MaintenanceLock::default(),
        });
        Ok(Daemon {
            state,
            writer_thread,
            unix,
            tcp,
            socket_path,
            _lock: lock,
        })
    }

    /// The shared state, for jobs that run beside the API.
    pub fn state(&self) -> SharedState {
        Arc::clone(&self.state)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Serves until `shutdown` resolves; then, all within `shutdown_timeout_secs`:
    /// stops accepting, lets in-flight requests finish for up to half that time and cuts
    /// connections still open then, makes the last sync with what is left (keeping a
    /// little for the end), commits and checkpoints the database and removes the socket.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let config = &self.state.config;
        let budget = Duration::from_secs(config.shutdown_timeout_secs);
        let limits = Limits::new(config.max_connections, budget / 2);
        // `Some(when)` once shutdown has begun.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<Instant>);
        let stopped = |mut rx: tokio::sync::watch::Receiver<Option<Instant>>| async move {
            let _ = rx.wait_for(Option::is_some).await;
        };
        tracing::info!(socket = %self.socket_path.display(), "usage-agent listening");
        // Under systemd (Type=notify) this tells it the socket is ready; elsewhere a no-op.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let unix_server = server::serve(
            self.unix,
            api::router(self.state.clone()),
            limits,
            stopped(stop_rx.clone()),
        );
        let tcp_server = self.tcp.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "also listening on loopback TCP (bearer token required)");
            }
            server::serve(
                listener,
                api::tcp_router(self.state.clone()),
                limits,
                stopped(stop_rx.clone()),
            )
        });
        let (sync_stop_tx, sync_stop_rx) = tokio::sync::watch::channel(false);
        let schedule = self
            .state
            .sync
            .clone()
            .map(|engine| jobs::sync::spawn_schedule(self.state.clone(), engine, sync_stop_rx));
        let daily_jobs = Scheduler::start(self.state.clone()).await?;
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop_tx.send(Some(Instant::now()));
            let _ = sync_stop_tx.send(true);
        });

        match tcp_server {
            Some(tcp) => {
                tokio::join!(unix_server, tcp);
            }
            None => unix_server.await,
        }
        let began = stop_rx.borrow().unwrap_or_else(Instant::now);
        let deadline = began + budget;

        daily_jobs.stop().await;
        // One last bounded sync, then no job holds the writer any more. The checkpoint
        // and clean-up after it keep a little of the budget.
        if let Some(engine) = self.state.sync.clone() {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(CHECKPOINT_RESERVE);
            jobs::sync::finish(&engine, schedule, left).await;
        }
        self.state.writer.stop().await;
        let writer_thread = self.writer_thread;
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!(
            took_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            "usage-agent stopped"
        );
        Ok(())
    }
}

/// Of the shutdown budget, what the last sync leaves for the checkpoint and clean-up.
const CHECKPOINT_RESERVE: Duration = Duration::from_secs(1);

fn take_lock(config: &Config) -> Result<File, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.lock_path();
    let lock_error = |source| DaemonError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(lock_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(DaemonError::AlreadyRunning {
                data_dir: config.data_dir.clone(),
                lock: path,
            });
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(lock_error(source)),
    }
    // The pid is informational, for an admin looking at the lock file.
    file.set_len(0).map_err(lock_error)?;
    writeln!(file, "{}", std::process::id()).map_err(lock_error)?;
    Ok(file)
}

/// Binds the Unix socket: replaces a stale socket left by a crash, refuses one that a live
/// process still answers on, and applies `socket_mode` and `socket_group`.
fn bind_socket(config: &Config, path: &Path) -> Result<UnixListener, DaemonError> {
    let socket_error = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    if let Ok(found) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket may be replaced: whatever else is at socket_path (a file, a
        // directory, a link) may be someone's data, so the agent refuses to start.
        let kind = found.file_type();
        if !kind.is_socket() {
            let what = if kind.is_file() {
                "a regular file"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_symlink() {
                "a symbolic link"
            } else {
                "something other than a socket"
            };
            return Err(socket_error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "socket_path is {what}, not a socket; usage-agent replaces only a stale socket, so move it away or set socket_path elsewhere"
                ),
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket");
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    let mode = config.socket_mode.bits();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    if !config.socket_group.is_empty() {
        let group = nix::unistd::Group::from_name(&config.socket_group)
            .ok()
            .flatten()
            .ok_or_else(|| DaemonError::UnknownGroup(config.socket_group.clone()))?;
        std::os::unix::fs::chown(path, None, Some(group.gid.as_raw())).map_err(socket_error)?;
    }
    Ok(listener)
}

/// One glibc malloc arena for all threads, instead of up to eight per core: each thread
/// that allocates (tokio workers, the writer, blocking reads) otherwise takes an arena of
/// its own, whose free memory no other thread reuses, and the agent is held to a small
/// memory budget (BENCHMARKS.md has what it saves and costs). Called by `cli::run`
/// before anything starts a thread, for every command but `receiver`.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator tunable; called at start-up, before
        // any other thread exists.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}
