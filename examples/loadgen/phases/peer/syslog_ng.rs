//! One round of syslog-ng doing the same work as the agent: 4 clients write chunks of 500
//! event lines to its `unix-stream` source; its HTTP destination, behind a reliable disk
//! buffer, ships batches of 500 lines as one JSON array to the counting sink.
//!
//! syslog-ng acknowledges nothing, so its ingest is timed until its destination's queue
//! (on disk) holds every event, read from its control socket; meanwhile the sink is down
//! and each attempt to deliver fails at once. Then the sink starts listening and the drain
//! is timed from the first batch to arrive to the last one counted.
//!
//! `ROOT` is where syslog-ng is: `/` when installed, or a tree unpacked from Debian's
//! `syslog-ng-core` and `syslog-ng-mod-http` packages with `dpkg -x` (the test suite's
//! setup unpacks one into `target/syslog-ng`, so nothing runs as the system's logger).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use super::{BATCH, CHUNK, CLIENTS, Round, sink};
use crate::generator::Generator;
use crate::phases::drain::free_port;
use crate::roles::{cpu_seconds, peak_rss_mib, terminate, wait_until};

/// The longest ingest or drain may take.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// Where syslog-ng's binary, modules and libraries are.
pub(super) struct Install {
    binary: PathBuf,
    modules: PathBuf,
    library_path: String,
}

