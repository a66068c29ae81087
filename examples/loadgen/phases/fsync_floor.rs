//! The physical floor of an acknowledged write on the benchmark's disk: one small overwrite
//! plus `fdatasync`, timed without SQLite or HTTP.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

/// Times `fdatasync` after overwriting one 4 KiB block of a preallocated file in `dir`
/// (what a WAL commit costs at least); p50 and p99 in milliseconds.
pub(crate) fn fsync_floor(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .context("creating the fsync probe")?;
    file.write_all_at(&vec![0u8; 256 * 1024], 0)
        .context("writing the fsync probe")?;
    file.sync_all().context("syncing the fsync probe")?;
    let block = [1u8; 4096];
    let mut times: Vec<f64> = (0..200u64)
        .map(|i| {
            file.write_all_at(&block, (i % 64) * 4096)?;
            let started = Instant::now();
            file.sync_data()?;
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<std::io::Result<_>>()
        .context("timing fdatasync")?;
    drop(file);
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}
