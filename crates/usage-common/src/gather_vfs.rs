//! A SQLite VFS that gathers the WAL frames of one commit into a single write.
//!
//! SQLite writes each WAL frame with two `pwrite`s (its 24-byte header, then the page), so
//! a commit of a dozen single events, which dirties some 35 pages, made about 75 system
//! calls before its one `fdatasync`, as costly as the sync itself (BENCHMARKS.md). This
//! VFS wraps the platform's default one and changes one thing: writes to a WAL file that
//! follow each other are held in a buffer and reach the file as one `pwrite` when SQLite
//! syncs, reads, truncates, sizes or closes it, or when the buffer is full. Every other
//! call, and every other file, goes straight through.
//!
//! [`with_wal_sync_deferred`] lets a commit whose loss a crash may cost (one that only
//! repeats what is durable elsewhere) skip the WAL's sync: its frames are written before
//! it is published, as always, and reach the disk with the next commit's sync, which
//! covers the whole file. SQLite's own `synchronous = NORMAL` makes the same trade for
//! every commit of a connection; this makes it for chosen ones.
//!
//! Why this is safe only with `synchronous = FULL`: then every commit syncs the WAL before
//! SQLite publishes the commit in the wal-index, so no other connection can be told of a
//! frame that is still in the buffer. With `NORMAL` a commit is published without a sync,
//! so the agent's `Store::open` uses the default VFS for it. Durability is unchanged: the
//! frames are written before the sync that acknowledges them, exactly as before, and a
//! failed write fails that sync, hence the commit.

use std::cell::Cell;
use std::ffi::{CStr, c_int, c_void};
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::OnceLock;

use rusqlite::{Connection, OpenFlags, ffi};

/// The name connections open this VFS by.
const NAME: &str = "usage-agent-gather";
const NAME_C: &CStr = c"usage-agent-gather";

/// Most bytes held before they are written anyway: a commit of a dozen single events needs
/// about 30 KiB; larger transactions (a drain's bookkeeping, a purge) write in steps of
/// this. It must stay under 128 KiB, the most the unix VFS writes in one call (it masks
/// the length to 17 bits).
const GATHER_LIMIT: usize = 64 * 1024;

/// Opens `path` through this VFS, or through the default one should SQLite refuse to
/// register it. Only for connections that then set `synchronous = FULL`.
pub fn open_for_full_sync(path: &Path) -> rusqlite::Result<Connection> {
    if register() {
        Connection::open_with_flags_and_vfs(path, OpenFlags::default(), NAME)
    } else {
        Connection::open(path)
    }
}

