//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` in a temporary
//! directory, a server on a Unix socket in it, stopped and removed on drop.
//!
//! It uses the PostgreSQL server binaries of Debian's packages (`/usr/lib/postgresql/<n>/bin`,
//! or `PG_BIN`). PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user (`setpriv`, which execs in place, so the pid is the server's own).
//!
//! The server is started by a small shell that also watches this process: when the pipe to
//! its standard input closes (this process ended, even by `kill -9`, without dropping the
//! cluster) it stops the server and removes the directory. So a cluster held in a `static`
//! for a whole test binary never outlives it. The same shell stops and starts the server
//! again on request ([`ThrowawayCluster::stop_server`], [`ThrowawayCluster::start_server`]),
//! for tests of a database that goes away.
//!
//! By default the server listens on its Unix socket only; [`ClusterOptions`] adds a TCP
//! port on 127.0.0.1 and TLS (`ssl = on`) with a certificate the test made.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running throwaway cluster.
pub struct ThrowawayCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    tcp: bool,
    /// The watcher shell; closing its stdin stops the server and removes the directory.
    watcher: Child,
    /// The watcher's stdin (`stop` and `start` lines) and stdout (their answers).
    control: Mutex<Option<(ChildStdin, BufReader<ChildStdout>)>>,
    databases: AtomicU32,
}

/// What a cluster listens on besides its Unix socket.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Also listen on 127.0.0.1, on a free port ([`ThrowawayCluster::port`]); initdb's
    /// `pg_hba.conf` trusts local TCP connections as it trusts the socket.
    pub tcp: bool,
    /// `ssl = on` with this certificate (PEM, the server's first, then any intermediates)
    /// and its private key (PEM).
    pub tls: Option<ServerTls>,
}

/// A server certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// How the server is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` on, as in production: for benchmarks.
    Full,
    /// `fsync` off: for tests, which never survive a power cut anyway.
    Fast,
}

const USER: &str = "usage_agent";
const PORT: u16 = 5432;

impl ThrowawayCluster {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start(durability: Durability) -> anyhow::Result<ThrowawayCluster> {
        ThrowawayCluster::start_with(durability, ClusterOptions::default())
    }