impl Install {
    /// Finds syslog-ng under `root` (its binary, and the module directory that holds the
    /// HTTP destination).
    pub(super) fn at(root: &Path) -> anyhow::Result<Install> {
        let binary = root.join("usr/sbin/syslog-ng");
        if !binary.is_file() {
            bail!("--syslog-ng: no syslog-ng binary at {}", binary.display());
        }
        let versions = root.join("usr/lib/syslog-ng");
        let modules = std::fs::read_dir(&versions)
            .with_context(|| format!("--syslog-ng: reading {}", versions.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|dir| dir.join("libhttp.so").is_file())
            .with_context(|| {
                format!(
                    "--syslog-ng: no HTTP destination module (libhttp.so, from \
                     syslog-ng-mod-http) under {}",
                    versions.display()
                )
            })?;
        let library_path = [
            "usr/lib/x86_64-linux-gnu",
            "usr/lib/syslog-ng",
            "lib/x86_64-linux-gnu",
        ]
        .iter()
        .map(|dir| root.join(dir).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
        Ok(Install {
            binary,
            modules,
            library_path,
        })
    }

    /// Starts syslog-ng in `dir`, records `n` events into it, then drains them to the sink.
    pub(super) fn round(
        &self,
        runtime: &tokio::runtime::Runtime,
        dir: &Path,
        n: usize,
    ) -> anyhow::Result<Round> {
        let running = Running::start(self, dir)?;
        let pid = running.child.id();
        let cpu_before = cpu_seconds(pid);

        let started = Instant::now();
        let sent = runtime.block_on(send_lines(&running.input, n))?;
        running.wait_until_queued(sent)?;
        let ingest = started.elapsed().as_secs_f64();
        let cpu_recorded = cpu_seconds(pid);
        let bytes_at_rest = dir_size(&dir.join("buffer"));
        eprintln!(
            "  {:<24} {:>9.0} events/s  ({sent} events in {ingest:.2} s)",
            "peer, syslog-ng ingest",
            sent as f64 / ingest
        );

        let counts = Arc::new(sink::Counts::default());
        let server = sink::serve(
            runtime,
            sink::bind(runtime, running.sink)?,
            Arc::clone(&counts),
        );
        let drained = runtime.block_on(counts.wait_for(sent as u64, PHASE_LIMIT));
        server.abort();
        let drain = drained?.as_secs_f64();
        let cpu_drained = cpu_seconds(pid);
        eprintln!(
            "  {:<24} {:>9.0} events/s  ({sent} events in {drain:.2} s)",
            "peer, syslog-ng drain",
            sent as f64 / drain
        );
        let round = Round {
            ingest_eps: sent as f64 / ingest,
            drain_eps: sent as f64 / drain,
            peak_rss_mib: peak_rss_mib(pid).unwrap_or(f64::NAN),
            bytes_per_event: bytes_at_rest as f64 / sent as f64,
            ingest_cpu_us: (cpu_recorded - cpu_before) * 1e6 / sent as f64,
            drain_cpu_us: (cpu_drained - cpu_recorded) * 1e6 / sent as f64,
        };
        running.stop()?;
        Ok(round)
    }
}

/// A syslog-ng process of one round, and where to reach it.
struct Running {
    child: Child,
    log: PathBuf,
    input: PathBuf,
    control: PathBuf,
    /// Where its destination delivers (nobody listens there until the drain).
    sink: std::net::SocketAddr,
}

impl Running {
    fn start(install: &Install, dir: &Path) -> anyhow::Result<Running> {
        let buffer = dir.join("buffer");
        std::fs::create_dir_all(&buffer)
            .with_context(|| format!("creating {}", buffer.display()))?;
        let input = dir.join("input.sock");
        let control = dir.join("syslog-ng.ctl");
        let sink = free_port()?;
        let config = dir.join("syslog-ng.conf");
        std::fs::write(&config, config_text(&input, &buffer, sink))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("syslog-ng.log");
        let stderr = std::fs::File::create(&log).context("creating syslog-ng's log")?;
        let child = Command::new(&install.binary)
            .arg("--foreground")
            .arg("--stderr")
            .arg(format!("--module-path={}", install.modules.display()))
            .arg(format!("--cfgfile={}", config.display()))
            .arg(format!("--persist-file={}", dir.join("persist").display()))
            .arg(format!("--control={}", control.display()))
            .arg(format!("--pidfile={}", dir.join("pid").display()))
            .env("LD_LIBRARY_PATH", &install.library_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", install.binary.display()))?;
        let mut running = Running {
            child,
            log,
            input,
            control,
            sink,
        };
        let (input, control) = (running.input.clone(), running.control.clone());
        wait_until(&mut running.child, &running.log, "syslog-ng", || {
            UnixStream::connect(&input).is_ok() && UnixStream::connect(&control).is_ok()
        })?;
        Ok(running)
    }

    /// Polls the control socket until the destination's queue holds `n` events.
    fn wait_until_queued(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let queued = self.queued()?;
            if queued >= n as u64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("syslog-ng queued {queued} of {n} events in {PHASE_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The destination's `queued` counter, from `STATS` on the control socket (CSV lines,
    /// ended by a line holding a dot).
    fn queued(&self) -> anyhow::Result<u64> {
        let mut control = UnixStream::connect(&self.control).context("syslog-ng's control")?;
        control.write_all(b"STATS\n")?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while !answer.ends_with(b"\n.\n") {
            let read = control.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..read]);
        }
        let text = String::from_utf8_lossy(&answer);
        let queued = text
            .lines()
            .map(|line| line.split(';').collect::<Vec<_>>())
            .find(|fields| fields.len() == 6 && fields[0] == "dst.http" && fields[4] == "queued")
            .and_then(|fields| fields[5].parse().ok());
        queued.with_context(|| format!("no queued counter in syslog-ng's stats: {text}"))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.child, &self.log, "syslog-ng")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Reached with the process running only on an error path.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration: lines taken whole (no syslog parsing), a reliable disk buffer,
/// batches of 500 lines joined into a JSON array, one attempt a second while the sink is
/// down.
fn config_text(input: &Path, buffer: &Path, sink: std::net::SocketAddr) -> String {
    format!(
        r#"@version: 3.38
options {{ stats-level(1); }};
source s_peer {{
  unix-stream("{input}" flags(no-parse) max-connections(16) log-iw-size(40000));
}};
destination d_sink {{
  http(
    url("http://{sink}/syslog") method("POST")
    batch-lines({BATCH}) batch-bytes(4MiB) batch-timeout(100)
    body-prefix("[") delimiter(",") body-suffix("]") body("${{MESSAGE}}")
    time-reopen(1)
    disk-buffer(reliable(yes) dir("{buffer}") disk-buf-size(2GiB) mem-buf-size(16MiB))
  );
}};
log {{ source(s_peer); destination(d_sink); }};
"#,
        input = input.display(),
        buffer = buffer.display(),
    )
}

/// 4 clients write chunks of 500 lines until `n` events are sent; the events sent.
async fn send_lines(input: &Path, n: usize) -> anyhow::Result<usize> {
    let writes = n.div_ceil(CHUNK);
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::with_capacity(CLIENTS);
    for client_index in 0..CLIENTS {
        let input = input.to_path_buf();
        let next = Arc::clone(&next);
        clients.push(tokio::spawn(async move {
            let mut stream = tokio::net::UnixStream::connect(&input)
                .await
                .context("connecting to syslog-ng's source")?;
            let mut generator = Generator::new(client_index as u64);
            let mut sent = 0;
            while next.fetch_add(1, Ordering::Relaxed) < writes {
                let lines = generator.json_lines(CHUNK);
                stream
                    .write_all(lines.as_bytes())
                    .await
                    .context("writing to syslog-ng")?;
                sent += CHUNK;
            }
            stream.shutdown().await.context("closing the connection")?;
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0;
    for client in clients {
        sent += client.await.context("a client task panicked")??;
    }
    Ok(sent)
}

/// The bytes of every file in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}