thread_local! {
    /// Set by [`with_wal_sync_deferred`] while its work runs on this thread, until a WAL
    /// sync is deferred.
    static WAL_SYNC_DEFERRED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` (a commit on a connection of this VFS, on this thread) with its sync of the
/// WAL deferred: the frames are still written before the commit is published, but not
/// synced; the next sync of the WAL, which any later commit makes, covers them.
///
/// Only for a commit that a crash of the machine may undo without harm. In WAL mode that
/// never breaks the database (SQLite makes the same trade under `synchronous = NORMAL`):
/// frames past the last sync are either whole and checksummed, or dropped with everything
/// after them, and every other commit syncs. Only the first sync of a WAL in `work` is
/// deferred, the commit's own: a checkpoint the commit then runs must sync the WAL before
/// it copies frames into the database, or a crash could leave the database newer than
/// the WAL that recovery replays over it.
pub fn with_wal_sync_deferred<R>(work: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WAL_SYNC_DEFERRED.set(self.0);
        }
    }
    let _restore = Restore(WAL_SYNC_DEFERRED.replace(true));
    work()
}

#[cfg(test)]
thread_local! {
    /// Tests only: WAL syncs deferred on this thread.
    static DEFERRED_SYNCS: Cell<usize> = const { Cell::new(0) };
}

/// Registers the VFS once per process (not as the default); `false` if SQLite refused.
fn register() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| unsafe { register_once() })
}

/// The wrapped VFS, set once by [`register`].
static INNER: OnceLock<usize> = OnceLock::new();

fn inner_vfs() -> *mut ffi::sqlite3_vfs {
    *INNER
        .get()
        .expect("the gather VFS is used only after it is registered") as *mut _
}

unsafe fn register_once() -> bool {
    unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return false;
        }
        let inner = ffi::sqlite3_vfs_find(std::ptr::null());
        if inner.is_null() {
            return false;
        }
        let _ = INNER.set(inner as usize);
        // A copy of the default VFS (its other methods see the same `pAppData` as before),
        // with room for our header before its file object and our own `xOpen`.
        let mut vfs = *inner;
        vfs.szOsFile = (INNER_FILE_OFFSET as c_int) + (*inner).szOsFile;
        vfs.zName = NAME_C.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(open);
        let vfs = Box::leak(Box::new(vfs));
        ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK
    }
}

/// Writes held back for one WAL file: `bytes` belong at `start`.
#[derive(Default)]
struct Gathered {
    start: i64,
    bytes: Vec<u8>,
}

/// What SQLite allocates for each open file: our header, then the wrapped VFS's file.
#[repr(C)]
struct GatherFile {
    /// Must come first: SQLite reads `pMethods` from here.
    base: ffi::sqlite3_file,
    /// `Some` for WAL files only.
    gathered: Option<Box<Gathered>>,
}

/// Where the wrapped VFS's file object starts, aligned as SQLite aligns allocations.
const INNER_FILE_OFFSET: usize = size_of::<GatherFile>().next_multiple_of(8);
const _: () = assert!(offset_of!(GatherFile, base) == 0);

unsafe fn header<'a>(file: *mut ffi::sqlite3_file) -> &'a mut GatherFile {
    unsafe { &mut *(file as *mut GatherFile) }
}

unsafe fn inner_file(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (file as *mut u8).add(INNER_FILE_OFFSET) as *mut ffi::sqlite3_file }
}

unsafe fn inner_methods<'a>(file: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    unsafe { &*(*inner_file(file)).pMethods }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let inner = inner_vfs();
        std::ptr::write(
            file as *mut GatherFile,
            GatherFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                gathered: None,
            },
        );
        let rc = (*inner).xOpen.expect("the default VFS opens files")(
            inner,
            name,
            inner_file(file),
            flags,
            out_flags,
        );
        let inner_methods = (*inner_file(file)).pMethods;
        if inner_methods.is_null() {
            // SQLite calls no method (not even xClose) on a file whose pMethods is null.
            return rc;
        }
        // From here SQLite calls xClose even if the open failed, as the wrapped VFS expects.
        let file_header = header(file);
        if flags & ffi::SQLITE_OPEN_WAL != 0 {
            file_header.gathered = Some(Box::default());
        }
        file_header.base.pMethods = match (*inner_methods).iVersion {
            1 => &METHODS_V1,
            2 => &METHODS_V2,
            _ => &METHODS_V3,
        };
        rc
    }
}

/// Writes out what is held, as one write; the buffer is empty afterwards either way.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let Some(gathered) = header(file).gathered.as_deref_mut() else {
            return ffi::SQLITE_OK;
        };
        if gathered.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let rc = inner_methods(file).xWrite.expect("files write")(
            inner_file(file),
            gathered.bytes.as_ptr() as *const c_void,
            gathered.bytes.len() as c_int,
            gathered.start,
        );
        gathered.bytes.clear();
        rc
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    unsafe {
        if let Some(gathered) = header(file).gathered.as_deref_mut() {
            let incoming = std::slice::from_raw_parts(data as *const u8, amount as usize);
            let held_end = gathered.start + gathered.bytes.len() as i64;
            if gathered.bytes.is_empty() && incoming.len() <= GATHER_LIMIT {
                gathered.start = offset;
                gathered.bytes.extend_from_slice(incoming);
                return ffi::SQLITE_OK;
            }
            if offset == held_end && gathered.bytes.len() + incoming.len() <= GATHER_LIMIT {
                gathered.bytes.extend_from_slice(incoming);
                return ffi::SQLITE_OK;
            }
            if offset >= gathered.start && offset + incoming.len() as i64 <= held_end {
                // SQLite rewrote a frame of this transaction (new checksums or page).
                let at = (offset - gathered.start) as usize;
                gathered.bytes[at..at + incoming.len()].copy_from_slice(incoming);
                return ffi::SQLITE_OK;
            }
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            if incoming.len() <= GATHER_LIMIT {
                let gathered = header(file).gathered.as_deref_mut().expect("a WAL file");
                gathered.start = offset;
                gathered.bytes.extend_from_slice(incoming);
                return ffi::SQLITE_OK;
            }
        }
        inner_methods(file).xWrite.expect("files write")(inner_file(file), data, amount, offset)
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let flushed = flush(file);
        let closed = inner_methods(file).xClose.expect("files close")(inner_file(file));
        drop(header(file).gathered.take());
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

/// Defines a method that writes out what is held, then calls the wrapped file's method.
macro_rules! flush_then_forward {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            unsafe {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                inner_methods(file).$method.expect(stringify!($method))(inner_file(file), $($arg),*)
            }
        }
    };
}

/// Defines a method that only calls the wrapped file's method.
macro_rules! forward {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> $ret {
            unsafe {
                inner_methods(file).$method.expect(stringify!($method))(inner_file(file), $($arg),*)
            }
        }
    };
}

flush_then_forward!(read, xRead, (data: *mut c_void, amount: c_int, offset: i64));
flush_then_forward!(truncate, xTruncate, (size: i64));

/// Writes out what is held, then syncs, unless this is a WAL file whose sync is deferred.
unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if header(file).gathered.is_some() && WAL_SYNC_DEFERRED.replace(false) {
            #[cfg(test)]
            DEFERRED_SYNCS.set(DEFERRED_SYNCS.get() + 1);
            return ffi::SQLITE_OK;
        }
        inner_methods(file).xSync.expect("xSync")(inner_file(file), flags)
    }
}

flush_then_forward!(file_size, xFileSize, (size: *mut i64));
flush_then_forward!(file_control, xFileControl, (op: c_int, arg: *mut c_void));
flush_then_forward!(fetch, xFetch, (offset: i64, amount: c_int, out: *mut *mut c_void));
forward!(lock, xLock, (level: c_int) -> c_int);
forward!(unlock, xUnlock, (level: c_int) -> c_int);
forward!(check_reserved_lock, xCheckReservedLock, (out: *mut c_int) -> c_int);
forward!(sector_size, xSectorSize, () -> c_int);
forward!(device_characteristics, xDeviceCharacteristics, () -> c_int);
forward!(shm_map, xShmMap, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int);
forward!(shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int) -> c_int);
forward!(shm_barrier, xShmBarrier, () -> ());
forward!(shm_unmap, xShmUnmap, (delete: c_int) -> c_int);
forward!(unfetch, xUnfetch, (offset: i64, page: *mut c_void) -> c_int);

/// The method table for a wrapped file whose own table has `version`: SQLite decides from
/// the version which methods exist (WAL needs 2, memory-mapped reads 3).
const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(close),
        xRead: Some(read),
        xWrite: Some(write),
        xTruncate: Some(truncate),
        xSync: Some(sync),
        xFileSize: Some(file_size),
        xLock: Some(lock),
        xUnlock: Some(unlock),
        xCheckReservedLock: Some(check_reserved_lock),
        xFileControl: Some(file_control),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: if version >= 2 { Some(shm_map) } else { None },
        xShmLock: if version >= 2 { Some(shm_lock) } else { None },
        xShmBarrier: if version >= 2 {
            Some(shm_barrier)
        } else {
            None
        },
        xShmUnmap: if version >= 2 { Some(shm_unmap) } else { None },
        xFetch: if version >= 3 { Some(fetch) } else { None },
        xUnfetch: if version >= 3 { Some(unfetch) } else { None },
    }
}

static METHODS_V1: ffi::sqlite3_io_methods = methods(1);
static METHODS_V2: ffi::sqlite3_io_methods = methods(2);
static METHODS_V3: ffi::sqlite3_io_methods = methods(3);

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::*;

    /// A connection through this VFS, set up as the stores set theirs up.
    fn gathering(path: &std::path::Path, cache_pages: i64) -> Connection {
        assert!(register());
        let conn = open_for_full_sync(path).unwrap();
        conn.pragma_update(None, "page_size", 1024).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.pragma_update(None, "cache_size", cache_pages).unwrap();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS t (id BLOB NOT NULL UNIQUE, body TEXT NOT NULL)",
        )
        .unwrap();
        conn
    }

    fn insert(conn: &mut Connection, rows: usize) {
        let tx = conn.transaction().unwrap();
        for _ in 0..rows {
            tx.execute(
                "INSERT INTO t (id, body) VALUES (?1, ?2)",
                params![uuid::Uuid::new_v4().as_bytes(), "x".repeat(100)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// What a connection through the default VFS finds: row count and integrity.
    fn seen_by_default_vfs(path: &std::path::Path) -> (i64, String) {
        let plain = Connection::open(path).unwrap();
        let rows = plain
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let integrity = plain
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        (rows, integrity)
    }

    #[test]
    fn each_commit_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut conn = gathering(&path, -1024);
        for commit in 1..=50 {
            insert(&mut conn, 12);
            assert_eq!(seen_by_default_vfs(&path), (commit * 12, "ok".into()));
        }
    }

    #[test]
    fn a_commit_with_its_sync_deferred_is_in_the_file_and_the_next_one_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut conn = gathering(&path, -1024);
        insert(&mut conn, 12);
        let before = DEFERRED_SYNCS.get();
        with_wal_sync_deferred(|| insert(&mut conn, 12));
        assert!(
            DEFERRED_SYNCS.get() > before,
            "the WAL's sync was not deferred"
        );
        // Published only once written: another connection sees the deferred commit.
        assert_eq!(seen_by_default_vfs(&path), (24, "ok".into()));
        let deferred = DEFERRED_SYNCS.get();
        insert(&mut conn, 12);
        assert_eq!(
            DEFERRED_SYNCS.get(),
            deferred,
            "a later commit skipped its sync"
        );
        assert_eq!(seen_by_default_vfs(&path), (36, "ok".into()));
    }

    #[test]
    fn a_checkpoint_after_a_deferred_commit_syncs_the_wal_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut conn = gathering(&path, -1024);
        let before = DEFERRED_SYNCS.get();
        with_wal_sync_deferred(|| {
            insert(&mut conn, 12);
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .unwrap();
        });
        assert_eq!(
            DEFERRED_SYNCS.get(),
            before + 1,
            "only the commit's sync is deferred"
        );
        assert_eq!(seen_by_default_vfs(&path), (12, "ok".into()));
    }

    #[test]
    fn a_transaction_larger_than_one_write_is_stored_whole() {
        // Thousands of frames: many times the gathering limit, and above the 128 KiB the
        // unix VFS writes at most in one call.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut conn = gathering(&path, -1024);
        insert(&mut conn, 5_000);
        drop(conn);
        assert_eq!(seen_by_default_vfs(&path), (5_000, "ok".into()));
    }

    #[test]
    fn a_transaction_that_spills_its_cache_reads_its_own_frames_back() {
        // A 20-page cache makes SQLite write pages to the WAL mid-transaction, then read
        // and rewrite them: reads and rewrites of frames still being gathered.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let mut conn = gathering(&path, 20);
        for _ in 0..5 {
            insert(&mut conn, 2_000);
        }
        let (rows, integrity): (i64, String) = (
            conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap(),
            conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap(),
        );
        assert_eq!((rows, integrity.as_str()), (10_000, "ok"));
        drop(conn);
        assert_eq!(seen_by_default_vfs(&path), (10_000, "ok".into()));
    }
}