    /// Creates and starts a cluster that also listens as `options` say.
    pub fn start_with(
        durability: Durability,
        options: ClusterOptions,
    ) -> anyhow::Result<ThrowawayCluster> {
        let bin = server_bin_dir()?;
        let dir = new_private_dir()?;
        let data = dir.join("data");
        let as_postgres = running_as_root();
        if as_postgres {
            chown_to_postgres(&dir)?;
        }
        let output = server_command(&bin.join("initdb"), as_postgres)
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "--auth=trust", "--no-sync", "--no-instructions"])
            .args(["-E", "UTF8", "--locale=C"])
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let fsync = match durability {
            Durability::Full => "on",
            Durability::Fast => "off",
        };
        let port = if options.tcp { free_port()? } else { PORT };
        let listen = if options.tcp { "127.0.0.1" } else { "" };
        let mut server = server_command(&bin.join("postgres"), as_postgres);
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-c", &format!("listen_addresses={listen}")])
            .args(["-p", &port.to_string()])
            .args(["-c", &format!("fsync={fsync}")])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=256MB"]);
        if let Some(tls) = &options.tls {
            let cert = dir.join("server.crt");
            let key = dir.join("server.key");
            write_server_file(&cert, &tls.cert_chain_pem, as_postgres)?;
            write_server_file(&key, &tls.key_pem, as_postgres)?;
            server
                .args(["-c", "ssl=on"])
                .args(["-c", &format!("ssl_cert_file={}", cert.display())])
                .args(["-c", &format!("ssl_key_file={}", key.display())]);
        }
        // The server's stdin is /dev/null: only the watcher holds the pipe. `stop` and
        // `start` lines stop and start it again, each answered on stdout once done.
        let script = format!(
            "run() {{ {server} </dev/null >>'{log}' 2>&1 & pid=$!; }}; run; \
             while read line; do case $line in \
               stop) kill -INT $pid; wait $pid; echo stopped;; \
               start) run; echo started;; \
             esac; done; \
             kill -INT $pid 2>/dev/null; wait $pid; rm -rf '{dir}'",
            server = shell_line(&server),
            log = dir.join("server.log").display(),
            dir = dir.display(),
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL server")?;
        let control = watcher
            .stdin
            .take()
            .zip(watcher.stdout.take().map(BufReader::new));
        let cluster = ThrowawayCluster {
            dir,
            bin,
            port,
            tcp: options.tcp,
            watcher,
            control: Mutex::new(control),
            databases: AtomicU32::new(0),
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Stops the server (a fast shutdown: open connections are cut) and returns once it
    /// has exited; the data stays for [`ThrowawayCluster::start_server`].
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.tell("stop", "stopped")
    }

    /// Starts the stopped server again; returns once it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        self.tell("start", "started")?;
        self.wait_ready()
    }

    fn tell(&self, line: &str, answer: &str) -> anyhow::Result<()> {
        let mut control = self
            .control
            .lock()
            .map_err(|_| anyhow::anyhow!("the cluster's control pipe was poisoned"))?;
        let (stdin, stdout) = control.as_mut().context("the cluster is shutting down")?;
        writeln!(stdin, "{line}").context("writing to the cluster's watcher")?;
        stdin.flush().context("writing to the cluster's watcher")?;
        let mut heard = String::new();
        stdout
            .read_line(&mut heard)
            .context("reading the cluster's watcher")?;
        if heard.trim() != answer {
            bail!("the cluster's watcher answered {heard:?} to {line:?}");
        }
        Ok(())
    }

    /// The server's port (on 127.0.0.1 with [`ClusterOptions::tcp`], and its socket's).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` over TCP to `host` (which must reach 127.0.0.1), for a
    /// cluster started with [`ClusterOptions::tcp`].
    pub fn tcp_url(&self, host: &str, name: &str) -> Option<String> {
        self.tcp
            .then(|| format!("postgres://{USER}@{host}:{}/{name}", self.port))
    }

    /// The URL of database `name` in this cluster.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{USER}@localhost/{name}?host={}&port={}",
            self.dir.display(),
            self.port
        )
    }

    /// Makes a fresh, empty database and returns its URL.
    pub fn new_database(&self) -> anyhow::Result<String> {
        let name = format!(
            "test_{}",
            self.databases.fetch_add(1, Ordering::Relaxed) + 1
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// Runs SQL through `psql` on database `database`; its output, unaligned.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(self.url(database))
            .args(["-c", sql])
            .output()
            .context("running psql")?;
        if !output.status.success() {
            bail!(
                "psql failed on {sql:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", USER, "-q"])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL did not start within 30 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        // The watcher's stdin closes: it stops the server and removes the directory.
        if let Ok(mut control) = self.control.lock() {
            control.take();
        }
        let _ = self.watcher.wait();
    }
}

/// A TCP port free on 127.0.0.1 just now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free TCP port")?;
    Ok(listener
        .local_addr()
        .context("finding a free TCP port")?
        .port())
}

/// A file the server reads (its certificate, its key): mode 0600, the server's user's.
fn write_server_file(path: &Path, contents: &[u8], as_postgres: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("making {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    if as_postgres {
        chown_to_postgres(path)?;
    }
    Ok(())
}

/// The directory of the server binaries: `PG_BIN`, else the newest of Debian's.
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((version, bin)) if version >= 15 => Ok(bin),
        Some((version, _)) => bail!("PostgreSQL {version} is installed; 15 or newer is needed"),
        None => bail!(
            "no PostgreSQL server found under /usr/lib/postgresql (install Debian's postgresql package, or set PG_BIN)"
        ),
    }
}

/// A new directory under the system's temporary directory.
fn new_private_dir() -> anyhow::Result<PathBuf> {
    static MADE: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "usage-agent-pg-{}-{}-{nanos}",
        std::process::id(),
        MADE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
    Ok(dir)
}

fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context("PostgreSQL refuses to run as root and there is no postgres user")?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {} to the postgres user", path.display()))
}

/// `program`, run as the `postgres` user when this process is root.
fn server_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A command as one shell line, each argument single-quoted.
fn shell_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| format!("'{}'", arg.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}
