//! The peer phase: the work a log shipper does, for a side-by-side with one. 4 clients
//! record chunks of 500 into a fresh shipper over a Unix socket, then the shipper drains
//! its backlog in batches of 500 to a counting sink in this process, which parses each
//! batch, counts its events and stores nothing.
//!
//! The agent is always measured (`agent.rs`: every answer after an fsync'd commit, signed
//! and gzipped batches). With `--syslog-ng ROOT`, syslog-ng is measured beside it
//! (`syslog_ng.rs`: a reliable disk buffer and its HTTP destination), round after round
//! in turn, and the table prints both and their ratio; the JSON line keeps the agent's two
//! figures. `sink.rs` is the sink both ship to.

mod agent;
mod sink;
mod syslog_ng;

use std::path::{Path, PathBuf};

use crate::Options;

/// Clients, events per request (lines per write for syslog-ng), and events per batch
/// shipped.
const CLIENTS: usize = 4;
const CHUNK: usize = 500;
const BATCH: usize = 500;

/// Rounds of each shipper when syslog-ng is beside the agent; figures are their medians.
const ROUNDS_SIDE_BY_SIDE: usize = 3;

/// What one round of one shipper measured (or each figure's median over rounds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    pub(crate) ingest_eps: f64,
    pub(crate) drain_eps: f64,
    /// The shipper's peak resident set over the round.
    pub(crate) peak_rss_mib: f64,
    /// The shipper's files once every event is in, divided by the events.
    pub(crate) bytes_per_event: f64,
    /// The shipper's own CPU time (user + system) per event, while recording and while
    /// draining.
    pub(crate) ingest_cpu_us: f64,
    pub(crate) drain_cpu_us: f64,
}

/// What the phase measured: the agent, and syslog-ng when it ran beside it.
pub(crate) struct PeerFigures {
    pub(crate) agent: Round,
    pub(crate) syslog_ng: Option<Round>,
}

/// Records `n` events, then drains them, with the agent (and syslog-ng beside it when
/// `options.syslog_ng` names one).
pub(crate) fn peer_phase(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    options: &Options,
    n: usize,
) -> anyhow::Result<PeerFigures> {
    let Some(syslog_ng) = &options.syslog_ng else {
        return Ok(PeerFigures {
            agent: agent::round(runtime, &root.join("peer"), options, n)?,
            syslog_ng: None,
        });
    };
    let syslog_ng = syslog_ng::Install::at(syslog_ng)?;
    let mut agent_rounds = Vec::new();
    let mut peer_rounds = Vec::new();
    for index in 0..ROUNDS_SIDE_BY_SIDE {
        let dir = |who: &str| -> PathBuf { root.join(format!("peer-{who}-{index}")) };
        agent_rounds.push(agent::round(runtime, &dir("agent"), options, n)?);
        peer_rounds.push(syslog_ng.round(runtime, &dir("syslog-ng"), n)?);
    }
    let agent = median(&agent_rounds);
    let peer = median(&peer_rounds);
    print_side_by_side(&agent, &peer, n);
    Ok(PeerFigures {
        agent,
        syslog_ng: Some(peer),
    })
}

/// Each figure's median over the rounds (taken figure by figure).
fn median(rounds: &[Round]) -> Round {
    let of = |figure: fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(figure).collect();
        values.sort_unstable_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Round {
        ingest_eps: of(|r| r.ingest_eps),
        drain_eps: of(|r| r.drain_eps),
        peak_rss_mib: of(|r| r.peak_rss_mib),
        bytes_per_event: of(|r| r.bytes_per_event),
        ingest_cpu_us: of(|r| r.ingest_cpu_us),
        drain_cpu_us: of(|r| r.drain_cpu_us),
    }
}

/// A figure of the side-by-side table: its name, how it is read from a round, decimals.
type Row = (&'static str, fn(&Round) -> f64, usize);

fn print_side_by_side(agent: &Round, peer: &Round, n: usize) {
    eprintln!(
        "  peer side by side, medians of {ROUNDS_SIDE_BY_SIDE} rounds of {n} events each \
         (agent / syslog-ng = ratio):"
    );
    let rows: [Row; 6] = [
        ("ingest, events/s", |r| r.ingest_eps, 0),
        ("drain, events/s", |r| r.drain_eps, 0),
        ("peak RSS, MiB", |r| r.peak_rss_mib, 1),
        ("bytes per event at rest", |r| r.bytes_per_event, 0),
        ("CPU µs per event, ingest", |r| r.ingest_cpu_us, 2),
        ("CPU µs per event, drain", |r| r.drain_cpu_us, 2),
    ];
    for (name, figure, decimals) in rows {
        let (ours, theirs) = (figure(agent), figure(peer));
        eprintln!(
            "    {name:<26} {ours:>12.decimals$} {theirs:>12.decimals$}   ×{:.2}",
            ours / theirs
        );
    }
}
