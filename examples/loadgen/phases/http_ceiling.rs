//! The HTTP ceiling phase: the c32 phase against this binary re-executed as `__http_ceiling`,
//! the agent's server and request reading answering without storing anything, so the
//! single-event figures can be read against what HTTP alone costs on this machine.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::phases::ingest::{Phase, PhaseResult, run_phase};
use crate::roles::{HTTP_CEILING_ROLE, spawn_self, wait_until};

/// Runs `n` single-event POSTs at 32 clients against the HTTP-only ceiling, which is
/// started in `root/http` and killed afterwards.
pub(crate) fn http_ceiling_phase(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    n: usize,
    cap: Duration,
) -> anyhow::Result<PhaseResult> {
    let dir = root.join("http");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("ceiling.sock");
    let log = dir.join("ceiling.log");
    let mut child = spawn_self(
        &[HTTP_CEILING_ROLE, &socket.display().to_string()],
        &log,
        &[],
    )?;
    let ready = wait_until(&mut child, &log, "the HTTP ceiling socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let result =
        ready.and_then(|()| runtime.block_on(run_phase(&socket, Phase::single(32, n, cap))));
    let _ = child.kill();
    let _ = child.wait();
    let result = result?;
    eprintln!(
        "  http      {:>3} clients {}  (HTTP only, nothing stored)",
        32,
        result.summary()
    );
    Ok(result)
}
