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
//! for a whole test binary never outlives it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running throwaway cluster.
pub struct ThrowawayCluster {
    dir: PathBuf,
    /// The watcher shell; writing a line to its stdin (or closing it) stops the server.
    watcher: Child,
    stop: Option<ChildStdin>,
    databases: AtomicU32,
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
        let mut server = server_command(&bin.join("postgres"), as_postgres);
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-c", "listen_addresses=", "-p", &PORT.to_string()])
            .args(["-c", &format!("fsync={fsync}")])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=256MB"]);
        // The server's stdin is /dev/null: only the watcher holds the pipe.
        let script = format!(
            "{server} </dev/null >>'{log}' 2>&1 & pid=$!; read _; kill -INT $pid; wait $pid; rm -rf '{dir}'",
            server = shell_line(&server),
            log = dir.join("server.log").display(),
            dir = dir.display(),
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the PostgreSQL server")?;
        let stop = watcher.stdin.take();
        let cluster = ThrowawayCluster {
            dir,
            watcher,
            stop,
            databases: AtomicU32::new(0),
        };
        cluster.wait_ready(&bin)?;
        Ok(cluster)
    }

    /// The URL of database `name` in this cluster.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://{USER}@localhost/{name}?host={}&port={PORT}",
            self.dir.display()
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

    fn wait_ready(&self, bin: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &PORT.to_string(), "-U", USER, "-q"])
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
        if let Some(mut stop) = self.stop.take() {
            let _ = stop.write_all(b"stop\n");
        }
        let _ = self.watcher.wait();
    }
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

fn chown_to_postgres(dir: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres user")?
        .context("PostgreSQL refuses to run as root and there is no postgres user")?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {} to the postgres user", dir.display()))
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
