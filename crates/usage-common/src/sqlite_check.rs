//! How both servers tell a damaged SQLite database from a sound one: the
//! `quick_check` each runs at start, the full `integrity_check` of `usage-agent check`,
//! and which SQLite errors mean damage rather than a passing condition.
//!
//! A leaf: `rusqlite` and nothing of the agent or the receiver. What to do about damage
//! (the agent salvages, the receiver refuses to start) is each server's own.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// Most problem lines a check keeps: one bad page can produce thousands, and the first
/// few say enough to an operator.
pub const MAX_PROBLEMS: usize = 20;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Sound,
    /// The first problems SQLite named (at most `MAX_PROBLEMS`).
    Damaged(Vec<String>),
}

/// How thorough a check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// `PRAGMA quick_check`: every page and record, without matching indexes to tables;
    /// linear in the file's size, cheap enough for every start.
    Quick,
    /// `PRAGMA integrity_check`: also every index against its table.
    Full,
}

/// Checks the database at `path` on a connection of its own, so pages come from the file
/// and not from another connection's cache. A missing file is sound (nothing to check).
/// `Err` only for failures that are not damage (permissions, a lock held too long).
pub fn check_file(path: &Path, depth: Depth) -> rusqlite::Result<Verdict> {
    if !path.exists() {
        return Ok(Verdict::Sound);
    }
    let conn = match open_read_only(path) {
        Ok(conn) => conn,
        Err(error) if is_damage(&error) => return Ok(Verdict::Damaged(vec![error.to_string()])),
        Err(error) => return Err(error),
    };
    check(&conn, depth)
}

/// Opens a database that must not change: read only, so not even the checkpoint SQLite
/// runs when a last connection closes can write to it (a damaged file is evidence), and
/// without CREATE, so no file is made. The WAL is still read (through the `-shm`).
pub fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// A server's refusal to open a database a `quick_check` found damaged.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database {path} is damaged ({}); restore it from a backup or repair it: it is never rebuilt silently",
    .problems.join("; ")
)]
pub struct Damaged {
    pub path: std::path::PathBuf,
    pub problems: Vec<String>,
}

/// The receiver's start: a `quick_check`, and an error naming the file if the
/// database is damaged or cannot be checked.
pub fn refuse_if_damaged(path: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match check_file(path, Depth::Quick)? {
        Verdict::Sound => Ok(()),
        Verdict::Damaged(problems) => Err(Box::new(Damaged {
            path: path.to_path_buf(),
            problems,
        })),
    }
}

/// Runs the check on an open connection; damage that stops the check itself (a page 1
/// that is not a database, an unreadable schema) is a `Damaged` verdict too.
pub fn check(conn: &Connection, depth: Depth) -> rusqlite::Result<Verdict> {
    let pragma = match depth {
        Depth::Quick => "PRAGMA quick_check",
        Depth::Full => "PRAGMA integrity_check",
    };
    let lines = conn.prepare(pragma).and_then(|mut stmt| {
        stmt.query_map([], |row| row.get::<_, String>(0))?
            .take(MAX_PROBLEMS)
            .collect::<rusqlite::Result<Vec<String>>>()
    });
    match lines {
        Ok(lines) if lines == ["ok"] => Ok(Verdict::Sound),
        Ok(lines) => Ok(Verdict::Damaged(lines)),
        Err(error) if is_damage(&error) => Ok(Verdict::Damaged(vec![error.to_string()])),
        Err(error) => Err(error),
    }
}

/// Whether a SQLite error means the file is damaged or cannot be read back: a corrupt
/// page, a file that is not a database, an I/O error. A full disk is not damage: it
/// passes once space is freed, and nothing on disk is wrong.
pub fn is_damage(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::SystemIoFailure)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_new_database_is_sound_and_garbage_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        assert_eq!(check_file(&path, Depth::Quick).unwrap(), Verdict::Sound);
        assert!(!path.exists(), "a check never creates the file");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(conn);
        assert_eq!(check_file(&path, Depth::Full).unwrap(), Verdict::Sound);
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let Verdict::Damaged(problems) = check_file(&path, Depth::Quick).unwrap() else {
            panic!("garbage passed the check");
        };
        assert!(problems[0].contains("not a database"), "{problems:?}");
    }
}
